#pragma once

// How much load a soak test puts through. Under the sanitizers
// (deploy/run-sanitizers.sh builds with HSM_DRIVER_SANITIZED) every
// allocation is traced through a full stack and every call is checked, and
// the tests that push a thousand requests through the in-process driver run
// twenty times slower; they look there for memory and thread errors on each
// path, which a third of the load walks as well. The optimised build runs
// the full load.

namespace hsm::test {

#ifdef HSM_DRIVER_SANITIZED
inline constexpr int soak_divisor = 3;
#else
inline constexpr int soak_divisor = 1;
#endif

/// `full` requests (rows, rounds) in the optimised build, a third under the
/// sanitizers.
constexpr int soak(int full) {
  return full / soak_divisor;
}

} // namespace hsm::test
