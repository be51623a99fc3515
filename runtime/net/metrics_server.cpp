#include "runtime/net/metrics_server.hpp"

#include "runtime/net/host_port.hpp"

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>

namespace hsm::net {

namespace {

/// The `Content-Type` of the Prometheus text format.
constexpr const char* prometheus_text = "text/plain; version=0.0.4; "
                                        "charset=utf-8";

/// True if `host` (a `Host` header's name part) names the loopback
/// listener: a page of another site whose name resolves to 127.0.0.1
/// sends its own name, and is refused.
bool loopback_host_header(const std::string& header) {
  std::string host = header;
  if (!host.empty() && host.front() == '[') {
    auto end = host.find(']');
    host = end == std::string::npos ? host : host.substr(1, end - 1);
  } else if (auto colon = host.rfind(':'); colon != std::string::npos) {
    host = host.substr(0, colon);
  }
  return is_loopback_host(host);
}

void reply_json(httplib::Response& res, int status, const nlohmann::json& j) {
  res.status = status;
  res.set_content(j.dump() + "\n", "application/json");
}

/// Two workers and at most `max_queued` accepted connections waiting for
/// them. Past that, the listener's own thread serves the connection before
/// it accepts another, so further clients wait in the kernel's backlog:
/// a flood of connections (a scraper gone wrong, a local process) holds a
/// bounded number of descriptors and threads, never the driver's share.
/// cpp-httplib's pool alone queues every accepted socket.
class bounded_pool : public httplib::TaskQueue {
public:
  static constexpr int workers = 2;
  static constexpr int max_queued = 8;

  void enqueue(std::function<void()> fn) override {
    if (queued_.fetch_add(1) >= max_queued) {
      queued_.fetch_sub(1);
      fn();
      return;
    }
    pool_.enqueue([this, fn = std::move(fn)] {
      queued_.fetch_sub(1);
      fn();
    });
  }

  void shutdown() override {
    pool_.shutdown();
  }

private:
  std::atomic<int> queued_{0};
  httplib::ThreadPool pool_{workers};
};

} // namespace

struct metrics_server::impl {
  httplib::Server svr;
  metrics_listen where;
  uint16_t port = 0;
  std::thread thread;
  bool running = false;
  bool stopped = false;
  metrics_sources src;

  void routes() {
    if (!where.allow_remote)
      svr.set_pre_routing_handler(
        [](const httplib::Request& req, httplib::Response& res) {
          if (loopback_host_header(req.get_header_value("Host")))
            return httplib::Server::HandlerResponse::Unhandled;
          reply_json(res, 403,
                     {{"error", "the Host header must name the loopback "
                                "listener"}});
          return httplib::Server::HandlerResponse::Handled;
        });
    svr.Get("/metrics",
            [this](const httplib::Request&, httplib::Response& res) {
              if (!src.metrics) {
                res.status = 503;
                res.set_content("starting\n", "text/plain");
                return;
              }
              res.set_content(src.metrics->text(), prometheus_text);
            });
    svr.Get("/healthz", [this](const httplib::Request&,
                               httplib::Response& res) {
      auto why = src.liveness ? src.liveness() : std::string{"starting"};
      if (why.empty())
        reply_json(res, 200, {{"alive", true}});
      else
        reply_json(res, 503, {{"alive", false}, {"reason", why}});
    });
    svr.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      if (!src.metrics) {
        reply_json(res, 503,
                   {{"ready", false}, {"not_ready", {{"driver", "starting"}}}});
        return;
      }
      auto missing = src.metrics->readiness(src.proxy_window);
      if (missing.empty()) {
        reply_json(res, 200, {{"ready", true}});
        return;
      }
      std::map<std::string, std::string> by_component;
      for (auto& m : missing) {
        auto& text = by_component[m.component];
        text += (text.empty() ? "" : "; ") + m.reason;
      }
      reply_json(res, 503, {{"ready", false}, {"not_ready", by_component}});
    });
  }

  void run() {
    auto exited = std::make_shared<std::atomic<bool>>(false);
    thread = std::thread{[this, exited] {
      // A scraper that hangs up mid-answer must not kill the process.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      svr.listen_after_bind();
      *exited = true;
    }};
    // `Server::stop()` is a no-op before the listen loop started.
    while (!svr.is_running() && !*exited)
      std::this_thread::sleep_for(std::chrono::milliseconds{1});
    running = true;
  }
};

caf::expected<std::unique_ptr<metrics_server>>
metrics_server::bind(const metrics_listen& where, std::string_view option) {
  std::string opt{option};
  if (!where.allow_remote && !is_loopback_host(where.host))
    return caf::make_error(
      config_errc::invalid_option, opt,
      opt + " must name a loopback address (127.0.0.1, ::1, localhost), not '"
        + where.host
        + "': the listener is plain HTTP without authentication; allow "
          "another address explicitly with --metrics-allow-remote");
  std::unique_ptr<metrics_server> self{new metrics_server};
  self->impl_ = std::make_unique<impl>();
  auto& d = *self->impl_;
  d.where = where;
  d.svr.new_task_queue = [] { return new bounded_pool; };
  // Reuse the address (a restart while old connections linger), never the
  // port: httplib's default SO_REUSEPORT would let a second driver bind the
  // same port and share the scrapes silently.
  d.svr.set_socket_options([](auto sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // One request per connection, read within 2 s: an idle or slow client
  // holds a worker for 2 s at most (a scrape is one short GET).
  d.svr.set_keep_alive_max_count(1);
  d.svr.set_read_timeout(2, 0);
  d.svr.set_write_timeout(5, 0);
  d.svr.set_payload_max_length(4096);
  d.routes();
  auto where_text = where.host + ":" + std::to_string(where.port);
  if (where.port == 0) {
    auto got = d.svr.bind_to_any_port(where.host);
    if (got <= 0 || got > 65535)
      return caf::make_error(net_errc::unreachable, opt,
                             "cannot bind " + where_text);
    d.port = static_cast<uint16_t>(got);
  } else {
    if (!d.svr.bind_to_port(where.host, where.port))
      return caf::make_error(net_errc::unreachable, opt,
                             "cannot bind " + where_text
                               + " (in use, or not an address of this "
                                 "host)");
    d.port = where.port;
  }
  return self;
}

void metrics_server::serve(metrics_sources src) {
  auto& d = *impl_;
  if (d.running || d.stopped)
    return;
  d.src = std::move(src);
  d.run();
}

uint16_t metrics_server::port() const noexcept {
  return impl_->port;
}

std::string metrics_server::url() const {
  auto& host = impl_->where.host;
  auto shown = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return "http://" + shown + ":" + std::to_string(impl_->port);
}

void metrics_server::stop() {
  if (!impl_)
    return;
  auto& d = *impl_;
  if (d.stopped)
    return;
  d.stopped = true;
  // A bound socket is closed only by stopping a running listen loop.
  if (!d.running)
    d.run();
  d.svr.stop();
  if (d.thread.joinable())
    d.thread.join();
}

metrics_server::~metrics_server() {
  stop();
}

} // namespace hsm::net
