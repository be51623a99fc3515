#pragma once

// The key-path decisions that the command line and the actors share, each
// in one place with its one message text: what to answer for a stored key,
// for an unknown key, for a scheme the token does not serve, and the
// retryable answers of the engine. Pure functions; any thread.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "messages/results.hpp"
#include "runtime/keys/capabilities.hpp"

#include <string_view>

namespace hsm::keys {

/// The public view of a stored record, with its fingerprint.
[[nodiscard]] caf::expected<key_result> make_key_result(const key_record& r,
                                                        bool created);

/// The answer to a generate_key for `requested` when `stored` is what the
/// store holds under the key id (found by a lookup, or the winner of a lost
/// `put` race): the stored key, or `key_errc::invalid_request` when it has
/// another scheme. `created` is true when this request wrote it.
[[nodiscard]] caf::expected<key_result>
answer_stored(const key_record& stored, scheme requested, bool created);

/// `key_errc::unknown_key` for `key_id`.
[[nodiscard]] caf::error unknown_key(std::string_view key_id);

/// The `scheme_unsupported` error for a scheme the token does not serve,
/// with the probe's reason.
[[nodiscard]] caf::error scheme_not_served(const capability& c);

/// Checks that `s` is served; the error of `scheme_not_served` otherwise.
[[nodiscard]] caf::error check_served(const capabilities& caps, scheme s);

/// The retryable answer to work handed back on shutdown.
[[nodiscard]] caf::error shutting_down();

/// The retryable answer to a job whose lease ends before it could be
/// served.
[[nodiscard]] caf::error lease_ending();

/// The retryable answer to a job beyond the queue bound.
[[nodiscard]] caf::error queue_full();

/// The retryable answer to a job that saw too many session failures.
[[nodiscard]] caf::error no_session_could_serve(const caf::error& last);

} // namespace hsm::keys
