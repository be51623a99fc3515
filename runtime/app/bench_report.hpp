#pragma once

// `hsm-driver bench`: what a run found (the matrix, the sweep or the
// soak), and how it is shown: a table on stdout, a JSON document (`--json
// FILE`), a PNG of the sweep rendered by gnuplot (`--plot FILE`). Main thread
// only.

#include "messages/scheme.hpp"
#include "runtime/app/bench_stats.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace hsm::bench {

/// One row of the matrix: the raw loop and the full system for one store,
/// scheme, kind and session count.
struct matrix_row {
  /// `sqlite` or `postgres`.
  std::string store;
  hsm::scheme scheme = hsm::scheme::secp256k1;
  op_kind kind = op_kind::sign;
  size_t sessions = 1;
  /// Keys of the scheme are token-resident.
  bool resident = false;
  raw_result raw;
  e2e_result e2e;

  /// The row has numbers (neither half failed).
  bool ok() const {
    return raw.error.empty() && e2e.error.empty();
  }
  /// e2e ops/s over raw ops/s.
  double ratio() const;
  /// The driver's CPU per request beyond the raw loop's CPU per operation:
  /// the engine's own cost (both run the same module in-process).
  double driver_cpu_beyond_raw_us() const;
};

/// One point of the sweep.
struct sweep_point {
  size_t sessions = 1;
  e2e_result e2e;
  /// sessions / per-request HSM time: what S sessions could do at most.
  double ideal_ops_per_s = 0;
  /// e2e ops/s over ideal.
  double efficiency = 0;
};

/// The sweep: the full system at several session counts through the
/// latency shim, against the ideal set by the 1-session raw loop.
struct sweep_result {
  std::string store;
  hsm::scheme scheme = hsm::scheme::p256;
  op_kind kind = op_kind::sign;
  /// The shim and its HSM_SHIM_SPEC.
  std::string latency_module;
  std::string latency_spec;
  /// The raw loop, 1 session, through the shim.
  raw_result raw;
  /// Its mean time per operation, ms (1000 / raw ops/s).
  double hsm_ms_per_request = 0;
  std::vector<sweep_point> points;
};

/// A scheme the run left out, and why.
struct skipped_scheme {
  std::string scheme;
  std::string reason;
};

/// Everything one `bench` run found.
struct report {
  /// Where and how it ran (module, token, options); no secrets.
  nlohmann::ordered_json context;
  std::vector<skipped_scheme> skipped;
  std::vector<matrix_row> rows;
  std::optional<sweep_result> sweep;
  std::optional<soak_result> soak;
};

/// The matrix as a table (one line per row; failures listed below it).
void print_matrix(std::ostream& out, const std::vector<matrix_row>& rows);

/// The sweep as a table.
void print_sweep(std::ostream& out, const sweep_result& sweep);

/// The soak as a table (one line per sample) and its verdict.
void print_soak(std::ostream& out, const soak_result& soak);

/// The soak's verdict as one line (no newline): VmRSS after the first
/// chunk, after the last, the largest, and the growth per 10^5 requests.
std::string verdict_line(const soak_verdict& v);

/// One soak sample as a progress line (no newline): requests done, VmRSS,
/// VmHWM, the chunk's rate, and the time left at that rate.
std::string soak_progress_line(const soak_result& soak);

/// The whole report as JSON.
nlohmann::ordered_json to_json(const report& r);

/// The absolute path of `program` found on PATH, or nullopt.
std::optional<std::filesystem::path> find_program(const std::string& program);

/// The gnuplot script `--plot` runs (bench/plot.gp is the same script):
/// reads `data` (columns: sessions, ops/s, ideal ops/s, efficiency) and
/// writes the PNG `out`, titled `title`.
extern const char* const plot_script;

/// Renders `sweep` as the PNG `png` with `gnuplot` (writing its data and
/// script under `work_dir`). Returns an empty string, or what went wrong.
std::string plot_sweep(const sweep_result& sweep,
                       const std::filesystem::path& gnuplot,
                       const std::filesystem::path& png,
                       const std::filesystem::path& work_dir);

} // namespace hsm::bench
