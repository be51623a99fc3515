#pragma once

// `hsm-driver bench` (bench/README.md): what one measurement yields, and the
// small pure helpers the raw loop, the full-system run and the report share
// (percentiles, CPU time of this process and of a child from /proc). No
// PKCS#11, no sockets. Main thread, except `percentile` (any thread).

#include "messages/scheme.hpp"

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::bench {

/// What one operation is: the driver's two request kinds.
enum class op_kind : uint8_t {
  /// generate key pair + wrap (+ destroy); `generate_key` through the proxy.
  generate,
  /// unwrap + sign + destroy with a wrapped key; `sign` through the proxy.
  sign,
};

/// `generate` or `sign`.
std::string_view to_string(op_kind k);

/// Parses `generate` or `sign`.
std::optional<op_kind> parse_op_kind(std::string_view name);

/// Latencies of one run, in milliseconds.
struct latency_ms {
  double p50 = 0;
  double p99 = 0;
  double max = 0;
};

/// Nearest-rank percentiles of `samples_us` (microseconds; sorted in
/// place). All zero for no samples.
latency_ms percentiles(std::vector<double>& samples_us);

/// The raw loop's outcome: S threads straight on the module.
struct raw_result {
  /// PKCS#11 sessions (= threads).
  size_t sessions = 0;
  /// Operations done in the timed window.
  size_t ops = 0;
  /// Length of the timed window.
  double seconds = 0;
  /// ops / seconds.
  double ops_per_s = 0;
  /// Per-operation latency.
  latency_ms latency;
  /// This process's CPU time (user + system) in the window, per operation.
  double cpu_us_per_op = 0;
  /// Set when the loop failed (the first failure); the numbers are void.
  std::string error;
};

/// The full system's outcome: the proxy in this process, the driver as a
/// child process.
struct e2e_result {
  /// The driver's `--sessions`.
  size_t sessions = 0;
  /// Requests in the timed window.
  size_t requests = 0;
  /// From the first enqueue to the last result seen.
  double seconds = 0;
  /// requests / seconds.
  double ops_per_s = 0;
  /// Per request, from its lease (the driver's poll took it) to its result
  /// (the proxy accepted it), as seen by polling the proxy's state.
  latency_ms latency;
  /// The driver's CPU time (user + system, /proc/<pid>/stat) in the
  /// window, per request.
  double driver_cpu_us_per_request = 0;
  /// CPU time of this process (the proxy) in the window, per request.
  double proxy_cpu_us_per_request = 0;
  /// Both processes' CPU time over the window's wall time and the
  /// machine's CPUs, in percent: near 100 means the CPU was the limit.
  double host_cpu_pct = 0;
  /// The driver's peak resident set (/proc/<pid>/status VmHWM), MiB.
  double peak_rss_mib = 0;
  /// Requests answered with an error (in the timed window).
  size_t errors = 0;
  /// The first such error, as the proxy shows it.
  std::string first_error;
  /// Deliveries after the first (lease expiries, handed-back requests).
  size_t redelivered = 0;
  /// Set when the run failed (the driver did not start, a stall, an
  /// interrupt); the numbers are void.
  std::string error;
};

/// CPU time (user + system) of this process so far, microseconds
/// (getrusage(RUSAGE_SELF)).
double self_cpu_us();

/// CPU time (user + system) of process `pid` so far, microseconds, from
/// /proc/<pid>/stat (clock ticks; 10 ms resolution at the usual 100 Hz).
/// nullopt if it cannot be read.
std::optional<double> proc_cpu_us(pid_t pid);

/// Peak resident set of `pid` (VmHWM in /proc/<pid>/status), KiB.
std::optional<uint64_t> proc_peak_rss_kib(pid_t pid);

/// Online CPUs of this machine (at least 1).
unsigned cpu_count();

} // namespace hsm::bench
