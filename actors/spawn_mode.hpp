#pragma once

// How an actor whose handlers block (PKCS#11, HTTPS, database commits) is
// spawned: detached on a thread of its own in production, scheduled in the
// deterministic actor tests (a detached actor bypasses CAF's test
// scheduler).

#include "caf/all.hpp"

namespace hsm {

/// Detached in production, scheduled in deterministic tests.
enum class spawn_mode { detached, scheduled };

/// Spawns `fun(self, xs...)` the way `mode` says.
template <class F, class... Ts>
auto spawn_as(caf::actor_system& sys, spawn_mode mode, F fun, Ts&&... xs) {
  if (mode == spawn_mode::detached)
    return sys.spawn<caf::detached>(fun, std::forward<Ts>(xs)...);
  return sys.spawn(fun, std::forward<Ts>(xs)...);
}

} // namespace hsm
