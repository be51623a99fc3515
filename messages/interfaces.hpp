#pragma once

// What the actors agree on: the local message types and the typed interfaces
// of the session and storage actors; atoms and type IDs are in type_ids.hpp.
// All actors live in one process; the message types are local-only (never
// serialised), so they are allowed as unsafe message types instead of
// getting inspect() overloads.

#include <cstdint>
#include <optional>
#include <vector>

#include "caf/all.hpp"

#include "messages/type_ids.hpp"
#include "runtime/wire.hpp"
#include "store/key_store.hpp"

namespace hsm {

/// A key lookup's answer: `found` false means no key under the id.
struct key_lookup {
  bool found = false;
  store::key_record record;
};

/// Raw signature bytes as the token returned them.
struct raw_signature {
  std::vector<uint8_t> bytes;
};

/// Dispatcher counters, for tests and logs.
struct dispatcher_stats {
  uint64_t done = 0;
  uint64_t failed = 0;
  uint64_t retried = 0;
  uint64_t slot_failures = 0;
  size_t healthy_slots = 0;
  size_t busy_slots = 0;
  size_t queued = 0;
};

/// One PKCS#11 session. Replies with a key record ready to store, or the raw
/// signature; fails with an `hsm_errc`/`key_errc`. `destroy_atom` removes the
/// token object of a token-resident record that never made it into the store.
/// Runs detached: its handlers block inside PKCS#11.
using hsm_session_actor = caf::typed_actor<
  caf::replies_to<generate_atom, std::string, scheme>::with<store::key_record>,
  caf::replies_to<sign_atom, store::key_record,
                  std::vector<uint8_t>>::with<raw_signature>,
  caf::reacts_to<destroy_atom, store::key_record>>;

/// The key store. Writes are acknowledged after commit.
using store_actor = caf::typed_actor<
  caf::replies_to<caf::get_atom, std::string>::with<key_lookup>,
  caf::replies_to<caf::put_atom, store::key_record>::with<store::put_result>>;

} // namespace hsm

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::job_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::key_lookup)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::raw_signature)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::dispatcher_stats)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::store::key_record)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::store::put_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(hsm::scheme)
