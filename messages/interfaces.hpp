#pragma once

// The typed interfaces of every actor, and the few message types that only
// actors exchange. Atoms and type IDs are in type_ids.hpp. All actors live
// in one process; the message types are local-only (never serialised), so
// they are allowed as unsafe message types instead of getting inspect()
// overloads.
//
// Who talks to whom (DESIGN.md, "The flow of one request"):
//   poller -> dispatcher (jobs, answers to invalid requests, credit)
//   dispatcher -> store, hsm_session, result_poster, session_supervisor
//   session_supervisor -> dispatcher (a session is up / down)
//   hsm_session -> session_supervisor (logged in)

#include "messages/job.hpp"
#include "messages/key_record.hpp"
#include "messages/results.hpp"
#include "messages/scheme.hpp"
#include "messages/type_ids.hpp"

#include "caf/all.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace hsm {

/// Dispatcher counters, for tests and logs.
struct dispatcher_stats {
  uint64_t done = 0;
  uint64_t failed = 0;
  uint64_t retried = 0;
  uint64_t session_failures = 0;
  size_t healthy_sessions = 0;
  size_t busy_sessions = 0;
  /// Jobs looked up and waiting for a session.
  size_t queued = 0;
  /// Leases held: from the poller's hand-over until the result is posted.
  size_t held = 0;
  /// Times intake paused because the store failed.
  uint64_t store_pauses = 0;
};

/// One PKCS#11 session. Replies with a key record ready to store, or the
/// finished signature (verified against the record's public key, low-s,
/// recovery id, DER: done here, in parallel across sessions); fails with an
/// `hsm_errc`/`key_errc` (`signature_mismatch` when it does not verify).
/// `destroy_atom` removes the token object of a token-resident record that
/// never made it into the store. Runs detached: its handlers block inside
/// PKCS#11.
using hsm_session_actor = caf::typed_actor<
  caf::replies_to<generate_atom, std::string, scheme>::with<key_record>,
  caf::replies_to<sign_atom, key_record,
                  std::vector<uint8_t>>::with<signature_result>,
  caf::reacts_to<destroy_atom, key_record>>;

/// The key store. Writes are acknowledged after commit. A put with an audit
/// entry (a generated key's answer) appends it to this driver's audit chain
/// in the same commit if, and only if, the record is inserted; the reply's
/// `audited` says so. A put that finds its key id taken appends nothing.
using store_actor = caf::typed_actor<
  caf::replies_to<caf::get_atom, std::string>::with<key_lookup>,
  caf::replies_to<caf::put_atom, key_record>::with<put_result>,
  caf::replies_to<caf::put_atom, key_record, audit_entry>::with<put_result>>;

/// The audit trail's writer: appends a batch of entries to this driver's
/// chain in one transaction and replies `true` once it is durable; fails
/// with the store's error (then nothing of the batch is written).
using audit_actor
  = caf::typed_actor<caf::replies_to<audit_atom, audit_batch>::with<bool>>;

/// Storage actor counters, for tests and logs.
struct store_stats {
  /// Gets answered from the cache, and gets that read the store.
  uint64_t cache_hits = 0;
  uint64_t cache_misses = 0;
  /// Records cached now, and at most.
  size_t cache_size = 0;
  size_t cache_capacity = 0;
  /// Groups committed (one transaction each), and the puts in them.
  uint64_t commits = 0;
  uint64_t committed_puts = 0;
  /// Groups whose commit failed (each of their puts got the error).
  uint64_t failed_groups = 0;
  /// Puts waiting for the next group.
  size_t pending = 0;
  /// Audit entries appended, and audit batches whose append failed.
  uint64_t audited = 0;
  uint64_t failed_audits = 0;
};

/// The storage actor as spawned: a `store_actor` and an `audit_actor`
/// (which its handle converts to) plus `flush_atom`, the group-commit
/// message it sends itself, `ping_atom`, its health check's timer, and
/// `stats_atom`, its counters.
using storage_actor
  = store_actor::extend<caf::replies_to<audit_atom, audit_batch>::with<bool>,
                        caf::reacts_to<flush_atom>,
                        caf::reacts_to<caf::ping_atom>,
                        caf::replies_to<stats_atom>::with<store_stats>>;

/// Posts results to the proxy. Replies `true` once a result is posted (or
/// refused by the proxy as stale), `false` when it gave up: then the lease
/// expires and the proxy hands the request out again. `flush_atom` is its
/// own: it posts what is due, in batches.
using result_poster_actor
  = caf::typed_actor<caf::replies_to<result_atom, job_result>::with<bool>,
                     caf::reacts_to<flush_atom>>;

/// Watches the session actors, restarts failed ones with backoff and tells
/// the dispatcher which sessions are up.
/// - `(ready_atom, index, generation)`: a session logged in;
/// - `(replace_atom, index, session)`: a call on `session` exceeded the HSM
///   timeout; abandon it and start a new one;
/// - `(session_ok_atom, index)`: a request succeeded on the session at
///   `index` after a failure; its backoff starts again from the minimum;
/// - `(respawn_atom, index, generation)`: the supervisor's own timer;
/// - `stuck_atom`: how many abandoned sessions are still stuck in a call;
/// - `close_atom`: ends every session; replies with the stuck count.
using session_supervisor_actor
  = caf::typed_actor<caf::reacts_to<ready_atom, size_t, uint64_t>,
                     caf::reacts_to<replace_atom, size_t, hsm_session_actor>,
                     caf::reacts_to<session_ok_atom, size_t>,
                     caf::reacts_to<respawn_atom, size_t, uint64_t>,
                     caf::replies_to<stuck_atom>::with<size_t>,
                     caf::replies_to<close_atom>::with<size_t>>;

/// Runs jobs on free healthy sessions.
/// - `(job_atom, job)`: a validated request from the poller;
/// - `(result_atom, job_result)`: the poller's answer to an invalid request,
///   posted in order with the others and counted as a lease until posted;
/// - `credit_atom`: how many more leases the driver may take; answered at
///   once when positive, else as soon as credit appears or the dispatcher
///   stops (never polled for on a timer);
/// - `(session_up_atom, index, session)`, `(session_down_atom, index)`:
///   from the supervisor;
/// - `drain_atom`: replies once no lease is held;
/// - `stop_atom`: hands back what never started, starts nothing new;
/// - `close_atom`: ends every session (through its supervisor); replies
///   with the number of calls still stuck in the HSM;
/// - `stuck_atom`: that number, now;
/// - `stats_atom`: the counters.
/// The dispatcher spawns its session supervisor and is linked to it.
using dispatcher_actor = caf::typed_actor<
  caf::reacts_to<job_atom, job>, caf::reacts_to<result_atom, job_result>,
  caf::replies_to<credit_atom>::with<int64_t>,
  caf::reacts_to<session_up_atom, size_t, hsm_session_actor>,
  caf::reacts_to<session_down_atom, size_t>,
  caf::reacts_to<deadline_atom, uint64_t>,
  caf::replies_to<drain_atom>::with<bool>, caf::reacts_to<stop_atom>,
  caf::replies_to<close_atom>::with<size_t>,
  caf::replies_to<stuck_atom>::with<size_t>,
  caf::replies_to<stats_atom>::with<dispatcher_stats>>;

/// Polls the proxy for as many requests as the dispatcher has credit.
/// `poll_atom` is its own loop; `stop_atom` stops polling and replies once
/// the poll in progress (if any) is over.
using poller_actor = caf::typed_actor<caf::reacts_to<poll_atom>,
                                      caf::replies_to<stop_atom>::with<bool>>;

} // namespace hsm

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::job_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::key_lookup)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::signature_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::dispatcher_stats)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::store_stats)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::key_record)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::put_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::scheme)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::audit_batch)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::audit_entry)
