#include "runtime/net/proxy_client.hpp"

#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "tests/net/pki_suite.hpp"
#include "tests/support/wait.hpp"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace hsm::net {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

/// A port on 127.0.0.1 with nothing listening: bound once by the kernel's
/// choice, then closed.
uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

/// When the fake proxy answers.
enum class answer_when {
  /// As soon as the request is in.
  at_once,
  /// Only once the test calls `release()` (or the fake is destroyed): a
  /// proxy that is slow for exactly as long as the test needs.
  released,
};

/// A bare HTTPS server (server certificate only) that records what the
/// client sends and answers with a fixed status: checks the client's side
/// of the protocol without the reference proxy's logic in the way.
class fake_proxy {
public:
  fake_proxy(const dev_pki& pki, int status,
             answer_when when = answer_when::at_once)
    : svr_(pki.server_chain.c_str(), pki.server_key.c_str()) {
    auto handler = [this, status, when](const httplib::Request& req,
                                        httplib::Response& res) {
      std::unique_lock<std::mutex> guard{mtx_};
      path_ = req.path;
      body_ = req.body;
      content_type_ = req.get_header_value("Content-Type");
      if (when == answer_when::released)
        released_cv_.wait_for(guard, 60s, [this] { return released_; });
      res.status = status;
      res.set_content("{\"fake\":true}", "application/json");
    };
    svr_.Post("/v1/poll", handler);
    svr_.Post("/v1/results", handler);
    port_ = static_cast<uint16_t>(svr_.bind_to_any_port("127.0.0.1"));
    thread_ = std::thread{[this] {
      // The client may hang up first; a write must not raise SIGPIPE.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      svr_.listen_after_bind();
    }};
    running_ = static_cast<bool>(test::wait_until(
      [this] { return svr_.is_running(); }, 20s, "the fake proxy to listen"));
  }

  ~fake_proxy() {
    release();
    svr_.stop();
    thread_.join();
  }

  bool valid() const {
    return svr_.is_valid() && port_ > 0 && running_;
  }

  uint16_t port() const {
    return port_;
  }

  /// Lets held requests be answered (see `answer_when::released`).
  void release() {
    {
      std::lock_guard<std::mutex> guard{mtx_};
      released_ = true;
    }
    released_cv_.notify_all();
  }

  std::string path() {
    std::lock_guard<std::mutex> guard{mtx_};
    return path_;
  }

  std::string body() {
    std::lock_guard<std::mutex> guard{mtx_};
    return body_;
  }

  std::string content_type() {
    std::lock_guard<std::mutex> guard{mtx_};
    return content_type_;
  }

private:
  httplib::SSLServer svr_;
  uint16_t port_ = 0;
  bool running_ = false;
  std::thread thread_;
  std::mutex mtx_;
  std::condition_variable released_cv_;
  bool released_ = false;
  std::string path_;
  std::string body_;
  std::string content_type_;
};

// -- fixture ------------------------------------------------------------------

class ProxyClientTest : public pki_suite<ProxyClientTest> {
public:
  static constexpr const char* suite_dir = "hsm_net_proxy_client";

protected:
  static proxy_client_config config(uint16_t port) {
    proxy_client_config cfg;
    cfg.proxy_addr = "127.0.0.1:" + std::to_string(port);
    cfg.tls = {pki_->root_cert, pki_->driver_chain, pki_->driver_key};
    cfg.driver_id = "driver-a";
    cfg.connect_timeout = 2s;
    cfg.poll_grace = 2s;
    cfg.post_timeout = 2s;
    return cfg;
  }
};

// -- create -------------------------------------------------------------------

TEST_F(ProxyClientTest, CreateNamesTheOptionOfAMissingFile) {
  auto missing = *dir_ / "missing.pem";
  struct row {
    std::filesystem::path tls_files::*field;
    const char* option;
  };
  for (auto r : {row{&tls_files::ca_cert, "--ca-cert"},
                 row{&tls_files::cert, "--client-cert"},
                 row{&tls_files::key, "--client-key"}}) {
    auto cfg = config(8443);
    cfg.tls.*r.field = missing;
    auto c = proxy_client::create(cfg);
    ASSERT_FALSE(c) << r.option;
    EXPECT_EQ(c.error(), net_errc::bad_tls_material);
    auto text = describe(c.error());
    EXPECT_NE(text.find(r.option), std::string::npos) << text;
    EXPECT_NE(text.find("missing.pem"), std::string::npos) << text;
    // A directory is not a file either.
    cfg.tls.*r.field = *dir_;
    c = proxy_client::create(cfg);
    ASSERT_FALSE(c) << r.option;
    EXPECT_NE(describe(c.error()).find(r.option), std::string::npos);
  }
}

TEST_F(ProxyClientTest, CreateRefusesUnreadableFile) {
  if (::geteuid() == 0)
    GTEST_SKIP() << "root reads any file";
  auto path = *dir_ / "unreadable.pem";
  std::filesystem::copy_file(pki_->driver_key, path,
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::permissions(path, std::filesystem::perms::none);
  auto cfg = config(8443);
  cfg.tls.key = path;
  auto c = proxy_client::create(cfg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), net_errc::bad_tls_material);
  EXPECT_NE(describe(c.error()).find("--client-key"), std::string::npos);
}

TEST_F(ProxyClientTest, MissingAddressIsMissingOption) {
  auto cfg = config(8443);
  cfg.proxy_addr.clear();
  auto c = proxy_client::create(cfg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), config_errc::missing_option);
  EXPECT_NE(describe(c.error()).find("--proxy-addr"), std::string::npos);
}

TEST_F(ProxyClientTest, BadAddressIsInvalidOption) {
  for (auto addr :
       {"localhost", "https://localhost:8443", "::1:8443", "localhost:0",
        "localhost:70000", "localhost:http", "[::1]8443", "[::1]:", ":8443",
        "a b:8443", "user@host:8443", "host:8443/path", "[localhost]:8443"}) {
    auto cfg = config(8443);
    cfg.proxy_addr = addr;
    auto c = proxy_client::create(cfg);
    ASSERT_FALSE(c) << addr;
    EXPECT_EQ(c.error(), config_errc::invalid_option) << addr;
    EXPECT_NE(describe(c.error()).find("--proxy-addr"), std::string::npos);
  }
}

TEST_F(ProxyClientTest, AcceptsHostPortAndBracketedIpv6) {
  for (auto addr : {"localhost:8443", "127.0.0.1:1", "[::1]:8443",
                    "proxy.example.com:65535"}) {
    auto cfg = config(8443);
    cfg.proxy_addr = addr;
    auto c = proxy_client::create(cfg);
    ASSERT_TRUE(c) << addr << ": " << describe(c.error());
    EXPECT_EQ((*c)->config().proxy_addr, addr);
  }
}

TEST_F(ProxyClientTest, MissingDriverIdIsMissingOption) {
  auto cfg = config(8443);
  cfg.driver_id.clear();
  auto c = proxy_client::create(cfg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), config_errc::missing_option);
}

// -- transport ----------------------------------------------------------------

TEST_F(ProxyClientTest, NothingListeningIsUnreachable) {
  auto c = proxy_client::create(config(free_port()));
  ASSERT_TRUE(c) << describe(c.error());
  auto reply = (*c)->poll(1, 100ms);
  ASSERT_FALSE(reply) << "status " << reply->status;
  EXPECT_EQ(reply.error(), net_errc::unreachable) << describe(reply.error());
  // The refusal itself is the error, not a timeout waited out after it.
  auto text = describe(reply.error());
  EXPECT_NE(text.find("Couldn't connect"), std::string::npos) << text;
  EXPECT_EQ(text.find("Timeout"), std::string::npos) << text;
  auto posted = (*c)->post_result("{}");
  ASSERT_FALSE(posted);
  EXPECT_EQ(posted.error(), net_errc::unreachable);
}

TEST_F(ProxyClientTest, PollSendsDriverIdMaxAndWaitAsJson) {
  fake_proxy fake{*pki_, 200};
  ASSERT_TRUE(fake.valid());
  auto c = proxy_client::create(config(fake.port()));
  ASSERT_TRUE(c) << describe(c.error());
  auto reply = (*c)->poll(3, 1500ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
  EXPECT_EQ(reply->body, "{\"fake\":true}");
  EXPECT_EQ(fake.path(), "/v1/poll");
  EXPECT_EQ(fake.content_type(), "application/json");
  auto body = json::parse(fake.body(), nullptr, false);
  ASSERT_TRUE(body.is_object()) << fake.body();
  EXPECT_EQ(body,
            (json{{"driver_id", "driver-a"}, {"max", 3}, {"wait_ms", 1500}}));
}

TEST_F(ProxyClientTest, PostResultSendsTheBodyAsIs) {
  fake_proxy fake{*pki_, 200};
  ASSERT_TRUE(fake.valid());
  auto c = proxy_client::create(config(fake.port()));
  ASSERT_TRUE(c) << describe(c.error());
  // Large enough that curl would otherwise ask for 100-continue.
  auto body = json{{"id", "r1"},
                   {"lease", "l1"},
                   {"driver_id", "driver-a"},
                   {"ok", true},
                   {"result", {{"blob", std::string(4000, 'a')}}}}
                .dump();
  for (int i = 0; i < 3; ++i) { // the same connection, reused
    auto reply = (*c)->post_result(body);
    ASSERT_TRUE(reply) << describe(reply.error());
    EXPECT_EQ(reply->status, 200);
    EXPECT_EQ(fake.path(), "/v1/results");
    EXPECT_EQ(fake.body(), body);
  }
}

TEST_F(ProxyClientTest, HttpErrorStatusIsAReplyNotAnError) {
  for (int status : {409, 500}) {
    fake_proxy fake{*pki_, status};
    ASSERT_TRUE(fake.valid());
    auto c = proxy_client::create(config(fake.port()));
    ASSERT_TRUE(c) << describe(c.error());
    auto reply = (*c)->post_result("{}");
    ASSERT_TRUE(reply) << describe(reply.error());
    EXPECT_EQ(reply->status, status);
  }
}

TEST_F(ProxyClientTest, ConflictFromReferenceProxyIsAReply) {
  reference_proxy_config pcfg;
  pcfg.server_cert = pki_->server_chain;
  pcfg.server_key = pki_->server_key;
  pcfg.client_ca = pki_->root_cert;
  auto proxy = reference_proxy::start(pcfg);
  ASSERT_TRUE(proxy) << describe(proxy.error());
  auto c = proxy_client::create(config((*proxy)->port()));
  ASSERT_TRUE(c) << describe(c.error());
  auto reply = (*c)->post_result(json{
    {"id", "unknown"},
    {"lease", "none"},
    {"driver_id", "driver-a"},
    {"ok", true},
    {"result", json::object()}}.dump());
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 409);
}

TEST_F(ProxyClientTest, SlowProxyTimesOutAsUnreachable) {
  // The proxy takes the poll and answers only after the client has given
  // up: the client cannot have had an answer, so its error is the timeout.
  fake_proxy fake{*pki_, 200, answer_when::released};
  ASSERT_TRUE(fake.valid());
  auto cfg = config(fake.port());
  cfg.poll_grace = 1s; // ample for the connection and the TLS handshake
  auto c = proxy_client::create(cfg);
  ASSERT_TRUE(c) << describe(c.error());
  auto t0 = std::chrono::steady_clock::now();
  auto reply = (*c)->poll(1, 0ms);
  auto waited = std::chrono::steady_clock::now() - t0;
  fake.release();
  ASSERT_FALSE(reply) << "status " << reply->status;
  EXPECT_EQ(reply.error(), net_errc::unreachable) << describe(reply.error());
  auto text = describe(reply.error());
  EXPECT_NE(text.find("Timeout"), std::string::npos) << text;
  EXPECT_EQ(fake.path(), "/v1/poll"); // the poll did reach the proxy
  // It gave the proxy the whole wait (0 here) plus the grace first (less a
  // little: curl rounds its clock to milliseconds).
  EXPECT_GE(waited, cfg.poll_grace - 20ms);
}

TEST_F(ProxyClientTest, ServerNameMustMatchTheCertificate) {
  // A proxy whose certificate is signed by a trusted CA but names another
  // host: the name check alone must refuse it.
  dev_pki_options opts;
  opts.server_names = {"proxy.example"};
  auto pki = make_dev_pki(*dir_ / "other-name", opts);
  ASSERT_TRUE(pki) << describe(pki.error());
  fake_proxy fake{*pki, 200};
  ASSERT_TRUE(fake.valid());
  auto cfg = config(fake.port());
  cfg.tls = {pki->root_cert, pki->driver_chain, pki->driver_key};
  auto c = proxy_client::create(cfg);
  ASSERT_TRUE(c) << describe(c.error());
  auto reply = (*c)->poll(1, 0ms);
  ASSERT_FALSE(reply) << "status " << reply->status;
  EXPECT_EQ(reply.error(), net_errc::tls_failed) << describe(reply.error());
  EXPECT_TRUE(fake.path().empty());
}

} // namespace
} // namespace hsm::net
