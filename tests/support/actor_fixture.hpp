#pragma once

// GoogleTest base for actor tests: CAF's deterministic scheduler, one scoped
// actor, and a helper that asks an actor and runs the scheduler until the
// answer is in. Actors spawned here run only when the test runs the
// scheduler (`sched.run()`, `sched.run_once()`); delayed messages fire on
// `sched.trigger_timeouts()` or `sched.advance_time(d)`. No sleeps.

#include "messages/errors.hpp"

#include "caf/all.hpp"
#include "caf/scheduler/test_coordinator.hpp"
#include <gtest/gtest.h>

#include <optional>

namespace hsm::testing {

class actor_fixture : public ::testing::Test {
protected:
  static caf::actor_system_config& configure(caf::actor_system_config& c) {
    c.set("scheduler.policy", caf::atom("testing"));
    c.set("logger.file-verbosity", caf::atom("quiet"));
    return c;
  }

  /// Sends `xs...` to `dest` as a request, runs the scheduler, and returns
  /// the answer; fails the test (and returns nullopt) on an error or no
  /// answer.
  template <class T, class Handle, class... Ts>
  std::optional<T> ask(const Handle& dest, Ts&&... xs) {
    std::optional<T> out;
    auto h = self->request(dest, caf::infinite, std::forward<Ts>(xs)...);
    sched.run();
    h.receive([&](T& x) { out = std::move(x); },
              [&](caf::error& err) { ADD_FAILURE() << describe(err); });
    return out;
  }

  caf::actor_system_config cfg;
  caf::actor_system sys{configure(cfg)};
  caf::scoped_actor self{sys, true};
  caf::scheduler::test_coordinator& sched
    = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
};

} // namespace hsm::testing
