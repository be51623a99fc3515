#pragma once

// Waiting in a test for something another thread or process is about to do:
// check a condition until it holds or a time limit passes. Tests synchronise
// on such conditions (a counter, a state, a log line), never on a fixed
// sleep; the limit only catches a hang, so make it generous. A wait that
// ends without its condition is a failure that says what it waited for.
// Header-only (the network tests link no support sources); callable from
// any thread, including a fault hook's.

#include <gtest/gtest.h>

#include <chrono>
#include <string_view>
#include <thread>

namespace hsm::test {

/// Checks `pred` every `poll` until it returns true (success) or `limit` has
/// passed (failure, with the message "waited N ms for: `what`"). Use as
/// `ASSERT_TRUE(wait_until(pred, 30s, "what")) << more;`, or as a bool.
template <class Pred>
[[nodiscard]] ::testing::AssertionResult
wait_until(Pred&& pred, std::chrono::milliseconds limit, std::string_view what,
           std::chrono::milliseconds poll = std::chrono::milliseconds{2}) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return ::testing::AssertionFailure()
             << "waited " << limit.count() << " ms for: " << what;
    std::this_thread::sleep_for(poll);
  }
  return ::testing::AssertionSuccess();
}

} // namespace hsm::test
