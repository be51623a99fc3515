// `hsm-driver run`: the daemon, until a stop signal or until it cannot go on.

#include "runtime/app/commands.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/output.hpp"
#include "runtime/base/logging.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <memory>

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
  auto d = daemon::start(*opts);
  if (!d)
    return fail(d.error());
  auto sig = wait_for_stop_signal();
  if (!*fatal)
    logger("runtime")->info("signal {} received", sig);
  if ((*d)->stop() == stop_status::hsm_call_stuck) {
    logger("runtime")->critical("exiting with status {}: an HSM call is "
                                "still stuck",
                                exit_failed);
    return exit_failed;
  }
  return *fatal ? exit_failed : exit_ok;
}

} // namespace hsm
