#include "runtime/net/reference_proxy.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/base/secret_file.hpp"
#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/net/host_port.hpp"
#include "runtime/net/openssl_error.hpp"
#include "runtime/net/proxy_bodies.hpp"
#include "runtime/net/x509_util.hpp"

#include <httplib.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

namespace hsm::net {

namespace {

using json = nlohmann::json;

// -- wire helpers -------------------------------------------------------------

constexpr const char* json_type = "application/json";

void reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dump_json(body), json_type);
}

void reply_error(httplib::Response& res, int status, const std::string& code,
                 const std::string& message) {
  reply(res, status, json{{"error", code}, {"message", message}});
}

/// The value read from a body, or nullptr after a 400 naming what is wrong.
template <class T>
T* read_or_refuse(body_read<T>& read, httplib::Response& res) {
  if (auto* bad = std::get_if<body_complaint>(&read)) {
    reply_error(res, 400, "bad_request", bad->message);
    return nullptr;
  }
  return &std::get<T>(read);
}

/// Blocks SIGPIPE in the calling thread (and so in the threads it starts,
/// which inherit the mask): cpp-httplib writes to sockets without
/// MSG_NOSIGNAL, and a peer that hangs up must not kill the process.
void block_sigpipe() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

// -- the client's connection --------------------------------------------------

/// The socket of a request's TLS connection; -1 if there is none.
int socket_of(const SSL* ssl) {
  return ssl != nullptr ? SSL_get_fd(ssl) : -1;
}

/// True if the client of `ssl`'s connection is gone: the kernel holds its
/// FIN or RST (a driver killed with -9 closes its sockets as it dies), or
/// the socket failed. While a long-poll waits its client sends nothing (one
/// request at a time per connection), so anything but the end of the stream
/// (a TLS alert, a pipelined request) does not count as gone.
bool client_gone(const SSL* ssl) {
  int fd = socket_of(ssl);
  if (fd < 0)
    return false;
  pollfd p{};
  p.fd = fd;
  p.events = POLLIN | POLLRDHUP;
  if (::poll(&p, 1, 0) <= 0)
    return false;
  if ((p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0)
    return true;
  if ((p.revents & POLLIN) == 0)
    return false;
  char c = 0;
  auto n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0
         || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK
             && errno != EINTR);
}

/// Refused client certificates kept for the admin API.
constexpr size_t max_refusals_kept = 100;

/// Who holds the leases a connection is handed: the client certificate's
/// subject name under the key that issued it, the SHA-256 of the issuer's
/// public key (DER SubjectPublicKeyInfo, from the chain the handshake
/// verified) and of the certificate's subject name (DER), in hex; empty
/// without a verified certificate (not on the mTLS listener, which refuses
/// a client without one and resumes no session, so every connection has
/// its verified chain). A driver whose certificate is renewed (same
/// name, same issuing key, new key and serial) still holds the leases it
/// took before: a reload of its files between a poll and its results
/// loses nothing. Another driver has another name (the runbook issues one
/// per driver); a certificate from another CA that happens to carry the
/// same names has another issuing key.
std::string holder_of(const SSL* ssl) {
  if (ssl == nullptr)
    return {};
  X509* cert = SSL_get0_peer_certificate(ssl);
  STACK_OF(X509)* chain = SSL_get0_verified_chain(ssl);
  if (cert == nullptr || chain == nullptr || sk_X509_num(chain) < 1)
    return {};
  // The verified chain starts with the leaf; its issuer follows, unless
  // the leaf itself is the trusted certificate.
  X509* issuer = sk_X509_value(chain, sk_X509_num(chain) > 1 ? 1 : 0);
  unsigned char* issuer_key = nullptr;
  unsigned char* subject = nullptr;
  auto key_len = i2d_PUBKEY(X509_get0_pubkey(issuer), &issuer_key);
  auto subject_len = i2d_X509_NAME(X509_get_subject_name(cert), &subject);
  std::string out;
  if (key_len > 0 && subject_len > 0) {
    std::vector<uint8_t> both(issuer_key, issuer_key + key_len);
    both.push_back('/');
    both.insert(both.end(), subject, subject + subject_len);
    out = crypto::to_hex(crypto::sha256(both));
  }
  OPENSSL_free(issuer_key);
  OPENSSL_free(subject);
  return out;
}

/// The client certificate of `ssl` as the admin API shows it.
client_cert_seen client_of(const SSL* ssl) {
  client_cert_seen out;
  X509* cert = ssl != nullptr ? SSL_get0_peer_certificate(ssl) : nullptr;
  if (cert == nullptr)
    return out;
  auto info = info_of(cert, std::time(nullptr));
  out.subject = std::move(info.subject);
  out.issuer = std::move(info.issuer);
  out.serial = std::move(info.serial);
  out.not_after = std::move(info.not_after);
  return out;
}

/// Resets the connection of `ssl` (TCP RST) without closing the socket,
/// which cpp-httplib still owns: `connect` with `AF_UNSPEC` disconnects a
/// TCP socket, sending a reset from an established connection.
void reset_connection(const SSL* ssl) {
  int fd = socket_of(ssl);
  if (fd < 0)
    return;
  sockaddr addr{};
  addr.sa_family = AF_UNSPEC;
  ::connect(fd, &addr, sizeof(addr));
}

/// Writes `text` to `sink`; false if the connection failed.
bool write_all(httplib::DataSink& sink, std::string_view text) {
  return text.empty() || sink.write(text.data(), text.size());
}

/// A fresh admin token: 256 random bits from OpenSSL, in hex.
std::string random_admin_token() {
  return crypto::random_hex(32);
}

// -- faults -------------------------------------------------------------------

constexpr std::array<poll_fault, 7> all_faults{
  poll_fault::reset,
  poll_fault::server_error,
  poll_fault::slow_body,
  poll_fault::garbage_body,
  poll_fault::duplicate_delivery,
  poll_fault::oversized_body,
  poll_fault::over_delivery,
};

/// The body of `poll_fault::garbage_body`: markup, a terminal escape, a NUL,
/// bytes that are not UTF-8.
std::string garbage_text() {
  static constexpr char text[] = "<html>\x1b[2J\x1b[31m502 Bad Gateway\r\n"
                                 "\x00\xff\xfe{\"requests\":[</html>";
  return std::string{text, sizeof(text) - 1};
}

// -- the queue's values as JSON -----------------------------------------------

/// The outcome as the admin API shows it (`ok`, `result` or `error`).
void put_outcome(json& out, const request_outcome& o) {
  out["ok"] = o.ok;
  auto body = json::parse(o.body, nullptr, false);
  out[o.ok ? "result" : "error"] = body.is_discarded() ? json{} : body;
}

/// A request's state as `GET /v1/admin/requests/{id}` shows it.
json to_json(const request_info& x) {
  json out{{"id", x.id},
           {"state", to_string(x.status)},
           {"deliveries", x.deliveries}};
  if (x.outcome)
    put_outcome(out, *x.outcome);
  return out;
}

/// A leased request as `POST /v1/poll` hands it out; `lease_ms` is how
/// long the lease lasts from now.
json to_json(const delivery& x, std::chrono::milliseconds lease) {
  auto params = json::parse(x.params, nullptr, false);
  return json{{"id", x.id},
              {"lease", x.lease},
              {"lease_ms", lease.count()},
              {"kind", x.kind},
              {"params", params.is_discarded() ? json{} : std::move(params)}};
}

/// The counters as `GET /v1/admin/stats` shows them.
json to_json(const proxy_stats& s) {
  return json{{"queued", s.queued},
              {"leased", s.leased},
              {"done", s.done},
              {"redelivered", s.redelivered},
              {"rejected_results", s.rejected_results},
              {"given_back", s.given_back},
              {"dead_polls", s.dead_polls},
              {"faulted_polls", s.faulted_polls},
              {"in_flight", s.in_flight},
              {"max_in_flight", s.max_in_flight}};
}

/// Queued faults as the admin API shows them.
json to_json(const std::vector<poll_fault>& faults) {
  auto names = json::array();
  for (auto f : faults)
    names.push_back(to_string(f));
  return json{{"pending", std::move(names)}};
}

/// Why a result is refused, for the 409's message.
const char* refusal(completion x) {
  switch (x) {
    case completion::accepted:
      break;
    case completion::unknown_request:
      return "unknown request";
    case completion::already_answered:
      return "already answered";
    case completion::lease_not_current:
      return "lease expired";
    case completion::not_lease_holder:
      return "the lease is held by another client certificate";
  }
  return "lease not current";
}

} // namespace

const char* to_string(poll_fault x) {
  switch (x) {
    case poll_fault::reset:
      return "reset";
    case poll_fault::server_error:
      return "server_error";
    case poll_fault::slow_body:
      return "slow_body";
    case poll_fault::garbage_body:
      return "garbage_body";
    case poll_fault::duplicate_delivery:
      return "duplicate_delivery";
    case poll_fault::oversized_body:
      return "oversized_body";
    case poll_fault::over_delivery:
      return "over_delivery";
  }
  return "unknown";
}

std::optional<poll_fault> parse_poll_fault(std::string_view name) {
  for (auto f : all_faults)
    if (name == to_string(f))
      return f;
  return std::nullopt;
}

// -- impl ---------------------------------------------------------------------

struct reference_proxy::impl {
  explicit impl(const reference_proxy_config& c)
    : cfg(c),
      clk(c.clock != nullptr ? *c.clock : real_clock()),
      queue(clk, c.lease_duration, c.keep) {
    // nop
  }

  reference_proxy_config cfg;
  const hsm::clock& clk;

  // -- servers (their threads run `listen_after_bind`) -----------------------

  std::unique_ptr<httplib::SSLServer> tls;
  httplib::Server admin;
  std::thread tls_thread;
  std::thread admin_thread;
  uint16_t port = 0;
  uint16_t admin_port = 0;
  std::mutex stop_mtx;
  bool stopped = false;
  /// The admin API's bearer token (`cfg.admin_token` or a random one).
  std::string admin_token;

  // -- the queue and the long-polls, guarded by mtx --------------------------

  std::mutex mtx;
  /// Wakes long-polls: a request became visible, the clock was advanced by
  /// hand, or the proxy stops. (A lease's expiry wakes them by timeout.)
  std::condition_variable visible_cv;
  /// Wakes the admin API's waits for an answer: a request was answered, or
  /// the proxy stops.
  std::condition_variable done_cv;
  bool stopping = false;
  /// Long-polls inside `on_poll`'s wait.
  size_t waiting = 0;
  lease_queue queue;
  /// Faults for the next poll answers, next first.
  std::deque<poll_fault> faults;
  /// Long-polls whose client had gone.
  size_t dead_polls = 0;
  /// Poll answers that carried a fault.
  size_t faulted_polls = 0;
  /// Client certificates seen, first seen first.
  std::vector<client_cert_seen> clients;
  /// Client certificates refused in the handshake, oldest first.
  std::vector<client_cert_refused> refused;

  /// Counts a call from the client certificate of `ssl`; logs a
  /// certificate the first time it is seen.
  void note_client(const SSL* ssl, bool poll) {
    auto seen = client_of(ssl);
    if (seen.serial.empty())
      return;
    std::lock_guard<std::mutex> guard{mtx};
    auto it = std::find_if(clients.begin(), clients.end(),
                           [&](const client_cert_seen& c) {
                             return c.serial == seen.serial
                                    && c.issuer == seen.issuer;
                           });
    if (it == clients.end()) {
      logger("proxy")->info("client certificate: subject '{}', serial {}, "
                            "issuer '{}', notAfter {}",
                            printable(seen.subject, 256), seen.serial,
                            printable(seen.issuer, 256), seen.not_after);
      clients.push_back(std::move(seen));
      it = std::prev(clients.end());
    }
    ++(poll ? it->polls : it->results);
  }

  /// Enqueues under the lock and wakes the long-polls.
  std::string add(std::string kind, std::string params,
                  std::optional<std::string> id) {
    std::lock_guard<std::mutex> guard{mtx};
    auto out = queue.enqueue(std::move(kind), std::move(params), std::move(id));
    visible_cv.notify_all();
    return out;
  }

  /// Blocks until a request is visible, `wait` has passed on `clk`, the
  /// proxy stops or the client is gone (`gone`, checked every
  /// `client_check_interval` and last right before leasing, under the lock);
  /// then leases up to `max` to `driver`, unless the client is gone (`dead`
  /// is then set) or the proxy stops. The wait is cut at the next lease
  /// expiry so that a redelivery wakes it.
  std::vector<delivery> take(const std::string& driver,
                             const std::string& holder, size_t max,
                             std::chrono::milliseconds wait,
                             const std::function<bool()>& gone, bool& dead) {
    std::unique_lock<std::mutex> lock{mtx};
    auto deadline = clk.steady_now() + wait;
    ++waiting;
    for (;;) {
      if (stopping)
        break;
      // Before any lease: a request leased to a dead driver's poll would
      // wait out a whole lease before a live driver got it.
      if (gone()) {
        dead = true;
        break;
      }
      if (queue.has_work())
        break;
      auto now = clk.steady_now();
      if (now >= deadline)
        break;
      auto until = deadline;
      if (auto expiry = queue.next_expiry())
        until = std::min(until, *expiry);
      // Real time stands in for `clk`'s here: a manual clock that moves
      // meanwhile comes with `clock_advanced`, which wakes this wait.
      visible_cv.wait_for(lock, std::min<std::chrono::steady_clock::duration>(
                                  until - now, cfg.client_check_interval));
    }
    --waiting;
    if (dead) {
      ++dead_polls;
      // Another poll may have slept through the wake-up this one took.
      if (queue.has_work())
        visible_cv.notify_all();
    }
    // A stopping proxy hands out no more leases: nobody would take results.
    if (stopping || dead)
      return {};
    return queue.lease(driver, max, holder);
  }

  /// Takes back the leases of an answer that could not be written.
  void give_back(const std::vector<delivery>& leased) {
    std::lock_guard<std::mutex> guard{mtx};
    auto any = false;
    for (auto it = leased.rbegin(); it != leased.rend(); ++it)
      any = queue.give_back(it->id, it->lease) || any;
    if (any)
      visible_cv.notify_all();
  }

  /// The fault for the next poll answer, if any.
  std::optional<poll_fault> next_fault() {
    std::lock_guard<std::mutex> guard{mtx};
    if (faults.empty())
      return std::nullopt;
    auto f = faults.front();
    faults.pop_front();
    ++faulted_polls;
    return f;
  }

  bool is_stopping() {
    std::lock_guard<std::mutex> guard{mtx};
    return stopping;
  }

  // -- poll answers -----------------------------------------------------------

  /// Answers 200 with `body`. With leases in it, the body goes out through a
  /// content provider so that a failed write is known: the leases are then
  /// taken back (the driver cannot have read them all). With `pieces` > 1
  /// it goes out in that many pieces, `pause` apart (`slow_body`).
  void answer(httplib::Response& res, std::string body,
              std::vector<delivery> leased, size_t pieces = 1,
              std::chrono::milliseconds pause = std::chrono::milliseconds{0}) {
    res.status = 200;
    if (leased.empty() && pieces <= 1) {
      res.set_content(body, json_type);
      return;
    }
    auto text = std::make_shared<const std::string>(std::move(body));
    auto size = text->size();
    pieces = std::clamp<size_t>(pieces, 1, std::max<size_t>(size, 1));
    res.set_content_provider(
      size, json_type,
      [this, text, pieces, pause](size_t offset, size_t,
                                  httplib::DataSink& sink) {
        auto piece = (text->size() + pieces - 1) / pieces;
        while (offset < text->size()) {
          if (offset > 0 && pause.count() > 0) {
            if (is_stopping())
              return false;
            std::this_thread::sleep_for(pause);
          }
          auto n = std::min(piece, text->size() - offset);
          if (!write_all(sink, std::string_view{*text}.substr(offset, n)))
            return false;
          offset += n;
        }
        return true;
      },
      [this, leased = std::move(leased)](bool success) {
        if (!success && !leased.empty())
          give_back(leased);
      });
  }

  /// `poll_fault::reset`: half the body, then a reset. Leases kept.
  static void answer_with_reset(httplib::Response& res, std::string body,
                                const SSL* ssl) {
    auto text = std::make_shared<const std::string>(std::move(body));
    res.status = 200;
    res.set_content_provider(
      text->size(), json_type,
      [text, ssl](size_t offset, size_t, httplib::DataSink& sink) {
        auto half = std::max<size_t>(text->size() / 2, 1);
        if (offset < half
            && write_all(sink,
                         std::string_view{*text}.substr(offset, half - offset)))
          // A reset makes the peer's kernel drop what its reader has not
          // taken yet: give the client time to read the half it got, so that
          // it sees an answer cut short rather than none.
          std::this_thread::sleep_for(std::chrono::milliseconds{100});
        reset_connection(ssl);
        return false;
      });
  }

  /// `poll_fault::oversized_body`: a valid answer padded to
  /// `oversized_body_bytes`, written in 64 KiB pieces. Leases kept.
  void answer_oversized(httplib::Response& res, const json& requests) {
    auto head = std::make_shared<const std::string>(
      "{\"requests\":" + dump_json(requests) + ",\"padding\":\"");
    static constexpr std::string_view tail = "\"}";
    auto size = std::max(cfg.oversized_body_bytes, head->size() + tail.size());
    res.status = 200;
    res.set_content_provider(
      size, json_type,
      [head, size](size_t offset, size_t, httplib::DataSink& sink) {
        static const std::string padding(64 * 1024, 'x');
        auto pad_end = size - tail.size();
        if (offset < head->size()) {
          if (!write_all(sink, std::string_view{*head}.substr(offset)))
            return false;
          offset = head->size();
        }
        while (offset < pad_end) {
          auto n = std::min(padding.size(), pad_end - offset);
          if (!write_all(sink, std::string_view{padding}.substr(0, n)))
            return false;
          offset += n;
        }
        return write_all(sink, tail.substr(offset - pad_end));
      });
  }

  // -- driver-facing handlers -------------------------------------------------

  void on_poll(const httplib::Request& req, httplib::Response& res) {
    auto read = read_poll_ask(req.body);
    auto* ask = read_or_refuse(read, res);
    if (ask == nullptr)
      return;
    const auto& driver = ask->driver_id;
    auto wait = std::min(std::chrono::milliseconds{static_cast<int64_t>(
                           std::min<uint64_t>(ask->wait_ms, INT32_MAX))},
                         cfg.max_wait);
    auto fault = next_fault();
    if (fault == poll_fault::server_error) {
      reply_error(res, 503, "unavailable", "injected fault: server_error");
      return;
    }
    auto n = static_cast<size_t>(
      std::min<uint64_t>(ask->max, std::numeric_limits<uint32_t>::max()));
    if (fault == poll_fault::over_delivery)
      n += cfg.over_delivery_extra;
    const SSL* ssl = req.ssl;
    note_client(ssl, true);
    bool dead = false;
    auto got = take(
      driver, holder_of(ssl), n, wait, [ssl] { return client_gone(ssl); },
      dead);
    auto out = json::array();
    for (const auto& x : got) {
      out.push_back(to_json(x, cfg.lease_duration));
      if (fault == poll_fault::duplicate_delivery)
        out.push_back(to_json(x, cfg.lease_duration));
    }
    if (dead || !fault) {
      // Nobody reads the answer of a dead client; it is written all the
      // same (the write fails and the connection closes).
      answer(res, dump_json(json{{"requests", std::move(out)}}),
             std::move(got));
      return;
    }
    switch (*fault) {
      case poll_fault::reset:
        answer_with_reset(res, dump_json(json{{"requests", std::move(out)}}),
                          ssl);
        return;
      case poll_fault::garbage_body:
        res.status = 200;
        res.set_content(garbage_text(), json_type);
        return;
      case poll_fault::oversized_body:
        answer_oversized(res, out);
        return;
      case poll_fault::slow_body:
        answer(res, dump_json(json{{"requests", std::move(out)}}),
               std::move(got), cfg.slow_body_pieces, cfg.slow_body_delay);
        return;
      case poll_fault::server_error:
      case poll_fault::duplicate_delivery:
      case poll_fault::over_delivery:
        answer(res, dump_json(json{{"requests", std::move(out)}}),
               std::move(got));
        return;
    }
  }

  /// Records one well-formed result; under `mtx`.
  completion record(posted_result& r, const std::string& holder) {
    auto done = queue.complete(r.id, r.lease, std::move(r.outcome), holder);
    if (done != completion::accepted)
      return done;
    // A retryable error made the request visible again; an answer ends
    // the admin API's waits.
    if (queue.has_work())
      visible_cv.notify_all();
    done_cv.notify_all();
    return done;
  }

  /// `POST /v1/results`: one result (`{"id","lease","driver_id","ok",...}`,
  /// 200 or 409), or a batch (`{"driver_id","results":[...]}`, 200 with a
  /// status per result, so that one stale lease never fails the others).
  void on_result(const httplib::Request& req, httplib::Response& res) {
    note_client(req.ssl, false);
    auto read = read_results(req.body);
    auto* posted = read_or_refuse(read, res);
    if (posted == nullptr)
      return;
    if (posted->batch) {
      auto statuses = json::array();
      auto holder = holder_of(req.ssl);
      std::unique_lock<std::mutex> lock{mtx};
      for (auto& r : posted->results) {
        json status{{"id", r.id.empty() ? json{} : json(r.id)}};
        if (r.complaint) {
          status["status"] = "bad_request";
          status["message"] = std::move(r.complaint->message);
        } else if (auto done = record(r, holder);
                   done != completion::accepted) {
          status["status"] = done == completion::not_lease_holder
                               ? "forbidden"
                               : "lease_not_current";
          status["message"] = refusal(done);
        } else {
          status["status"] = "accepted";
        }
        statuses.push_back(std::move(status));
      }
      lock.unlock();
      reply(res, 200, json{{"results", std::move(statuses)}});
      return;
    }
    auto holder = holder_of(req.ssl);
    std::unique_lock<std::mutex> lock{mtx};
    auto done = record(posted->results.front(), holder);
    lock.unlock();
    if (done == completion::not_lease_holder) {
      reply_error(res, 403, "forbidden", refusal(done));
      return;
    }
    if (done != completion::accepted) {
      reply_error(res, 409, "lease_not_current", refusal(done));
      return;
    }
    reply(res, 200, json{{"accepted", true}});
  }

  // -- admin handlers ---------------------------------------------------------

  /// `POST /v1/admin/requests[?wait_ms=N]`: `{"id"}`; with `wait_ms`, the
  /// request's state (as `GET /v1/admin/requests/{id}` shows it) once it
  /// is done or after N ms, whichever comes first.
  void on_enqueue(const httplib::Request& req, httplib::Response& res) {
    auto wait = wait_param(req, res);
    if (!wait)
      return;
    auto read = read_enqueue(req.body);
    auto* ask = read_or_refuse(read, res);
    if (ask == nullptr)
      return;
    auto out = add(std::move(ask->kind), std::move(ask->params),
                   std::move(ask->id));
    if (wait->count() == 0) {
      reply(res, 200, json{{"id", out}});
      return;
    }
    auto info = find_when_done(out, *wait);
    reply(res, 200, info ? to_json(*info) : json{{"id", out}});
  }

  std::optional<request_info> find(const std::string& id) {
    std::lock_guard<std::mutex> guard{mtx};
    return queue.find(id);
  }

  /// The request's state once it is done, the proxy stops or `wait` has
  /// passed, whichever comes first; nullopt for an unknown id.
  std::optional<request_info> find_when_done(const std::string& id,
                                             std::chrono::milliseconds wait) {
    auto deadline = std::chrono::steady_clock::now() + wait;
    std::unique_lock<std::mutex> lock{mtx};
    done_cv.wait_until(lock, deadline, [&] {
      auto info = queue.find(id);
      return stopping || !info || info->status == request_status::done;
    });
    return queue.find(id);
  }

  /// The `wait_ms` query parameter (0 without one), at most
  /// `max_admin_wait`; nullopt after a 400 if it is not an integer.
  std::optional<std::chrono::milliseconds>
  wait_param(const httplib::Request& req, httplib::Response& res) const {
    if (!req.has_param("wait_ms"))
      return std::chrono::milliseconds{0};
    auto text = req.get_param_value("wait_ms");
    uint64_t n = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
    if (ec != std::errc{} || end != text.data() + text.size()) {
      reply_error(res, 400, "bad_request",
                  "\"wait_ms\" must be an integer >= 0");
      return std::nullopt;
    }
    return std::min(std::chrono::milliseconds{static_cast<int64_t>(
                      std::min<uint64_t>(n, INT32_MAX))},
                    cfg.max_admin_wait);
  }

  /// `GET /v1/admin/requests/{id}[?wait_ms=N]`: the request's state; with
  /// `wait_ms`, once it is done or after N ms (at most `max_admin_wait`).
  void on_state(const httplib::Request& req, httplib::Response& res) {
    std::string id = req.matches[1];
    auto wait = wait_param(req, res);
    if (!wait)
      return;
    auto info = wait->count() > 0 ? find_when_done(id, *wait) : find(id);
    if (!info) {
      reply_error(res, 404, "not_found", "no request with id " + id);
      return;
    }
    reply(res, 200, to_json(*info));
  }

  proxy_stats stats() {
    std::lock_guard<std::mutex> guard{mtx};
    proxy_stats out;
    static_cast<queue_stats&>(out) = queue.stats();
    out.dead_polls = dead_polls;
    out.faulted_polls = faulted_polls;
    return out;
  }

  // -- faults -----------------------------------------------------------------

  void inject(poll_fault fault, size_t polls) {
    std::lock_guard<std::mutex> guard{mtx};
    faults.insert(faults.end(), polls, fault);
  }

  void clear_faults() {
    std::lock_guard<std::mutex> guard{mtx};
    faults.clear();
  }

  std::vector<poll_fault> pending_faults() {
    std::lock_guard<std::mutex> guard{mtx};
    return {faults.begin(), faults.end()};
  }

  /// `POST /v1/admin/faults {"fault","polls"?}`: queues a fault for the
  /// next `polls` (default 1, at most `max_fault_polls`) poll answers.
  void on_inject(const httplib::Request& req, httplib::Response& res) {
    auto read = read_fault_ask(req.body);
    auto* ask = read_or_refuse(read, res);
    if (ask == nullptr)
      return;
    auto fault = parse_poll_fault(ask->fault);
    if (!fault) {
      std::string names;
      for (auto f : all_faults)
        names += std::string{names.empty() ? "" : ", "} + to_string(f);
      reply_error(res, 400, "bad_request", "\"fault\" must be one of " + names);
      return;
    }
    inject(*fault, static_cast<size_t>(ask->polls));
    reply(res, 200, to_json(pending_faults()));
  }

  void on_stats(httplib::Response& res) {
    reply(res, 200, to_json(stats()));
  }

  std::vector<client_cert_seen> seen_clients() {
    std::lock_guard<std::mutex> guard{mtx};
    return clients;
  }

  std::vector<client_cert_refused> refused_clients() {
    std::lock_guard<std::mutex> guard{mtx};
    return refused;
  }

  void on_clients(httplib::Response& res) {
    auto out = json::array();
    for (const auto& c : seen_clients())
      out.push_back(json{{"subject", c.subject},
                         {"issuer", c.issuer},
                         {"serial", c.serial},
                         {"not_after", c.not_after},
                         {"polls", c.polls},
                         {"results", c.results}});
    auto refusals = json::array();
    for (const auto& r : refused_clients())
      refusals.push_back(json{{"subject", r.subject},
                              {"serial", r.serial},
                              {"cause", r.cause},
                              {"reason", r.reason}});
    reply(res, 200,
          json{{"clients", std::move(out)}, {"refused", std::move(refusals)}});
  }

  // -- the admin API's gate -----------------------------------------------

  /// True if `host` (a `Host` header) names the admin listener by a
  /// loopback name: what a browser sends for a page of this host, and
  /// never for another site's page that resolves its name to 127.0.0.1.
  bool loopback_host(const std::string& host) const {
    auto suffix = ":" + std::to_string(admin_port);
    for (const char* name : {"127.0.0.1", "localhost", "[::1]"})
      if (host == name + suffix)
        return true;
    // The address it listens on, as a client names it (127.0.0.2, [::1]).
    auto own = cfg.admin_host.find(':') != std::string::npos
                 ? "[" + cfg.admin_host + "]"
                 : cfg.admin_host;
    return host == own + suffix;
  }

  /// Refuses an admin call that lacks the bearer token, names another host
  /// (a loopback listener only) or posts something other than JSON; lets
  /// the others through to their route.
  httplib::Server::HandlerResponse admin_gate(const httplib::Request& req,
                                              httplib::Response& res) const {
    using handled = httplib::Server::HandlerResponse;
    if (!cfg.admin_remote && !loopback_host(req.get_header_value("Host"))) {
      reply_error(res, 403, "forbidden",
                  "the admin API answers only to Host 127.0.0.1, localhost "
                  "or [::1] with its port");
      return handled::Handled;
    }
    static constexpr std::string_view bearer = "Bearer ";
    auto auth = req.get_header_value("Authorization");
    auto given = std::string_view{auth}.substr(
      std::min(auth.size(), bearer.size()));
    if (!auth.starts_with(bearer) || given.size() != admin_token.size()
        || CRYPTO_memcmp(given.data(), admin_token.data(), given.size()) != 0) {
      res.set_header("WWW-Authenticate", "Bearer");
      reply_error(res, 401, "unauthorized",
                  "the admin API needs \"Authorization: Bearer <token>\" "
                  "(the proxy's admin token file)");
      return handled::Handled;
    }
    if (req.method == "POST") {
      auto type = req.get_header_value("Content-Type");
      auto media = std::string_view{type}.substr(0, type.find(';'));
      while (!media.empty() && media.back() == ' ')
        media.remove_suffix(1);
      if (media != json_type) {
        reply_error(res, 415, "unsupported_media_type",
                    "the admin API takes Content-Type: application/json");
        return handled::Handled;
      }
    }
    return handled::Unhandled;
  }

  // -- setup ------------------------------------------------------------------

  /// Settings both listeners share: body limit, JSON error bodies, no
  /// exception escaping a handler.
  void common_setup(httplib::Server& svr) {
    svr.set_payload_max_length(cfg.max_body);
    // httplib's default also sets SO_REUSEPORT, which lets a second proxy
    // bind the same port and silently share the traffic: reuse the address
    // (restart while old connections linger) but never the port.
    svr.set_socket_options([](auto sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    });
    svr.set_keep_alive_max_count(1000);
    svr.set_keep_alive_timeout(
      static_cast<time_t>(std::max<int64_t>(cfg.idle_timeout.count(), 1)));
    // Headers and body go out in separate writes: without this, Nagle and
    // the peer's delayed ACK add 40 ms to every answer.
    svr.set_tcp_nodelay(true);
    svr.set_error_handler(httplib::Server::HandlerWithResponse{
      [](const httplib::Request&, httplib::Response& res) {
        if (!res.body.empty())
          return httplib::Server::HandlerResponse::Unhandled;
        auto code = res.status == 404   ? "not_found"
                    : res.status == 413 ? "payload_too_large"
                                        : "bad_request";
        reply_error(res, res.status, code,
                    "HTTP " + std::to_string(res.status));
        return httplib::Server::HandlerResponse::Handled;
      }});
    svr.set_exception_handler([](const httplib::Request&,
                                 httplib::Response& res,
                                 std::exception_ptr ep) {
      std::string what = "unexpected failure";
      try {
        if (ep)
          std::rethrow_exception(ep);
      } catch (const std::exception& ex) {
        what = ex.what();
      } catch (...) {
        // nop: reported as the generic text above
      }
      reply_error(res, 500, "internal", what);
    });
  }

  void routes() {
    tls->Post("/v1/poll",
              [this](const httplib::Request& req, httplib::Response& res) {
                on_poll(req, res);
              });
    tls->Post("/v1/results",
              [this](const httplib::Request& req, httplib::Response& res) {
                on_result(req, res);
              });
    admin.Post("/v1/admin/requests",
               [this](const httplib::Request& req, httplib::Response& res) {
                 on_enqueue(req, res);
               });
    admin.Get(R"(/v1/admin/requests/([^/]+))",
              [this](const httplib::Request& req, httplib::Response& res) {
                on_state(req, res);
              });
    admin.Get("/v1/admin/stats",
              [this](const httplib::Request&, httplib::Response& res) {
                on_stats(res);
              });
    admin.Get("/v1/admin/clients",
              [this](const httplib::Request&, httplib::Response& res) {
                on_clients(res);
              });
    admin.Post("/v1/admin/faults",
               [this](const httplib::Request& req, httplib::Response& res) {
                 on_inject(req, res);
               });
    admin.Get("/v1/admin/faults",
              [this](const httplib::Request&, httplib::Response& res) {
                reply(res, 200, to_json(pending_faults()));
              });
    admin.Delete("/v1/admin/faults",
                 [this](const httplib::Request&, httplib::Response& res) {
                   clear_faults();
                   reply(res, 200, to_json(pending_faults()));
                 });
  }

  static caf::error fill_extension_caches(X509_STORE* store) {
    if (store == nullptr)
      return bad_tls_material("the server has no certificate store");
    auto* objects = X509_STORE_get0_objects(store);
    for (int i = 0; i < sk_X509_OBJECT_num(objects); ++i)
      if (auto* x = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objects, i)))
        X509_check_purpose(x, -1, 0);
    return caf::none;
  }

  caf::error load_tls() {
    for (const auto& [path, what] :
         {std::pair{cfg.server_cert, "server certificate"},
          std::pair{cfg.server_key, "server key"},
          std::pair{cfg.client_ca, "client CA"}}) {
      std::error_code ec;
      if (path.empty() || !std::filesystem::is_regular_file(path, ec))
        return caf::make_error(net_errc::bad_tls_material,
                               std::string{what} + " '" + path.string()
                                 + "' is not a readable file");
    }
    auto cert = cfg.server_cert.string();
    auto key = cfg.server_key.string();
    auto ca = cfg.client_ca.string();
    // This constructor loads the chain and key, trusts `ca` for clients and
    // sets SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT: a client
    // without a certificate chaining to `ca` fails the handshake.
    tls = std::make_unique<httplib::SSLServer>(cert.c_str(), key.c_str(),
                                               ca.c_str());
    if (!tls->is_valid())
      return bad_tls_material("cannot load the server certificate " + cert
                              + " with key " + key);
    auto* ctx = tls->ssl_context();
    if (SSL_CTX_set_min_proto_version(ctx, cfg.allow_tls12 ? TLS1_2_VERSION
                                                           : TLS1_3_VERSION)
        != 1)
      return bad_tls_material("cannot set the lowest TLS version");
    // No session is resumed: a lease belongs to a certificate under the key
    // that issued it (`holder_of`), and OpenSSL keeps the verified chain
    // with the connection, not with the session, so a resumed connection
    // has none. No TLS 1.3 ticket, no TLS 1.2 session cache: every
    // connection verifies the client's chain in full. The session id
    // context stays set, so that a client offering an old session gets a
    // full handshake rather than OpenSSL's "internal error".
    static constexpr unsigned char sid_ctx[] = "hsm-driver-reference-proxy";
    if (SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1) != 1)
      return bad_tls_material("cannot set the session id context");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    if (SSL_CTX_set_num_tickets(ctx, 0) != 1)
      return bad_tls_material("cannot turn session tickets off");
    if (SSL_CTX_check_private_key(ctx) != 1)
      return bad_tls_material("the server key does not match its certificate");
    // httplib ignores whether the CA file loads; check it, and name the
    // acceptable CAs in the handshake.
    auto* names = SSL_load_client_CA_file(ca.c_str());
    if (names == nullptr)
      return bad_tls_material("no CA certificate in the client CA file " + ca);
    SSL_CTX_set_client_CA_list(ctx, names);
    // OpenSSL fills a certificate's extension cache (key ids, purposes) on
    // first use, under the certificate's lock but read back without it on
    // a fast path: two handshakes verifying against the same CA at once
    // race on it. Fill it here, before any worker thread runs.
    if (auto err = fill_extension_caches(SSL_CTX_get_cert_store(ctx)))
      return err;
    // Refused client certificates are recorded, with the cause, for the
    // operator (log, `GET /v1/admin/clients`) and the tests: with TLS 1.3
    // the client often cannot read the alert before the connection closes.
    SSL_CTX_set_ex_data(ctx, proxy_ex_index(), this);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                       &on_verify);
    ERR_clear_error();
    return caf::none;
  }

  /// The SSL_CTX slot that points back to the proxy.
  static int proxy_ex_index() {
    static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr,
                                                      nullptr, nullptr);
    return index;
  }

  /// OpenSSL's verify callback: keeps OpenSSL's verdict, and records a
  /// refusal (once per handshake: the first error is the cause).
  static int on_verify(int ok, X509_STORE_CTX* store) {
    if (ok == 1)
      return ok;
    auto* ssl = static_cast<SSL*>(
      X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
    auto* self = ssl != nullptr ? static_cast<impl*>(
                   SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), proxy_ex_index()))
                                : nullptr;
    if (self == nullptr)
      return ok;
    auto code = X509_STORE_CTX_get_error(store);
    client_cert_refused r;
    if (auto* leaf = X509_STORE_CTX_get0_cert(store)) {
      auto info = info_of(leaf, std::time(nullptr));
      r.subject = std::move(info.subject);
      r.serial = std::move(info.serial);
    }
    r.cause = to_string(cause_of_verify_result(code));
    r.reason = X509_verify_cert_error_string(code);
    // The callback may run again for the same handshake (another error
    // further up the chain); the first one is the cause.
    std::lock_guard<std::mutex> guard{self->mtx};
    if (!self->refused.empty() && self->refused.back().serial == r.serial
        && self->refused.back().handshake == ssl)
      return ok;
    r.handshake = ssl;
    logger("proxy")->warn("refused a client certificate: subject '{}', "
                          "serial {}: {} ({})",
                          printable(r.subject, 256), r.serial, r.cause,
                          r.reason);
    self->refused.push_back(std::move(r));
    if (self->refused.size() > max_refusals_kept)
      self->refused.erase(self->refused.begin());
    return ok;
  }

  static caf::expected<uint16_t> bind(httplib::Server& svr,
                                      const std::string& host, uint16_t p,
                                      const char* what) {
    if (p == 0) {
      auto got = svr.bind_to_any_port(host);
      if (got <= 0 || got > 65535)
        return caf::make_error(net_errc::unreachable,
                               std::string{"cannot bind the "} + what
                                 + " listener on " + host);
      return static_cast<uint16_t>(got);
    }
    if (!svr.bind_to_port(host, p))
      return caf::make_error(net_errc::unreachable,
                             std::string{"cannot bind the "} + what
                               + " listener on " + host + ":"
                               + std::to_string(p));
    return p;
  }

  /// Runs `svr` on a thread of its own and waits until it accepts:
  /// `Server::stop()` is a no-op before the listen loop started.
  static std::thread run(httplib::Server& svr) {
    auto exited = std::make_shared<std::atomic<bool>>(false);
    std::thread t{[&svr, exited] {
      block_sigpipe();
      svr.listen_after_bind();
      *exited = true;
    }};
    // A short wait at start-up only (the listen loop sets the flag first).
    while (!svr.is_running() && !*exited)
      std::this_thread::sleep_for(std::chrono::milliseconds{1});
    return t;
  }

  void stop() {
    std::lock_guard<std::mutex> guard{stop_mtx};
    if (stopped)
      return;
    stopped = true;
    {
      std::lock_guard<std::mutex> lock{mtx};
      stopping = true;
      visible_cv.notify_all();
      done_cv.notify_all();
    }
    if (tls)
      tls->stop();
    admin.stop();
    for (auto* t : {&tls_thread, &admin_thread})
      if (t->joinable())
        t->join();
  }
};

caf::expected<std::string>
load_or_create_admin_token(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, ec))) {
    auto fresh = random_admin_token();
    if (auto err = write_secret_file(path, fresh + "\n", "admin token file"))
      return err;
    return fresh;
  }
  return read_secret_file(path, "admin token file");
}

// -- reference_proxy ----------------------------------------------------------

caf::expected<std::unique_ptr<reference_proxy>>
reference_proxy::start(const reference_proxy_config& cfg) {
  std::unique_ptr<reference_proxy> self{new reference_proxy};
  self->impl_ = std::make_unique<impl>(cfg);
  auto& d = *self->impl_;
  if (auto err = d.load_tls())
    return err;
  auto threads = std::max<size_t>(cfg.worker_threads, 2);
  d.tls->new_task_queue = [threads] {
    return new httplib::ThreadPool(threads);
  };
  if (!cfg.admin_remote && !is_loopback_host(cfg.admin_host))
    return caf::make_error(
      config_errc::invalid_option,
      "the admin listener must bind a loopback address (127.0.0.1, ::1), "
      "not '"
        + cfg.admin_host
        + "': its API enqueues signatures; allow another address explicitly");
  d.admin_token = cfg.admin_token.empty() ? random_admin_token()
                                          : cfg.admin_token;
  d.common_setup(*d.tls);
  d.common_setup(d.admin);
  d.admin.set_pre_routing_handler(
    [&d](const httplib::Request& req, httplib::Response& res) {
      return d.admin_gate(req, res);
    });
  d.routes();
  // Each listener runs as soon as it is bound, so that a failure further on
  // leaves nothing behind: the destructor stops whatever runs.
  auto port = impl::bind(*d.tls, cfg.host, cfg.port, "driver");
  if (!port)
    return std::move(port.error());
  d.port = *port;
  d.tls_thread = impl::run(*d.tls);
  auto admin_port = impl::bind(d.admin, cfg.admin_host, cfg.admin_port,
                               "admin");
  if (!admin_port)
    return std::move(admin_port.error());
  d.admin_port = *admin_port;
  d.admin_thread = impl::run(d.admin);
  return self;
}

reference_proxy::~reference_proxy() {
  stop();
}

uint16_t reference_proxy::port() const noexcept {
  return impl_->port;
}

uint16_t reference_proxy::admin_port() const noexcept {
  return impl_->admin_port;
}

const std::string& reference_proxy::admin_token() const noexcept {
  return impl_->admin_token;
}

std::string reference_proxy::enqueue(const std::string& kind,
                                     const nlohmann::json& params,
                                     std::optional<std::string> id) {
  return impl_->add(kind, dump_json(params), std::move(id));
}

std::optional<nlohmann::json>
reference_proxy::request_state(const std::string& id) const {
  auto info = impl_->find(id);
  if (!info)
    return std::nullopt;
  return to_json(*info);
}

proxy_stats reference_proxy::stats() const {
  return impl_->stats();
}

size_t reference_proxy::waiting_polls() const {
  std::lock_guard<std::mutex> guard{impl_->mtx};
  return impl_->waiting;
}

std::vector<client_cert_seen> reference_proxy::clients() const {
  return impl_->seen_clients();
}

std::vector<client_cert_refused> reference_proxy::refused_clients() const {
  return impl_->refused_clients();
}

void reference_proxy::inject(poll_fault fault, size_t polls) {
  impl_->inject(fault, polls);
}

void reference_proxy::clear_faults() {
  impl_->clear_faults();
}

std::vector<poll_fault> reference_proxy::pending_faults() const {
  return impl_->pending_faults();
}

void reference_proxy::clock_advanced() {
  std::lock_guard<std::mutex> guard{impl_->mtx};
  impl_->visible_cv.notify_all();
}

void reference_proxy::stop() {
  if (impl_)
    impl_->stop();
}

} // namespace hsm::net
