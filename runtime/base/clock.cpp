#include "runtime/base/clock.hpp"

namespace hsm {

namespace {

class real_clock_impl : public clock {
public:
  std::chrono::steady_clock::time_point steady_now() const override {
    return std::chrono::steady_clock::now();
  }

  int64_t unix_ms() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
  }
};

} // namespace

const clock& real_clock() {
  static const real_clock_impl instance;
  return instance;
}

int64_t now_ms() {
  return real_clock().unix_ms();
}

} // namespace hsm
