#include "runtime/app/bench_stats.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

namespace hsm::bench {

std::string_view to_string(op_kind k) {
  return k == op_kind::generate ? "generate" : "sign";
}

std::optional<op_kind> parse_op_kind(std::string_view name) {
  if (name == "generate")
    return op_kind::generate;
  if (name == "sign")
    return op_kind::sign;
  return std::nullopt;
}

latency_ms percentiles(std::vector<double>& samples_us) {
  latency_ms out;
  if (samples_us.empty())
    return out;
  std::sort(samples_us.begin(), samples_us.end());
  auto rank = [&](double p) {
    // Nearest rank: the smallest sample with at least p of them at or below.
    auto n = static_cast<double>(samples_us.size());
    auto idx = static_cast<size_t>(std::ceil(p * n));
    return samples_us[std::clamp<size_t>(idx, 1, samples_us.size()) - 1]
           / 1000.0;
  };
  out.p50 = rank(0.50);
  out.p99 = rank(0.99);
  out.max = samples_us.back() / 1000.0;
  return out;
}

double self_cpu_us() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto us = [](const timeval& tv) {
    return static_cast<double>(tv.tv_sec) * 1e6
           + static_cast<double>(tv.tv_usec);
  };
  return us(ru.ru_utime) + us(ru.ru_stime);
}

std::optional<double> proc_cpu_us(pid_t pid) {
  std::ifstream in{"/proc/" + std::to_string(pid) + "/stat"};
  std::string line;
  if (!std::getline(in, line))
    return std::nullopt;
  // The command name (field 2) is in parentheses and may hold spaces: the
  // fields that follow start after the last ')'. Field 3 is the state;
  // utime and stime are fields 14 and 15.
  auto close = line.rfind(')');
  if (close == std::string::npos)
    return std::nullopt;
  std::istringstream rest{line.substr(close + 1)};
  std::string field;
  unsigned long long utime = 0;
  unsigned long long stime = 0;
  for (int n = 3; n <= 15 && rest >> field; ++n) {
    if (n == 14)
      utime = std::stoull(field);
    else if (n == 15)
      stime = std::stoull(field);
  }
  auto ticks = ::sysconf(_SC_CLK_TCK);
  if (ticks <= 0)
    return std::nullopt;
  return static_cast<double>(utime + stime) * 1e6 / static_cast<double>(ticks);
}

namespace {

/// A `<field>: <n> kB` line of /proc/<pid>/status, KiB.
std::optional<uint64_t> proc_status_kib(pid_t pid, std::string_view field) {
  std::ifstream in{"/proc/" + std::to_string(pid) + "/status"};
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() <= field.size() || line.compare(0, field.size(), field) != 0
        || line[field.size()] != ':')
      continue;
    std::istringstream fields{line.substr(field.size() + 1)};
    uint64_t kib = 0;
    if (fields >> kib)
      return kib;
    return std::nullopt;
  }
  return std::nullopt;
}

} // namespace

std::optional<uint64_t> proc_peak_rss_kib(pid_t pid) {
  return proc_status_kib(pid, "VmHWM");
}

std::optional<uint64_t> proc_rss_kib(pid_t pid) {
  return proc_status_kib(pid, "VmRSS");
}

namespace {

/// The least-squares slope of VmRSS over requests done among the samples
/// [from, to), MiB per 10^5 requests; 0 with fewer than 2.
template <class It>
double slope_per_1e5(It from, It to) {
  auto n = static_cast<double>(std::distance(from, to));
  if (n < 2)
    return 0.0;
  double mx = 0;
  double my = 0;
  for (auto i = from; i != to; ++i) {
    mx += static_cast<double>((*i)->requests_done);
    my += (*i)->rss_mib;
  }
  mx /= n;
  my /= n;
  double sxy = 0;
  double sxx = 0;
  for (auto i = from; i != to; ++i) {
    auto dx = static_cast<double>((*i)->requests_done) - mx;
    sxy += dx * ((*i)->rss_mib - my);
    sxx += dx * dx;
  }
  return sxx > 0 ? sxy / sxx * 1e5 : 0.0;
}

} // namespace

std::optional<soak_verdict>
verdict_of(const std::vector<soak_sample>& samples) {
  std::vector<const soak_sample*> chunks;
  for (auto& s : samples)
    if (s.chunk)
      chunks.push_back(&s);
  if (chunks.empty())
    return std::nullopt;
  soak_verdict v;
  auto& first = *chunks.front();
  auto& last = *chunks.back();
  v.first_rss_mib = first.rss_mib;
  v.last_rss_mib = last.rss_mib;
  v.first_requests = first.requests_done;
  v.last_requests = last.requests_done;
  for (auto* s : chunks)
    if (s->rss_mib > v.max_rss_mib) {
      v.max_rss_mib = s->rss_mib;
      v.max_at_requests = s->requests_done;
    }
  v.peak_hwm_mib = samples.back().hwm_mib;
  if (chunks.size() < 2 || last.requests_done <= first.requests_done)
    return v;
  auto span = static_cast<double>(last.requests_done - first.requests_done);
  v.growth_mib_per_1e5 = (last.rss_mib - first.rss_mib) / span * 1e5;
  v.slope_mib_per_1e5 = slope_per_1e5(chunks.begin(), chunks.end());
  if (chunks.size() >= 4)
    v.late_slope_mib_per_1e5 = slope_per_1e5(
      chunks.begin() + static_cast<std::ptrdiff_t>(chunks.size() / 2),
      chunks.end());
  return v;
}

unsigned cpu_count() {
  return std::max(1u, std::thread::hardware_concurrency());
}

} // namespace hsm::bench
