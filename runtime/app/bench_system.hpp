#pragma once

// `hsm-driver bench`, the full system: the reference proxy runs in this
// process, the driver runs as a child process (`hsm-driver run`, this very
// binary) with the bench's token, store and `--sessions`, over mTLS on
// loopback. A run starts a fresh driver, waits until it polls, makes the
// keys a sign run needs and a few warm-up requests, then enqueues every
// timed request at once and watches the proxy until all are answered.
// Main thread only.

#include "messages/scheme.hpp"
#include "runtime/app/bench_stats.hpp"
#include "runtime/net/reference_proxy.hpp"

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace hsm::bench {

/// A child process running `/proc/self/exe` (this binary) with the given
/// arguments and environment, in a process group of its own (a terminal's
/// Ctrl-C reaches only the bench, which stops the child in order), with
/// signals unblocked, stdout and stderr to a log file, and SIGTERM when
/// the bench's main thread dies. Stopped (SIGTERM, then SIGKILL after the
/// grace time) when it goes out of scope. Move-only.
class child_process {
public:
  /// Forks and execs; `args` excludes argv[0]; `env` is the whole
  /// environment (`NAME=value`).
  [[nodiscard]] static caf::expected<child_process>
  spawn(const std::vector<std::string>& args,
        const std::vector<std::string>& env, const std::filesystem::path& log);

  child_process(child_process&& other) noexcept;
  child_process& operator=(child_process&& other) noexcept;
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  ~child_process();

  /// The process id.
  pid_t pid() const noexcept {
    return pid_;
  }

  /// True until the process has exited (reaps it then).
  bool running();

  /// How it exited: the exit code, or 128 + signal; nullopt while running.
  std::optional<int> exit_status() const noexcept {
    return status_;
  }

  /// SIGTERM, then waits up to `grace`, then SIGKILL. Returns the exit
  /// status (see `exit_status`).
  int stop(std::chrono::milliseconds grace);

private:
  child_process() = default;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

/// The last `lines` lines of a log file, for an error message.
std::string log_tail(const std::filesystem::path& log, size_t lines = 15);

/// How to start the driver for one run.
struct driver_launch {
  /// `hsm-driver` arguments (`run` and its flags) except `--sessions`.
  std::vector<std::string> args;
  /// The driver's whole environment.
  std::vector<std::string> env;
  /// Where its stdout and stderr go.
  std::filesystem::path log;
};

/// One full-system run.
struct e2e_plan {
  scheme s = scheme::secp256k1;
  op_kind kind = op_kind::sign;
  /// The driver's `--sessions`.
  size_t sessions = 1;
  /// Timed requests, enqueued at once.
  size_t requests = 500;
  /// Keys made (through the proxy, untimed) for a sign run; the timed
  /// requests use them in turn.
  size_t sign_keys = 64;
  /// Untimed requests of the run's kind before the window.
  size_t warmup = 8;
  /// Prefix of the run's key ids (unique per run: the store keeps them).
  std::string key_prefix;
  /// A run in which no request finishes for this long fails.
  std::chrono::milliseconds stall_timeout{60000};
  /// How long the driver may take to start polling.
  std::chrono::milliseconds start_timeout{60000};
  /// How long the driver may take to stop (it drains first).
  std::chrono::milliseconds stop_timeout{40000};
};

/// Runs `plan` against a fresh driver started with `launch`; `stop` (set
/// from another thread) ends it early with an error. `key_ids` receives
/// the ids of every key the run asked the driver to make (for removing
/// token-resident ones afterwards).
e2e_result run_e2e(net::reference_proxy& proxy, const driver_launch& launch,
                   const e2e_plan& plan, const std::atomic<bool>& stop,
                   std::vector<std::string>& key_ids);

} // namespace hsm::bench
