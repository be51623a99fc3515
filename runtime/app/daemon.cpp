#include "runtime/app/daemon.hpp"

#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <optional>
#include <thread>

#include <spdlog/spdlog.h>

#include "actors/dispatcher.hpp"
#include "actors/hsm_session.hpp"
#include "actors/poller.hpp"
#include "actors/result_poster.hpp"
#include "actors/session_supervisor.hpp"
#include "actors/store_actor.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "runtime/app/store_open.hpp"

namespace hsm {

struct daemon::impl {
  // Declaration order is destruction order reversed: the actor system goes
  // first (its actors close their sessions), then the start-up session,
  // then the module (C_Finalize last).
  std::optional<pkcs11::module> mod;
  std::optional<pkcs11::session> admin_session;
  std::unique_ptr<caf::actor_system_config> sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  dispatcher_actor dispatcher;
  poller_actor poller;
  result_poster_actor poster;
  store_actor store;
  std::shared_ptr<std::atomic<bool>> stopping
    = std::make_shared<std::atomic<bool>>(false);
  daemon_options opts;
  bool stopped = false;
};

caf::expected<std::unique_ptr<daemon>>
daemon::start(const daemon_options& opts) {
  auto log = logger("runtime");
  auto pin = pkcs11::secret_pin::from_environment();
  if (!pin)
    return pin.error();
  auto shared_pin = std::make_shared<const pkcs11::secret_pin>(std::move(*pin));
  std::unique_ptr<daemon> d{new daemon};
  d->impl_ = std::make_unique<impl>();
  auto& in = *d->impl_;
  in.opts = opts;
  auto mod = pkcs11::module::load(opts.cfg.pkcs11_module, opts.decorate);
  if (!mod)
    return mod.error();
  in.mod.emplace(std::move(*mod));
  auto slot = in.mod->find_token(opts.cfg.token_label);
  if (!slot)
    return slot.error();
  auto sess = pkcs11::session::open(*in.mod, *slot);
  if (!sess)
    return sess.error();
  in.admin_session.emplace(std::move(*sess));
  if (auto err = in.admin_session->login(*shared_pin))
    return err;
  auto master = pkcs11::find_master_key(*in.admin_session,
                                        opts.cfg.master_key_label);
  if (!master)
    return master.error();
  auto st = open_store(opts.cfg);
  if (!st)
    return st.error();
  auto guard = keys::check_master_key(*in.admin_session, *master,
                                opts.cfg.master_key_label, **st, true);
  if (!guard)
    return guard.error();
  auto caps = keys::probe(*in.admin_session, *master, opts.cfg.resident_schemes);
  if (!caps)
    return caps.error();
  size_t served = 0;
  for (auto& c : caps->schemes) {
    if (c.served) {
      ++served;
      log->info("scheme {}: served ({})", to_string(c.scheme),
                c.resident ? "token-resident keys" : "wrapped keys");
    } else {
      log->warn("scheme {}: not served: {}", to_string(c.scheme), c.detail);
    }
  }
  if (served == 0)
    return caf::make_error(key_errc::scheme_unsupported,
                           std::string{"the token serves no scheme"});
  auto poll_client = net::proxy_client::create(opts.proxy);
  if (!poll_client)
    return poll_client.error();
  auto post_client = net::proxy_client::create(opts.proxy);
  if (!post_client)
    return post_client.error();

  auto ctx = std::make_shared<session_context>();
  ctx->mod = &*in.mod;
  ctx->slot = *slot;
  ctx->pin = shared_pin;
  ctx->master_key_label = opts.cfg.master_key_label;
  ctx->caps = *caps;

  in.sys_cfg = std::make_unique<caf::actor_system_config>();
  in.sys_cfg->set("scheduler.max-threads", 2);
  in.sys = std::make_unique<caf::actor_system>(*in.sys_cfg);
  auto& sys = *in.sys;
  in.store = spawn_store_actor(
    sys, std::shared_ptr<store::key_store>(std::move(*st)));
  in.poster = spawn_result_poster(
    sys, result_poster_config{},
    std::shared_ptr<net::proxy_link>(std::move(*post_client)), in.stopping);
  dispatcher_config dcfg;
  dcfg.sessions = opts.sessions;
  dcfg.caps = *caps;
  dcfg.hsm_timeout = opts.hsm_timeout;
  supervisor_config scfg;
  scfg.sessions = opts.sessions;
  scfg.on_fatal = opts.on_fatal;
  scfg.spawn_session = hsm_sessions(ctx);
  in.dispatcher = spawn_dispatcher(
    sys, dcfg, in.store, in.poster,
    [&sys, scfg](dispatcher_actor dispatcher) {
      return spawn_session_supervisor(sys, scfg, std::move(dispatcher));
    });
  poller_config pcfg;
  pcfg.poll_wait = opts.poll_wait;
  in.poller = spawn_poller(
    sys, pcfg, std::shared_ptr<net::proxy_link>(std::move(*poll_client)),
    in.dispatcher);
  log->info("serving: driver {} polls {} with {} session(s)",
            opts.proxy.driver_id, opts.proxy.proxy_addr, opts.sessions);
  return d;
}

void daemon::stop() {
  if (!impl_ || impl_->stopped)
    return;
  auto& in = *impl_;
  in.stopped = true;
  if (!in.sys) { // start-up failed before the actors existed
    in.admin_session.reset();
    in.mod.reset();
    return;
  }
  auto log = logger("runtime");
  log->info("stopping: no new polls; draining in-flight work");
  {
    caf::scoped_actor self{*in.sys};
    // A poll in progress finishes first (at most the poll wait).
    self->request(in.poller, in.opts.poll_wait + std::chrono::seconds{15},
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
      log->critical("{} HSM call(s) still hung after {} ms; exiting without "
                    "C_Finalize",
                    stuck, in.opts.abandon_grace.count());
      spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) {
        l->flush();
      });
      std::_Exit(1);
    }
    self->send_exit(in.poller, caf::exit_reason::user_shutdown);
    self->send_exit(in.poster, caf::exit_reason::user_shutdown);
    self->send_exit(in.dispatcher, caf::exit_reason::user_shutdown);
    self->send_exit(in.store, caf::exit_reason::user_shutdown);
  }
  in.poller = nullptr;
  in.poster = nullptr;
  in.dispatcher = nullptr;
  in.store = nullptr;
  in.sys.reset(); // waits for every actor
  in.admin_session.reset();
  in.mod.reset(); // C_Finalize last
  log->info("stopped");
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

daemon::~daemon() {
  stop();
}

void block_stop_signals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
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
