// Metrics and health end to end: the real binary (and the daemon in
// process, behind the fault-injecting PKCS#11 shim) with a real SoftHSMv2
// token, SQLite and the reference proxy over mTLS on loopback, scraped over
// HTTP as Prometheus and a service manager would.

#include "runtime/app/daemon.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/process.hpp"
#include "tests/support/proxy_helpers.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

namespace hsm {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr const char* user_pin = "metrics-user-pin-1618";
constexpr const char* so_pin = "metrics-so-pin-1414";
constexpr const char* token_label = "metrics";

/// One scrape: every sample by its series as printed
/// (`name{label="value",...}`), labels in the exporter's order.
using samples = std::map<std::string, double>;

samples parse_metrics(const std::string& text) {
  samples out;
  std::istringstream in{text};
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#')
      continue;
    auto space = line.rfind(' ');
    if (space == std::string::npos)
      continue;
    out[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return out;
}

/// The sum of every sample of metric `name` whose series contains `part`.
double sum_of(const samples& s, const std::string& name,
              const std::string& part = "") {
  double total = 0;
  for (auto& [series, value] : s)
    if ((series == name || series.rfind(name + "{", 0) == 0)
        && series.find(part) != std::string::npos)
      total += value;
  return total;
}

/// A sample that must exist; NaN (failing every comparison) if it does not.
double at(const samples& s, const std::string& series) {
  auto i = s.find(series);
  if (i == s.end()) {
    ADD_FAILURE() << "no series " << series;
    return std::nan("");
  }
  return i->second;
}

/// The `notAfter` of the PEM certificate at `path`, as the `openssl`
/// command line prints it, in Unix seconds; -1 if it cannot be read.
int64_t openssl_not_after(const std::filesystem::path& path) {
  auto cmd = "openssl x509 -noout -enddate -in '" + path.string() + "'";
  std::unique_ptr<FILE, decltype(&::pclose)> p{::popen(cmd.c_str(), "r"),
                                               &::pclose};
  if (!p)
    return -1;
  char buf[256] = {};
  if (std::fgets(buf, sizeof(buf), p.get()) == nullptr)
    return -1;
  // notAfter=Jan  2 03:04:05 2027 GMT
  std::string line{buf};
  auto eq = line.find('=');
  if (eq == std::string::npos)
    return -1;
  std::tm tm{};
  if (::strptime(line.c_str() + eq + 1, "%b %d %H:%M:%S %Y GMT", &tm)
      == nullptr)
    return -1;
  return static_cast<int64_t>(::timegm(&tm));
}

/// The port of the metrics listener that a `run` log names (0 if none).
uint16_t metrics_port_in(const std::string& log) {
  static const std::regex line{
    R"re(metrics and health on http://127\.0\.0\.1:([0-9]+))re"};
  std::smatch m;
  if (!std::regex_search(log, m, line))
    return 0;
  return static_cast<uint16_t>(std::stoul(m[1].str()));
}

class MetricsEndToEndTest : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path()
          / ("hsm-driver-metrics-" + std::to_string(::getpid()) + "-"
             + std::to_string(rd() % 100000));
    test::write_softhsm_conf(dir);
    ::setenv("SOFTHSM2_CONF", (dir / "softhsm2.conf").c_str(), 1);
    env = {{"SOFTHSM2_CONF", (dir / "softhsm2.conf").string()},
           {"PKCS11_MODULE", test::softhsm_module()},
           {"PKCS11_THALES_MODULE", ""},
           {"PKCS11_IBM_MODULE", ""},
           {"USER_PIN_FILE", ""},
           {"USER_PIN", user_pin},
           {"SO_PIN", so_pin},
           {"HSM_TOKEN_LABEL", token_label},
           {"HSM_METRICS_LISTEN", ""},
           {"SQLITE_PATH", (dir / "keys.db").string()}};
    auto init = test::run_driver({"token", "init"}, env);
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = test::run_driver({"master-key", "init"}, env);
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
    auto made = net::make_dev_pki(dir / "pki");
    ASSERT_TRUE(made) << describe(made.error());
    pki = *made;
    net::reference_proxy_config pc;
    pc.server_cert = pki.server_chain;
    pc.server_key = pki.server_key;
    pc.client_ca = pki.root_cert;
    pc.lease_duration = 2000ms;
    auto started = net::reference_proxy::start(pc);
    ASSERT_TRUE(started) << describe(started.error());
    proxy = std::move(*started);
    static_cast<void>(init_logging("warn"));
  }

  void TearDown() override {
    drv.reset();
    if (proxy)
      proxy->stop();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  json await_done(const std::string& id) {
    return test::await_done(*proxy, id, 30000ms);
  }

  std::string enqueue_sign(const std::string& key_id, const std::string& text) {
    return proxy->enqueue("sign",
                          {{"key_id", key_id},
                           {"payload", crypto::to_hex(test::sha256(text))}});
  }

  /// GET `path` from the metrics listener; status 0 if it did not answer.
  std::pair<int, std::string> get(const std::string& path) {
    httplib::Client cli{"127.0.0.1", metrics_port};
    cli.set_connection_timeout(5);
    cli.set_read_timeout(10);
    auto res = cli.Get(path.c_str());
    if (!res)
      return {0, ""};
    return {res->status, res->body};
  }

  samples scrape() {
    auto [status, body] = get("/metrics");
    EXPECT_EQ(status, 200) << body;
    return parse_metrics(body);
  }

  /// `/readyz`'s `not_ready` object (empty when ready), and its status.
  std::pair<int, json> readiness() {
    auto [status, body] = get("/readyz");
    auto j = json::parse(body, nullptr, false);
    if (!j.is_object())
      return {status, json::object()};
    return {status, j.value("not_ready", json::object())};
  }

  /// Starts `hsm-driver run` against the proxy with the dev PKI and a
  /// metrics listener on a free loopback port, plus `extra` (driver id,
  /// sessions, ...); its log goes to `run.log` (`run_log`).
  test::background_process start_run(const std::vector<std::string>& extra) {
    auto args = test::run_args(proxy->port(), pki,
                               {"--metrics-listen", "127.0.0.1:0"});
    args.insert(args.end(), extra.begin(), extra.end());
    return test::start_driver(args, env, (dir / "run.log").string());
  }

  /// What the driver started by `start_run` logged so far.
  std::string run_log() const {
    std::ifstream in{dir / "run.log"};
    return std::string{std::istreambuf_iterator<char>{in}, {}};
  }

  /// Waits until the log of `start_run` names the metrics port, into
  /// `metrics_port`.
  ::testing::AssertionResult metrics_listening() {
    return test::wait_until(
      [&] {
        metrics_port = metrics_port_in(run_log());
        return metrics_port != 0;
      },
      60s, "the driver to log its metrics address", 20ms);
  }

  std::filesystem::path dir;
  std::map<std::string, std::string> env;
  net::dev_pki pki;
  std::unique_ptr<net::reference_proxy> proxy;
  std::unique_ptr<daemon> drv;
  uint16_t metrics_port = 0;
};

TEST_F(MetricsEndToEndTest, TheRunningBinaryCountsWhatItServedAndReportsReady) {
  auto p = start_run({"--driver-id", "metrics-driver", "--sessions", "2",
                      "--poll-wait", "300", "--log-level", "info"});
  test::kill_on_exit guard{p};
  ASSERT_TRUE(metrics_listening()) << run_log();
  ASSERT_TRUE(test::wait_until([&] { return readiness().first == 200; }, 30s,
                               "/readyz to answer 200", 20ms))
    << readiness().second.dump() << run_log();
  // What is sent: 3 new keys, 5 signatures, a sign for a key nobody has,
  // and a request of a kind the protocol does not know.
  std::map<std::string, std::string> keys{{"m-a", "p256"},
                                          {"m-b", "secp256k1"},
                                          {"m-c", "p256"}};
  for (auto& [key_id, s] : keys) {
    auto g = await_done(
      proxy->enqueue("generate_key", {{"key_id", key_id}, {"scheme", s}}));
    ASSERT_TRUE(g["ok"].get<bool>()) << g.dump();
  }
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i)
    ids.push_back(
      enqueue_sign(i % 2 == 0 ? "m-a" : "m-b", "metrics " + std::to_string(i)));
  for (auto& id : ids) {
    auto r = await_done(id);
    ASSERT_TRUE(r["ok"].get<bool>()) << r.dump();
  }
  auto unknown = await_done(enqueue_sign("nobody", "no key"));
  ASSERT_EQ(unknown["error"]["code"], "unknown_key") << unknown.dump();
  auto odd = await_done(proxy->enqueue("explode", {{"key_id", "m-a"}}));
  ASSERT_FALSE(odd["ok"].get<bool>()) << odd.dump();
  auto odd_code = odd["error"]["code"].get<std::string>();
  // The proxy has every answer; the driver frees a lease once the proxy
  // acknowledged its post.
  samples s;
  ASSERT_TRUE(test::wait_until(
    [&] {
      s = scrape();
      return s["hsm_driver_leases_held"] == 0
             && sum_of(s, "hsm_driver_requests_total") >= 10;
    },
    10s, "every lease settled", 20ms));
  // Requests by kind and outcome: exactly what was sent.
  EXPECT_EQ(
    at(s, R"(hsm_driver_requests_total{kind="generate_key",outcome="ok"})"), 3);
  EXPECT_EQ(at(s, R"(hsm_driver_requests_total{kind="sign",outcome="ok"})"), 5);
  EXPECT_EQ(
    at(s, R"(hsm_driver_requests_total{kind="sign",outcome="unknown_key"})"),
    1);
  EXPECT_EQ(at(s, "hsm_driver_requests_total{kind=\"invalid\",outcome=\""
                    + odd_code + "\"}"),
            1);
  EXPECT_EQ(sum_of(s, "hsm_driver_requests_total"), 10);
  // Stage durations: one post per answer, one HSM call and one wait for a
  // session per key and signature, a lookup per job plus a put per new key.
  EXPECT_EQ(at(s, R"(hsm_driver_stage_duration_seconds_count{stage="post"})"),
            10);
  EXPECT_EQ(at(s, R"(hsm_driver_stage_duration_seconds_count{stage="hsm"})"),
            8);
  EXPECT_EQ(
    at(s, R"(hsm_driver_stage_duration_seconds_count{stage="queue_wait"})"), 8);
  EXPECT_EQ(at(s, R"(hsm_driver_stage_duration_seconds_count{stage="store"})"),
            9 + 3);
  EXPECT_GT(at(s, R"(hsm_driver_stage_duration_seconds_sum{stage="hsm"})"), 0);
  EXPECT_EQ(
    at(s, R"(hsm_driver_stage_duration_seconds_bucket{stage="hsm",le="+Inf"})"),
    8);
  // Sessions, credits, certificate.
  EXPECT_EQ(at(s, "hsm_driver_sessions_healthy"), 2);
  EXPECT_EQ(at(s, "hsm_driver_sessions_configured"), 2);
  EXPECT_EQ(at(s, "hsm_driver_credits"), 2 * 2) << "sessions x pipeline";
  EXPECT_EQ(at(s, "hsm_driver_session_restarts_total"), 0);
  EXPECT_EQ(sum_of(s, "hsm_driver_pkcs11_errors_total"), 0);
  EXPECT_EQ(sum_of(s, "hsm_driver_store_errors_total"), 0);
  EXPECT_EQ(sum_of(s, "hsm_driver_post_errors_total"), 0);
  auto not_after = openssl_not_after(pki.driver_chain);
  ASSERT_GT(not_after, 0);
  EXPECT_EQ(at(s, "hsm_driver_client_certificate_expiry_timestamp_seconds"),
            static_cast<double>(not_after));
  auto now = static_cast<double>(std::time(nullptr));
  EXPECT_NEAR(at(s, "hsm_driver_proxy_last_success_timestamp_seconds"), now,
              30);
  // Nothing secret or unbounded in a label: no key id, no request id.
  auto [status, text] = get("/metrics");
  ASSERT_EQ(status, 200);
  for (auto needle : {"m-a", "nobody", "req-", user_pin})
    EXPECT_EQ(text.find(needle), std::string::npos) << needle;
  auto alive = get("/healthz");
  EXPECT_EQ(alive.first, 200) << alive.second;
  auto ready = readiness();
  EXPECT_EQ(ready.first, 200) << ready.second.dump();

  // The proxy goes away: the driver is alive but not ready, and says why.
  proxy->stop();
  json why;
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto r = readiness();
      why = r.second;
      return r.first == 503 && why.contains("proxy");
    },
    30s, "/readyz to name the proxy", 50ms))
    << why.dump();
  EXPECT_FALSE(why.contains("sessions")) << why.dump();
  EXPECT_FALSE(why.contains("store")) << why.dump();
  alive = get("/healthz");
  EXPECT_EQ(alive.first, 200) << alive.second;
  s = scrape();
  EXPECT_GE(at(s, R"(hsm_driver_poll_errors_total{reason="unreachable"})"), 1);
  EXPECT_EQ(at(s, "hsm_driver_sessions_healthy"), 2);

  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  EXPECT_EQ(test::wait_exit(p, 30000), 0) << run_log();
  auto log = run_log();
  EXPECT_EQ(log.find(user_pin), std::string::npos);
}

TEST_F(MetricsEndToEndTest, ReadyAfterOneRoundTripNotAfterAPollWait) {
  // An idle proxy answers a long poll only when its wait runs out (20 s
  // here). The driver's first poll returns at once, so it is ready as soon
  // as its sessions are up and the proxy answered, not 20 s later.
  auto p = start_run(
    {"--driver-id", "ready-driver", "--sessions", "1", "--poll-wait", "20000"});
  test::kill_on_exit guard{p};
  ASSERT_TRUE(metrics_listening()) << run_log();
  ASSERT_TRUE(test::wait_until([&] { return readiness().first == 200; }, 10s,
                               "/readyz to answer 200 well before the 20 s "
                               "poll wait",
                               20ms))
    << readiness().second.dump() << run_log();
  // And then it long-polls: the proxy holds its poll.
  EXPECT_TRUE(test::wait_until([&] { return proxy->waiting_polls() == 1; }, 5s,
                               "the driver's long poll to wait in the proxy"));
  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  EXPECT_EQ(test::wait_exit(p, 30000), 0) << run_log();
}

/// The token goes away (every PKCS#11 call fails with CKR_DEVICE_REMOVED
/// from 4 s after the module is loaded, for 5 s): /readyz names the
/// sessions, the errors are counted by CKR name, and readiness comes back
/// with the sessions.
TEST_F(MetricsEndToEndTest, ReadinessNamesTheSessionsWhileTheTokenIsGone) {
  ::setenv("HSM_SHIM_MODULE", test::softhsm_module().c_str(), 1);
  ::setenv("HSM_SHIM_SPEC", "outage=*:CKR_DEVICE_REMOVED@4s for 5s", 1);
  auto loaded = std::chrono::steady_clock::now();
  daemon_options o;
  o.cfg.pkcs11_module = HSM_SHIM_LIBRARY;
  o.cfg.token_label = token_label;
  o.cfg.master_key_label = "hsm-driver-master";
  o.cfg.sqlite_path = dir / "keys.db";
  o.cfg.resident_schemes = {scheme::ed25519};
  o.cfg.log_level = "warn";
  o.proxy.proxy_addr = "127.0.0.1:" + std::to_string(proxy->port());
  o.proxy.tls = {pki.root_cert, pki.driver_chain, pki.driver_key};
  o.proxy.driver_id = "outage-driver";
  o.sessions = 2;
  o.hsm_timeout = 5000ms;
  o.drain_timeout = 10000ms;
  o.poll_wait = 300ms;
  o.metrics_listen = net::metrics_listen{"127.0.0.1", 0, false};
  auto fatal = std::make_shared<std::atomic<int>>(0);
  o.on_fatal = [fatal](const std::string&) { ++*fatal; };
  ::setenv("USER_PIN", user_pin, 1);
  auto d = daemon::start(o);
  ASSERT_TRUE(d) << describe(d.error());
  drv = std::move(*d);
  auto url = drv->metrics_url();
  ASSERT_TRUE(url);
  metrics_port = static_cast<uint16_t>(
    std::stoul(url->substr(url->rfind(':') + 1)));
  auto g = await_done(
    proxy->enqueue("generate_key", {{"key_id", "out-1"}, {"scheme", "p256"}}));
  ASSERT_TRUE(g["ok"].get<bool>()) << g.dump();
  ASSERT_TRUE(test::wait_until([&] { return readiness().first == 200; }, 10s,
                               "/readyz to answer 200 before the outage", 20ms))
    << readiness().second.dump();
  std::this_thread::sleep_until(loaded + 4500ms);
  // A request in the outage finds the token gone.
  auto id = enqueue_sign("out-1", "during the outage");
  json why;
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto r = readiness();
      why = r.second;
      return r.first == 503 && why.contains("sessions");
    },
    4s, "/readyz to name the sessions", 20ms))
    << why.dump();
  EXPECT_NE(why["sessions"].get<std::string>().find("0 of 2"),
            std::string::npos)
    << why.dump();
  auto alive = get("/healthz");
  EXPECT_EQ(alive.first, 200) << "an outage is not death: " << alive.second;
  auto s = scrape();
  EXPECT_EQ(at(s, "hsm_driver_sessions_healthy"), 0);
  EXPECT_GE(sum_of(s, "hsm_driver_pkcs11_errors_total",
                   R"(rv="CKR_DEVICE_REMOVED")"),
            1);
  // Back after the outage.
  auto r = await_done(id);
  ASSERT_TRUE(r["ok"].get<bool>()) << r.dump();
  ASSERT_TRUE(test::wait_until([&] { return readiness().first == 200; }, 30s,
                               "/readyz to answer 200 after the outage", 50ms))
    << readiness().second.dump();
  s = scrape();
  EXPECT_EQ(at(s, "hsm_driver_sessions_healthy"), 2);
  EXPECT_GE(at(s, "hsm_driver_session_restarts_total"), 2);
  // The answers in the outage were retryable errors; the last one is ok.
  EXPECT_GE(
    at(s,
       R"(hsm_driver_requests_total{kind="sign",outcome="hsm_unavailable"})"),
    1);
  EXPECT_EQ(at(s, R"(hsm_driver_requests_total{kind="sign",outcome="ok"})"), 1);
  EXPECT_EQ(fatal->load(), 0);
}

} // namespace
} // namespace hsm
