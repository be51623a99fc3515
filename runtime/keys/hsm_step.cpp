#include "runtime/keys/hsm_step.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/pkcs11/key_ops.hpp"

#include <openssl/sha.h>

#include <array>
#include <random>

namespace hsm::keys {

namespace {

/// A label unique to one generation of a resident key.
std::string resident_label(std::string_view key_id) {
  std::random_device rd;
  std::array<uint8_t, 8> nonce{};
  for (auto& b : nonce)
    b = static_cast<uint8_t>(rd());
  return std::string{key_id} + "/" + crypto::to_hex(nonce);
}

} // namespace

caf::expected<key_record> make_key(pkcs11::session& sess,
                                   CK_OBJECT_HANDLE master, scheme s,
                                   std::string_view key_id, bool resident,
                                   CK_OBJECT_HANDLE* resident_handle) {
  if (resident_handle != nullptr)
    *resident_handle = CK_INVALID_HANDLE;
  key_record rec;
  rec.key_id = std::string{key_id};
  rec.scheme = s;
  rec.created_at_ms = now_ms();
  if (resident) {
    auto label = resident_label(key_id);
    std::vector<uint8_t> id{key_id.begin(), key_id.end()};
    auto key = pkcs11::generate_resident(sess, s, id, label);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob.assign(label.begin(), label.end());
    rec.wrap_mechanism = std::string{resident_mechanism};
    if (resident_handle != nullptr)
      *resident_handle = key->handle;
  } else {
    auto key = pkcs11::generate_wrapped(sess, master, s);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob = std::move(key->wrapped_key);
    rec.wrap_mechanism = std::string{aes_key_wrap_pad};
  }
  return rec;
}

caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, CK_OBJECT_HANDLE master, const key_record& rec,
          std::span<const uint8_t> payload) {
  if (rec.resident()) {
    std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
    std::string label{rec.key_blob.begin(), rec.key_blob.end()};
    return pkcs11::sign_resident(sess, rec.scheme, id, label, payload);
  }
  return pkcs11::sign_wrapped(sess, master, rec.scheme, rec.key_blob, payload);
}

caf::error destroy_resident_key(pkcs11::session& sess, const key_record& rec) {
  if (!rec.resident())
    return caf::none;
  std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
  std::string label{rec.key_blob.begin(), rec.key_blob.end()};
  return pkcs11::destroy_resident(sess, id, label);
}

std::vector<uint8_t> fixed_payload(scheme s, std::string_view what) {
  std::vector<uint8_t> digest(SHA256_DIGEST_LENGTH);
  SHA256(reinterpret_cast<const unsigned char*>(what.data()), what.size(),
         digest.data());
  if (is_ecdsa(s))
    return digest;
  return {what.begin(), what.end()};
}

} // namespace hsm::keys
