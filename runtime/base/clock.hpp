#pragma once

// The injectable clock: steady time for deadlines and leases, wall-clock
// time for what is recorded. Production code takes a `const clock&` where
// time decides something a test must control; `real_clock()` is the one to
// pass outside tests, and `manual_clock` moves only when a test says so.
// Both are safe to read from any thread.

#include <atomic>
#include <chrono>
#include <cstdint>

namespace hsm {

/// A source of time.
class clock {
public:
  virtual ~clock() = default;

  /// Monotonic time, for deadlines.
  [[nodiscard]] virtual std::chrono::steady_clock::time_point
  steady_now() const = 0;

  /// Milliseconds since the Unix epoch (UTC), for records.
  [[nodiscard]] virtual int64_t unix_ms() const = 0;
};

/// The process's clocks.
const clock& real_clock();

/// Milliseconds since the Unix epoch, now (`real_clock().unix_ms()`).
int64_t now_ms();

/// A clock that stands still until `advance` moves it. Starts at an
/// arbitrary fixed point.
class manual_clock : public clock {
public:
  std::chrono::steady_clock::time_point steady_now() const override {
    return std::chrono::steady_clock::time_point{
      std::chrono::milliseconds{ms_.load()}};
  }

  int64_t unix_ms() const override {
    return epoch_ms + ms_.load();
  }

  /// Moves the clock forward by `d`.
  void advance(std::chrono::milliseconds d) {
    ms_ += d.count();
  }

private:
  static constexpr int64_t epoch_ms = 1'700'000'000'000;
  std::atomic<int64_t> ms_{1'000'000};
};

} // namespace hsm
