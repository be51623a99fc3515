#pragma once

// Jittered waits for retries, so that drivers that failed together do not
// retry together. Any thread (the generator is per thread).

#include <chrono>

namespace hsm {

/// A random wait between half of `base` and `base`.
std::chrono::milliseconds jittered(std::chrono::milliseconds base);

} // namespace hsm
