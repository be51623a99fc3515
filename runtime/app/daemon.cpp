#include "runtime/app/daemon.hpp"

#include "actors/dispatcher.hpp"
#include "actors/hsm_session.hpp"
#include "actors/poller.hpp"
#include "actors/result_poster.hpp"
#include "actors/session_supervisor.hpp"
#include "actors/store_actor.hpp"
#include "runtime/app/client_tls.hpp"
#include "runtime/app/store_open.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/reconcile.hpp"

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace hsm {

namespace {

/// Keeps `parts` alive until the process exits, on purpose: they stay
/// reachable from a static that is never destroyed, so no destructor runs
/// on them (and leak checkers do not count them).
template <class... Ts>
void keep_until_exit(std::unique_ptr<Ts>... parts) {
  static std::mutex mtx;
  static auto* kept = new std::vector<std::shared_ptr<void>>;
  std::lock_guard<std::mutex> guard{mtx};
  (kept->emplace_back(std::move(parts)), ...);
}

/// Reconciles the token-resident keys at start: destroys the losers of
/// generation races (a row names another object under their key id; they
/// can never be used), and reports orphans (no row at all) without
/// touching them, since on a replicated token one may be another driver's
/// generation whose put is still in flight; `keys reconcile` lists them.
/// Never fails the start.
void report_resident_keys(pkcs11::session& sess, store::key_store& st) {
  auto log = logger("runtime");
  keys::reconcile_options opts;
  opts.apply = true;
  opts.include_orphans = false;
  auto rep = keys::reconcile_resident_keys(sess, st, opts);
  if (!rep) {
    log->warn("could not reconcile token-resident keys with the store: {}",
              describe(rep.error()));
    return;
  }
  using keys::resident_class;
  auto kept = rep->count(resident_class::kept);
  auto losers = rep->count(resident_class::loser);
  auto orphans = rep->count(resident_class::orphan);
  if (losers + orphans == 0) {
    if (kept > 0)
      log->info("token-resident keys: {} in use, none unused", kept);
    return;
  }
  auto destroyed = rep->destroyed(resident_class::loser);
  if (losers > 0)
    log->info("token-resident keys: destroyed {} of {} loser(s) of "
              "generation races (a row names another object under their key "
              "id){}",
              destroyed, losers,
              rep->failures.empty()
                ? std::string{}
                : "; not destroyed: " + rep->failures.front());
  if (orphans > 0)
    log->warn("token-resident keys: {} in use, {} orphan(s) (no row: a put "
              "that failed, or one still in flight on another driver), left "
              "as they are; 'hsm-driver keys reconcile' lists them, and with "
              "every driver on this token stopped '--apply "
              "--include-orphans' destroys them",
              kept, orphans);
}

/// Watches the actors the driver cannot serve without (store, poster,
/// dispatcher, poller; the session supervisor is linked to the dispatcher).
/// One that ends for any reason but a stop the daemon asked for is fatal: a
/// process that stays up without it answers nothing and tells nobody, so
/// `on_fatal` makes it exit non-zero for systemd to restart it.
caf::actor spawn_watchdog(caf::actor_system& sys,
                          std::vector<std::pair<std::string, caf::actor>> parts,
                          std::shared_ptr<std::atomic<bool>> stopping,
                          std::function<void(const std::string&)> on_fatal) {
  return sys.spawn([parts = std::move(parts), stopping = std::move(stopping),
                    on_fatal = std::move(on_fatal)](
                     caf::event_based_actor* self) -> caf::behavior {
    for (auto& part : parts)
      self->monitor(part.second);
    self->set_down_handler([=](caf::down_msg& dm) {
      if (stopping->load())
        return;
      std::string name = "an actor";
      for (auto& part : parts)
        if (part.second.address() == dm.source)
          name = "the " + part.first;
      auto why = name + " ended (" + to_string(dm.reason)
                 + "); the driver cannot serve without it";
      if (on_fatal)
        on_fatal(why);
      else
        logger("runtime")->critical("{}", why);
    });
    return {[](stop_atom) {}};
  });
}

/// Why the driver is no longer alive (`/healthz`): set once, by the first
/// part that ended or the module lost for good; empty while alive.
struct liveness_note {
  std::mutex mtx;
  std::string why;

  void set(const std::string& text) {
    std::lock_guard<std::mutex> guard{mtx};
    if (why.empty())
      why = text;
  }

  std::string get() {
    std::lock_guard<std::mutex> guard{mtx};
    return why;
  }
};

/// The last answer of the dispatcher to a `/healthz` probe, and when.
struct dispatcher_probe {
  std::mutex mtx;
  bool asked = false;
  std::chrono::steady_clock::time_point at;
  std::string answer;
};

/// `on_fatal`, noting first that the driver is no longer alive.
std::function<void(const std::string&)>
noting(std::shared_ptr<liveness_note> note,
       std::function<void(const std::string&)> on_fatal) {
  return [note = std::move(note),
          on_fatal = std::move(on_fatal)](const std::string& why) {
    note->set(why);
    if (on_fatal)
      on_fatal(why);
    else
      logger("runtime")->critical("{}", why);
  };
}

} // namespace

struct daemon::impl {
  // Declaration order is destruction order reversed: the actor system goes
  // first (its actors close their sessions), then the token (the start-up
  // session, then the module: C_Finalize last). Held by pointer so that
  // `stop` can keep them alive past the daemon when a call is stuck.
  std::unique_ptr<token_session> token;
  std::unique_ptr<caf::actor_system_config> sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  dispatcher_actor dispatcher;
  poller_actor poller;
  result_poster_actor poster;
  store_actor store;
  /// Appends the audit trail, on a connection of its own (so that a sign's
  /// key lookup never waits behind an audit commit's fsync).
  audit_actor audit;
  /// Turns the death of any actor above into `opts.on_fatal`.
  caf::actor watchdog;
  /// Set first on stop: the poller hands back what a poll in progress
  /// leases.
  std::shared_ptr<std::atomic<bool>> poll_stopping
    = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<std::atomic<bool>> stopping
    = std::make_shared<std::atomic<bool>>(false);
  daemon_options opts;
  /// Set by the first `stop`.
  std::optional<stop_status> stopped;
  std::shared_ptr<driver_metrics> metrics;
  std::shared_ptr<liveness_note> liveness = std::make_shared<liveness_note>();
  /// Serves `/metrics`, `/healthz`, `/readyz`; stopped before the actor
  /// system goes (its handlers talk to the dispatcher).
  std::unique_ptr<net::metrics_server> metrics_server;
};

caf::expected<std::unique_ptr<daemon>>
daemon::start(const daemon_options& given) {
  auto log = logger("runtime");
  auto opts = given;
  // Bound first: a taken port fails the start before the token is opened.
  std::unique_ptr<net::metrics_server> listener;
  if (opts.metrics_listen) {
    auto bound = net::metrics_server::bind(*opts.metrics_listen,
                                           "--metrics-listen");
    if (!bound)
      return bound.error();
    listener = std::move(*bound);
  }
  auto metrics = std::make_shared<driver_metrics>(opts.sessions);
  // The expiry of the certificate in use, as loaded (not the file on disk,
  // which may already hold the next one).
  if (opts.proxy.material) {
    metrics->set_client_certificate_expiry(
      opts.proxy.material->current().first->leaf.not_after_unix);
  } else if (auto tls = net::load_client_tls(opts.proxy.tls,
                                             {.verify = false})) {
    metrics->set_client_certificate_expiry((*tls)->leaf.not_after_unix);
  } else {
    log->warn("cannot read the expiry of the client certificate: {}",
              describe(tls.error()));
  }
  auto pin = pkcs11::secret_pin::from_environment();
  if (!pin)
    return pin.error();
  auto shared_pin = std::make_shared<const pkcs11::secret_pin>(std::move(*pin));
  auto tok = open_token(opts.cfg, *shared_pin, opts.decorate);
  if (!tok)
    return tok.error();
  // The TLS files before the slower key set-up and probe: the driver's own
  // certificate, then the proxy's on one handshake.
  if (!opts.proxy.material) {
    auto tls = open_client_tls(opts.proxy.tls, opts.cert_warn_days);
    if (!tls)
      return tls.error();
    opts.proxy.material = std::move(*tls);
  }
  if (auto err = check_proxy_certificate(opts.proxy))
    return err;
  std::unique_ptr<daemon> d{new daemon};
  d->impl_ = std::make_unique<impl>();
  auto& in = *d->impl_;
  in.opts = opts;
  in.metrics = metrics;
  in.metrics_server = std::move(listener);
  // From here on the module stays where it is: the sessions point to it.
  in.token = std::make_unique<token_session>(std::move(*tok));
  auto setup = set_up_keys(in.token->sess, opts.cfg);
  if (!setup)
    return setup.error();
  if (setup->store)
    report_resident_keys(in.token->sess, *setup->store);
  auto& caps = setup->caps;
  if (std::none_of(caps.schemes.begin(), caps.schemes.end(),
                   [](const keys::capability& c) { return c.served; }))
    return caf::make_error(key_errc::scheme_unsupported,
                           std::string{"the token serves no scheme"});
  auto poll_client = net::proxy_client::create(opts.proxy);
  if (!poll_client)
    return poll_client.error();
  auto post_client = net::proxy_client::create(opts.proxy);
  if (!post_client)
    return post_client.error();
  auto audit_store = open_store(opts.cfg);
  if (!audit_store)
    return audit_store.error();

  auto ctx = std::make_shared<session_context>();
  ctx->mod = &in.token->mod;
  ctx->slot = in.token->slot;
  ctx->pin = shared_pin;
  ctx->master_keys = setup->plan;
  ctx->caps = caps;
  ctx->metrics = metrics;

  in.sys_cfg = std::make_unique<caf::actor_system_config>();
  // Set from measurement (`hsm-driver bench`, 2 cores): only the
  // dispatcher and the supervisor are scheduled (sessions, poller, poster
  // and storage run detached), so two workers are plenty; the sharing
  // policy sleeps on a condition variable where work stealing polls, which
  // cost 8 % of the host's CPU at 5 requests/s against 2 % with sharing,
  // for the same throughput under load.
  in.sys_cfg->set("scheduler.max-threads", 2);
  in.sys_cfg->set("scheduler.policy", caf::atom("sharing"));
  in.sys = std::make_unique<caf::actor_system>(*in.sys_cfg);
  auto& sys = *in.sys;
  store_actor_config stcfg;
  stcfg.driver_id = opts.proxy.driver_id;
  stcfg.metrics = metrics;
  // Readiness notices a database gone while idle within this time.
  if (in.metrics_server)
    stcfg.health_interval = std::chrono::seconds{5};
  auto storage = spawn_store_actor(
    sys, std::shared_ptr<store::key_store>(std::move(setup->store)), stcfg);
  in.store = storage;
  // Every answer to a job is audited (in the key store's database) before
  // it is posted, by a storage actor of its own: its commits (one fsync
  // each) run beside the key lookups and puts, not in front of them. A new
  // key's entry rides in its put's commit instead (`audit_with_put`).
  store_actor_config acfg = stcfg;
  acfg.cache_capacity = 0;
  acfg.role = store_role::audit;
  in.audit = spawn_store_actor(
    sys, std::shared_ptr<store::key_store>(std::move(*audit_store)), acfg);
  result_poster_config rcfg;
  rcfg.metrics = metrics;
  in.poster = spawn_result_poster(
    sys, rcfg, std::shared_ptr<net::proxy_link>(std::move(*post_client)),
    in.stopping, in.audit);
  dispatcher_config dcfg;
  dcfg.sessions = opts.sessions;
  dcfg.pipeline = opts.pipeline;
  dcfg.caps = caps;
  dcfg.hsm_timeout = opts.hsm_timeout;
  dcfg.metrics = metrics;
  // A generated key and its audit entry: one commit.
  dcfg.audit_with_put = true;
  supervisor_config scfg;
  scfg.sessions = opts.sessions;
  scfg.on_fatal = noting(in.liveness, opts.on_fatal);
  scfg.metrics = metrics;
  scfg.spawn_session = hsm_sessions(ctx);
  in.dispatcher = spawn_dispatcher(
    sys, dcfg, in.store, in.poster, [&sys, scfg](dispatcher_actor dispatcher) {
      return spawn_session_supervisor(sys, scfg, std::move(dispatcher));
    });
  poller_config pcfg;
  pcfg.poll_wait = opts.poll_wait;
  pcfg.stopping = in.poll_stopping;
  pcfg.metrics = metrics;
  in.poller = spawn_poller(
    sys, pcfg, std::shared_ptr<net::proxy_link>(std::move(*poll_client)),
    in.dispatcher);
  in.watchdog = spawn_watchdog(
    sys,
    {{"store", caf::actor_cast<caf::actor>(in.store)},
     {"audit writer", caf::actor_cast<caf::actor>(in.audit)},
     {"result poster", caf::actor_cast<caf::actor>(in.poster)},
     {"dispatcher", caf::actor_cast<caf::actor>(in.dispatcher)},
     {"poller", caf::actor_cast<caf::actor>(in.poller)}},
    in.poll_stopping, noting(in.liveness, opts.on_fatal));
  if (in.metrics_server) {
    net::metrics_sources src;
    src.metrics = metrics;
    src.proxy_window = proxy_ready_window(opts.poll_wait);
    // Alive: no part ended, and the dispatcher (on the scheduler) answers;
    // asked at most once a second, however often `/healthz` is called.
    src.liveness = [&sys, note = in.liveness, dispatcher = in.dispatcher,
                    probe = std::make_shared<dispatcher_probe>()] {
      if (auto why = note->get(); !why.empty())
        return why;
      std::lock_guard<std::mutex> guard{probe->mtx};
      auto now = std::chrono::steady_clock::now();
      if (probe->asked && now - probe->at < std::chrono::seconds{1})
        return probe->answer;
      caf::scoped_actor self{sys};
      std::string out;
      self->request(dispatcher, std::chrono::seconds{2}, stats_atom::value)
        .receive([](dispatcher_stats&) {},
                 [&out](caf::error& err) {
                   out = "the dispatcher did not answer: " + describe(err);
                 });
      probe->asked = true;
      probe->at = std::chrono::steady_clock::now();
      probe->answer = out;
      return out;
    };
    in.metrics_server->serve(std::move(src));
    log->info("metrics and health on {} (/metrics, /healthz, /readyz)",
              in.metrics_server->url());
  }
  log->info("serving: driver {} polls {} with {} session(s)",
            opts.proxy.driver_id, opts.proxy.proxy_addr, opts.sessions);
  return d;
}

stop_status daemon::stop() {
  if (!impl_)
    return stop_status::clean;
  auto& in = *impl_;
  if (in.stopped)
    return *in.stopped;
  in.stopped = stop_status::clean;
  if (!in.sys) { // start-up failed before the actors existed
    in.token.reset();
    return *in.stopped;
  }
  auto log = logger("runtime");
  log->info("stopping: no new polls; draining in-flight work");
  if (in.metrics)
    in.metrics->set_stopping();
  {
    caf::scoped_actor self{*in.sys};
    // A poll in progress finishes first (at most the poll wait); what it
    // leased is handed back at once.
    in.poll_stopping->store(true);
    self
      ->request(in.poller, in.opts.poll_wait + std::chrono::seconds{15},
                stop_atom::value)
      .receive([](bool) {},
               [&](caf::error& err) {
                 log->warn("poller did not stop cleanly: {}", describe(err));
               });
    self->request(in.dispatcher, in.opts.drain_timeout, drain_atom::value)
      .receive([](bool) {},
               [&](caf::error& err) {
                 log->warn("drain timed out ({}); unfinished requests are "
                           "left for redelivery",
                           describe(err));
               });
    // Queued jobs that never started are handed back (a retryable error
    // makes the proxy queue them again at once), and those answers posted.
    self->send(in.dispatcher, stop_atom::value);
    self->request(in.dispatcher, std::chrono::seconds{15}, drain_atom::value)
      .receive([](bool) {}, [](caf::error&) {});
    in.stopping->store(true);
    // Sessions end in their own actors. Abandoned (hung) calls must return
    // before the module may be finalised.
    size_t stuck = 0;
    self->request(in.dispatcher, std::chrono::seconds{5}, close_atom::value)
      .receive([&](size_t n) { stuck = n; }, [](caf::error&) {});
    auto deadline = std::chrono::steady_clock::now() + in.opts.abandon_grace;
    while (stuck > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds{50});
      self->request(in.dispatcher, std::chrono::seconds{5}, stuck_atom::value)
        .receive([&](size_t n) { stuck = n; }, [](caf::error&) {});
    }
    if (stuck > 0) {
      log->critical("{} HSM call(s) still hung after {} ms; leaving the "
                    "PKCS#11 module loaded, without C_Finalize",
                    stuck, in.opts.abandon_grace.count());
      // Deliberately not torn down. A thread is still inside the module:
      // C_Finalize (or C_CloseSession) under a busy session can crash the
      // module, and destroying the actor system would wait for that thread
      // forever. So the actor system (with every session actor, the stuck
      // one included), the start-up session and the module stay alive, as
      // they are, until the process exits. Every request was answered or
      // handed back above, and the poller has stopped.
      if (in.metrics_server)
        in.metrics_server->stop();
      keep_until_exit(std::move(in.sys_cfg), std::move(in.sys),
                      std::move(in.token));
      in.stopped = stop_status::hsm_call_stuck;
      return *in.stopped;
    }
    self->send_exit(in.watchdog, caf::exit_reason::user_shutdown);
    self->send_exit(in.poller, caf::exit_reason::user_shutdown);
    self->send_exit(in.poster, caf::exit_reason::user_shutdown);
    self->send_exit(in.dispatcher, caf::exit_reason::user_shutdown);
    self->send_exit(in.store, caf::exit_reason::user_shutdown);
    self->send_exit(in.audit, caf::exit_reason::user_shutdown);
  }
  if (in.metrics_server)
    in.metrics_server->stop();
  in.watchdog = nullptr;
  in.poller = nullptr;
  in.poster = nullptr;
  in.dispatcher = nullptr;
  in.store = nullptr;
  in.audit = nullptr;
  in.sys.reset();   // waits for every actor
  in.token.reset(); // the start-up session, then C_Finalize last
  log->info("stopped");
  return *in.stopped;
}

caf::error daemon::kill_part_for_test(std::string_view part) {
  if (!impl_ || impl_->stopped)
    return caf::make_error(caf::sec::invalid_argument);
  auto& in = *impl_;
  caf::actor target;
  if (part == "store")
    target = caf::actor_cast<caf::actor>(in.store);
  else if (part == "audit writer")
    target = caf::actor_cast<caf::actor>(in.audit);
  else if (part == "result poster")
    target = caf::actor_cast<caf::actor>(in.poster);
  else if (part == "dispatcher")
    target = caf::actor_cast<caf::actor>(in.dispatcher);
  else if (part == "poller")
    target = caf::actor_cast<caf::actor>(in.poller);
  else
    return caf::make_error(caf::sec::invalid_argument);
  caf::anon_send_exit(target, caf::exit_reason::kill);
  return caf::none;
}

caf::error daemon::reload_tls() {
  if (!impl_ || !impl_->opts.proxy.material)
    return caf::make_error(caf::sec::invalid_argument);
  auto err = reload_client_tls(*impl_->opts.proxy.material,
                               impl_->opts.cert_warn_days);
  if (!err && impl_->metrics)
    impl_->metrics->set_client_certificate_expiry(
      impl_->opts.proxy.material->current().first->leaf.not_after_unix);
  return err;
}

void daemon::check_cert_expiry() {
  if (impl_ && impl_->opts.proxy.material)
    warn_if_expiring(*impl_->opts.proxy.material, impl_->opts.cert_warn_days);
}

int daemon::serve_until_stop_signal() {
  constexpr std::chrono::hours expiry_check_interval{24};
  auto next_check = std::chrono::steady_clock::now() + expiry_check_interval;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      next_check - std::chrono::steady_clock::now());
    auto sig = wait_for_signal(std::max(left, std::chrono::milliseconds{1}));
    if (sig == SIGHUP) {
      logger("runtime")->info("SIGHUP: reloading the TLS files");
      static_cast<void>(reload_tls());
    } else if (sig == 0) {
      check_cert_expiry();
      next_check += expiry_check_interval;
    } else {
      return sig;
    }
  }
}

caf::expected<dispatcher_stats> daemon::stats() {
  if (!impl_ || impl_->stopped)
    return caf::make_error(caf::sec::invalid_argument);
  caf::scoped_actor self{*impl_->sys};
  caf::expected<dispatcher_stats> out{caf::sec::request_timeout};
  self->request(impl_->dispatcher, std::chrono::seconds{5}, stats_atom::value)
    .receive([&](dispatcher_stats& st) { out = st; },
             [&](caf::error& err) { out = err; });
  return out;
}

std::shared_ptr<driver_metrics> daemon::metrics() const {
  return impl_ ? impl_->metrics : nullptr;
}

std::optional<std::string> daemon::metrics_url() const {
  if (!impl_ || !impl_->metrics_server)
    return std::nullopt;
  return impl_->metrics_server->url();
}

daemon::~daemon() {
  static_cast<void>(stop());
}

void block_stop_signals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
}

int wait_for_signal(std::chrono::milliseconds timeout) {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  ts.tv_nsec = static_cast<long>((timeout.count() % 1000) * 1000000);
  auto sig = sigtimedwait(&sigs, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

int wait_for_stop_signal(std::chrono::milliseconds timeout) {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  ts.tv_nsec = static_cast<long>((timeout.count() % 1000) * 1000000);
  auto sig = sigtimedwait(&sigs, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

int wait_for_stop_signal() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  int sig = 0;
  sigwait(&sigs, &sig);
  return sig;
}

} // namespace hsm
