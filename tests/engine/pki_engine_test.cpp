// The real binary and its TLS files: `run` refuses to start on a bad
// certificate of its own or of the proxy, naming the cause; warns about a
// certificate near its expiry; and on SIGHUP reloads its files without
// dropping work, keeping the old ones when the new ones fail.

#include "runtime/crypto/hex.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/pki_ops.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/process.hpp"
#include "tests/support/proxy_helpers.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace hsm {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr std::time_t day = 86400;
constexpr const char* user_pin = "pki-user-pin-1618";
constexpr const char* token_label = "pki-engine";

struct leaf_files {
  std::filesystem::path cert; // the leaf alone
  std::filesystem::path chain;
  std::filesystem::path key;
  std::string serial;
};

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in{p};
  return {std::istreambuf_iterator<char>{in}, {}};
}

class PkiEngineTest : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path()
          / ("hsm-driver-pki-" + std::to_string(::getpid()) + "-"
             + std::to_string(rd() % 100000));
    test::write_softhsm_conf(dir);
    env = {{"SOFTHSM2_CONF", (dir / "softhsm2.conf").string()},
           {"PKCS11_MODULE", test::softhsm_module()},
           {"PKCS11_THALES_MODULE", ""},
           {"PKCS11_IBM_MODULE", ""},
           {"USER_PIN_FILE", ""},
           {"USER_PIN", user_pin},
           {"SO_PIN", "pki-so-pin-2718"},
           {"HSM_TOKEN_LABEL", token_label},
           {"HSM_RESIDENT_SCHEMES", "ed25519"},
           {"HSM_LOG_LEVEL", "info"},
           {"SQLITE_PATH", (dir / "keys.db").string()}};
    auto init = test::run_driver({"token", "init"}, env);
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = test::run_driver({"master-key", "init"}, env);
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
    auto made = net::make_dev_pki(dir / "pki");
    ASSERT_TRUE(made) << describe(made.error());
    pki = *made;
    auto other_made = net::make_dev_pki(dir / "other");
    ASSERT_TRUE(other_made) << describe(other_made.error());
    other = *other_made;
  }

  void TearDown() override {
    if (proxy)
      proxy->stop();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  void start_proxy(const std::filesystem::path& chain,
                   const std::filesystem::path& key) {
    if (proxy)
      proxy->stop();
    net::reference_proxy_config pc;
    pc.server_cert = chain;
    pc.server_key = key;
    pc.client_ca = pki.root_cert;
    auto started = net::reference_proxy::start(pc);
    ASSERT_TRUE(started) << describe(started.error());
    proxy = std::move(*started);
  }

  /// A leaf from `of`'s intermediate, written to `to_dir` (chain and key).
  leaf_files issue(const net::dev_pki& of, const std::filesystem::path& to_dir,
                   net::leaf_spec spec) {
    leaf_files out;
    std::filesystem::create_directories(to_dir);
    net::issuer_files ca{of.intermediate_cert,
                         of.intermediate_cert.parent_path()
                           / "intermediate.key.pem",
                         {}};
    if (spec.common_name.empty())
      spec.common_name = "pki-driver";
    spec.within_issuer = false;
    auto leaf = net::issue_leaf(ca, spec);
    EXPECT_TRUE(leaf) << describe(leaf.error());
    if (!leaf)
      return out;
    out.cert = to_dir / "driver.pem";
    out.chain = to_dir / "driver.chain.pem";
    out.key = to_dir / "driver.key.pem";
    out.serial = leaf->info.serial;
    EXPECT_FALSE(net::write_pem_file(out.key, leaf->key_pem.str(), 0600));
    EXPECT_FALSE(net::write_pem_file(out.chain, leaf->chain_pem, 0644));
    EXPECT_FALSE(net::write_pem_file(out.cert, leaf->cert_pem, 0644));
    return out;
  }

  static net::leaf_spec dated(std::time_t from, std::time_t until,
                              std::string eku = "clientAuth") {
    net::leaf_spec s;
    s.not_before = from;
    s.not_after = until;
    s.eku = std::move(eku);
    return s;
  }

  std::vector<std::string> run_args(const std::filesystem::path& chain,
                                    const std::filesystem::path& key,
                                    const std::string& host = "127.0.0.1") {
    return {"run",
            "--proxy-addr",
            host + ":" + std::to_string(proxy->port()),
            "--ca-cert",
            pki.root_cert.string(),
            "--client-cert",
            chain.string(),
            "--client-key",
            key.string(),
            "--driver-id",
            "pki-driver",
            "--sessions",
            "2",
            "--poll-wait",
            "300",
            "--drain-timeout",
            "5000"};
  }

  bool proxy_saw(const std::string& serial) {
    for (const auto& c : proxy->clients())
      if (c.serial == serial && c.polls + c.results > 0)
        return true;
    return false;
  }

  std::filesystem::path dir;
  std::map<std::string, std::string> env;
  net::dev_pki pki;
  net::dev_pki other;
  std::unique_ptr<net::reference_proxy> proxy;
};

TEST_F(PkiEngineTest, RunRefusesItsOwnBadCertificateNamingTheCause) {
  start_proxy(pki.server_chain, pki.server_key);
  auto now = std::time(nullptr);
  auto good = issue(pki, dir / "good", {});
  struct bad_case {
    const char* name;
    leaf_files files;
    const char* cause;
  };
  std::vector<bad_case> cases{
    {"wrong CA", issue(other, dir / "other-ca", {}), "wrong_ca"},
    {"expired", issue(pki, dir / "expired", dated(now - 10 * day, now - day)),
     "expired"},
    {"not yet valid",
     issue(pki, dir / "future", dated(now + day, now + 10 * day)),
     "not_yet_valid"},
    {"wrong EKU",
     issue(pki, dir / "eku", dated(now - day, now + 10 * day, "serverAuth")),
     "wrong_eku"},
    {"key mismatch",
     {good.cert, good.chain, issue(pki, dir / "b", {}).key, ""},
     "key_mismatch"},
  };
  for (const auto& c : cases) {
    auto r = test::run_driver(run_args(c.files.chain, c.files.key), env);
    EXPECT_EQ(r.exit_code, 1) << c.name << "\n" << r.out << r.err;
    EXPECT_NE(r.err.find(std::string{"client certificate: "} + c.cause),
              std::string::npos)
      << c.name << "\n"
      << r.err;
    EXPECT_NE(r.out.find("\"ok\": false"), std::string::npos) << r.out;
  }
  // None of them reached the proxy.
  EXPECT_TRUE(proxy->clients().empty());
}

TEST_F(PkiEngineTest, RunRefusesAProxyWhoseCertificateFailsNamingTheCause) {
  auto now = std::time(nullptr);
  auto expired_spec = dated(now - 10 * day, now - day, "serverAuth");
  expired_spec.names = {"127.0.0.1"};
  auto expired = issue(pki, dir / "server-expired", expired_spec);
  net::leaf_spec elsewhere_spec;
  elsewhere_spec.eku = "serverAuth";
  elsewhere_spec.names = {"proxy.elsewhere.example"};
  auto elsewhere = issue(pki, dir / "server-elsewhere", elsewhere_spec);
  struct bad_case {
    const char* name;
    std::filesystem::path chain;
    std::filesystem::path key;
    const char* cause;
  };
  const bad_case cases[] = {
    {"wrong CA", other.server_chain, other.server_key, "wrong_ca"},
    {"expired", expired.chain, expired.key, "expired"},
    {"wrong server name", elsewhere.chain, elsewhere.key, "wrong_server_name"},
  };
  for (const auto& c : cases) {
    start_proxy(c.chain, c.key);
    auto r = test::run_driver(run_args(pki.driver_chain, pki.driver_key), env);
    EXPECT_EQ(r.exit_code, 1) << c.name << "\n" << r.out << r.err;
    EXPECT_NE(r.err.find(std::string{"proxy certificate: "} + c.cause),
              std::string::npos)
      << c.name << "\n"
      << r.err;
    EXPECT_EQ(proxy->stats().leased, 0u);
  }
}

TEST_F(PkiEngineTest, SighupReloadsTheFilesWithoutDroppingWork) {
  start_proxy(pki.server_chain, pki.server_key);
  auto now = std::time(nullptr);
  auto live = dir / "live";
  // The first certificate has 10 days left: a warning at start (the
  // default threshold is 30 days).
  auto first = issue(pki, live, dated(now - day, now + 10 * day));
  auto log_path = (dir / "run.log").string();
  // Every C_Sign takes 200 ms, so that requests are in the HSM, leased
  // under the first certificate, when the files change.
  auto e = env;
  e["PKCS11_MODULE"] = HSM_SHIM_LIBRARY;
  e["HSM_SHIM_MODULE"] = test::softhsm_module();
  e["HSM_SHIM_SPEC"] = "delay=C_Sign:200ms";
  auto p = test::start_driver(run_args(first.chain, first.key), e, log_path);
  test::kill_on_exit guard{p};
  auto read_log = [&] { return slurp(log_path); };
  auto g = test::await_done(
    *proxy,
    proxy->enqueue("generate_key", {{"key_id", "hup-k"}, {"scheme", "p256"}}));
  ASSERT_TRUE(g["ok"].get<bool>()) << g.dump() << read_log();
  EXPECT_TRUE(proxy_saw(first.serial));
  EXPECT_NE(read_log().find("expires in"), std::string::npos) << read_log();
  auto pub = test::unhex(g["result"]["public_key"]);
  // Work in flight while the files change and SIGHUP arrives.
  std::vector<std::pair<std::string, std::vector<uint8_t>>> sent;
  auto enqueue_signs = [&](int n, const std::string& tag) {
    for (int i = 0; i < n; ++i) {
      auto payload = test::sha256(tag + std::to_string(i));
      sent.emplace_back(proxy->enqueue("sign",
                                       {{"key_id", "hup-k"},
                                        {"payload", crypto::to_hex(payload)}}),
                        payload);
    }
  };
  enqueue_signs(20, "before ");
  ASSERT_TRUE(test::wait_until([&] { return proxy->stats().leased > 0; }, 30s,
                               "requests in flight"));
  // A renewed certificate (same name, new key and serial), written over
  // the files in place, then SIGHUP while requests are in flight.
  auto renewed = issue(pki, dir / "renewed", dated(now - day, now + 60 * day));
  ASSERT_FALSE(net::write_pem_file(first.key, slurp(renewed.key), 0600));
  ASSERT_FALSE(net::write_pem_file(first.chain, slurp(renewed.chain), 0644));
  ASSERT_EQ(::kill(p.pid, SIGHUP), 0);
  enqueue_signs(20, "during ");
  ASSERT_TRUE(test::wait_until([&] { return proxy_saw(renewed.serial); }, 30s,
                               "the proxy to see the renewed certificate"))
    << read_log();
  enqueue_signs(10, "after ");
  for (const auto& [id, payload] : sent) {
    auto r = test::await_done(*proxy, id);
    ASSERT_TRUE(r["ok"].get<bool>()) << r.dump() << read_log();
    EXPECT_TRUE(test::openssl_verify(scheme::p256, pub, payload,
                                     test::unhex(r["result"]["der"])));
  }
  EXPECT_NE(read_log().find("SIGHUP: reloaded"), std::string::npos)
    << read_log();
  // Results went out under the renewed certificate, requests leased under
  // the first one among them (the lease belongs to the driver's name), and
  // none was refused or left to expire.
  size_t renewed_results = 0;
  for (const auto& c : proxy->clients())
    if (c.serial == renewed.serial)
      renewed_results = c.results;
  EXPECT_GT(renewed_results, 0u);
  EXPECT_EQ(proxy->stats().rejected_results, 0u);
  EXPECT_EQ(proxy->stats().redelivered, 0u);
  // A bad set (an expired certificate) is refused; the renewed one stays
  // in use and the driver keeps serving.
  auto bad = issue(pki, dir / "bad", dated(now - 10 * day, now - day));
  ASSERT_FALSE(net::write_pem_file(first.key, slurp(bad.key), 0600));
  ASSERT_FALSE(net::write_pem_file(first.chain, slurp(bad.chain), 0644));
  ASSERT_EQ(::kill(p.pid, SIGHUP), 0);
  ASSERT_TRUE(test::wait_until(
    [&] {
      return read_log().find("the new TLS files are refused")
             != std::string::npos;
    },
    30s, "the refusal in the log"))
    << read_log();
  EXPECT_NE(read_log().find("client certificate: expired"), std::string::npos)
    << read_log();
  sent.clear();
  enqueue_signs(10, "after the bad set ");
  for (const auto& [id, payload] : sent) {
    auto r = test::await_done(*proxy, id);
    ASSERT_TRUE(r["ok"].get<bool>()) << r.dump() << read_log();
  }
  EXPECT_FALSE(proxy_saw(bad.serial));
  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  EXPECT_EQ(test::wait_exit(p, 30000), 0) << read_log();
  EXPECT_EQ(proxy->stats().leased, 0u);
}

/// The runbook's layout: --client-cert holds the leaf alone, --ca-cert the
/// customer's intermediate and the vendor's root; the proxy trusts only the
/// root, so the driver must send the intermediate.
TEST_F(PkiEngineTest, RunbookLayoutServesThroughAProxyTrustingOnlyTheRoot) {
  start_proxy(pki.server_chain, pki.server_key);
  auto leaf = issue(pki, dir / "runbook", {});
  auto ca_chain = dir / "runbook" / "chain.pem";
  ASSERT_FALSE(net::write_pem_file(
    ca_chain, slurp(pki.intermediate_cert) + slurp(pki.root_cert), 0644));
  auto args = run_args(leaf.cert, leaf.key);
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "--ca-cert")
      args[i + 1] = ca_chain.string();
  auto log_path = (dir / "runbook.log").string();
  auto p = test::start_driver(args, env, log_path);
  test::kill_on_exit guard{p};
  auto g = test::await_done(*proxy, proxy->enqueue("generate_key",
                                                   {{"key_id", "runbook-k"},
                                                    {"scheme", "p256"}}));
  EXPECT_TRUE(g["ok"].get<bool>()) << g.dump() << slurp(log_path);
  EXPECT_TRUE(proxy_saw(leaf.serial));
  EXPECT_TRUE(proxy->refused_clients().empty());
  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  EXPECT_EQ(test::wait_exit(p, 30000), 0) << slurp(log_path);
}

TEST_F(PkiEngineTest, NoExpiryWarningBelowTheThreshold) {
  start_proxy(pki.server_chain, pki.server_key);
  auto now = std::time(nullptr);
  auto leaf = issue(pki, dir / "leaf", dated(now - day, now + 10 * day));
  auto e = env;
  e["HSM_CERT_WARN_DAYS"] = "5";
  auto log_path = (dir / "quiet.log").string();
  auto p = test::start_driver(run_args(leaf.chain, leaf.key), e, log_path);
  test::kill_on_exit guard{p};
  ASSERT_TRUE(test::wait_until([&] { return proxy_saw(leaf.serial); }, 30s,
                               "the driver to poll"))
    << slurp(log_path);
  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  EXPECT_EQ(test::wait_exit(p, 30000), 0);
  auto log = slurp(log_path);
  EXPECT_EQ(log.find("expires in"), std::string::npos) << log;
  EXPECT_NE(log.find("valid until"), std::string::npos) << log;
}

} // namespace
} // namespace hsm
