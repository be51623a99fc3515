#pragma once

// `hsm-driver bench` (bench/README.md): what one measurement yields, and the
// small pure helpers the raw loop, the full-system run and the report share
// (percentiles, CPU time and memory of this process and of a child from
// /proc, the soak's verdict). No PKCS#11, no sockets. Main thread, except
// `percentile` (any thread).

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
  /// The driver's peak resident set (/proc/<pid>/status VmHWM) at the end
  /// of the window, MiB: a peak over the driver's life so far.
  double peak_rss_mib = 0;
  /// The driver's resident set (VmRSS) at the end of the window, MiB.
  double rss_mib = 0;
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

/// The soak: one driver serving many requests, chunk by chunk; the
/// driver's memory read after each chunk.
struct soak_sample {
  /// Timed requests done so far (0: after the keys and the warm-up).
  size_t requests_done = 0;
  /// Seconds since the first timed request was enqueued.
  double elapsed_s = 0;
  /// The driver's VmRSS and VmHWM, MiB.
  double rss_mib = 0;
  double hwm_mib = 0;
  /// This process's VmRSS (the proxy keeps every request it ever served),
  /// MiB.
  double bench_rss_mib = 0;
  /// The chunk that ended here (none for the first sample): its rate,
  /// latency, CPU and errors.
  std::optional<e2e_result> chunk;
};

/// What the soak's samples say about the driver's memory.
struct soak_verdict {
  /// VmRSS after the first chunk and after the last, MiB.
  double first_rss_mib = 0;
  double last_rss_mib = 0;
  /// The largest VmRSS after a chunk, and the requests done then.
  double max_rss_mib = 0;
  size_t max_at_requests = 0;
  /// The driver's VmHWM at the end (a peak over its whole life).
  double peak_hwm_mib = 0;
  /// Requests done at the first and the last chunk's end.
  size_t first_requests = 0;
  size_t last_requests = 0;
  /// (last − first) VmRSS per 10^5 requests, MiB.
  double growth_mib_per_1e5 = 0;
  /// The least-squares slope of VmRSS over requests done, chunks only
  /// (first to last), per 10^5 requests, MiB; 0 with fewer than 2 chunks.
  double slope_mib_per_1e5 = 0;
  /// The same over the second half of the chunks only: what is left of
  /// the growth once whatever is bounded (caches, pending timeouts) has
  /// filled; 0 with fewer than 4 chunks.
  double late_slope_mib_per_1e5 = 0;
};

/// The soak's outcome.
struct soak_result {
  std::string store;
  hsm::scheme scheme = hsm::scheme::p256;
  op_kind kind = op_kind::sign;
  /// The driver's `--sessions`.
  size_t sessions = 1;
  /// Timed requests asked for, and per chunk.
  size_t requests = 0;
  size_t chunk = 0;
  /// One sample after the warm-up, then one per chunk done.
  std::vector<soak_sample> samples;
  /// Timed requests answered with an error, and the first such error.
  size_t errors = 0;
  std::string first_error;
  /// Set when the soak stopped early (the driver did not start, a stall,
  /// an interrupt); the samples so far stand.
  std::string error;

  /// Timed requests done (the last sample's).
  size_t requests_done() const {
    return samples.empty() ? 0 : samples.back().requests_done;
  }
};

/// The verdict over `samples` (empty without a chunk done).
std::optional<soak_verdict> verdict_of(const std::vector<soak_sample>& samples);

/// CPU time (user + system) of this process so far, microseconds
/// (getrusage(RUSAGE_SELF)).
double self_cpu_us();

/// CPU time (user + system) of process `pid` so far, microseconds, from
/// /proc/<pid>/stat (clock ticks; 10 ms resolution at the usual 100 Hz).
/// nullopt if it cannot be read.
std::optional<double> proc_cpu_us(pid_t pid);

/// Peak resident set of `pid` (VmHWM in /proc/<pid>/status), KiB.
std::optional<uint64_t> proc_peak_rss_kib(pid_t pid);

/// Resident set of `pid` now (VmRSS in /proc/<pid>/status), KiB.
std::optional<uint64_t> proc_rss_kib(pid_t pid);

/// Online CPUs of this machine (at least 1).
unsigned cpu_count();

} // namespace hsm::bench
