#include "runtime/app/bench_stats.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
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

std::optional<uint64_t> proc_peak_rss_kib(pid_t pid) {
  std::ifstream in{"/proc/" + std::to_string(pid) + "/status"};
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) != 0)
      continue;
    std::istringstream fields{line.substr(6)};
    uint64_t kib = 0;
    if (fields >> kib)
      return kib;
    return std::nullopt;
  }
  return std::nullopt;
}

unsigned cpu_count() {
  return std::max(1u, std::thread::hardware_concurrency());
}

} // namespace hsm::bench
