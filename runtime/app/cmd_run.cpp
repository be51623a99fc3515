// `hsm-driver run`: the daemon, until a stop signal or until it cannot go on.

#include "runtime/app/commands.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/output.hpp"
#include "runtime/base/logging.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>

namespace hsm {

int cmd_run(const driver_config& cfg, const run_flags& flags) {
  auto opts = resolve_run_options(cfg, flags, process_env());
  if (!opts)
    return fail(opts.error());
  // Set when the daemon cannot go on (from an actor's thread).
  auto fatal = std::make_shared<std::atomic<bool>>(false);
  opts->on_fatal = [fatal](const std::string& why) {
    logger("runtime")->critical("{}; stopping", why);
    *fatal = true;
    ::kill(::getpid(), SIGTERM); // wakes the signal wait below
  };
  // Start-up talks to the HSM and the database, either of which can hang.
  // It runs on its own thread, so that a stop signal is honoured during it
  // and start-up has a deadline.
  auto deadline = startup_deadline(opts->hsm_timeout);
  std::packaged_task<caf::expected<std::unique_ptr<daemon>>()> task{
    [&opts] { return daemon::start(*opts); }};
  auto started = task.get_future();
  std::thread starter{std::move(task)};
  auto until = std::chrono::steady_clock::now() + deadline;
  int early_signal = 0;
  while (started.wait_for(std::chrono::milliseconds{0})
         != std::future_status::ready) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      until - std::chrono::steady_clock::now());
    if (left.count() <= 0 || early_signal != 0)
      break;
    early_signal = wait_for_stop_signal(
      std::min(left, std::chrono::milliseconds{100}));
  }
  // After a signal, a start-up that is not hung gets a moment to finish,
  // so that it stops cleanly.
  if (early_signal != 0)
    started.wait_for(std::chrono::seconds{2});
  if (started.wait_for(std::chrono::milliseconds{0})
      != std::future_status::ready) {
    // A thread is inside the PKCS#11 module (or libpq) and will not come
    // back: finalising the module or unloading it under it can crash, and
    // returning from main would run exit handlers under it. So the process
    // ends here, at once, without them (DESIGN: a hung HSM is abandoned,
    // never closed from outside).
    logger("runtime")->critical(
      "{}; exiting with status {} without finalising the PKCS#11 module",
      early_signal != 0
        ? "signal " + std::to_string(early_signal)
            + " received while start-up was still waiting for the HSM or "
              "the database"
        : "start-up did not finish within " + std::to_string(deadline.count())
            + " ms: a call to the HSM or the database hangs",
      exit_failed);
    spdlog::shutdown();
    std::_Exit(exit_failed);
  }
  starter.join();
  auto d = started.get();
  if (!d)
    return fail(d.error());
  if (early_signal != 0) {
    logger("runtime")->info("signal {} received during start-up", early_signal);
    static_cast<void>((*d)->stop());
    return exit_ok;
  }
  auto sig = (*d)->serve_until_stop_signal();
  if (!*fatal)
    logger("runtime")->info("signal {} received", sig);
  if ((*d)->stop() == stop_status::hsm_call_stuck) {
    // As above: the stuck thread is still inside the module, and exit
    // handlers would run under it (SoftHSMv2's and OpenSSL's free the
    // mutexes and tables it uses once its call returns; ThreadSanitizer
    // caught that in the engine test).
    logger("runtime")->critical("exiting with status {}: an HSM call is "
                                "still stuck",
                                exit_failed);
    spdlog::shutdown();
    std::_Exit(exit_failed);
  }
  return *fatal ? exit_failed : exit_ok;
}

} // namespace hsm
