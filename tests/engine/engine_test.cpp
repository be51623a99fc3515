// The daemon end to end: a real SoftHSMv2 token, real SQLite, the reference
// proxy and the driver talking mTLS on loopback. Each test runs in its own
// process (gtest_discover_tests), so each loads the module once.

#include "runtime/app/daemon.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "store/sqlite_store.hpp"
#include "tests/support/fault_table.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/process.hpp"
#include "tests/support/proxy_helpers.hpp"
#include "tests/support/soak.hpp"
#include "tests/support/wait.hpp"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

namespace hsm {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr const char* user_pin = "engine-user-pin-2718";
constexpr const char* so_pin = "engine-so-pin-3141";
constexpr const char* token_label = "engine";

/// One plain HTTP/1.1 exchange with a reference proxy's admin listener on
/// 127.0.0.1:`port` (plain HTTP, one connection per call); the response
/// body, or nullopt if the exchange failed.
std::optional<std::string>
admin_http(uint16_t port, const std::string& token, const std::string& method,
           const std::string& path, const std::string& body = "") {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return std::nullopt;
  timeval limit{30, 0}; // a hung listener fails the call, not the suite
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  std::string response;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    auto request = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1:"
                   + std::to_string(port) + "\r\nAuthorization: Bearer " + token
                   + "\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: "
                   + std::to_string(body.size()) + "\r\n\r\n" + body;
    size_t sent = 0;
    while (sent < request.size()) {
      auto n = ::send(fd, request.data() + sent, request.size() - sent,
                      MSG_NOSIGNAL);
      if (n <= 0)
        break;
      sent += static_cast<size_t>(n);
    }
    char buf[4096];
    for (ssize_t n; (n = ::recv(fd, buf, sizeof(buf), 0)) > 0;)
      response.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  auto at = response.find("\r\n\r\n");
  if (at == std::string::npos)
    return std::nullopt;
  return response.substr(at + 4);
}

class EngineTest : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path()
          / ("hsm-driver-engine-" + std::to_string(::getpid()) + "-"
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
           {"SQLITE_PATH", (dir / "keys.db").string()}};
    auto init = test::run_driver({"token", "init"}, env);
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = test::run_driver({"master-key", "init"}, env);
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
    auto made = net::make_dev_pki(dir / "pki");
    ASSERT_TRUE(made) << describe(made.error());
    pki = *made;
    start_proxy(2000ms);
    static_cast<void>(init_logging("warn"));
  }

  void TearDown() override {
    // Let a call still held at the gate return before the daemon stops,
    // which would otherwise wait for it (or give up on the module).
    gate_open = true;
    drv.reset();
    if (proxy)
      proxy->stop();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  void start_proxy(std::chrono::milliseconds lease) {
    net::reference_proxy_config pc;
    pc.server_cert = pki.server_chain;
    pc.server_key = pki.server_key;
    pc.client_ca = pki.root_cert;
    pc.lease_duration = lease;
    auto started = net::reference_proxy::start(pc);
    ASSERT_TRUE(started) << describe(started.error());
    proxy = std::move(*started);
  }

  daemon_options options(size_t sessions = 2) {
    daemon_options o;
    o.cfg.pkcs11_module = test::softhsm_module();
    o.cfg.token_label = token_label;
    o.cfg.master_key_label = "hsm-driver-master";
    o.cfg.sqlite_path = dir / "keys.db";
    o.cfg.resident_schemes = {scheme::ed25519};
    o.cfg.log_level = "warn";
    o.proxy.proxy_addr = "127.0.0.1:" + std::to_string(proxy->port());
    o.proxy.tls = {pki.root_cert, pki.driver_chain, pki.driver_key};
    o.proxy.driver_id = "engine-driver";
    o.sessions = sessions;
    o.hsm_timeout = 5000ms;
    o.drain_timeout = 10000ms;
    o.poll_wait = 300ms;
    o.decorate = test::fault_decorator(plan);
    return o;
  }

  void start_daemon(daemon_options o) {
    ::setenv("USER_PIN", user_pin, 1);
    auto d = daemon::start(o);
    ASSERT_TRUE(d) << describe(d.error());
    drv = std::move(*d);
  }

  json await_done(const std::string& id,
                  std::chrono::milliseconds timeout = 30000ms) {
    return test::await_done(*proxy, id, timeout);
  }

  json generate(const std::string& key_id, const std::string& s) {
    return await_done(
      proxy->enqueue("generate_key", {{"key_id", key_id}, {"scheme", s}}));
  }

  std::string enqueue_sign(const std::string& key_id,
                           const std::vector<uint8_t>& payload) {
    return proxy->enqueue("sign", {{"key_id", key_id},
                                   {"payload", crypto::to_hex(payload)}});
  }

  /// A fault hook that holds call number `held_call` until the test opens
  /// the gate: a call that is slow, or hangs, exactly as long as the test
  /// needs, instead of for a fixed time. `released` counts the held calls
  /// that went on. Captures only `this`: the fixture outlives the daemon.
  test::fault_hook hold_at_gate() {
    return [this](int n) -> CK_RV {
      if (n == held_call.load()) {
        // Opened by the test, at the latest in TearDown; the limit only
        // keeps a broken test from hanging a thread for ever.
        static_cast<void>(test::wait_until([this] { return gate_open.load(); },
                                           60s, "the test to open the gate"));
        ++released;
      }
      return CKR_OK;
    };
  }

  /// The number of the call `hold_at_gate` holds (0: none; numbers start
  /// at 1). Set it after the daemon started: start-up makes calls too.
  std::atomic<int> held_call{0};
  std::atomic<bool> gate_open{false};
  std::atomic<int> released{0};

  std::filesystem::path dir;
  std::map<std::string, std::string> env;
  net::dev_pki pki;
  std::unique_ptr<net::reference_proxy> proxy;
  std::shared_ptr<test::fault_plan> plan = std::make_shared<test::fault_plan>();
  std::unique_ptr<daemon> drv;
};

TEST_F(EngineTest, EveryServedSchemeGeneratesAndSignsThroughTheProxy) {
  start_daemon(options());
  for (auto s : all_schemes) {
    auto name = std::string{to_string(s)};
    auto gen = generate("e2e-" + name, name);
    ASSERT_TRUE(gen["ok"].get<bool>()) << gen.dump();
    auto pub = test::unhex(gen["result"]["public_key"]);
    auto payload = is_ecdsa(s) ? test::sha256("e2e " + name)
                               : std::vector<uint8_t>{'m', 's', 'g'};
    auto sig = await_done(enqueue_sign("e2e-" + name, payload));
    ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
    if (is_ecdsa(s)) {
      EXPECT_TRUE(test::openssl_verify(s, pub, payload,
                                       test::unhex(sig["result"]["der"])))
        << name;
      EXPECT_TRUE(sig["result"].contains("recovery_id"));
      if (s == scheme::secp256k1) {
        EXPECT_TRUE(
          test::is_low_s_secp256k1(test::unhex(sig["result"]["signature"])));
      }
    } else {
      EXPECT_TRUE(test::openssl_verify(
        s, pub, payload, test::unhex(sig["result"]["signature"])));
    }
  }
  EXPECT_EQ(proxy->stats().max_in_flight.count("engine-driver"), 1u);
}

/// Every answer to a job is in the audit trail, in the key store's
/// database, before it is posted; `audit verify` checks the chain and names
/// an edited or a deleted row.
TEST_F(EngineTest, EveryAnswerIsAuditedAndTheChainShowsTampering) {
  start_daemon(options());
  auto gen = generate("aud-1", "p256");
  ASSERT_TRUE(gen["ok"].get<bool>()) << gen.dump();
  auto fingerprint = gen["result"]["public_key_fingerprint"].get<std::string>();
  std::vector<std::vector<uint8_t>> payloads;
  for (int i = 0; i < 5; ++i) {
    payloads.push_back(test::sha256("audited " + std::to_string(i)));
    auto sig = await_done(enqueue_sign("aud-1", payloads.back()));
    ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
  }
  auto unknown = await_done(enqueue_sign("aud-none", payloads.front()));
  ASSERT_FALSE(unknown["ok"].get<bool>());
  drv.reset();
  auto st = store::sqlite_store::open(dir / "keys.db");
  ASSERT_TRUE(st) << describe(st.error());
  auto rows = (*st)->read_audit("", 0, 100);
  ASSERT_TRUE(rows) << describe(rows.error());
  ASSERT_EQ(rows->size(), 7u);
  for (size_t i = 0; i < rows->size(); ++i) {
    const auto& r = (*rows)[i];
    EXPECT_EQ(r.driver_id, "engine-driver");
    EXPECT_EQ(r.seq, i + 1);
    EXPECT_GT(r.entry.at_ms, 0);
    EXPECT_FALSE(r.entry.request_id.empty());
  }
  EXPECT_EQ((*rows)[0].entry.kind, job_kind::generate_key);
  EXPECT_EQ((*rows)[0].entry.key_id, "aud-1");
  EXPECT_EQ((*rows)[0].entry.public_key_fingerprint, fingerprint);
  EXPECT_EQ((*rows)[0].entry.outcome, "ok");
  EXPECT_TRUE((*rows)[0].entry.payload_sha256.empty());
  for (size_t i = 0; i < payloads.size(); ++i) {
    const auto& e = (*rows)[i + 1].entry;
    EXPECT_EQ(e.kind, job_kind::sign);
    EXPECT_EQ(e.public_key_fingerprint, fingerprint);
    EXPECT_EQ(e.payload_sha256, crypto::sha256(payloads[i])) << i;
    EXPECT_EQ(e.outcome, "ok");
  }
  EXPECT_EQ((*rows)[6].entry.key_id, "aud-none");
  EXPECT_EQ((*rows)[6].entry.outcome, "unknown_key");
  EXPECT_TRUE((*rows)[6].entry.public_key_fingerprint.empty());
  st->reset();
  // The binary checks the chain: intact, then edited, then cut.
  auto verify = [&] {
    auto e = env;
    e["USER_PIN"] = "";
    return test::run_driver({"audit", "verify"}, e);
  };
  auto ok = verify();
  EXPECT_EQ(ok.exit_code, 0) << ok.out << ok.err;
  auto report = json::parse(ok.out);
  EXPECT_EQ(report["rows"], 7);
  EXPECT_EQ(report["chains"][0]["head_seq"], 7);
  auto db = (dir / "keys.db").string();
  auto sql = [&](const std::string& statement) {
    auto cmd = "sqlite3 '" + db + "' \"" + statement + "\"";
    return std::system(cmd.c_str());
  };
  ASSERT_EQ(sql("UPDATE audit_log SET outcome = 'ok' WHERE seq = 7"), 0);
  auto edited = verify();
  EXPECT_EQ(edited.exit_code, 1) << edited.out;
  EXPECT_NE(edited.out.find("engine-driver seq 7: the row does not match its "
                            "hash (edited)"),
            std::string::npos)
    << edited.out;
  ASSERT_EQ(sql("UPDATE audit_log SET outcome = 'unknown_key' WHERE seq = 7; "
                "DELETE FROM audit_log WHERE seq = 3"),
            0);
  auto cut = verify();
  EXPECT_EQ(cut.exit_code, 1) << cut.out;
  EXPECT_NE(cut.out.find("engine-driver seq 4: follows seq 2 (rows 3..3 are "
                         "missing)"),
            std::string::npos)
    << cut.out;
}

TEST_F(EngineTest, SameGenerateDeliveredTwiceYieldsOneKey) {
  start_daemon(options());
  auto first = generate("dup", "secp256k1");
  ASSERT_TRUE(first["ok"].get<bool>()) << first.dump();
  auto generations = plan->counts.generate_key_pair.load();
  // A second request for the same key id, as a redelivery would be.
  auto second = generate("dup", "secp256k1");
  ASSERT_TRUE(second["ok"].get<bool>()) << second.dump();
  EXPECT_EQ(first["result"]["public_key"], second["result"]["public_key"]);
  EXPECT_EQ(plan->counts.generate_key_pair.load(), generations);
}

TEST_F(EngineTest, GenerateRedeliveredAfterLeaseExpiryYieldsOneKey) {
  start_proxy(400ms);
  // The first generation is held past the lease, until the request is
  // answered; meanwhile the proxy hands the request out again and the other
  // slot serves it.
  plan->before_generate_key_pair = hold_at_gate();
  auto o = options();
  o.hsm_timeout = 60s; // the held call is slow, not hung: never abandoned
  start_daemon(o);
  held_call = plan->counts.generate_key_pair.load() + 1; // the next one
  auto id = proxy->enqueue("generate_key",
                           {{"key_id", "slow"}, {"scheme", "p256"}});
  auto done = await_done(id);
  ASSERT_TRUE(done["ok"].get<bool>()) << done.dump();
  EXPECT_GE(done["deliveries"].get<int>(), 2);
  EXPECT_EQ(released.load(), 0); // answered by the redelivery, not the first
  // Now the first attempt finishes: it reaches the store (which has the
  // key already) and then posts under its expired lease, which the proxy
  // refuses. The refusal is the sign that it is through.
  // (Under a sanitizer a redelivery can itself outlive the 400 ms lease and
  // have its result refused: count only refusals from here on.)
  auto refused_before = proxy->stats().rejected_results;
  gate_open = true;
  ASSERT_TRUE(test::wait_until(
    [&] {
      return released.load() == 1
             && proxy->stats().rejected_results > refused_before;
    },
    30s, "the first attempt's late result, refused by the proxy"));
  drv.reset();
  auto st = store::sqlite_store::open(dir / "keys.db");
  ASSERT_TRUE(st);
  auto rec = (*st)->get("slow");
  ASSERT_TRUE(rec && *rec);
  EXPECT_EQ(crypto::to_hex((*rec)->public_key),
            done["result"]["public_key"].get<std::string>());
}

TEST_F(EngineTest, LeasesInFlightNeverExceedHealthySessionsTimesPipeline) {
  // From the first sign of the load on, each sign waits until a second one
  // has started (so both sessions are busy at once for certain), then takes
  // 15 ms, an HSM's latency, so that leases keep overlapping and the next
  // request of each session waits, looked up, behind the current one.
  struct overlap {
    std::atomic<int> from{0};
    std::atomic<int> started{0};
  };
  auto ov = std::make_shared<overlap>();
  plan->before_sign = [ov](int n) -> CK_RV {
    auto from = ov->from.load();
    if (from == 0 || n < from)
      return CKR_OK;
    ++ov->started;
    static_cast<void>(test::wait_until(
      [&ov] { return ov->started.load() >= 2; }, 30s, "a second sign"));
    std::this_thread::sleep_for(15ms);
    return CKR_OK;
  };
  auto o = options(2);
  o.pipeline = 2;
  o.hsm_timeout = 60s; // a sign waiting for its partner is not hung
  start_daemon(o);
  ASSERT_TRUE(generate("bp", "p256")["ok"].get<bool>());
  ov->from = plan->counts.sign.load() + 1;
  std::vector<std::string> ids;
  for (int i = 0; i < 40; ++i)
    ids.push_back(enqueue_sign("bp", test::sha256("bp " + std::to_string(i))));
  for (auto& id : ids)
    EXPECT_TRUE(await_done(id)["ok"].get<bool>()) << id;
  auto stats = proxy->stats();
  ASSERT_EQ(stats.max_in_flight.count("engine-driver"), 1u);
  // Two healthy sessions, pipeline 2: at most 4 leases, and the pipeline
  // was used (more leases than sessions while both were busy).
  EXPECT_LE(stats.max_in_flight["engine-driver"], 4u);
  EXPECT_GT(stats.max_in_flight["engine-driver"], 2u);
}

TEST_F(EngineTest, SessionFailingMidRequestIsRestartedAndTheRequestAnswered) {
  std::atomic<int> fail_at{0};
  plan->before_sign = [&fail_at](int n) -> CK_RV {
    return n == fail_at.load() ? CKR_SESSION_CLOSED : CKR_OK;
  };
  start_daemon(options(2));
  ASSERT_TRUE(generate("sup", "secp256k1")["ok"].get<bool>());
  auto sessions_before = plan->counts.open_session.load();
  fail_at = plan->counts.sign.load() + 1; // the very next sign
  auto sig = await_done(enqueue_sign("sup", test::sha256("supervised")));
  ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
  // The failed session was replaced by a new one; the daemon kept running.
  ASSERT_TRUE(test::wait_until(
    [&] { return plan->counts.open_session.load() > sessions_before; }, 30s,
    "a new session replacing the failed one"));
  auto stats = drv->stats();
  ASSERT_TRUE(stats);
  EXPECT_GE(stats->session_failures, 1u);
  EXPECT_GE(stats->retried, 1u);
  // Still serving afterwards, on both slots.
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto now = drv->stats();
      return now && now->healthy_sessions == 2;
    },
    30s, "both sessions healthy again"));
  EXPECT_TRUE(
    await_done(enqueue_sign("sup", test::sha256("after")))["ok"].get<bool>());
}

TEST_F(EngineTest, OneSessionFailureCostsOneRetryEvenWithOneSlot) {
  std::atomic<int> fail_at{0};
  plan->before_sign = [&fail_at](int n) -> CK_RV {
    return n == fail_at.load() ? CKR_DEVICE_ERROR : CKR_OK;
  };
  start_daemon(options(1));
  ASSERT_TRUE(generate("one", "p256")["ok"].get<bool>());
  fail_at = plan->counts.sign.load() + 1;
  auto sig = await_done(enqueue_sign("one", test::sha256("one slot")));
  ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
  auto stats = drv->stats();
  ASSERT_TRUE(stats);
  // The job waited for the new session instead of bouncing off the dead one.
  EXPECT_EQ(stats->session_failures, 1u);
  EXPECT_EQ(stats->retried, 1u);
  EXPECT_EQ(proxy->stats().max_in_flight["engine-driver"], 1u);
}

TEST_F(EngineTest, UnservedSchemeIsRefusedBeforeTheHsm) {
  auto o = options();
  o.cfg.resident_schemes.clear(); // SoftHSMv2 cannot wrap Ed25519 keys
  start_daemon(o);
  auto generations = plan->counts.generate_key_pair.load();
  auto done = generate("ed", "ed25519");
  EXPECT_FALSE(done["ok"].get<bool>());
  EXPECT_EQ(done["error"]["code"], "scheme_unsupported") << done.dump();
  EXPECT_NE(done["error"]["message"].get<std::string>().find("resident"),
            std::string::npos);
  EXPECT_EQ(plan->counts.generate_key_pair.load(), generations);
}

TEST_F(EngineTest, HungCallIsAbandonedAndTheRequestRetriedElsewhere) {
  // The sign hangs until the test releases it.
  plan->before_sign = hold_at_gate();
  auto o = options(2);
  o.hsm_timeout = 500ms;
  start_daemon(o);
  ASSERT_TRUE(generate("hang", "p256")["ok"].get<bool>());
  held_call = plan->counts.sign.load() + 1; // the next sign
  auto started = std::chrono::steady_clock::now();
  auto sig = await_done(enqueue_sign("hang", test::sha256("hung")));
  auto took = std::chrono::steady_clock::now() - started;
  ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
  // Answered by another session while the hung call was still held: the
  // job did not wait for it...
  EXPECT_EQ(released.load(), 0);
  // ... but it did give it the HSM timeout first (the timer starts after
  // `started` and does not fire early).
  EXPECT_GE(took, o.hsm_timeout);
  auto stats = drv->stats();
  ASSERT_TRUE(stats);
  EXPECT_GE(stats->session_failures, 1u);
  EXPECT_GE(stats->retried, 1u);
  // The abandoned call returns; the driver serves on.
  gate_open = true;
  ASSERT_TRUE(test::wait_until([&] { return released.load() == 1; }, 30s,
                               "the abandoned call to return"));
  EXPECT_TRUE(
    await_done(enqueue_sign("hang", test::sha256("after")))["ok"].get<bool>());
}

TEST_F(EngineTest, StopWithAHungCallEndsWithinItsBoundsAndSaysSo) {
  plan->before_sign = hold_at_gate();
  auto o = options(2);
  o.hsm_timeout = 500ms;
  o.drain_timeout = 2000ms;
  o.abandon_grace = 1000ms;
  o.metrics_listen = net::metrics_listen{"127.0.0.1", 0, false};
  start_daemon(o);
  auto url = drv->metrics_url();
  ASSERT_TRUE(url);
  auto metrics_port = static_cast<uint16_t>(
    std::stoul(url->substr(url->rfind(':') + 1)));
  EXPECT_TRUE(admin_http(metrics_port, "", "GET", "/healthz"));
  ASSERT_TRUE(generate("stuck", "p256")["ok"].get<bool>());
  held_call = plan->counts.sign.load() + 1;
  // Served elsewhere once the hung call is abandoned.
  auto sig = await_done(enqueue_sign("stuck", test::sha256("stuck")));
  ASSERT_TRUE(sig["ok"].get<bool>()) << sig.dump();
  ASSERT_EQ(released.load(), 0);
  // SIGTERM's path while the call is still inside the module: stop gives
  // up on it after the abandon grace and reports it; `run` then exits 1
  // without C_Finalize.
  auto started = std::chrono::steady_clock::now();
  auto status = drv->stop();
  auto took = std::chrono::steady_clock::now() - started;
  EXPECT_EQ(status, stop_status::hsm_call_stuck);
  // Bounded: the poll wait (300 ms) for the poller, the drain, and the
  // abandon grace, plus scheduling slack.
  EXPECT_LT(took, o.poll_wait + o.drain_timeout + o.abandon_grace + 2s);
  EXPECT_GE(took, o.abandon_grace);
  EXPECT_EQ(released.load(), 0);
  // The metrics listener is closed, although the actor system is kept.
  EXPECT_FALSE(admin_http(metrics_port, "", "GET", "/healthz"));
  // The abandoned call returns and its session closes before this process
  // exits: exit handlers (SoftHSMv2's and OpenSSL's free the mutexes and
  // tables that thread uses) must not run under a thread still inside the
  // module, which is also why `run` ends with _Exit here (ThreadSanitizer
  // caught the race).
  auto closed = plan->counts.closed_session.load();
  gate_open = true;
  EXPECT_TRUE(test::wait_until(
    [&] {
      return released.load() == 1
             && plan->counts.closed_session.load() > closed;
    },
    30s, "the abandoned call to return and its session to close"));
}

TEST_F(EngineTest, BadRequestsGetErrorResultsAndTheDriverKeepsServing) {
  start_daemon(options());
  ASSERT_TRUE(generate("good", "secp256k1")["ok"].get<bool>());
  struct bad_case {
    std::string kind;
    json params;
    std::string code;
  };
  std::vector<bad_case> cases{
    {"explode", {{"key_id", "good"}}, "invalid_request"},
    {"sign", {{"payload", std::string(64, 'a')}}, "invalid_request"},
    {"sign", json::array({1, 2}), "invalid_request"},
    {"sign", {{"key_id", "good"}, {"payload", "not hex"}}, "invalid_request"},
    {"sign",
     {{"key_id", "nobody"}, {"payload", std::string(64, 'a')}},
     "unknown_key"},
    {"sign",
     {{"key_id", "good"}, {"payload", std::string(62, 'a')}},
     "invalid_payload"},
    {"sign",
     {{"key_id", "good"}, {"payload", std::string(300000, 'a')}},
     "invalid_payload"},
    {"generate_key",
     {{"key_id", "s"}, {"scheme", "schnorr"}},
     "scheme_unsupported"},
    {"generate_key",
     {{"key_id", "bad id!"}, {"scheme", "p256"}},
     "invalid_request"},
  };
  auto hsm_signs = plan->counts.sign.load();
  for (auto& c : cases) {
    auto done = await_done(proxy->enqueue(c.kind, c.params));
    ASSERT_FALSE(done.empty());
    EXPECT_FALSE(done["ok"].get<bool>()) << done.dump();
    EXPECT_EQ(done["error"]["code"], c.code) << done.dump();
    EXPECT_FALSE(done["error"]["retryable"].get<bool>()) << done.dump();
  }
  EXPECT_EQ(plan->counts.sign.load(), hsm_signs); // none reached the HSM
  auto ok = await_done(enqueue_sign("good", test::sha256("still serving")));
  EXPECT_TRUE(ok["ok"].get<bool>()) << ok.dump();
}

TEST_F(EngineTest, OnePercentHsmFaultsOfEachClassLoseNothing) {
  // The fault-injecting module in front of SoftHSMv2: 1 % of signs (the
  // row MAC, the signature) and of unwraps fail with a session, device,
  // general or token error, drawn from a fixed seed. Under the sanitizers a
  // third of the requests meet three times the rate: as many faults.
  auto counts = dir / "faults.txt";
  ::setenv("HSM_SHIM_MODULE", test::softhsm_module().c_str(), 1);
  auto rate = std::to_string(test::soak_divisor);
  auto spec = "seed=11;counts=" + counts.string()
              + ";fail=C_Sign:CKR_SESSION_HANDLE_INVALID|CKR_DEVICE_ERROR|"
                "CKR_GENERAL_ERROR|CKR_FUNCTION_FAILED|CKR_DEVICE_REMOVED|"
                "CKR_TOKEN_NOT_PRESENT%"
              + rate + ",C_UnwrapKey:CKR_DEVICE_ERROR|CKR_GENERAL_ERROR%"
              + rate;
  ::setenv("HSM_SHIM_SPEC", spec.c_str(), 1);
  auto o = options(2);
  o.cfg.pkcs11_module = HSM_SHIM_LIBRARY;
  start_daemon(o);
  std::vector<std::string> keys{"f-k1", "f-k2", "f-r1", "f-r2"};
  for (auto& k : keys) {
    auto g = generate(k, k[2] == 'k' ? "secp256k1" : "p256");
    ASSERT_TRUE(g["ok"].get<bool>()) << g.dump();
  }
  constexpr int requests = test::soak(1500);
  std::vector<std::pair<std::string, std::string>> sent; // id, key
  for (int i = 0; i < requests; ++i) {
    auto& k = keys[static_cast<size_t>(i) % keys.size()];
    sent.emplace_back(enqueue_sign(k, test::sha256("f" + std::to_string(i))),
                      k);
  }
  int ok = 0;
  for (auto& [id, key] : sent) {
    auto r = await_done(id, 90000ms);
    if (r["ok"].get<bool>())
      ++ok;
    else
      ADD_FAILURE() << key << ": " << r.dump();
  }
  EXPECT_EQ(ok, requests);
  // Faults really happened, sessions were replaced, nothing restarted the
  // process, and both sessions serve again.
  int injected = test::shim_count(counts, "fail");
  EXPECT_GE(injected, 15) << "too few faults to show anything";
  auto st = drv->stats();
  ASSERT_TRUE(st);
  EXPECT_GE(st->session_failures, static_cast<uint64_t>(injected) / 2);
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto now = drv->stats();
      return now && now->healthy_sessions == 2;
    },
    30s, "both sessions healthy again"));
  std::cout << "[ faults ] " << requests << " signs, " << injected
            << " injected faults, " << st->session_failures
            << " session failures, " << st->retried << " retries\n";
}

TEST_F(EngineTest, AFiveSecondHsmOutageTakesNoLeasesAndRecovers) {
  // Every call but C_Initialize/C_Finalize fails with CKR_DEVICE_REMOVED
  // from 4 s after the module is loaded, for 5 s.
  ::setenv("HSM_SHIM_MODULE", test::softhsm_module().c_str(), 1);
  ::setenv("HSM_SHIM_SPEC", "outage=*:CKR_DEVICE_REMOVED@4s for 5s", 1);
  auto loaded = std::chrono::steady_clock::now();
  auto fatal = std::make_shared<std::atomic<int>>(0);
  auto o = options(2);
  o.cfg.pkcs11_module = HSM_SHIM_LIBRARY;
  o.on_fatal = [fatal](const std::string&) { ++*fatal; };
  start_daemon(o);
  ASSERT_TRUE(generate("out-1", "p256")["ok"].get<bool>());
  std::this_thread::sleep_until(loaded + 4500ms);
  // A request in the outage: the session that takes it finds the token
  // gone; the answer is retryable and the proxy queues it again.
  auto id = enqueue_sign("out-1", test::sha256("during the outage"));
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto now = drv->stats();
      return now && now->healthy_sessions == 0;
    },
    4s, "every session down in the outage"));
  auto leased = proxy->stats().leased;
  std::this_thread::sleep_for(1500ms);
  EXPECT_EQ(proxy->stats().leased, leased)
    << "leases taken while no session was up";
  auto r = await_done(id, 30000ms);
  auto answered = std::chrono::steady_clock::now();
  ASSERT_TRUE(r["ok"].get<bool>()) << r.dump();
  EXPECT_GE(answered - loaded, 9s) << "answered inside the outage";
  ASSERT_TRUE(test::wait_until(
    [&] {
      auto now = drv->stats();
      return now && now->healthy_sessions == 2;
    },
    30s, "both sessions back after the outage"));
  EXPECT_EQ(fatal->load(), 0) << "a 5 s outage ended the driver";
  EXPECT_TRUE(
    await_done(enqueue_sign("out-1", test::sha256("after")))["ok"].get<bool>());
}

/// The real binary in front of the fault-injecting module: the 30th C_Sign
/// of the process never returns. The request it holds is answered through
/// the other session once `--hsm-timeout` has passed, and the driver serves
/// on with one session replaced; SIGTERM then ends `run` with exit 1 (the
/// documented status of a call still stuck at shutdown) within the poll
/// wait, the drain deadline and the 5 s abandon grace.
TEST_F(EngineTest, TheBinaryServesPastAHungSignAndExitsOneOnSigterm) {
  auto counts = dir / "hang-counts.txt";
  auto e = env;
  e["PKCS11_MODULE"] = HSM_SHIM_LIBRARY;
  e["HSM_SHIM_MODULE"] = test::softhsm_module();
  e["HSM_SHIM_SPEC"] = "counts=" + counts.string() + ";hang=C_Sign:@30";
  e["HSM_RESIDENT_SCHEMES"] = "ed25519";
  e["HSM_LOG_LEVEL"] = "info";
  auto log_path = (dir / "hang.log").string();
  constexpr auto poll_wait = 300ms;
  constexpr auto hsm_timeout = 1000ms;
  constexpr auto drain = 2000ms;
  constexpr auto abandon_grace = 5000ms; // `run`'s, not configurable
  auto p = test::start_driver(
    test::run_args(proxy->port(), pki,
                   {"--driver-id", "hang-driver", "--sessions", "2",
                    "--poll-wait", std::to_string(poll_wait.count()),
                    "--hsm-timeout", std::to_string(hsm_timeout.count()),
                    "--drain-timeout", std::to_string(drain.count())}),
    e, log_path);
  test::kill_on_exit guard{p};
  auto read_log = [&] {
    std::ifstream in{log_path};
    return std::string{std::istreambuf_iterator<char>{in}, {}};
  };
  auto hangs = [&] { return test::shim_count(counts, "hang", "C_Sign"); };
  auto g = generate("hang-k", "p256");
  ASSERT_TRUE(g["ok"].get<bool>()) << g.dump() << read_log();
  auto pub = test::unhex(g["result"]["public_key"]);
  // Start-up and the generate sign fewer than 30 times (the probe, the new
  // key's self-check); signs one at a time reach the 30th call.
  int signed_ok = 0;
  for (int i = 0; i < 60 && hangs() == 0; ++i) {
    auto payload = test::sha256("hang " + std::to_string(i));
    auto started = std::chrono::steady_clock::now();
    auto r = await_done(enqueue_sign("hang-k", payload));
    auto took = std::chrono::steady_clock::now() - started;
    ASSERT_TRUE(r["ok"].get<bool>()) << r.dump();
    EXPECT_TRUE(test::openssl_verify(scheme::p256, pub, payload,
                                     test::unhex(r["result"]["der"])));
    ++signed_ok;
    if (hangs() == 1) {
      // This one met the hung call: answered elsewhere, after the timeout.
      EXPECT_GE(took, hsm_timeout) << "answered before the call was abandoned";
    }
  }
  ASSERT_EQ(hangs(), 1) << "the hang never fired; " << signed_ok << " signs\n"
                        << read_log();
  // One session was replaced; the driver serves on with two.
  for (int i = 0; i < 5; ++i) {
    auto payload = test::sha256("after " + std::to_string(i));
    auto r = await_done(enqueue_sign("hang-k", payload));
    ASSERT_TRUE(r["ok"].get<bool>()) << r.dump();
    EXPECT_TRUE(test::openssl_verify(scheme::p256, pub, payload,
                                     test::unhex(r["result"]["der"])));
  }
  auto sent = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(p.pid, SIGTERM), 0);
  auto code = test::wait_exit(p, 30000);
  auto took = std::chrono::steady_clock::now() - sent;
  auto text = read_log();
  EXPECT_EQ(code, 1) << text;
  EXPECT_GE(took, abandon_grace) << text;
  EXPECT_LT(took, poll_wait + drain + abandon_grace + 3s) << text;
  EXPECT_NE(text.find("still hung after 5000 ms"), std::string::npos) << text;
  EXPECT_NE(text.find("exiting with status 1: an HSM call is still stuck"),
            std::string::npos)
    << text;
  EXPECT_EQ(proxy->stats().leased, 0u) << "a lease left with the stopped "
                                          "driver";
}

TEST_F(EngineTest, AnActorThatDiesEndsTheDriverInsteadOfLeavingItSilent) {
  for (std::string part :
       {"store", "audit writer", "result poster", "dispatcher", "poller"}) {
    auto why = std::make_shared<std::string>();
    auto calls = std::make_shared<std::atomic<int>>(0);
    auto mutex = std::make_shared<std::mutex>();
    auto o = options();
    o.on_fatal = [why, calls, mutex](const std::string& text) {
      std::lock_guard<std::mutex> guard{*mutex};
      *why = text;
      ++*calls;
    };
    start_daemon(o);
    // It serves first.
    auto done = generate("watch-" + std::to_string(part.size()), "p256");
    ASSERT_TRUE(done["ok"].get<bool>()) << done.dump();
    ASSERT_FALSE(drv->kill_part_for_test(part));
    ASSERT_TRUE(test::wait_until([&] { return calls->load() > 0; }, 10s,
                                 "on_fatal after the " + part + " died"));
    {
      std::lock_guard<std::mutex> guard{*mutex};
      EXPECT_NE(why->find("the " + part + " ended"), std::string::npos) << *why;
    }
    // The daemon still stops (what run does next), and says so once.
    static_cast<void>(drv->stop());
    EXPECT_EQ(calls->load(), 1) << part;
    drv.reset();
  }
}

TEST_F(EngineTest, WrongPinRefusesToStartAndLogsInOnce) {
  ::setenv("USER_PIN", "not-the-pin", 1);
  auto d = daemon::start(options());
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error(), hsm_errc::fatal);
  EXPECT_NE(describe(d.error()).find("CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(plan->counts.login.load(), 1);
}

TEST_F(EngineTest, NoSchemeServedMeansNoStartAndNoPolling) {
  // A master key label the token does not hold: refused before any poll.
  // A request waits, so that a poll would show: it would lease it.
  auto waiting = proxy->enqueue("generate_key",
                                {{"key_id", "unserved"}, {"scheme", "p256"}});
  auto o = options();
  o.cfg.master_key_label = "missing-master";
  ::setenv("USER_PIN", user_pin, 1);
  auto d = daemon::start(o);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error(), key_errc::master_key_missing);
  // Nothing of the refused daemon runs after `start` returned, so what the
  // proxy shows now is final: no lease, no poll.
  EXPECT_TRUE(proxy->stats().max_in_flight.empty());
  auto state = proxy->request_state(waiting);
  ASSERT_TRUE(state);
  EXPECT_EQ((*state)["state"], "queued") << state->dump();
  EXPECT_EQ((*state)["deliveries"], 0) << state->dump();
  EXPECT_EQ(proxy->waiting_polls(), 0u);
}

/// The real binary: SIGTERM while requests are in flight.
TEST_F(EngineTest, SigtermDuringLoadAnswersOrHandsBackEveryRequest) {
  // Keys first, with an in-process daemon.
  start_daemon(options());
  ASSERT_TRUE(generate("term", "p256")["ok"].get<bool>());
  drv.reset();
  std::vector<std::string> ids;
  for (int i = 0; i < 60; ++i)
    ids.push_back(i % 4 == 0
                    ? proxy->enqueue("generate_key",
                                     {{"key_id", "term-" + std::to_string(i)},
                                      {"scheme", "secp256k1"}})
                    : enqueue_sign("term", test::sha256(std::to_string(i))));
  auto run_env = env;
  auto p = test::start_driver(
    test::run_args(proxy->port(), pki,
                   {"--driver-id", "term-driver", "--poll-wait", "300",
                    "--sessions", "2", "--log-level", "info"}),
    run_env, (dir / "run.log").string());
  test::kill_on_exit guard{p};
  // Wait until some, not all, are done.
  EXPECT_TRUE(test::wait_until([&] { return proxy->stats().done >= 5; }, 60s,
                               "5 requests answered by the driver process"));
  // The PIN is neither on the command line nor left in the environment.
  for (auto file : {"cmdline", "environ"}) {
    std::ifstream in{"/proc/" + std::to_string(p.pid) + "/" + file};
    std::string content{std::istreambuf_iterator<char>{in}, {}};
    EXPECT_EQ(content.find(user_pin), std::string::npos) << file;
  }
  ::kill(p.pid, SIGTERM);
  EXPECT_EQ(test::wait_exit(p, 30000), 0);
  std::ifstream log{dir / "run.log"};
  std::string log_text{std::istreambuf_iterator<char>{log}, {}};
  EXPECT_EQ(log_text.find(user_pin), std::string::npos);
  EXPECT_NE(log_text.find("stopped"), std::string::npos) << log_text;
  // Nothing is left leased to the stopped driver: each request is done or
  // back in the queue.
  auto stats = proxy->stats();
  EXPECT_EQ(stats.leased, 0u) << "leases left after SIGTERM";
  EXPECT_LT(stats.done, ids.size()); // the stop really came mid-load
  // A new driver finishes the rest: nothing was lost.
  start_daemon(options());
  for (auto& id : ids)
    EXPECT_TRUE(await_done(id)["ok"].get<bool>()) << id;
}

size_t count(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (auto pos = hay.find(needle); pos != std::string::npos;
       pos = hay.find(needle, pos + 1))
    ++n;
  return n;
}

/// The admin port a `hsm-driver dev` log names (0 if none).
uint16_t admin_port_in(const std::string& log) {
  static const std::regex admin{
    R"re("admin_api": "http://127\.0\.0\.1:([0-9]+)")re"};
  std::smatch m;
  if (!std::regex_search(log, m, admin))
    return 0;
  return static_cast<uint16_t>(std::stoul(m[1].str()));
}

/// `hsm-driver dev`: the whole system in one command, twice on one folder.
TEST_F(EngineTest, DevModeRunsTheDemoAndServesUntilSigterm) {
  auto data = dir / "dev";
  auto dev_env = env;
  dev_env["HSM_TOKEN_LABEL"] = "";
  dev_env["SQLITE_PATH"] = "";
  dev_env["USER_PIN"] = "";
  std::string first_keys;
  for (int round = 0; round < 2; ++round) {
    auto log_path = (dir / ("dev-" + std::to_string(round) + ".log")).string();
    auto p = test::start_driver({"dev", "--data-dir", data.string()}, dev_env,
                                log_path);
    test::kill_on_exit guard{p};
    std::string text;
    ASSERT_TRUE(test::wait_until(
      [&] {
        std::ifstream in{log_path};
        text.assign(std::istreambuf_iterator<char>{in}, {});
        return text.find("hsm-driver dev: serving") != std::string::npos;
      },
      60s, "the dev mode to log that it serves", 50ms))
      << text;
    EXPECT_EQ(count(text, "\"verified\": true"), 3u) << text;
    EXPECT_EQ(count(text, "\"verified\": false"), 0u) << text;
    // Still serving after the demo: a request enqueued now is answered.
    auto admin = admin_port_in(text);
    ASSERT_NE(admin, 0) << text;
    // The dev mode's admin token: a 0600 file in its 0700 folder, named in
    // the lines it prints.
    EXPECT_EQ(std::filesystem::status(data).permissions(),
              std::filesystem::perms::owner_all);
    EXPECT_EQ(std::filesystem::status(data / "admin-token").permissions(),
              std::filesystem::perms::owner_read
                | std::filesystem::perms::owner_write);
    EXPECT_NE(text.find("Authorization: Bearer $(cat "
                        + (data / "admin-token").string() + ")"),
              std::string::npos)
      << text;
    std::string token;
    std::ifstream{data / "admin-token"} >> token;
    ASSERT_EQ(token.size(), 64u);
    EXPECT_NE(admin_http(admin, "wrong", "GET", "/v1/admin/stats")
                .value_or("")
                .find("unauthorized"),
              std::string::npos);
    auto key_id = "alive-" + std::to_string(round);
    auto posted = admin_http(
      admin, token, "POST", "/v1/admin/requests",
      json{{"kind", "generate_key"},
           {"params", {{"key_id", key_id}, {"scheme", "secp256k1"}}}}
        .dump());
    ASSERT_TRUE(posted);
    auto reply = json::parse(*posted, nullptr, false);
    ASSERT_TRUE(reply.is_object() && reply.contains("id")) << *posted;
    auto id = reply["id"].get<std::string>();
    json state;
    EXPECT_TRUE(test::wait_until(
      [&] {
        auto got = admin_http(admin, token, "GET", "/v1/admin/requests/" + id);
        state = json::parse(got.value_or(""), nullptr, false);
        return state.is_object() && state.value("state", "") == "done";
      },
      30s, "the dev mode to answer " + key_id, 20ms))
      << state.dump();
    EXPECT_TRUE(state.is_object() && state.value("ok", false)) << state.dump();
    // It serves its metrics on a loopback port and printed where.
    static const std::regex metrics_url{
      R"re("metrics": "http://127\.0\.0\.1:([0-9]+)/metrics")re"};
    std::smatch m;
    ASSERT_TRUE(std::regex_search(text, m, metrics_url)) << text;
    auto metrics = admin_http(static_cast<uint16_t>(std::stoul(m[1].str())), "",
                              "GET", "/metrics");
    ASSERT_TRUE(metrics);
    EXPECT_NE(metrics->find(
                "hsm_driver_requests_total{kind=\"sign\",outcome=\"ok\"} 3\n"),
              std::string::npos)
      << *metrics;
    ::kill(p.pid, SIGTERM);
    EXPECT_EQ(test::wait_exit(p, 30000), 0);
    // The same keys on the second run: the folder is reused.
    auto keys_at = text.find("\"public_key\"");
    ASSERT_NE(keys_at, std::string::npos);
    auto keys = text.substr(keys_at, 150);
    if (round == 0)
      first_keys = keys;
    else
      EXPECT_EQ(keys, first_keys);
  }
  EXPECT_TRUE(std::filesystem::exists(data / "pki" / "root.pem"));
  EXPECT_TRUE(std::filesystem::exists(data / "keys.db"));
}

} // namespace
} // namespace hsm
