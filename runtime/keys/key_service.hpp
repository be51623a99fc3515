#pragma once

// The key path of the command line, composed in one thread: validate a
// request, look the key up in the store, do the HSM step, persist, finish
// and verify the signature. The daemon's actors run the same steps split
// across storage, session and dispatcher, with the same rules (requests.hpp)
// and decisions (decisions.hpp).

#include "messages/errors.hpp"
#include "messages/results.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/session.hpp"
#include "store/key_store.hpp"

#include <cstdint>
#include <span>
#include <string_view>

namespace hsm::keys {

/// Synchronous key path over one session and one store. Not thread-safe.
class key_service {
public:
  key_service(pkcs11::session& sess, key_handles keys, store::key_store& st,
              capabilities caps)
    : sess_(sess), keys_(std::move(keys)), store_(st), caps_(caps) {
    // nop
  }

  /// Generates a key under `key_id`, or returns the stored one without
  /// touching the HSM (idempotent by key id). Reported only after commit.
  [[nodiscard]] caf::expected<key_result>
  generate(std::string_view key_id, std::string_view scheme_name);

  /// Signs `payload` with the key stored under `key_id`; the signature is
  /// verified against the stored public key before it is returned.
  [[nodiscard]] caf::expected<signature_result>
  sign(std::string_view key_id, std::span<const uint8_t> payload);

  /// The stored key, public data only.
  [[nodiscard]] caf::expected<key_result> show(std::string_view key_id);

private:
  caf::expected<key_record> lookup(std::string_view key_id);

  pkcs11::session& sess_;
  key_handles keys_;
  store::key_store& store_;
  capabilities caps_;
};

} // namespace hsm::keys
