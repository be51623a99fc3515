#include "runtime/base/jitter.hpp"

#include <random>

namespace hsm {

std::chrono::milliseconds jittered(std::chrono::milliseconds base) {
  static thread_local std::mt19937 rng{std::random_device{}()};
  std::uniform_int_distribution<long long> dist{base.count() / 2, base.count()};
  return std::chrono::milliseconds{dist(rng)};
}

} // namespace hsm
