// `hsm-driver dev`: the whole system on one machine (a SoftHSMv2 token, a
// local PKI, SQLite, the reference proxy and the daemon) under one data
// folder, then a demo through the proxy; serves until a stop signal.

#include "runtime/app/commands.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/local_token.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"

#include <openssl/sha.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>

namespace hsm {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

/// Waits until the reference proxy reports `id` done; nullopt on timeout.
std::optional<nlohmann::json> await_done(net::reference_proxy& proxy,
                                         const std::string& id) {
  for (int i = 0; i < 600; ++i) {
    auto st = proxy.request_state(id);
    if (st && (*st)["state"] == "done")
      return st;
    std::this_thread::sleep_for(std::chrono::milliseconds{20});
  }
  return std::nullopt;
}

/// The demo for one scheme, through the proxy: a key, a signature, a check
/// of the signature on the host.
json demo_scheme(net::reference_proxy& proxy, scheme s) {
  auto name = std::string{to_string(s)};
  auto key_id = "dev-" + name;
  auto gen = await_done(proxy,
                        proxy.enqueue("generate_key",
                                      {{"key_id", key_id}, {"scheme", name}}));
  if (!gen || !(*gen)["ok"].get<bool>())
    return json{{"scheme", name},
                {"served", false},
                {"error", gen ? json((*gen)["error"]) : json{"timeout"}}};
  auto pub = crypto::from_hex(
    (*gen)["result"]["public_key"].get<std::string>());
  std::string msg = "hello from hsm-driver dev";
  std::vector<uint8_t> payload{msg.begin(), msg.end()};
  if (is_ecdsa(s)) {
    payload.resize(32);
    SHA256(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
           payload.data());
  }
  auto sig = await_done(
    proxy, proxy.enqueue("sign", {{"key_id", key_id},
                                  {"payload", crypto::to_hex(payload)}}));
  bool verified = false;
  json entry{{"scheme", name},
             {"key_id", key_id},
             {"public_key", json((*gen)["result"]["public_key"])}};
  if (sig && (*sig)["ok"].get<bool>() && pub) {
    auto raw = crypto::from_hex(
      (*sig)["result"]["signature"].get<std::string>());
    verified = raw && crypto::verify(s, *pub, payload, *raw);
    entry["signature"] = json((*sig)["result"]["signature"]);
    if ((*sig)["result"].contains("recovery_id"))
      entry["recovery_id"] = json((*sig)["result"]["recovery_id"]);
  } else if (sig) {
    entry["error"] = json((*sig)["error"]);
  }
  entry["verified"] = verified;
  return entry;
}

} // namespace

int cmd_dev(driver_config cfg, run_flags flags, const std::string& data_dir,
            bool resident_given) {
  fs::path dir = data_dir.empty() ? fs::path{default_dev_data_dir}
                                  : fs::path{data_dir};
  dir = fs::absolute(dir);
  // Its PINs, keys and admin token are for this user only: the folder is
  // 0700 whatever the umask, also when it existed already.
  std::error_code ec;
  fs::create_directories(dir, ec);
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace, ec);
  if (ec)
    return fail(
      caf::make_error(config_errc::bad_file, dir.string(),
                      "cannot make it a 0700 folder: " + ec.message()));
  cfg.sqlite_path = dir / "keys.db";
  if (!resident_given)
    cfg.resident_schemes = {scheme::ed25519};
  {
    // The module is finalised again at the end of this block: the daemon
    // loads it itself.
    auto token = prepare_local_token(cfg, cfg.pkcs11_module, dir);
    if (!token)
      return fail(token.error());
  }
  ::unsetenv("USER_PIN");
  ::setenv("USER_PIN_FILE", (dir / "user.pin").c_str(), 1);
  auto pki = net::make_dev_pki(dir / "pki");
  if (!pki)
    return fail(pki.error());
  net::reference_proxy_config pc;
  pc.server_cert = pki->server_chain;
  pc.server_key = pki->server_key;
  pc.client_ca = pki->root_cert;
  auto token_file = dir / "admin-token";
  auto token = net::load_or_create_admin_token(token_file);
  if (!token)
    return fail(token.error());
  pc.admin_token = std::move(*token);
  auto proxy = net::reference_proxy::start(pc);
  if (!proxy)
    return fail(proxy.error());
  flags.proxy_addr = "127.0.0.1:" + std::to_string((*proxy)->port());
  flags.ca_cert = pki->root_cert.string();
  flags.client_cert = pki->driver_chain.string();
  flags.client_key = pki->driver_key.string();
  if (flags.driver_id.empty())
    flags.driver_id = std::string{dev_driver_id};
  if (flags.poll_wait_ms == default_poll_wait_ms)
    flags.poll_wait_ms = dev_poll_wait_ms;
  if (flags.metrics_listen.empty() && !process_env()("HSM_METRICS_LISTEN"))
    flags.metrics_listen = std::string{dev_metrics_listen};
  auto opts = resolve_run_options(cfg, flags, process_env());
  if (!opts)
    return fail(opts.error());
  // As in `run`: when the driver cannot go on, say so and stop.
  auto fatal = std::make_shared<std::atomic<bool>>(false);
  opts->on_fatal = [fatal](const std::string& why) {
    logger("runtime")->critical("{}; stopping", why);
    *fatal = true;
    ::kill(::getpid(), SIGTERM); // wakes the signal wait below
  };
  auto d = daemon::start(*opts);
  if (!d)
    return fail(d.error());
  json demo = json::array();
  bool all_ok = true;
  for (auto s : all_schemes) {
    auto entry = demo_scheme(**proxy, s);
    // A scheme the token does not serve is reported, not a failure.
    if (entry.contains("verified"))
      all_ok = all_ok && entry["verified"].get<bool>();
    demo.push_back(std::move(entry));
  }
  auto admin = "http://127.0.0.1:" + std::to_string((*proxy)->admin_port());
  auto metrics = (*d)->metrics_url();
  print(json{{"ok", all_ok},
             {"data_dir", dir.string()},
             {"proxy", flags.proxy_addr},
             {"admin_api", admin},
             {"metrics", metrics ? *metrics + "/metrics" : "off"},
             {"demo", demo}});
  // One line per kind that enqueues, waits for the answer and prints it.
  auto curl = "curl -s -H \"Authorization: Bearer $(cat " + token_file.string()
              + ")\" -H 'Content-Type: application/json' '" + admin
              + "/v1/admin/requests?wait_ms=10000' -d ";
  std::cerr << "hsm-driver dev: serving; a new key (its public key):\n  "
            << curl
            << "'{\"kind\":\"generate_key\",\"params\":{\"key_id\":\"k1\","
               "\"scheme\":\"secp256k1\"}}'\n"
            << "and a signature with it (a SHA-256 digest in hex):\n  " << curl
            << "'{\"kind\":\"sign\",\"params\":{\"key_id\":\"k1\","
               "\"payload\":\"'$(printf hello | sha256sum | cut -c1-64)'\"}}'\n"
            << "The admin API needs the token in " << token_file.string()
            << " (Authorization: Bearer).\n";
  if (metrics)
    std::cerr << "Metrics: curl -s " << *metrics
              << "/metrics; health: " << *metrics << "/healthz, " << *metrics
              << "/readyz\n";
  std::cerr << "Ctrl-C (SIGINT) or SIGTERM stops it; SIGHUP reloads the TLS "
               "files.\n";
  static_cast<void>((*d)->serve_until_stop_signal());
  auto stopped = (*d)->stop();
  (*proxy)->stop();
  if (stopped == stop_status::hsm_call_stuck) {
    // A thread is still inside the module: no exit handlers under it (see
    // cmd_run.cpp).
    std::cout.flush();
    spdlog::shutdown();
    std::_Exit(exit_failed);
  }
  if (*fatal)
    return exit_failed;
  return all_ok ? exit_ok : exit_failed;
}

} // namespace hsm
