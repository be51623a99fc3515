#include "runtime/net/reference_proxy.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/proxy_client.hpp"
#include "tests/support/wait.hpp"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace hsm::net {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

std::filesystem::path fresh_dir(const std::string& name) {
  auto dir = std::filesystem::path{::testing::TempDir()}
             / ("hsm_net_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

long elapsed_ms(steady::time_point since) {
  return static_cast<long>(
    std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - since)
      .count());
}

/// Checks `pred` until it holds (true) or `limit` has passed (false): for
/// something another thread is about to do. The limit only catches a hang.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 20s) {
  auto deadline = steady::now() + limit;
  while (!pred()) {
    if (steady::now() >= deadline)
      return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

/// A POST over mTLS with libcurl directly, for bodies `proxy_client` never
/// sends and for a client without a certificate. Empty `cert` = none.
struct raw_reply {
  CURLcode rc = CURLE_OK;
  long status = 0;
  std::string body;
};

size_t collect(char* ptr, size_t size, size_t nmemb, void* user) {
  static_cast<std::string*>(user)->append(ptr, size * nmemb);
  return size * nmemb;
}

raw_reply raw_post(uint16_t port, const std::string& path,
                   const std::string& body, const dev_pki& trust,
                   const std::filesystem::path& cert = {},
                   const std::filesystem::path& key = {}) {
  raw_reply out;
  auto* curl = curl_easy_init();
  auto url = "https://127.0.0.1:" + std::to_string(port) + path;
  auto ca = trust.root_cert.string();
  auto cert_s = cert.string();
  auto key_s = key.string();
  curl_slist* headers = curl_slist_append(nullptr,
                                          "Content-Type: application/json");
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CAINFO, ca.c_str());
  if (!cert.empty()) {
    curl_easy_setopt(curl, CURLOPT_SSLCERT, cert_s.c_str());
    curl_easy_setopt(curl, CURLOPT_SSLKEY, key_s.c_str());
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                   static_cast<curl_off_t>(body.size()));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &collect);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, static_cast<void*>(&out.body));
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 5000L);
  out.rc = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &out.status);
  curl_easy_cleanup(curl);
  curl_slist_free_all(headers);
  return out;
}

/// The curl command line, if installed (deploy/install-deps.sh installs
/// it): a client in a process of its own, to kill with -9.
std::optional<std::filesystem::path> curl_command() {
  const char* path = std::getenv("PATH");
  std::istringstream dirs{path != nullptr ? path : "/usr/bin:/bin"};
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    auto candidate = std::filesystem::path{dir} / "curl";
    if (::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  return std::nullopt;
}

/// A long-poll held by another process (the curl command line with the
/// driver's certificate), which the test kills with SIGKILL as an operator
/// kills a driver with kill -9: the kernel closes its connection as the
/// process dies, nothing is said at the TLS or HTTP level.
class external_poll {
public:
  external_poll(const std::filesystem::path& curl, uint16_t port,
                const dev_pki& pki, const std::string& driver,
                std::chrono::milliseconds wait) {
    std::vector<std::string> args{
      curl.string(),
      "--silent",
      "--output",
      "/dev/null",
      "--max-time",
      "120",
      "--cacert",
      pki.root_cert.string(),
      "--cert",
      pki.driver_chain.string(),
      "--key",
      pki.driver_key.string(),
      "--header",
      "Content-Type: application/json",
      "--data",
      json{{"driver_id", driver}, {"max", 1}, {"wait_ms", wait.count()}}.dump(),
      "https://127.0.0.1:" + std::to_string(port) + "/v1/poll"};
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null",
                                     O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null",
                                     O_WRONLY, 0);
    if (::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ)
        != 0)
      pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
  }

  ~external_poll() {
    kill9();
  }

  external_poll(const external_poll&) = delete;
  external_poll& operator=(const external_poll&) = delete;

  bool started() const {
    return pid_ > 0;
  }

  /// SIGKILL, then reaps: once this returns the process is gone and its
  /// sockets are closed.
  void kill9() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

private:
  pid_t pid_ = -1;
};

json ok_result(const json& req, const std::string& driver) {
  return json{{"id", req["id"]},
              {"lease", req["lease"]},
              {"driver_id", driver},
              {"ok", true},
              {"result", {{"public_key", "02ab"}}}};
}

json error_result(const json& req, const std::string& driver, bool retryable) {
  return json{{"id", req["id"]},
              {"lease", req["lease"]},
              {"driver_id", driver},
              {"ok", false},
              {"error",
               {{"code", "hsm_unavailable"},
                {"message", "no session"},
                {"retryable", retryable}}}};
}

// -- fixture ------------------------------------------------------------------

/// One PKI for the suite (and a second, unrelated one for refusals); a fresh
/// proxy per test.
class ReferenceProxyTest : public ::testing::Test {
protected:
  static void SetUpTestSuite() {
    dir_ = new std::filesystem::path{fresh_dir("reference_proxy")};
    auto pki = make_dev_pki(*dir_ / "pki");
    ASSERT_TRUE(pki) << describe(pki.error());
    pki_ = new dev_pki{*pki};
    auto other = make_dev_pki(*dir_ / "other");
    ASSERT_TRUE(other) << describe(other.error());
    other_ = new dev_pki{*other};
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    delete pki_;
    delete other_;
  }

  void SetUp() override {
    ASSERT_NE(pki_, nullptr);
    ASSERT_NE(other_, nullptr);
  }

  void TearDown() override {
    // Clients first: an idle kept-alive connection holds a server thread.
    clients_.clear();
    admin_.reset();
    proxy_.reset();
  }

  reference_proxy_config proxy_config() const {
    reference_proxy_config cfg;
    cfg.server_cert = pki_->server_chain;
    cfg.server_key = pki_->server_key;
    cfg.client_ca = pki_->root_cert;
    cfg.lease_duration = 10s;
    cfg.max_wait = 5s;
    return cfg;
  }

  void start(const reference_proxy_config& cfg) {
    auto proxy = reference_proxy::start(cfg);
    ASSERT_TRUE(proxy) << describe(proxy.error());
    proxy_ = std::move(*proxy);
    admin_ = std::make_unique<httplib::Client>("127.0.0.1",
                                               proxy_->admin_port());
    admin_->set_read_timeout(5, 0);
    admin_->set_bearer_token_auth(proxy_->admin_token().c_str());
  }

  void start() {
    start(proxy_config());
  }

  /// Starts a proxy on `clk_`, which moves only when the test says so.
  void start_manual(reference_proxy_config cfg) {
    cfg.clock = &clk_;
    start(cfg);
  }

  void start_manual() {
    start_manual(proxy_config());
  }

  /// Moves the proxy's manual clock on and lets waiting polls see it.
  void advance(std::chrono::milliseconds d) {
    clk_.advance(d);
    proxy_->clock_advanced();
  }

  /// Waits until `n` long-polls wait in the proxy.
  [[nodiscard]] bool polls_waiting(size_t n) {
    return eventually([&] { return proxy_->waiting_polls() == n; });
  }

  proxy_client_config client_config(const std::string& driver) const {
    proxy_client_config cfg;
    cfg.proxy_addr = "127.0.0.1:" + std::to_string(proxy_->port());
    cfg.tls = {pki_->root_cert, pki_->driver_chain, pki_->driver_key};
    cfg.driver_id = driver;
    cfg.connect_timeout = 2s;
    cfg.poll_grace = 3s;
    cfg.post_timeout = 3s;
    return cfg;
  }

  /// As `client_config(driver)`, presenting another certificate and key.
  proxy_client_config client_config(const std::string& driver,
                                    const std::filesystem::path& cert,
                                    const std::filesystem::path& key) const {
    auto cfg = client_config(driver);
    cfg.tls.cert = cert;
    cfg.tls.key = key;
    return cfg;
  }

  proxy_client* client(const proxy_client_config& cfg) {
    auto c = proxy_client::create(cfg);
    EXPECT_TRUE(c) << describe(c.error());
    if (!c)
      return nullptr;
    clients_.push_back(std::move(*c));
    return clients_.back().get();
  }

  proxy_client* client(const std::string& driver = "driver-a") {
    return client(client_config(driver));
  }

  // -- admin API over HTTP ----------------------------------------------------

  std::string enqueue(const std::string& kind, const json& params,
                      const std::string& id = {}) {
    json body{{"kind", kind}, {"params", params}};
    if (!id.empty())
      body["id"] = id;
    auto res = admin_->Post("/v1/admin/requests", body.dump(),
                            "application/json");
    EXPECT_TRUE(res);
    if (!res)
      return {};
    EXPECT_EQ(res->status, 200) << res->body;
    return json::parse(res->body).value("id", "");
  }

  std::pair<int, json> state(const std::string& id) {
    auto res = admin_->Get("/v1/admin/requests/" + id);
    EXPECT_TRUE(res);
    if (!res)
      return {0, {}};
    return {res->status, json::parse(res->body, nullptr, false)};
  }

  json stats() {
    auto res = admin_->Get("/v1/admin/stats");
    EXPECT_TRUE(res);
    if (!res)
      return {};
    EXPECT_EQ(res->status, 200);
    return json::parse(res->body);
  }

  /// Polls and returns the delivered requests (empty on any failure).
  static json poll(proxy_client* c, size_t max,
                   std::chrono::milliseconds wait) {
    auto reply = c->poll(max, wait);
    EXPECT_TRUE(reply) << describe(reply.error());
    if (!reply)
      return json::array();
    EXPECT_EQ(reply->status, 200) << reply->body;
    auto body = json::parse(reply->body, nullptr, false);
    EXPECT_TRUE(body.is_object() && body["requests"].is_array()) << reply->body;
    if (!body.is_object() || !body["requests"].is_array())
      return json::array();
    return body["requests"];
  }

  static long post(proxy_client* c, const json& body) {
    auto reply = c->post_result(body.dump());
    EXPECT_TRUE(reply) << describe(reply.error());
    return reply ? reply->status : 0;
  }

  static inline std::filesystem::path* dir_ = nullptr;
  static inline dev_pki* pki_ = nullptr;
  static inline dev_pki* other_ = nullptr;

  manual_clock clk_;
  std::unique_ptr<reference_proxy> proxy_;
  std::unique_ptr<httplib::Client> admin_;
  std::vector<std::unique_ptr<proxy_client>> clients_;
};

// -- delivery and results -----------------------------------------------------

TEST_F(ReferenceProxyTest, PollDeliversEnqueuedRequestWithLease) {
  start();
  auto id = enqueue("generate_key", {{"key_id", "k1"}, {"scheme", "p256"}});
  ASSERT_FALSE(id.empty());
  auto reqs = poll(client(), 10, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_EQ(reqs[0]["kind"], "generate_key");
  EXPECT_EQ(reqs[0]["params"]["key_id"], "k1");
  ASSERT_TRUE(reqs[0]["lease"].is_string());
  EXPECT_FALSE(reqs[0]["lease"].get<std::string>().empty());
  auto [status, st] = state(id);
  EXPECT_EQ(status, 200);
  EXPECT_EQ(st["state"], "leased");
  EXPECT_EQ(st["deliveries"], 1);
}

TEST_F(ReferenceProxyTest, ResultIsAcceptedOnceThenConflicts) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto* c = client();
  auto reqs = poll(c, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(post(c, ok_result(reqs[0], "driver-a")), 200);
  EXPECT_EQ(post(c, ok_result(reqs[0], "driver-a")), 409);
  auto [status, st] = state(id);
  EXPECT_EQ(st["state"], "done");
  EXPECT_EQ(st["ok"], true);
  EXPECT_EQ(st["result"]["public_key"], "02ab");
  auto s = stats();
  EXPECT_EQ(s["done"], 1);
  EXPECT_EQ(s["rejected_results"], 1);
  EXPECT_EQ(s["queued"], 0);
  EXPECT_EQ(s["leased"], 0);
}

TEST_F(ReferenceProxyTest, PollTellsHowLongTheLeaseLasts) {
  start();
  enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto reqs = poll(client(), 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  ASSERT_TRUE(reqs[0]["lease_ms"].is_number_integer());
  EXPECT_GT(reqs[0]["lease_ms"].get<int64_t>(), 0);
}

TEST_F(ReferenceProxyTest, BatchOfResultsGetsAStatusEach) {
  start();
  auto a = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto b = enqueue("sign", {{"key_id", "k2"}, {"payload", "00"}});
  auto* c = client();
  auto reqs = poll(c, 2, 1000ms);
  ASSERT_EQ(reqs.size(), 2u);
  auto stale = ok_result(reqs[1], "driver-a");
  stale["lease"] = "not-the-lease";
  json batch{{"driver_id", "driver-a"},
             {"results",
              {ok_result(reqs[0], "driver-a"), stale,
               json{{"id", "x"}, {"lease", "y"}}}}};
  auto reply = c->post_result(batch.dump());
  ASSERT_TRUE(reply) << describe(reply.error());
  ASSERT_EQ(reply->status, 200) << reply->body;
  auto body = json::parse(reply->body);
  ASSERT_EQ(body["results"].size(), 3u);
  EXPECT_EQ(body["results"][0]["id"], reqs[0]["id"]);
  EXPECT_EQ(body["results"][0]["status"], "accepted");
  EXPECT_EQ(body["results"][1]["status"], "lease_not_current");
  EXPECT_EQ(body["results"][2]["status"], "bad_request");
  // One stale lease never failed the others.
  EXPECT_EQ(state(reqs[0]["id"].get<std::string>()).second["state"], "done");
  EXPECT_EQ(state(reqs[1]["id"].get<std::string>()).second["state"], "leased");
  EXPECT_FALSE(a.empty());
  EXPECT_FALSE(b.empty());
}

TEST_F(ReferenceProxyTest, ResultWithWrongLeaseConflicts) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto* c = client();
  auto reqs = poll(c, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  auto wrong = ok_result(reqs[0], "driver-a");
  wrong["lease"] = "not-the-lease";
  EXPECT_EQ(post(c, wrong), 409);
  auto unknown = ok_result(reqs[0], "driver-a");
  unknown["id"] = "no-such-request";
  EXPECT_EQ(post(c, unknown), 409);
  EXPECT_EQ(state(id).second["state"], "leased");
  EXPECT_EQ(post(c, ok_result(reqs[0], "driver-a")), 200);
  EXPECT_EQ(stats()["rejected_results"], 2);
}

TEST_F(ReferenceProxyTest, FailedResultIsStored) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto* c = client();
  auto reqs = poll(c, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(post(c, error_result(reqs[0], "driver-a", false)), 200);
  auto st = state(id).second;
  EXPECT_EQ(st["state"], "done");
  EXPECT_EQ(st["ok"], false);
  EXPECT_EQ(st["error"]["code"], "hsm_unavailable");
  EXPECT_FALSE(st.contains("result"));
}

TEST_F(ReferenceProxyTest, RetryableErrorRequeuesTheRequest) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto* c = client();
  auto first = poll(c, 1, 1000ms);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(post(c, error_result(first[0], "driver-a", true)), 200);
  EXPECT_EQ(state(id).second["state"], "queued");
  auto second = poll(client("driver-b"), 1, 0ms);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0]["id"], id);
  EXPECT_NE(second[0]["lease"], first[0]["lease"]);
  EXPECT_EQ(state(id).second["deliveries"], 2);
  // The first lease ended with its result.
  EXPECT_EQ(post(c, ok_result(first[0], "driver-a")), 409);
}

// -- long-poll ----------------------------------------------------------------

TEST_F(ReferenceProxyTest, LongPollReturnsEmptyAfterWait) {
  start();
  auto* c = client();
  auto t0 = steady::now();
  auto reqs = poll(c, 5, 300ms);
  EXPECT_TRUE(reqs.empty());
  // The proxy's deadline starts after t0: it cannot answer sooner.
  EXPECT_GE(elapsed_ms(t0), 300);
}

TEST_F(ReferenceProxyTest, LongPollWaitIsClampedToMaxWait) {
  auto cfg = proxy_config();
  cfg.max_wait = 200ms;
  start_manual(cfg);
  auto* c = client();
  auto pending = std::async(std::launch::async,
                            [c] { return poll(c, 5, 20000ms); });
  ASSERT_TRUE(polls_waiting(1));
  // 200 ms on the proxy's clock end a poll that asked for 20 s.
  advance(200ms);
  ASSERT_EQ(pending.wait_for(20s), std::future_status::ready);
  EXPECT_TRUE(pending.get().empty());
}

TEST_F(ReferenceProxyTest, LongPollReturnsEarlyWhenRequestArrives) {
  start_manual();
  auto* c = client();
  auto pending = std::async(std::launch::async,
                            [c] { return poll(c, 5, 20000ms); });
  ASSERT_TRUE(polls_waiting(1));
  // The proxy's clock stands still: only the request can end this poll.
  EXPECT_NE(pending.wait_for(0s), std::future_status::ready);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  ASSERT_EQ(pending.wait_for(20s), std::future_status::ready);
  auto reqs = pending.get();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_EQ(proxy_->waiting_polls(), 0u);
}

TEST_F(ReferenceProxyTest, PollHonoursMaxInFifoOrder) {
  start();
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i)
    ids.push_back(enqueue("sign", {{"key_id", "k" + std::to_string(i)},
                                   {"payload", "00"}}));
  auto* c = client();
  auto first = poll(c, 2, 0ms);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0]["id"], ids[0]);
  EXPECT_EQ(first[1]["id"], ids[1]);
  auto rest = poll(c, 10, 0ms);
  ASSERT_EQ(rest.size(), 3u);
  EXPECT_EQ(rest[0]["id"], ids[2]);
  EXPECT_EQ(rest[2]["id"], ids[4]);
  EXPECT_EQ(stats()["leased"], 5);
}

// -- leases -------------------------------------------------------------------

TEST_F(ReferenceProxyTest, ExpiredLeaseIsRedeliveredWithNewLease) {
  auto cfg = proxy_config();
  start_manual(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto other = enqueue("sign", {{"key_id", "k2"}, {"payload", "00"}});
  auto* c = client();
  auto first = poll(c, 1, 0ms);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_EQ(first[0]["id"], id);
  // Leave `other` queued: the redelivered request goes before it.
  auto* second_client = client("driver-b");
  advance(cfg.lease_duration - 1ms);
  auto none = poll(second_client, 5, 0ms); // takes `other` only
  ASSERT_EQ(none.size(), 1u);
  EXPECT_EQ(none[0]["id"], other);
  advance(1ms);
  auto again = poll(c, 1, 0ms);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0]["id"], id);
  EXPECT_NE(again[0]["lease"], first[0]["lease"]);
  EXPECT_EQ(state(id).second["deliveries"], 2);
  auto s = stats();
  EXPECT_EQ(s["redelivered"], 1);
  EXPECT_EQ(s["in_flight"]["driver-a"], 1);
  EXPECT_EQ(post(c, ok_result(first[0], "driver-a")), 409);
  EXPECT_EQ(post(c, ok_result(again[0], "driver-a")), 200);
}

TEST_F(ReferenceProxyTest, WaitingPollWakesWhenLeaseExpires) {
  auto cfg = proxy_config();
  cfg.max_wait = 60s; // beyond the lease: the deadline plays no part
  start_manual(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  ASSERT_EQ(poll(client("driver-a"), 1, 0ms).size(), 1u);
  auto* b = client("driver-b");
  auto pending = std::async(std::launch::async,
                            [b] { return poll(b, 1, 20000ms); });
  ASSERT_TRUE(polls_waiting(1));
  EXPECT_NE(pending.wait_for(0s), std::future_status::ready);
  // Nothing else happens: only the expiry can end this wait.
  advance(cfg.lease_duration);
  ASSERT_EQ(pending.wait_for(20s), std::future_status::ready);
  auto reqs = pending.get();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  auto s = proxy_->stats();
  EXPECT_EQ(s.in_flight["driver-a"], 0u);
  EXPECT_EQ(s.in_flight["driver-b"], 1u);
  EXPECT_EQ(s.redelivered, 1u);
}

TEST_F(ReferenceProxyTest, WaitingPollWakesWhenLeaseExpiresOnRealClock) {
  // The long-poll's own timer, not a notification, ends this wait: the
  // poll asks for far longer than the lease lasts.
  auto cfg = proxy_config();
  cfg.lease_duration = 300ms;
  cfg.max_wait = 30s;
  start(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto t0 = steady::now();
  ASSERT_EQ(poll(client("driver-a"), 1, 0ms).size(), 1u);
  auto* b = client("driver-b");
  auto pending = std::async(std::launch::async,
                            [b] { return poll(b, 1, 30000ms); });
  ASSERT_EQ(pending.wait_for(20s), std::future_status::ready);
  auto reqs = pending.get();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  // The lease started after t0 and lasted 300 ms.
  EXPECT_GE(elapsed_ms(t0), 300);
}

TEST_F(ReferenceProxyTest, ExpiredLeaseShowsAsQueued) {
  auto cfg = proxy_config();
  start_manual(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto reqs = poll(client(), 1, 0ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(proxy_->stats().leased, 1u);
  advance(cfg.lease_duration);
  auto s = proxy_->stats();
  EXPECT_EQ(s.queued, 1u);
  EXPECT_EQ(s.leased, 0u);
  EXPECT_EQ(s.in_flight["driver-a"], 0u);
  EXPECT_EQ(s.max_in_flight["driver-a"], 1u);
  EXPECT_EQ(s.redelivered, 0u); // counted when delivered again
  EXPECT_EQ(state(id).second["state"], "queued");
  EXPECT_EQ(state(id).second["deliveries"], 1);
}

TEST_F(ReferenceProxyTest, InFlightIsCountedPerDriver) {
  start();
  for (int i = 0; i < 4; ++i)
    enqueue("sign", {{"key_id", "k" + std::to_string(i)}, {"payload", "00"}});
  auto* a = client("driver-a");
  auto* b = client("driver-b");
  auto got_a = poll(a, 2, 0ms);
  auto got_b = poll(b, 1, 0ms);
  ASSERT_EQ(got_a.size(), 2u);
  ASSERT_EQ(got_b.size(), 1u);
  auto s = stats();
  EXPECT_EQ(s["in_flight"]["driver-a"], 2);
  EXPECT_EQ(s["in_flight"]["driver-b"], 1);
  EXPECT_EQ(s["queued"], 1);
  EXPECT_EQ(s["leased"], 3);
  EXPECT_EQ(post(a, ok_result(got_a[0], "driver-a")), 200);
  s = stats();
  EXPECT_EQ(s["in_flight"]["driver-a"], 1);
  EXPECT_EQ(s["max_in_flight"]["driver-a"], 2);
  EXPECT_EQ(s["max_in_flight"]["driver-b"], 1);
  auto in_process = proxy_->stats();
  EXPECT_EQ(in_process.in_flight["driver-a"], 1u);
  EXPECT_EQ(in_process.done, 1u);
}

// -- admin API ----------------------------------------------------------------

TEST_F(ReferenceProxyTest, AdminEnqueueOfExistingIdDoesNotDuplicate) {
  start();
  EXPECT_EQ(enqueue("generate_key", {{"key_id", "k1"}}, "req-1"), "req-1");
  EXPECT_EQ(enqueue("generate_key", {{"key_id", "k1"}}, "req-1"), "req-1");
  EXPECT_EQ(proxy_->enqueue("generate_key", {{"key_id", "k1"}}, "req-1"),
            "req-1");
  EXPECT_EQ(stats()["queued"], 1);
  auto reqs = poll(client(), 10, 0ms);
  EXPECT_EQ(reqs.size(), 1u);
  // Not even once answered or leased.
  EXPECT_EQ(enqueue("generate_key", {{"key_id", "k1"}}, "req-1"), "req-1");
  EXPECT_EQ(stats()["queued"], 0);
}

TEST_F(ReferenceProxyTest, AdminEnqueueGeneratesDistinctIds) {
  start();
  auto a = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto b = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  EXPECT_FALSE(a.empty());
  EXPECT_NE(a, b);
  EXPECT_EQ(stats()["queued"], 2);
}

TEST_F(ReferenceProxyTest, AdminStateOfUnknownIdIs404) {
  start();
  EXPECT_EQ(state("no-such-id").first, 404);
  EXPECT_FALSE(proxy_->request_state("no-such-id").has_value());
}

TEST_F(ReferenceProxyTest, AdminRejectsMalformedEnqueue) {
  start();
  auto res = admin_->Post("/v1/admin/requests", "{\"params\":{}}",
                          "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  res = admin_->Post("/v1/admin/requests", "not json", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_TRUE(json::parse(res->body, nullptr, false).contains("error"));
}

// -- malformed driver requests -----------------------------------------------

TEST_F(ReferenceProxyTest, MalformedPollBodyIs400) {
  start();
  auto cert = pki_->driver_chain;
  auto key = pki_->driver_key;
  for (auto body : {"not json", "[]", "{\"max\":1,\"wait_ms\":0}",
                    "{\"driver_id\":\"d\",\"max\":0,\"wait_ms\":0}",
                    "{\"driver_id\":\"d\",\"max\":1,\"wait_ms\":-5}",
                    "{\"driver_id\":\"d\",\"max\":\"2\",\"wait_ms\":0}"}) {
    auto r = raw_post(proxy_->port(), "/v1/poll", body, *pki_, cert, key);
    ASSERT_EQ(r.rc, CURLE_OK) << curl_easy_strerror(r.rc);
    EXPECT_EQ(r.status, 400) << body;
    EXPECT_TRUE(json::parse(r.body, nullptr, false).contains("error"))
      << r.body;
  }
  auto good = raw_post(proxy_->port(), "/v1/poll",
                       "{\"driver_id\":\"d\",\"max\":1,\"wait_ms\":0}", *pki_,
                       cert, key);
  EXPECT_EQ(good.status, 200);
}

TEST_F(ReferenceProxyTest, MalformedResultBodyIs400) {
  start();
  auto* c = client();
  for (auto body :
       {"not json", "{}", "{\"id\":\"x\",\"lease\":\"y\",\"ok\":true}",
        "{\"id\":\"x\",\"lease\":\"y\",\"driver_id\":\"d\",\"ok\":false,"
        "\"error\":{\"code\":\"c\"}}"}) {
    auto reply = c->post_result(body);
    ASSERT_TRUE(reply) << describe(reply.error());
    EXPECT_EQ(reply->status, 400) << body;
  }
}

TEST_F(ReferenceProxyTest, OversizedBodyIs413) {
  auto cfg = proxy_config();
  cfg.max_body = 1024;
  start(cfg);
  auto big = json{{"id", "x"},
                  {"lease", "y"},
                  {"driver_id", "d"},
                  {"ok", true},
                  {"result", {{"blob", std::string(4096, 'a')}}}};
  auto reply = client()->post_result(big.dump());
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 413);
}

// -- mutual TLS ---------------------------------------------------------------

TEST_F(ReferenceProxyTest, RefusesClientCertificateFromAnotherPki) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto* c = client(
    client_config("intruder", other_->driver_chain, other_->driver_key));
  ASSERT_NE(c, nullptr);
  auto reply = c->poll(5, 0ms);
  ASSERT_FALSE(reply) << "status " << reply->status;
  EXPECT_TRUE(reply.error() == net_errc::tls_failed
              || reply.error() == net_errc::unreachable)
    << describe(reply.error());
  EXPECT_EQ(state(id).second["deliveries"], 0);
  EXPECT_EQ(state(id).second["state"], "queued");
}

TEST_F(ReferenceProxyTest, RefusesClientWithoutCertificate) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  auto r = raw_post(proxy_->port(), "/v1/poll",
                    "{\"driver_id\":\"d\",\"max\":5,\"wait_ms\":0}", *pki_);
  EXPECT_NE(r.rc, CURLE_OK) << "status " << r.status << " " << r.body;
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(state(id).second["deliveries"], 0);
  // The same request with the driver's certificate gets through.
  auto ok = raw_post(proxy_->port(), "/v1/poll",
                     "{\"driver_id\":\"d\",\"max\":5,\"wait_ms\":0}", *pki_,
                     pki_->driver_chain, pki_->driver_key);
  EXPECT_EQ(ok.rc, CURLE_OK) << curl_easy_strerror(ok.rc);
  EXPECT_EQ(ok.status, 200);
}

TEST_F(ReferenceProxyTest, DriverRefusesProxyOutsideItsCa) {
  start();
  auto cfg = client_config("driver-a");
  cfg.tls.ca_cert = other_->root_cert;
  auto* c = client(cfg);
  ASSERT_NE(c, nullptr);
  auto reply = c->poll(1, 0ms);
  ASSERT_FALSE(reply) << "status " << reply->status;
  EXPECT_EQ(reply.error(), net_errc::tls_failed) << describe(reply.error());
}

TEST_F(ReferenceProxyTest, ClientChainFromIssuedCertIsAccepted) {
  start();
  auto issued = issue_client_cert(*pki_, *dir_ / "issued", "driver-b");
  ASSERT_TRUE(issued) << describe(issued.error());
  auto reply = client(client_config("driver-b", issued->first, issued->second))
                 ->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
}

/// What a transfer's write callback saw of its TLS session.
struct tls_probe {
  CURL* curl = nullptr;
  int version = 0;
};

size_t record_tls_version(char*, size_t size, size_t nmemb, void* user) {
  // The session is only sure to be valid while the transfer runs.
  auto* probe = static_cast<tls_probe*>(user);
  curl_tlssessioninfo* info = nullptr;
  if (curl_easy_getinfo(probe->curl, CURLINFO_TLS_SSL_PTR, &info) == CURLE_OK
      && info != nullptr && info->backend == CURLSSLBACKEND_OPENSSL)
    probe->version = SSL_version(static_cast<SSL*>(info->internals));
  return size * nmemb;
}

TEST_F(ReferenceProxyTest, NegotiatesTls13) {
  start();
  tls_probe seen;
  seen.curl = curl_easy_init();
  auto url = "https://127.0.0.1:" + std::to_string(proxy_->port()) + "/v1/poll";
  std::string body = "{\"driver_id\":\"d\",\"max\":1,\"wait_ms\":0}";
  auto ca = pki_->root_cert.string();
  auto cert = pki_->driver_chain.string();
  auto key = pki_->driver_key.string();
  curl_easy_setopt(seen.curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(seen.curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(seen.curl, CURLOPT_CAINFO, ca.c_str());
  curl_easy_setopt(seen.curl, CURLOPT_SSLCERT, cert.c_str());
  curl_easy_setopt(seen.curl, CURLOPT_SSLKEY, key.c_str());
  curl_easy_setopt(seen.curl, CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(seen.curl, CURLOPT_WRITEFUNCTION, &record_tls_version);
  curl_easy_setopt(seen.curl, CURLOPT_WRITEDATA, static_cast<void*>(&seen));
  curl_easy_setopt(seen.curl, CURLOPT_TIMEOUT_MS, 5000L);
  auto rc = curl_easy_perform(seen.curl);
  curl_easy_cleanup(seen.curl);
  ASSERT_EQ(rc, CURLE_OK) << curl_easy_strerror(rc);
  EXPECT_EQ(seen.version, TLS1_3_VERSION);
}

TEST_F(ReferenceProxyTest, RefusesTls12ClientsUnlessAllowed) {
  auto attempt = [this] {
    auto* curl = curl_easy_init();
    auto url = "https://127.0.0.1:" + std::to_string(proxy_->port())
               + "/v1/poll";
    std::string body = "{\"driver_id\":\"d\",\"max\":1,\"wait_ms\":0}";
    auto ca = pki_->root_cert.string();
    auto cert = pki_->driver_chain.string();
    auto key = pki_->driver_key.string();
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_CAINFO, ca.c_str());
    curl_easy_setopt(curl, CURLOPT_SSLCERT, cert.c_str());
    curl_easy_setopt(curl, CURLOPT_SSLKEY, key.c_str());
    // TLS 1.2 as the lowest and the highest version (libcurl puts the
    // highest in the upper 16 bits).
    long tls12 = CURL_SSLVERSION_TLSv1_2;
    curl_easy_setopt(curl, CURLOPT_SSLVERSION, tls12 | (tls12 << 16));
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &collect);
    std::string out;
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, static_cast<void*>(&out));
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 5000L);
    auto rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(curl);
    return rc == CURLE_OK ? status : -1L;
  };
  start();
  EXPECT_EQ(attempt(), -1L) << "a TLS 1.2 client got through";
  TearDown();
  auto cfg = proxy_config();
  cfg.allow_tls12 = true;
  start(cfg);
  EXPECT_EQ(attempt(), 200L);
}

// -- fault switches -----------------------------------------------------------

TEST_F(ReferenceProxyTest, ServerErrorFaultAnswers503AndLeasesNothing) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::server_error);
  auto r = raw_post(proxy_->port(), "/v1/poll",
                    R"({"driver_id":"d","max":1,"wait_ms":0})", *pki_,
                    pki_->driver_chain, pki_->driver_key);
  ASSERT_EQ(r.rc, CURLE_OK) << curl_easy_strerror(r.rc);
  EXPECT_EQ(r.status, 503);
  EXPECT_TRUE(json::parse(r.body, nullptr, false).contains("error")) << r.body;
  EXPECT_EQ(state(id).second["deliveries"], 0);
  EXPECT_EQ(stats()["faulted_polls"], 1);
  // One answer only: the next poll is served.
  auto reqs = poll(client(), 1, 0ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
}

TEST_F(ReferenceProxyTest, GarbageFaultAnswersNonJsonAndTheLeaseExpires) {
  start_manual();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::garbage_body);
  auto r = raw_post(proxy_->port(), "/v1/poll",
                    R"({"driver_id":"d","max":1,"wait_ms":0})", *pki_,
                    pki_->driver_chain, pki_->driver_key);
  ASSERT_EQ(r.rc, CURLE_OK) << curl_easy_strerror(r.rc);
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(json::parse(r.body, nullptr, false).is_discarded()) << r.body;
  EXPECT_NE(r.body.find('\0'), std::string::npos);
  EXPECT_NE(r.body.find('\x1b'), std::string::npos);
  // Leased all the same, as by a proxy that does not know what the driver
  // made of its answer; redelivered when the lease expires.
  EXPECT_EQ(state(id).second["state"], "leased");
  advance(proxy_config().lease_duration);
  auto again = poll(client(), 1, 0ms);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0]["id"], id);
  EXPECT_EQ(state(id).second["deliveries"], 2);
}

TEST_F(ReferenceProxyTest, DuplicateFaultListsEveryLeaseTwice) {
  start();
  enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  enqueue("sign", {{"key_id", "k2"}, {"payload", "00"}});
  proxy_->inject(poll_fault::duplicate_delivery);
  auto reqs = poll(client(), 2, 0ms);
  ASSERT_EQ(reqs.size(), 4u);
  EXPECT_EQ(reqs[0], reqs[1]);
  EXPECT_EQ(reqs[2], reqs[3]);
  EXPECT_NE(reqs[0]["id"], reqs[2]["id"]);
  EXPECT_EQ(stats()["leased"], 2);
}

TEST_F(ReferenceProxyTest, OverDeliveryFaultLeasesMoreThanMax) {
  auto cfg = proxy_config();
  cfg.over_delivery_extra = 2;
  start(cfg);
  for (int i = 0; i < 5; ++i)
    enqueue("sign", {{"key_id", "k" + std::to_string(i)}, {"payload", "00"}});
  proxy_->inject(poll_fault::over_delivery);
  auto reqs = poll(client(), 1, 0ms);
  EXPECT_EQ(reqs.size(), 3u);
  EXPECT_EQ(stats()["in_flight"]["driver-a"], 3);
}

TEST_F(ReferenceProxyTest, OversizedFaultSendsAValidBodyOfTheSetSize) {
  auto cfg = proxy_config();
  cfg.oversized_body_bytes = 300000;
  start(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::oversized_body);
  auto r = raw_post(proxy_->port(), "/v1/poll",
                    R"({"driver_id":"d","max":1,"wait_ms":0})", *pki_,
                    pki_->driver_chain, pki_->driver_key);
  ASSERT_EQ(r.rc, CURLE_OK) << curl_easy_strerror(r.rc);
  EXPECT_EQ(r.body.size(), cfg.oversized_body_bytes);
  auto body = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << r.body.substr(0, 200);
  ASSERT_EQ(body["requests"].size(), 1u);
  EXPECT_EQ(body["requests"][0]["id"], id);
  // The default is past what the driver reads.
  EXPECT_GT(reference_proxy_config{}.oversized_body_bytes, max_response_bytes);
}

TEST_F(ReferenceProxyTest, SlowBodyFaultArrivesInPiecesAndWhole) {
  auto cfg = proxy_config();
  cfg.slow_body_pieces = 5;
  cfg.slow_body_delay = 100ms;
  start(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::slow_body);
  auto t0 = steady::now();
  auto reqs = poll(client(), 1, 0ms);
  // Four pauses between five pieces.
  EXPECT_GE(elapsed_ms(t0), 400);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_EQ(stats()["given_back"], 0);
}

TEST_F(ReferenceProxyTest, SlowBodyTheClientGaveUpOnGivesTheLeaseBack) {
  // The driver times out in the middle of a slow answer: the proxy's write
  // fails and it takes the lease back at once, rather than letting it wait
  // out the lease time (10 s here).
  auto cfg = proxy_config();
  cfg.slow_body_pieces = 20;
  cfg.slow_body_delay = 100ms;
  start(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::slow_body);
  auto impatient_cfg = client_config("impatient");
  impatient_cfg.poll_grace = 300ms;
  auto t0 = steady::now();
  auto reply = client(impatient_cfg)->poll(1, 0ms);
  ASSERT_FALSE(reply) << reply->body;
  EXPECT_EQ(reply.error(), net_errc::unreachable) << describe(reply.error());
  ASSERT_TRUE(test::wait_until([&] { return proxy_->stats().given_back == 1; },
                               5s, "the proxy to take the lease back"));
  auto st = state(id).second;
  EXPECT_EQ(st["state"], "queued");
  EXPECT_EQ(st["deliveries"], 0);
  auto reqs = poll(client("patient"), 1, 0ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_LT(elapsed_ms(t0), 5000);
  EXPECT_EQ(proxy_->stats().in_flight["impatient"], 0u);
}

TEST_F(ReferenceProxyTest, ResetFaultCutsTheAnswerAndKeepsTheLease) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  proxy_->inject(poll_fault::reset);
  auto r = raw_post(proxy_->port(), "/v1/poll",
                    R"({"driver_id":"d","max":1,"wait_ms":0})", *pki_,
                    pki_->driver_chain, pki_->driver_key);
  EXPECT_NE(r.rc, CURLE_OK) << r.body;
  EXPECT_EQ(r.status, 200); // the headers came
  EXPECT_TRUE(json::parse(r.body, nullptr, false).is_discarded()) << r.body;
  EXPECT_EQ(state(id).second["state"], "leased");
  EXPECT_EQ(stats()["given_back"], 0);
}

TEST_F(ReferenceProxyTest, FaultsQueueInOrderThroughTheAdminApi) {
  start();
  auto post = [this](const json& body) {
    auto res = admin_->Post("/v1/admin/faults", body.dump(),
                            "application/json");
    EXPECT_TRUE(res);
    return res ? std::pair{res->status, json::parse(res->body, nullptr, false)}
               : std::pair{0, json{}};
  };
  EXPECT_EQ(post({{"fault", "server_error"}, {"polls", 2}}).first, 200);
  auto [status, body] = post({{"fault", "garbage_body"}});
  EXPECT_EQ(status, 200);
  EXPECT_EQ(body["pending"],
            (json{"server_error", "server_error", "garbage_body"}));
  EXPECT_EQ(proxy_->pending_faults(),
            (std::vector<poll_fault>{poll_fault::server_error,
                                     poll_fault::server_error,
                                     poll_fault::garbage_body}));
  EXPECT_EQ(post({{"fault", "explode"}}).first, 400);
  EXPECT_EQ(post({{"fault", "reset"}, {"polls", 0}}).first, 400);
  EXPECT_EQ(post({{"polls", 1}}).first, 400);
  // Every name round-trips.
  for (auto name : {"reset", "server_error", "slow_body", "garbage_body",
                    "duplicate_delivery", "oversized_body", "over_delivery"}) {
    auto f = parse_poll_fault(name);
    ASSERT_TRUE(f) << name;
    EXPECT_STREQ(to_string(*f), name);
  }
  // The first queued fault takes the next poll.
  auto* c = client();
  auto reply = c->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 503);
  auto listed = admin_->Get("/v1/admin/faults");
  ASSERT_TRUE(listed);
  EXPECT_EQ(json::parse(listed->body)["pending"],
            (json{"server_error", "garbage_body"}));
  auto cleared = admin_->Delete("/v1/admin/faults");
  ASSERT_TRUE(cleared);
  EXPECT_EQ(cleared->status, 200);
  EXPECT_TRUE(proxy_->pending_faults().empty());
  reply = c->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
  EXPECT_EQ(stats()["faulted_polls"], 1);
}

// -- a dead driver's long-poll ------------------------------------------------

/// Settings for the dead-driver tests: long polls, long leases (a request
/// leased to the dead driver would be stuck for 30 s).
reference_proxy_config dead_driver_config(reference_proxy_config cfg) {
  cfg.lease_duration = 30s;
  cfg.max_wait = 30s;
  return cfg;
}

TEST_F(ReferenceProxyTest, RequestAfterAKillNineGoesToTheLiveDriverAtOnce) {
  // The issue's trial, four times: a driver long-polls, so does another;
  // the first is killed with -9 and a request arrives right after. The live
  // driver must get it within a second, not after the 30 s lease. The
  // periodic check is off (a minute): only the check before leasing can
  // see the dead client here.
  auto curl = curl_command();
  if (!curl)
    GTEST_SKIP() << "no curl command line";
  auto cfg = dead_driver_config(proxy_config());
  cfg.client_check_interval = 60s;
  start(cfg);
  auto* live = client("live");
  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    external_poll dead{*curl, proxy_->port(), *pki_, "dead", 20s};
    ASSERT_TRUE(dead.started());
    ASSERT_TRUE(polls_waiting(1));
    auto pending = std::async(std::launch::async,
                              [live] { return poll(live, 1, 20000ms); });
    ASSERT_TRUE(polls_waiting(2));
    dead.kill9();
    auto t0 = steady::now();
    auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
    ASSERT_EQ(pending.wait_for(5s), std::future_status::ready);
    auto reqs = pending.get();
    ASSERT_EQ(reqs.size(), 1u);
    EXPECT_EQ(reqs[0]["id"], id);
    EXPECT_LT(elapsed_ms(t0), 1000);
    EXPECT_EQ(state(id).second["deliveries"], 1);
    EXPECT_EQ(post(live, ok_result(reqs[0], "live")), 200);
    auto s = proxy_->stats();
    EXPECT_EQ(s.in_flight["dead"], 0u);
    EXPECT_EQ(s.max_in_flight["dead"], 0u);
    // The dead poll is over (it woke for the request and found its client
    // gone); only then does the next trial start.
    ASSERT_TRUE(polls_waiting(0));
    EXPECT_EQ(proxy_->stats().dead_polls, static_cast<size_t>(trial) + 1);
  }
}

TEST_F(ReferenceProxyTest, RequestAfterAKillNineWaitsForTheNextLiveDriver) {
  // Only the dead driver's poll waits when the request arrives: it must not
  // take it (before the fix it did, deterministically), and the next poll
  // of a live driver gets it at once.
  auto curl = curl_command();
  if (!curl)
    GTEST_SKIP() << "no curl command line";
  auto cfg = dead_driver_config(proxy_config());
  cfg.client_check_interval = 60s;
  start(cfg);
  external_poll dead{*curl, proxy_->port(), *pki_, "dead", 20s};
  ASSERT_TRUE(dead.started());
  ASSERT_TRUE(polls_waiting(1));
  dead.kill9();
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  ASSERT_TRUE(polls_waiting(0));
  auto st = state(id).second;
  EXPECT_EQ(st["state"], "queued");
  EXPECT_EQ(st["deliveries"], 0);
  EXPECT_EQ(proxy_->stats().dead_polls, 1u);
  auto t0 = steady::now();
  auto reqs = poll(client("live"), 1, 0ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_LT(elapsed_ms(t0), 1000);
  EXPECT_EQ(state(id).second["deliveries"], 1);
}

TEST_F(ReferenceProxyTest, DeadDriversLongPollEndsWithoutARequest) {
  // With no request at all, the waiting poll of a killed driver ends within
  // the check interval instead of holding a server thread for its wait.
  auto curl = curl_command();
  if (!curl)
    GTEST_SKIP() << "no curl command line";
  auto cfg = dead_driver_config(proxy_config());
  cfg.client_check_interval = 100ms;
  start(cfg);
  external_poll dead{*curl, proxy_->port(), *pki_, "dead", 20s};
  ASSERT_TRUE(dead.started());
  ASSERT_TRUE(polls_waiting(1));
  dead.kill9();
  auto t0 = steady::now();
  ASSERT_TRUE(test::wait_until([&] { return proxy_->waiting_polls() == 0; }, 5s,
                               "the dead driver's poll to end"));
  EXPECT_LT(elapsed_ms(t0), 2000);
  EXPECT_EQ(proxy_->stats().dead_polls, 1u);
  // A live client's long-poll is not taken for dead.
  auto* live = client("live");
  auto pending = std::async(std::launch::async,
                            [live] { return poll(live, 1, 20000ms); });
  ASSERT_TRUE(polls_waiting(1));
  // Not a synchronisation: the time for some five checks of a live client,
  // which must all find it alive (else its poll would end empty).
  std::this_thread::sleep_for(500ms);
  auto id = enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  ASSERT_EQ(pending.wait_for(5s), std::future_status::ready);
  auto reqs = pending.get();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["id"], id);
  EXPECT_EQ(proxy_->stats().dead_polls, 1u);
}

// -- start and stop -----------------------------------------------------------

// -- the admin API's gate and waits
// --------------------------------------------

TEST_F(ReferenceProxyTest, AdminApiNeedsTheBearerTokenAHostOfItsOwnAndJson) {
  start();
  ASSERT_EQ(proxy_->admin_token().size(), 64u) << "256 random bits in hex";
  httplib::Client bare{"127.0.0.1", proxy_->admin_port()};
  bare.set_read_timeout(5, 0);
  auto body = json{{"kind", "sign"}, {"params", json::object()}}.dump();
  // No token, a wrong token, a token of the right length but wrong.
  auto res = bare.Get("/v1/admin/stats");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401) << res->body;
  EXPECT_EQ(res->get_header_value("WWW-Authenticate"), "Bearer");
  for (std::string wrong :
       {std::string{"nope"}, std::string(proxy_->admin_token().size(), '0')}) {
    httplib::Headers h{{"Authorization", "Bearer " + wrong}};
    res = bare.Post("/v1/admin/requests", h, body, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 401) << res->body;
  }
  EXPECT_EQ(proxy_->stats().queued, 0u) << "enqueued without the token";
  // The token, but a page of another site whose name resolves here.
  httplib::Headers rebound{{"Authorization", "Bearer " + proxy_->admin_token()},
                           {"Host", "evil.example:"
                                      + std::to_string(proxy_->admin_port())}};
  res = bare.Post("/v1/admin/requests", rebound, body, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403) << res->body;
  // The token and the host, but a form post.
  res = admin_->Post("/v1/admin/requests", body, "text/plain");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 415) << res->body;
  res = admin_->Post("/v1/admin/requests", body,
                     "application/x-www-form-urlencoded");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 415) << res->body;
  EXPECT_EQ(proxy_->stats().queued, 0u);
  // All three: accepted, with a charset too.
  res = admin_->Post("/v1/admin/requests", body,
                     "application/json; charset=utf-8");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(proxy_->stats().queued, 1u);
}

TEST_F(ReferenceProxyTest, AdminListenerElsewhereThanLoopbackIsRefused) {
  for (std::string host : {"0.0.0.0", "::", "192.0.2.10"}) {
    auto cfg = proxy_config();
    cfg.admin_host = host;
    auto proxy = reference_proxy::start(cfg);
    ASSERT_FALSE(proxy) << host;
    EXPECT_EQ(proxy.error(), config_errc::invalid_option) << host;
  }
  for (std::string host : {"127.0.0.1", "127.0.0.2"}) {
    auto cfg = proxy_config();
    cfg.admin_host = host;
    auto proxy = reference_proxy::start(cfg);
    ASSERT_TRUE(proxy) << host;
    // Served under the address it listens on.
    httplib::Client c{host, (*proxy)->admin_port()};
    c.set_bearer_token_auth((*proxy)->admin_token().c_str());
    auto res = c.Get("/v1/admin/stats");
    ASSERT_TRUE(res) << host;
    EXPECT_EQ(res->status, 200) << host << " " << res->body;
  }
}

TEST_F(ReferenceProxyTest, EnqueueWithWaitAnswersWithTheResult) {
  start();
  auto* c = client();
  // The driver answers while the admin call waits.
  std::thread driver{[&] {
    auto reqs = poll(c, 1, 5000ms);
    ASSERT_EQ(reqs.size(), 1u);
    EXPECT_EQ(post(c, ok_result(reqs[0], "driver-a")), 200);
  }};
  auto started = steady::now();
  auto res = admin_->Post(
    "/v1/admin/requests?wait_ms=4000",
    json{{"kind", "sign"}, {"params", {{"key_id", "k1"}}}}.dump(),
    "application/json");
  driver.join();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  auto st = json::parse(res->body);
  EXPECT_EQ(st["state"], "done") << res->body;
  EXPECT_EQ(st["ok"], true);
  EXPECT_EQ(st["result"]["public_key"], "02ab");
  EXPECT_LT(elapsed_ms(started), 4000) << "waited past the answer";
}

TEST_F(ReferenceProxyTest, StateWithWaitReturnsWhenDoneOrAtTheDeadline) {
  start();
  auto id = enqueue("sign", {{"key_id", "k1"}});
  // Nobody answers: the wait ends at its deadline, still queued.
  auto started = steady::now();
  auto res = admin_->Get("/v1/admin/requests/" + id + "?wait_ms=300");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["state"], "queued");
  EXPECT_GE(elapsed_ms(started), 300);
  // Answered meanwhile: the wait ends with the answer.
  auto* c = client();
  std::thread driver{[&] {
    auto reqs = poll(c, 1, 5000ms);
    ASSERT_EQ(reqs.size(), 1u);
    std::this_thread::sleep_for(200ms);
    EXPECT_EQ(post(c, ok_result(reqs[0], "driver-a")), 200);
  }};
  res = admin_->Get("/v1/admin/requests/" + id + "?wait_ms=4000");
  driver.join();
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["state"], "done") << res->body;
  res = admin_->Get("/v1/admin/requests/" + id + "?wait_ms=soon");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400) << res->body;
}

TEST_F(ReferenceProxyTest, ResultFromAnotherCertificateIsForbidden) {
  start();
  auto issued = issue_client_cert(*pki_, *dir_ / "thief", "driver-b");
  ASSERT_TRUE(issued) << describe(issued.error());
  auto id = enqueue("sign", {{"key_id", "k1"}});
  auto* holder = client("driver-a");
  auto* thief = client(
    client_config("driver-b", issued->first, issued->second));
  auto reqs = poll(holder, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  // The lease and id are right, the certificate is not the holder's: a
  // single result is 403, an entry of a batch "forbidden".
  EXPECT_EQ(post(thief, ok_result(reqs[0], "driver-a")), 403);
  auto batch = json{{"driver_id", "driver-a"},
                    {"results", json::array({ok_result(reqs[0], "driver-a")})}};
  auto reply = thief->post_result(batch.dump());
  ASSERT_TRUE(reply);
  EXPECT_EQ(json::parse(reply->body)["results"][0]["status"], "forbidden")
    << reply->body;
  EXPECT_EQ(state(id).second["state"], "leased");
  EXPECT_EQ(post(holder, ok_result(reqs[0], "driver-a")), 200);
  EXPECT_EQ(state(id).second["state"], "done");
}

TEST_F(ReferenceProxyTest, SameNamesUnderAnotherIssuingKeyHoldNoLease) {
  // A proxy trusting two roots whose PKIs use the same names (the dev PKI
  // of two machines: same root, intermediate and driver names, other
  // keys). A lease belongs to the driver's name under the key that issued
  // its certificate: the other PKI's driver, with every name alike, is not
  // its holder.
  auto both = *dir_ / "both-roots.pem";
  {
    std::ofstream out{both, std::ios::binary};
    for (const auto& root : {pki_->root_cert, other_->root_cert}) {
      std::ifstream in{root, std::ios::binary};
      out << in.rdbuf();
    }
  }
  auto cfg = proxy_config();
  cfg.client_ca = both;
  start(cfg);
  auto id = enqueue("sign", {{"key_id", "k1"}});
  auto* holder = client("driver-a");
  auto* twin = client(
    client_config("driver-a", other_->driver_chain, other_->driver_key));
  auto reqs = poll(holder, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(post(twin, ok_result(reqs[0], "driver-a")), 403);
  EXPECT_EQ(state(id).second["state"], "leased");
  EXPECT_EQ(post(holder, ok_result(reqs[0], "driver-a")), 200);
  EXPECT_EQ(state(id).second["state"], "done");
}

TEST_F(ReferenceProxyTest, ARenewedCertificateStillHoldsItsLeases) {
  // Same name, same intermediate, a new key and serial (a renewal, or a
  // SIGHUP reload between a poll and its results): still the holder.
  start();
  auto renewed = issue_client_cert(*pki_, *dir_ / "renewed", "hsm-driver");
  ASSERT_TRUE(renewed) << describe(renewed.error());
  auto id = enqueue("sign", {{"key_id", "k1"}});
  auto* before = client("driver-a");
  auto* after = client(
    client_config("driver-a", renewed->first, renewed->second));
  auto reqs = poll(before, 1, 1000ms);
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(post(after, ok_result(reqs[0], "driver-a")), 200);
  EXPECT_EQ(state(id).second["state"], "done");
}

/// One request over a fresh TLS connection with the driver's certificate,
/// offering `resume` if given; the session it leaves (owned by the caller,
/// null on failure) and whether the server resumed `resume`.
std::pair<SSL_SESSION*, bool> tls_round_trip(uint16_t port, const dev_pki& pki,
                                             SSL_SESSION* resume) {
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx{
    SSL_CTX_new(TLS_client_method()), &SSL_CTX_free};
  if (!ctx
      || SSL_CTX_use_certificate_chain_file(ctx.get(), pki.driver_chain.c_str())
           != 1
      || SSL_CTX_use_PrivateKey_file(ctx.get(), pki.driver_key.c_str(),
                                     SSL_FILETYPE_PEM)
           != 1
      || SSL_CTX_load_verify_locations(ctx.get(), pki.root_cert.c_str(),
                                       nullptr)
           != 1)
    return {nullptr, false};
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0
      || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (fd >= 0)
      ::close(fd);
    return {nullptr, false};
  }
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl{SSL_new(ctx.get()), &SSL_free};
  SSL_set_fd(ssl.get(), fd);
  if (resume != nullptr)
    SSL_set_session(ssl.get(), resume);
  SSL_SESSION* left = nullptr;
  bool reused = false;
  if (SSL_connect(ssl.get()) == 1) {
    reused = SSL_session_reused(ssl.get()) == 1;
    // Any request; reading its answer also reads the tickets a TLS 1.3
    // server sends after the handshake.
    std::string req = "GET /v1/none HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Connection: close\r\n\r\n";
    SSL_write(ssl.get(), req.data(), static_cast<int>(req.size()));
    std::array<char, 4096> buf{};
    while (SSL_read(ssl.get(), buf.data(), static_cast<int>(buf.size())) > 0) {
    }
    left = SSL_get1_session(ssl.get());
    // A connection freed without a shutdown marks its session bad; this
    // one ended as the server closed it.
    SSL_set_shutdown(ssl.get(), SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  }
  ::close(fd);
  return {left, reused};
}

TEST_F(ReferenceProxyTest, NoSessionIsResumedSoEveryConnectionHasItsChain) {
  // A resumed connection carries no verified chain, and so no lease holder:
  // the proxy issues no ticket and keeps no session, and a client offering
  // its last session gets a full handshake.
  start();
  auto [first, first_reused] = tls_round_trip(proxy_->port(), *pki_, nullptr);
  ASSERT_NE(first, nullptr);
  EXPECT_FALSE(first_reused);
  EXPECT_EQ(SSL_SESSION_is_resumable(first), 0)
    << "the proxy handed out a session to resume";
  auto [second, second_reused] = tls_round_trip(proxy_->port(), *pki_, first);
  EXPECT_FALSE(second_reused);
  SSL_SESSION_free(first);
  SSL_SESSION_free(second);
}

TEST_F(ReferenceProxyTest, AdminTokenFileIsMadeOnceAndReadAsASecret) {
  auto path = *dir_ / "admin-token";
  std::filesystem::remove(path);
  auto made = load_or_create_admin_token(path);
  ASSERT_TRUE(made) << describe(made.error());
  EXPECT_EQ(made->size(), 64u);
  EXPECT_EQ(std::filesystem::status(path).permissions(),
            std::filesystem::perms::owner_read
              | std::filesystem::perms::owner_write);
  auto again = load_or_create_admin_token(path);
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_EQ(*again, *made);
  // Readable by others: refused, not used.
  std::filesystem::permissions(path, std::filesystem::perms::others_read,
                               std::filesystem::perm_options::add);
  auto loose = load_or_create_admin_token(path);
  ASSERT_FALSE(loose);
  EXPECT_EQ(loose.error(), config_errc::bad_file);
}

TEST_F(ReferenceProxyTest, StartFailsOnMissingTlsFiles) {
  auto cfg = proxy_config();
  cfg.server_key = *dir_ / "missing.key.pem";
  auto proxy = reference_proxy::start(cfg);
  ASSERT_FALSE(proxy);
  EXPECT_EQ(proxy.error(), net_errc::bad_tls_material);
  cfg = proxy_config();
  cfg.server_key = other_->server_key; // does not match the certificate
  proxy = reference_proxy::start(cfg);
  ASSERT_FALSE(proxy);
  EXPECT_EQ(proxy.error(), net_errc::bad_tls_material);
}

TEST_F(ReferenceProxyTest, StartFailsOnBusyPort) {
  start();
  auto cfg = proxy_config();
  cfg.port = proxy_->port();
  auto second = reference_proxy::start(cfg);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), net_errc::unreachable);
}

TEST_F(ReferenceProxyTest, StopEndsPendingLongPoll) {
  start_manual();
  auto* c = client();
  auto pending = std::async(std::launch::async,
                            [c] { return c->poll(1, 20000ms); });
  ASSERT_TRUE(polls_waiting(1));
  // The proxy's clock stands still: only `stop` can end this poll (and
  // `stop` joins the thread serving it).
  auto stopping = std::async(std::launch::async, [this] { proxy_->stop(); });
  auto stopped = stopping.wait_for(20s) == std::future_status::ready;
  if (!stopped)
    advance(60s); // release the poll, so that the test fails instead of hangs
  ASSERT_TRUE(stopped) << "stop() left the long-poll waiting";
  ASSERT_EQ(pending.wait_for(20s), std::future_status::ready);
  auto reply = pending.get();
  if (reply) {
    // Answered before the listener closed: no lease handed out.
    EXPECT_EQ(reply->status, 200);
    EXPECT_EQ(json::parse(reply->body, nullptr, false)["requests"],
              json::array());
  }
  proxy_->stop(); // idempotent
}

} // namespace
} // namespace hsm::net
