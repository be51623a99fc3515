#pragma once

// `hsm-driver bench`, the full system: the reference proxy runs in this
// process, the driver runs as a child process (`hsm-driver run`, this very
// binary) with the bench's token, store and `--sessions`, over mTLS on
// loopback. A run starts a fresh driver, waits until it polls, makes the
// keys a sign run needs and a few warm-up requests, then enqueues every
// timed request at once and watches the proxy until all are answered. The
// soak does the same chunk by chunk with one driver, reading its memory
// after each chunk. Main thread only.

#include "messages/scheme.hpp"
#include "runtime/app/bench_stats.hpp"
#include "runtime/net/reference_proxy.hpp"

#include <nlohmann/json.hpp>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
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

/// A driver started for one run: `start` spawns it with `launch` and waits
/// until it polls, then makes the keys a sign run needs and the warm-up;
/// `window` runs timed requests (as often as wanted: the soak runs one per
/// chunk); `finish` stops it. Every failure stops the driver and ends with
/// the tail of its log. Stopped on destruction. The building blocks of
/// `run_e2e` and `run_soak`.
class e2e_driver {
public:
  /// `plan.requests` is not used here (see `window`). `key_ids` receives
  /// the ids of every key the driver is asked to make; `proxy`, `launch`,
  /// `plan`, `stop` and `key_ids` must outlive this object.
  e2e_driver(net::reference_proxy& proxy, const driver_launch& launch,
             const e2e_plan& plan, const std::atomic<bool>& stop,
             std::vector<std::string>& key_ids);

  /// Starts the driver and waits until it polls (`plan.start_timeout`);
  /// then, untimed, a sign run's keys (`plan.sign_keys`) and the warm-up
  /// (`plan.warmup` requests of the run's kind). Returns an empty string,
  /// or why it failed.
  std::string start();

  /// `count` timed requests of the run's kind, enqueued at once and
  /// watched until all are answered: rate, latency, CPU of both processes,
  /// the driver's VmRSS and VmHWM at the end, errors. On failure only
  /// `error` is set (and the driver is stopped).
  e2e_result window(size_t count);

  /// The driver's process id (-1 before `start`).
  pid_t pid() const;

  /// Stops the driver (SIGTERM; it drains) within `plan.stop_timeout`;
  /// returns its exit status (0 when it stopped cleanly).
  int finish();

private:
  std::string failed(std::string why);
  std::vector<nlohmann::json> kind_params(size_t count);
  std::vector<nlohmann::json> gen_params(size_t from, size_t count,
                                         const std::string& tag);

  net::reference_proxy& proxy_;
  const driver_launch& launch_;
  const e2e_plan& plan_;
  const std::atomic<bool>& stop_;
  std::vector<std::string>& key_ids_;
  std::optional<child_process> child_;
  std::vector<std::string> sign_keys_;
  size_t next_gen_ = 0;
  size_t next_sign_ = 0;
};

/// Runs `plan` against a fresh driver started with `launch`; `stop` (set
/// from another thread) ends it early with an error. `key_ids` receives
/// the ids of every key the run asked the driver to make (for removing
/// token-resident ones afterwards).
e2e_result run_e2e(net::reference_proxy& proxy, const driver_launch& launch,
                   const e2e_plan& plan, const std::atomic<bool>& stop,
                   std::vector<std::string>& key_ids);

/// The soak: one driver, `requests` timed requests in windows of `chunk`
/// (so the proxy's queue never holds more than a chunk), the driver's
/// memory sampled after the warm-up and after each chunk. `base` says
/// how to start it (its `requests` is not used).
struct soak_plan {
  e2e_plan base;
  size_t requests = 1000000;
  size_t chunk = 20000;
};

/// Runs `plan`; calls `on_sample` with the result so far after each
/// sample (for progress). `store` only labels the result. An early end
/// (`stop`, a failure) sets `error` and keeps the samples so far.
soak_result run_soak(net::reference_proxy& proxy, const driver_launch& launch,
                     const soak_plan& plan, const std::string& store,
                     const std::atomic<bool>& stop,
                     std::vector<std::string>& key_ids,
                     const std::function<void(const soak_result&)>& on_sample);

} // namespace hsm::bench
