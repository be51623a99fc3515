#include "tests/support/proxy_helpers.hpp"

#include "runtime/crypto/hex.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <optional>

namespace hsm::test {

std::string softhsm_module() {
  if (const char* m = std::getenv("SOFTHSM2_MODULE"))
    return m;
  return "/usr/lib/softhsm/libsofthsm2.so";
}

std::filesystem::path write_softhsm_conf(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir / "tokens");
  auto conf = dir / "softhsm2.conf";
  std::ofstream{conf} << "directories.tokendir = " << (dir / "tokens").string()
                      << "\nobjectstore.backend = file\nlog.level = ERROR\n"
                      << "slots.removable = false\n";
  return conf;
}

nlohmann::json await_done(net::reference_proxy& proxy, const std::string& id,
                          std::chrono::milliseconds timeout) {
  std::optional<nlohmann::json> st;
  auto done = wait_until(
    [&] {
      st = proxy.request_state(id);
      return st && (*st)["state"] == "done";
    },
    timeout, "request " + id + " to be done", std::chrono::milliseconds{10});
  if (done)
    return *st;
  ADD_FAILURE() << done.message()
                << "; its state: " << (st ? st->dump() : "unknown");
  return nlohmann::json{{"ok", false}};
}

std::vector<std::string> run_args(uint16_t proxy_port, const net::dev_pki& pki,
                                  const std::vector<std::string>& extra) {
  std::vector<std::string> args{"run",
                                "--proxy-addr",
                                "127.0.0.1:" + std::to_string(proxy_port),
                                "--ca-cert",
                                pki.root_cert.string(),
                                "--client-cert",
                                pki.driver_chain.string(),
                                "--client-key",
                                pki.driver_key.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::vector<uint8_t> unhex(const nlohmann::json& j) {
  if (!j.is_string())
    return {};
  auto v = crypto::from_hex(j.get<std::string>());
  return v ? *v : std::vector<uint8_t>{};
}

} // namespace hsm::test
