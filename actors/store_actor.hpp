#pragma once

// The storage actor: owns the key store; caches records (immutable once
// written). Runs detached: SQLite commits block on fsync.

#include "messages/interfaces.hpp"
#include "store/key_store.hpp"

#include <memory>

namespace hsm {

/// Spawns the storage actor; it takes ownership of `st`.
store_actor spawn_store_actor(caf::actor_system& sys,
                              std::shared_ptr<store::key_store> st);

} // namespace hsm
