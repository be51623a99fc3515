#include "runtime/app/bench_report.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

extern char** environ;

namespace hsm::bench {

namespace {

using json = nlohmann::ordered_json;

json latency_json(const latency_ms& l) {
  return json{{"p50_ms", l.p50}, {"p99_ms", l.p99}, {"max_ms", l.max}};
}

json raw_json(const raw_result& r) {
  if (!r.error.empty())
    return json{{"sessions", r.sessions}, {"error", r.error}};
  return json{{"sessions", r.sessions},
              {"ops", r.ops},
              {"seconds", r.seconds},
              {"ops_per_s", r.ops_per_s},
              {"latency", latency_json(r.latency)},
              {"cpu_us_per_op", r.cpu_us_per_op}};
}

json e2e_json(const e2e_result& r) {
  if (!r.error.empty())
    return json{{"sessions", r.sessions}, {"error", r.error}};
  json out{{"sessions", r.sessions},
           {"requests", r.requests},
           {"seconds", r.seconds},
           {"ops_per_s", r.ops_per_s},
           {"latency", latency_json(r.latency)},
           {"driver_cpu_us_per_request", r.driver_cpu_us_per_request},
           {"proxy_cpu_us_per_request", r.proxy_cpu_us_per_request},
           {"host_cpu_pct", r.host_cpu_pct},
           {"driver_peak_rss_mib", r.peak_rss_mib},
           {"driver_rss_mib", r.rss_mib},
           {"errors", r.errors},
           {"redelivered", r.redelivered}};
  if (!r.first_error.empty())
    out["first_error"] = r.first_error;
  return out;
}

/// A gnuplot single-quoted string.
std::string gnuplot_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) {
    if (c == '\'')
      out += "''";
    else if (c != '\n')
      out += c;
  }
  return out + "'";
}

} // namespace

double matrix_row::ratio() const {
  return raw.ops_per_s > 0 ? e2e.ops_per_s / raw.ops_per_s : 0.0;
}

double matrix_row::driver_cpu_beyond_raw_us() const {
  return e2e.driver_cpu_us_per_request - raw.cpu_us_per_op;
}

void print_matrix(std::ostream& out, const std::vector<matrix_row>& rows) {
  // Two header lines: the brief names stay whole when read top-down.
  constexpr auto header = "{:<8} {:<9} {:<8} {:>8} {:>10} {:>10} {:>6} {:>7} "
                          "{:>7} {:>17} {:>8}\n";
  out << fmt::format(header, "store", "scheme", "kind", "sessions", "raw ops/s",
                     "e2e ops/s", "ratio", "p50 ms", "p99 ms",
                     "driver CPU µs/req", "peak RSS");
  out << fmt::format(header, "", "", "", "", "", "", "", "", "", "beyond raw",
                     "MiB");
  std::vector<std::string> failures;
  for (auto& r : rows) {
    auto head = fmt::format("{:<8} {:<9} {:<8} {:>8}", r.store,
                            to_string(r.scheme), to_string(r.kind), r.sessions);
    if (!r.raw.error.empty()) {
      out << head << "  raw loop failed (see below)\n";
      failures.push_back(head + ": raw loop: " + r.raw.error);
      continue;
    }
    if (!r.e2e.error.empty()) {
      out << head << fmt::format(" {:>10.0f}", r.raw.ops_per_s)
          << "  full system failed (see below)\n";
      failures.push_back(head + ": full system: " + r.e2e.error);
      continue;
    }
    out << head
        << fmt::format(" {:>10.0f} {:>10.1f} {:>6.3f} {:>7.2f} {:>7.2f} "
                       "{:>17.0f} {:>8.1f}",
                       r.raw.ops_per_s, r.e2e.ops_per_s, r.ratio(),
                       r.e2e.latency.p50, r.e2e.latency.p99,
                       r.driver_cpu_beyond_raw_us(), r.e2e.peak_rss_mib);
    if (r.e2e.errors > 0)
      out << fmt::format("  ({} requests failed)", r.e2e.errors);
    out << "\n";
    if (r.e2e.errors > 0 || !r.e2e.first_error.empty())
      failures.push_back(head + ": " + std::to_string(r.e2e.errors)
                         + " failed requests; first: " + r.e2e.first_error);
  }
  for (auto& f : failures)
    out << "  " << f << "\n";
}

void print_sweep(std::ostream& out, const sweep_result& sweep) {
  out << fmt::format("sweep: {} {} on {}, through {} with HSM_SHIM_SPEC={}\n",
                     to_string(sweep.scheme), to_string(sweep.kind),
                     sweep.store, sweep.latency_module, sweep.latency_spec);
  if (!sweep.raw.error.empty()) {
    out << "  raw loop (1 session) failed: " << sweep.raw.error << "\n";
    return;
  }
  out << fmt::format("per-request HSM time (raw loop, 1 session, {} ops): "
                     "{:.2f} ms\n",
                     sweep.raw.ops, sweep.hsm_ms_per_request);
  constexpr auto header = "{:>8} {:>8} {:>9} {:>11} {:>10} {:>7} {:>7} {:>9} "
                          "{:>8}\n";
  out << fmt::format(header, "sessions", "requests", "ops/s", "ideal ops/s",
                     "efficiency", "p50 ms", "p99 ms", "host CPU", "peak RSS");
  out << fmt::format(header, "", "", "", "", "", "", "", "", "MiB");
  for (auto& p : sweep.points) {
    if (!p.e2e.error.empty()) {
      out << fmt::format("{:>8}  failed: {}\n", p.sessions, p.e2e.error);
      continue;
    }
    out << fmt::format("{:>8} {:>8} {:>9.1f} {:>11.1f} {:>10.3f} {:>7.1f} "
                       "{:>7.1f} {:>8.0f}% {:>8.1f}",
                       p.sessions, p.e2e.requests, p.e2e.ops_per_s,
                       p.ideal_ops_per_s, p.efficiency, p.e2e.latency.p50,
                       p.e2e.latency.p99, p.e2e.host_cpu_pct,
                       p.e2e.peak_rss_mib);
    if (p.e2e.errors > 0)
      out << fmt::format("  ({} requests failed)", p.e2e.errors);
    out << "\n";
  }
}

std::string verdict_line(const soak_verdict& v) {
  return fmt::format("VmRSS {:.1f} MiB after the first chunk ({} requests), "
                     "{:.1f} MiB after the last ({}), max {:.1f} MiB (after "
                     "{}); growth {:+.2f} MiB per 10^5 requests (first to "
                     "last; least-squares {:+.2f}, second half {:+.2f}); "
                     "peak VmHWM {:.1f} MiB",
                     v.first_rss_mib, v.first_requests, v.last_rss_mib,
                     v.last_requests, v.max_rss_mib, v.max_at_requests,
                     v.growth_mib_per_1e5, v.slope_mib_per_1e5,
                     v.late_slope_mib_per_1e5, v.peak_hwm_mib);
}

std::string soak_progress_line(const soak_result& soak) {
  if (soak.samples.empty())
    return "soak: no sample yet";
  auto& s = soak.samples.back();
  auto line = fmt::format("soak: {}/{} requests, driver VmRSS {:.1f} MiB, "
                          "VmHWM {:.1f} MiB",
                          s.requests_done, soak.requests, s.rss_mib, s.hwm_mib);
  if (!s.chunk) {
    line += " (after the keys and the warm-up)";
    return line;
  }
  line += fmt::format(", {:.0f} req/s", s.chunk->ops_per_s);
  if (s.chunk->errors > 0)
    line += fmt::format(", {} failed", s.chunk->errors);
  if (s.requests_done > 0 && s.requests_done < soak.requests) {
    auto left = s.elapsed_s / static_cast<double>(s.requests_done)
                * static_cast<double>(soak.requests - s.requests_done);
    line += left < 120 ? fmt::format(", about {:.0f} s left", left)
                       : fmt::format(", about {:.0f} min left", left / 60.0);
  }
  return line;
}

void print_soak(std::ostream& out, const soak_result& soak) {
  out << fmt::format("soak: {} {} on {}, {} session(s), {} requests in "
                     "chunks of {}\n",
                     to_string(soak.scheme), to_string(soak.kind), soak.store,
                     soak.sessions, soak.requests, soak.chunk);
  constexpr auto header = "{:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>9} "
                          "{:>9}\n";
  out << fmt::format(header, "requests", "VmRSS", "VmHWM", "req/s", "p50 ms",
                     "p99 ms", "errors", "driver", "bench RSS");
  out << fmt::format(header, "done", "MiB", "MiB", "(chunk)", "", "", "",
                     "CPU µs/req", "MiB");
  for (auto& s : soak.samples) {
    if (!s.chunk) {
      out << fmt::format("{:>9} {:>9.1f} {:>9.1f} {:>9} {:>7} {:>7} {:>7} "
                         "{:>9} {:>9.1f}  (after the keys and the warm-up)\n",
                         s.requests_done, s.rss_mib, s.hwm_mib, "", "", "", "",
                         "", s.bench_rss_mib);
      continue;
    }
    auto& c = *s.chunk;
    out << fmt::format("{:>9} {:>9.1f} {:>9.1f} {:>9.0f} {:>7.2f} {:>7.2f} "
                       "{:>7} {:>9.0f} {:>9.1f}\n",
                       s.requests_done, s.rss_mib, s.hwm_mib, c.ops_per_s,
                       c.latency.p50, c.latency.p99, c.errors,
                       c.driver_cpu_us_per_request, s.bench_rss_mib);
  }
  if (!soak.error.empty())
    out << "soak stopped early: " << soak.error << "\n";
  if (soak.errors > 0 || !soak.first_error.empty())
    out << fmt::format("{} requests failed; first: {}\n", soak.errors,
                       soak.first_error);
  if (auto v = verdict_of(soak.samples))
    out << "verdict: " << verdict_line(*v) << "\n";
  else
    out << "verdict: none (no chunk done)\n";
}

json to_json(const report& r) {
  json out = r.context;
  json skipped = json::array();
  for (auto& s : r.skipped)
    skipped.push_back(json{{"scheme", s.scheme}, {"reason", s.reason}});
  out["skipped"] = skipped;
  json rows = json::array();
  for (auto& row : r.rows) {
    json j{{"store", row.store},
           {"scheme", std::string{to_string(row.scheme)}},
           {"kind", std::string{to_string(row.kind)}},
           {"sessions", row.sessions},
           {"resident", row.resident},
           {"raw", raw_json(row.raw)},
           {"e2e", e2e_json(row.e2e)}};
    if (row.ok()) {
      j["ratio"] = row.ratio();
      j["driver_cpu_us_per_request_beyond_raw"]
        = row.driver_cpu_beyond_raw_us();
    }
    rows.push_back(std::move(j));
  }
  out["rows"] = rows;
  if (r.sweep) {
    auto& s = *r.sweep;
    json points = json::array();
    for (auto& p : s.points) {
      json j{{"sessions", p.sessions}, {"e2e", e2e_json(p.e2e)}};
      if (p.e2e.error.empty()) {
        j["ideal_ops_per_s"] = p.ideal_ops_per_s;
        j["efficiency"] = p.efficiency;
      }
      points.push_back(std::move(j));
    }
    out["sweep"] = json{{"store", s.store},
                        {"scheme", std::string{to_string(s.scheme)}},
                        {"kind", std::string{to_string(s.kind)}},
                        {"latency_module", s.latency_module},
                        {"latency_spec", s.latency_spec},
                        {"raw", raw_json(s.raw)},
                        {"hsm_ms_per_request", s.hsm_ms_per_request},
                        {"points", points}};
  }
  if (r.soak) {
    auto& s = *r.soak;
    json samples = json::array();
    for (auto& x : s.samples) {
      json j{{"requests_done", x.requests_done},
             {"elapsed_s", x.elapsed_s},
             {"driver_rss_mib", x.rss_mib},
             {"driver_hwm_mib", x.hwm_mib},
             {"bench_rss_mib", x.bench_rss_mib}};
      if (x.chunk)
        j["chunk"] = e2e_json(*x.chunk);
      samples.push_back(std::move(j));
    }
    json soak{{"store", s.store},
              {"scheme", std::string{to_string(s.scheme)}},
              {"kind", std::string{to_string(s.kind)}},
              {"sessions", s.sessions},
              {"requests", s.requests},
              {"chunk", s.chunk},
              {"requests_done", s.requests_done()},
              {"errors", s.errors},
              {"samples", samples}};
    if (!s.first_error.empty())
      soak["first_error"] = s.first_error;
    if (!s.error.empty())
      soak["error"] = s.error;
    if (auto v = verdict_of(s.samples))
      soak["verdict"] = json{{"first_rss_mib", v->first_rss_mib},
                             {"first_requests", v->first_requests},
                             {"last_rss_mib", v->last_rss_mib},
                             {"last_requests", v->last_requests},
                             {"max_rss_mib", v->max_rss_mib},
                             {"max_at_requests", v->max_at_requests},
                             {"growth_mib_per_1e5", v->growth_mib_per_1e5},
                             {"slope_mib_per_1e5", v->slope_mib_per_1e5},
                             {"late_slope_mib_per_1e5",
                              v->late_slope_mib_per_1e5},
                             {"peak_hwm_mib", v->peak_hwm_mib}};
    out["soak"] = soak;
  }
  return out;
}

std::optional<std::filesystem::path> find_program(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs{path != nullptr ? path : "/usr/bin:/bin"};
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    auto candidate = std::filesystem::path{dir.empty() ? "." : dir} / program;
    if (::access(candidate.c_str(), X_OK) == 0)
      return std::filesystem::absolute(candidate);
  }
  return std::nullopt;
}

const char* const plot_script
  = R"(# hsm-driver bench --plot: throughput and efficiency against sessions.
# The same script as bench/plot.gp. Variables (set them with -e or before
# loading): data = a whitespace table with the columns sessions, ops/s,
# ideal ops/s, efficiency; out = the PNG to write; plot_title.
if (!exists("data")) data = 'sweep.dat'
if (!exists("out")) out = 'sweep.png'
if (!exists("plot_title")) plot_title = 'hsm-driver bench: sweep'
set terminal pngcairo size 960,600 noenhanced font ',11'
set output out
set title plot_title
set xlabel 'PKCS#11 sessions (--sessions)'
set logscale x 2
set logscale y 10
set ylabel 'requests/s (log scale)'
set y2label 'efficiency (achieved / ideal)'
set y2range [0:1.2]
set ytics nomirror
set y2tics 0.2
set grid
set key top left
plot data using 1:3 with lines dashtype 2 lw 2 \
       title 'ideal: sessions / HSM time', \
     data using 1:2 with linespoints lw 2 pt 7 title 'achieved', \
     data using 1:4 axes x1y2 with linespoints lw 2 pt 5 \
       title 'efficiency (right axis)'
)";

std::string plot_sweep(const sweep_result& sweep,
                       const std::filesystem::path& gnuplot,
                       const std::filesystem::path& png,
                       const std::filesystem::path& work_dir) {
  auto data = work_dir / "sweep.dat";
  auto script = work_dir / "sweep.gp";
  auto log = work_dir / "gnuplot.log";
  {
    std::ofstream d{data};
    d << "# sessions ops/s ideal_ops/s efficiency\n";
    for (auto& p : sweep.points)
      if (p.e2e.error.empty())
        d << p.sessions << " " << p.e2e.ops_per_s << " " << p.ideal_ops_per_s
          << " " << p.efficiency << "\n";
    std::ofstream s{script};
    auto title = fmt::format("hsm-driver bench: {} {}, HSM {:.1f} ms/request "
                             "({}), {}",
                             to_string(sweep.scheme), to_string(sweep.kind),
                             sweep.hsm_ms_per_request, sweep.latency_spec,
                             sweep.store);
    s << "data = " << gnuplot_quote(data.string()) << "\n"
      << "out = " << gnuplot_quote(std::filesystem::absolute(png).string())
      << "\n"
      << "plot_title = " << gnuplot_quote(title) << "\n"
      << plot_script;
    if (!d || !s)
      return "cannot write " + work_dir.string();
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::string prog = gnuplot.string();
  std::string arg = script.string();
  char* argv[] = {prog.data(), arg.data(), nullptr};
  pid_t pid = 0;
  auto rc = posix_spawn(&pid, prog.c_str(), &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0)
    return "cannot run " + prog;
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::ifstream in{log};
    std::stringstream text;
    text << in.rdbuf();
    return "gnuplot failed: " + text.str();
  }
  return {};
}

} // namespace hsm::bench
