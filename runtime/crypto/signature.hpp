#pragma once

// Signature finishing on the host: what happens between the HSM's raw output
// and the result the driver releases. Normalises ECDSA to low-s (secp256k1),
// computes the recovery id (both EC curves), DER-encodes, and verifies every
// signature against the stored public key (invariant 3). Stateless; any
// thread. secp256k1 uses libsecp256k1, P-256 and Ed25519 use OpenSSL.

#include "messages/errors.hpp"
#include "messages/results.hpp"
#include "messages/scheme.hpp"

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace hsm::crypto {

/// ECDSA r||s, 32 bytes each, big-endian.
using raw_ecdsa = std::array<uint8_t, 64>;

/// Reads an ECDSA signature as a token returns it: 64 raw bytes r||s or a DER
/// `ECDSA-Sig-Value`. Anything else is `key_errc::signature_mismatch`.
caf::expected<raw_ecdsa> parse_ecdsa(std::span<const uint8_t> from_token);

/// Replaces s by n - s when s > n/2 on `s`'s curve. Returns true if it did.
/// Only secp256k1 is normalised by `finish_signature`, but this works for
/// both curves.
bool normalize_low_s(scheme s, raw_ecdsa& sig);

/// DER `ECDSA-Sig-Value` of r||s.
std::vector<uint8_t> to_der(const raw_ecdsa& sig);

/// Verifies `sig` over `payload` against the canonical public key (see
/// ec.hpp). For ECDSA the payload is the 32-byte hash; secp256k1 requires
/// low-s (libsecp256k1 rules).
bool verify(scheme s, std::span<const uint8_t> public_key,
            std::span<const uint8_t> payload, std::span<const uint8_t> sig);

/// The recovery id of a valid ECDSA signature: the `v` such that recovering
/// from (hash, r, s, v) yields `public_key`. `key_errc::signature_mismatch`
/// when no id recovers the key.
caf::expected<int> recovery_id(scheme s, std::span<const uint8_t> public_key,
                               std::span<const uint8_t> hash,
                               const raw_ecdsa& sig);

/// Everything above in order: parse, normalise, verify, recovery id, DER;
/// the result names `public_key` by its fingerprint (fingerprint.hpp). A
/// signature that does not verify is `key_errc::signature_mismatch` and is
/// never returned.
caf::expected<signature> finish_signature(scheme s,
                                          std::span<const uint8_t> public_key,
                                          std::span<const uint8_t> payload,
                                          std::span<const uint8_t> from_token);

} // namespace hsm::crypto
