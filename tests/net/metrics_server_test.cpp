// The metrics and health listener over real HTTP on loopback: what each
// endpoint answers, the loopback rule, the Host check, a taken port, and a
// flood of idle connections.

#include "runtime/net/metrics_server.hpp"

#include "runtime/net/host_port.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <nlohmann/json.hpp>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace hsm::net {
namespace {

using json = nlohmann::json;

std::unique_ptr<metrics_server>
bound(metrics_listen where = {"127.0.0.1", 0, false}) {
  auto s = metrics_server::bind(where, "--metrics-listen");
  if (!s) {
    ADD_FAILURE() << describe(s.error());
    return nullptr;
  }
  return std::move(*s);
}

/// Serves on `srv` with fresh metrics and a driver that is alive.
void serve_alive(metrics_server& srv) {
  metrics_sources src;
  src.metrics = std::make_shared<driver_metrics>(1);
  src.liveness = [] { return std::string{}; };
  srv.serve(src);
}

TEST(MetricsServerTest, ServesMetricsLivenessAndReadiness) {
  auto metrics = std::make_shared<driver_metrics>(2);
  auto alive = std::make_shared<std::atomic<bool>>(true);
  auto srv = bound();
  ASSERT_TRUE(srv);
  ASSERT_NE(srv->port(), 0);
  EXPECT_EQ(srv->url(), "http://127.0.0.1:" + std::to_string(srv->port()));
  metrics_sources src;
  src.metrics = metrics;
  src.liveness = [alive] {
    return alive->load() ? std::string{} : std::string{"the poller ended"};
  };
  srv->serve(src);
  httplib::Client cli{"127.0.0.1", srv->port()};
  auto job = job_kind::sign;
  metrics->count_request(&job, "ok");
  auto m = cli.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  EXPECT_EQ(m->get_header_value("Content-Type"),
            "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_NE(m->body.find("hsm_driver_requests_total{kind=\"sign\",outcome="
                         "\"ok\"} 1"),
            std::string::npos)
    << m->body;
  auto h = cli.Get("/healthz");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200) << h->body;
  // Not ready: no session, the proxy never reached.
  auto r = cli.Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  auto body = json::parse(r->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << r->body;
  EXPECT_EQ(body["ready"], false);
  EXPECT_TRUE(body["not_ready"].contains("sessions")) << r->body;
  EXPECT_TRUE(body["not_ready"].contains("proxy")) << r->body;
  EXPECT_FALSE(body["not_ready"].contains("store")) << r->body;
  metrics->set_dispatch_state(2, 4, 0);
  metrics->proxy_reached();
  r = cli.Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  alive->store(false);
  h = cli.Get("/healthz");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 503);
  EXPECT_NE(h->body.find("the poller ended"), std::string::npos) << h->body;
  auto missing = cli.Get("/v1/poll");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  srv->stop();
  EXPECT_FALSE(cli.Get("/metrics")) << "still answering after stop";
}

/// Open descriptors of this process.
size_t open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] auto& e :
       std::filesystem::directory_iterator{"/proc/self/fd"})
    ++n;
  return n;
}

TEST(MetricsServerTest, AFloodOfIdleConnectionsHoldsBoundedDescriptors) {
  auto srv = bound();
  ASSERT_TRUE(srv);
  serve_alive(*srv);
  // 40 connections that never send a byte (non-blocking connects: past the
  // listener's backlog the kernel drops the handshake, and a blocking
  // connect would wait on it).
  constexpr size_t idle = 40;
  auto before = open_fds();
  std::vector<int> socks;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(srv->port());
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (size_t i = 0; i < idle; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    ASSERT_GE(fd, 0);
    ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    socks.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds{500});
  // The listener accepted two for its workers, eight queued and one on
  // its own thread; the rest wait in the kernel. Unbounded, it would hold
  // one descriptor per connection.
  auto accepted = open_fds() - before - idle;
  EXPECT_LE(accepted, 11u);
  for (int fd : socks)
    ::close(fd);
  // Gone, the listener serves again at once.
  httplib::Client cli{"127.0.0.1", srv->port()};
  cli.set_read_timeout(10, 0);
  auto h = cli.Get("/healthz");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200) << h->body;
  srv->stop();
}

TEST(MetricsServerTest, RefusesAnAddressThatIsNotLoopbackUnlessAllowed) {
  auto refused = metrics_server::bind({"0.0.0.0", 0, false},
                                      "--metrics-listen");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error(), config_errc::invalid_option);
  EXPECT_NE(describe(refused.error()).find("--metrics-listen"),
            std::string::npos);
  auto allowed = metrics_server::bind({"0.0.0.0", 0, true}, "--metrics-listen");
  ASSERT_TRUE(allowed) << describe(allowed.error());
  EXPECT_TRUE(is_loopback_host("127.0.0.2"));
  EXPECT_TRUE(is_loopback_host("::1"));
  EXPECT_TRUE(is_loopback_host("localhost"));
  EXPECT_FALSE(is_loopback_host("10.0.0.1"));
  EXPECT_FALSE(is_loopback_host("::"));
  EXPECT_FALSE(is_loopback_host("metrics.example"));
}

TEST(MetricsServerTest, LoopbackListenerRefusesAForeignHostHeader) {
  auto srv = bound();
  ASSERT_TRUE(srv);
  serve_alive(*srv);
  httplib::Client cli{"127.0.0.1", srv->port()};
  auto foreign = cli.Get("/metrics", {{"Host", "rebound.example:80"}});
  ASSERT_TRUE(foreign);
  EXPECT_EQ(foreign->status, 403);
  auto local = cli.Get("/metrics", {{"Host", "localhost"}});
  ASSERT_TRUE(local);
  EXPECT_EQ(local->status, 200);
}

TEST(MetricsServerTest, ATakenPortFailsTheBindAndNamesTheFlag) {
  auto first = bound();
  ASSERT_TRUE(first);
  auto second = metrics_server::bind({"127.0.0.1", first->port(), false},
                                     "--metrics-listen");
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), net_errc::unreachable);
  EXPECT_NE(describe(second.error()).find("--metrics-listen"),
            std::string::npos)
    << describe(second.error());
}

TEST(MetricsServerTest, BoundButNeverServedReleasesThePort) {
  uint16_t port = 0;
  {
    auto srv = bound();
    ASSERT_TRUE(srv);
    port = srv->port();
  }
  auto again = metrics_server::bind({"127.0.0.1", port, false},
                                    "--metrics-listen");
  EXPECT_TRUE(again) << describe(again.error());
}

} // namespace
} // namespace hsm::net
