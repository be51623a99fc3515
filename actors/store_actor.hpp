#pragma once

// The storage actor: owns the key store. Serves key records from a bounded
// LRU cache (records are immutable once written, so a cached record never
// goes stale; a missing key is never cached: another driver may create it)
// and commits puts in groups: a put waits in a pending list, the first one
// sends the actor a `flush_atom`, which queues behind every put already in
// the mailbox; the flush commits up to `max_group` of them with one
// `put_many` (one transaction, one fsync) and only then answers each
// (durable before visible); if the commit fails, each gets the error. Gets
// are served between groups. On an exit message other than `kill` it
// commits what is pending before it quits. It also appends the audit
// trail (`audit_atom`): a batch per call, in one transaction of its own,
// answered once durable, with an info log line per entry that names its
// place in the chain (seq and hash). A put may carry its audit entry (a
// generated key's answer): the entry is appended in the group's commit if
// the record is inserted, so a new key and its row in the trail cost one
// commit. Runs detached in production: SQLite commits block on fsync,
// PostgreSQL ones on the network.

#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
#include "runtime/base/metrics.hpp"
#include "store/key_store.hpp"

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

namespace hsm {

/// Key records the storage actor caches by default (a record is a few
/// hundred bytes, so a few MB).
inline constexpr size_t default_store_cache_capacity = 10'000;

/// Puts the storage actor commits in one transaction at most, by default.
inline constexpr size_t default_store_max_group = 256;

/// Options of the storage actor.
struct store_actor_config {
  /// Key records the cache holds at most; 0 caches nothing.
  size_t cache_capacity = default_store_cache_capacity;
  /// Puts committed together at most (0 counts as 1); a longer backlog is
  /// committed in several groups.
  size_t max_group = default_store_max_group;
  /// The audit chain this actor appends to (`audit_atom`): the driver id.
  std::string driver_id;
  spawn_mode mode = spawn_mode::detached;
  /// Counts store errors and tells whether the store answers; none: not
  /// counted.
  std::shared_ptr<driver_metrics> metrics;
  /// Which connection this actor is, for the metrics.
  store_role role = store_role::keys;
  /// With metrics: when the store has not answered for this long, the
  /// actor asks it (`schema_version`) so that readiness notices a database
  /// that went away while idle; 0: never.
  std::chrono::milliseconds health_interval{0};
};

/// Spawns the storage actor; it takes ownership of `st`. The handle
/// converts to a `store_actor`.
storage_actor spawn_store_actor(caf::actor_system& sys,
                                std::shared_ptr<store::key_store> st,
                                store_actor_config cfg = {});

} // namespace hsm
