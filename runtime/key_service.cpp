#include "runtime/key_service.hpp"

#include <random>

#include <openssl/sha.h>

#include "runtime/crypto/ec.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/logging.hpp"
#include "runtime/pkcs11/key_ops.hpp"

namespace hsm {

// -- request validation -------------------------------------------------------

caf::error validate_key_id(std::string_view key_id) {
  if (key_id.empty())
    return caf::make_error(key_errc::invalid_request,
                           std::string{"key_id is empty"});
  if (key_id.size() > max_key_id_length)
    return caf::make_error(key_errc::invalid_request,
                           "key_id is longer than "
                             + std::to_string(max_key_id_length)
                             + " characters");
  for (char c : key_id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':'
              || c == '-';
    if (!ok)
      return caf::make_error(key_errc::invalid_request,
                             std::string{"key_id may only hold A-Z a-z 0-9 . "
                                         "_ : -"});
  }
  return caf::none;
}

namespace {

/// Request text fit for an error message and a log line: at most 40
/// characters, anything unprintable as '?'.
std::string printable(std::string_view text) {
  std::string out{text.substr(0, 40)};
  for (auto& c : out)
    if (c < 0x20 || c > 0x7E)
      c = '?';
  return out;
}

} // namespace

caf::expected<scheme> parse_scheme_name(std::string_view name) {
  if (auto s = parse_scheme(name))
    return *s;
  return caf::make_error(key_errc::scheme_unsupported,
                         "unknown scheme '" + printable(name)
                           + "' (schemes: secp256k1, p256, ed25519; Schnorr "
                             "and Stark have no PKCS#11 mechanism)");
}

caf::error validate_payload(scheme s, std::span<const uint8_t> payload) {
  if (is_ecdsa(s)) {
    if (payload.size() != 32)
      return caf::make_error(key_errc::invalid_payload,
                             std::string{to_string(s)}
                               + " signs a 32-byte hash; got "
                               + std::to_string(payload.size()) + " bytes");
    return caf::none;
  }
  if (payload.empty() || payload.size() > max_ed25519_message)
    return caf::make_error(key_errc::invalid_payload,
                           "ed25519 signs a message of 1 to "
                             + std::to_string(max_ed25519_message)
                             + " bytes; got "
                             + std::to_string(payload.size()));
  return caf::none;
}

// -- capability probe -----------------------------------------------------------

const capability& capabilities::of(scheme s) const {
  for (auto& c : schemes)
    if (c.scheme == s)
      return c;
  return schemes.front(); // unreachable: every scheme has an entry
}

namespace {

/// A fixed payload of the right shape for `s`.
std::vector<uint8_t> probe_payload(scheme s, std::string_view what) {
  std::vector<uint8_t> digest(SHA256_DIGEST_LENGTH);
  SHA256(reinterpret_cast<const unsigned char*>(what.data()), what.size(),
         digest.data());
  if (is_ecdsa(s))
    return digest;
  return {what.begin(), what.end()};
}

bool session_level(const caf::error& err) {
  return err == hsm_errc::reopen_session || err == hsm_errc::reinit_module
         || err == hsm_errc::retryable;
}

std::string wrap_hint(scheme s, const caf::error& err) {
  auto text = describe(err);
  if (text.find("CKR_KEY_NOT_WRAPPABLE") != std::string::npos
      || text.find("C_UnwrapKey") != std::string::npos)
    text += "; the token cannot wrap " + std::string{to_string(s)}
            + " keys: enable key wrapping in the HSM's partition policy, or "
              "opt in to token-resident keys with --resident-schemes "
            + std::string{to_string(s)};
  return text;
}

/// One wrapped round trip: generate, wrap, unwrap, sign, verify, destroy.
caf::error probe_wrapped(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                         scheme s) {
  auto key = pkcs11::generate_wrapped(sess, master, s);
  if (!key)
    return key.error();
  auto payload = probe_payload(s, "hsm-driver capability probe");
  auto raw = pkcs11::sign_wrapped(sess, master, s, key->wrapped_key, payload);
  if (!raw)
    return raw.error();
  auto sig = crypto::finish_signature(s, key->public_key, payload, *raw);
  return sig ? caf::none : sig.error();
}

/// One resident round trip: generate, sign, verify, destroy.
caf::error probe_resident(pkcs11::session& sess, scheme s) {
  std::string id = "hsm-driver-probe-" + std::string{to_string(s)};
  std::vector<uint8_t> id_bytes{id.begin(), id.end()};
  auto key = pkcs11::generate_resident(sess, s, id_bytes, id);
  if (!key)
    return key.error();
  auto payload = probe_payload(s, "hsm-driver capability probe");
  auto raw = pkcs11::sign_resident(sess, s, id_bytes, id, payload);
  caf::error result;
  if (!raw) {
    result = raw.error();
  } else if (auto sig = crypto::finish_signature(s, key->public_key, payload,
                                                 *raw);
             !sig) {
    result = sig.error();
  }
  if (auto err = pkcs11::destroy_resident(sess, id_bytes); err && !result)
    result = err;
  return result;
}

} // namespace

caf::expected<capabilities> probe(pkcs11::session& sess,
                                  CK_OBJECT_HANDLE master,
                                  const std::set<scheme>& resident_opt_in) {
  capabilities caps;
  for (size_t i = 0; i < all_schemes.size(); ++i) {
    auto s = all_schemes[i];
    auto& c = caps.schemes[i];
    c.scheme = s;
    c.resident = resident_opt_in.count(s) > 0;
    auto err = c.resident ? probe_resident(sess, s)
                          : probe_wrapped(sess, master, s);
    if (err && session_level(err))
      return err;
    c.served = !err;
    c.detail = err ? wrap_hint(s, err) : "ok";
  }
  return caps;
}

// -- master-key guard -----------------------------------------------------------

caf::expected<canary_state>
check_master_key(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                 std::string_view master_label, store::key_store& st,
                 bool may_create) {
  auto log = logger("runtime");
  auto stored = st.get_canary();
  if (!stored)
    return stored.error();
  auto state = canary_state::matches;
  if (!*stored) {
    if (!may_create)
      return caf::make_error(key_errc::master_key_missing,
                             std::string{"the database holds no master-key "
                                         "canary yet; start the driver once "
                                         "to record it"});
    auto key = pkcs11::generate_wrapped(sess, master, scheme::p256);
    if (!key)
      return key.error();
    store::canary_record c;
    c.public_key = std::move(key->public_key);
    c.wrapped_key = std::move(key->wrapped_key);
    c.wrap_mechanism = std::string{store::aes_key_wrap_pad};
    c.master_key_label = std::string{master_label};
    c.created_at_ms = store::now_ms();
    auto written = st.put_canary(c);
    if (!written)
      return written.error();
    // Another driver may have won the race: check against what is stored.
    state = written->public_key == c.public_key ? canary_state::created
                                                : canary_state::matches;
    stored = std::optional<store::canary_record>{std::move(*written)};
  }
  const auto& c = **stored;
  auto payload = probe_payload(scheme::p256, "hsm-driver master-key canary");
  auto mismatch = [&](const std::string& why) {
    return caf::make_error(
      key_errc::master_key_mismatch,
      "the master key '" + std::string{master_label}
        + "' on this token is not the one that protects this database's "
          "keys (the canary was wrapped by master key '"
        + c.master_key_label + "'): " + why
        + ". Refusing to serve: give this driver a token holding the same "
          "master key, or point it at its own database");
  };
  auto raw = pkcs11::sign_wrapped(sess, master, scheme::p256, c.wrapped_key,
                                  payload);
  if (!raw) {
    if (raw.error() == key_errc::key_corrupted)
      return mismatch("it cannot unwrap the canary");
    return raw.error();
  }
  if (auto sig = crypto::finish_signature(scheme::p256, c.public_key, payload,
                                          *raw);
      !sig)
    return mismatch("the canary's signature does not verify");
  log->debug("master key '{}' matches the database canary", master_label);
  return state;
}

// -- key service ----------------------------------------------------------------

caf::expected<key_view> make_key_view(const store::key_record& r,
                                      bool created) {
  key_view v;
  v.key_id = r.key_id;
  v.scheme = r.scheme;
  v.public_key = r.public_key;
  if (is_ecdsa(r.scheme)) {
    auto c = crypto::compress_public_key(r.scheme, r.public_key);
    if (!c)
      return c.error();
    v.public_key_compressed = std::move(*c);
  }
  v.storage = r.wrap_mechanism;
  v.created_at_ms = r.created_at_ms;
  v.created = created;
  return v;
}

caf::error scheme_not_served(const capability& c) {
  return caf::make_error(key_errc::scheme_unsupported,
                         std::string{to_string(c.scheme)}
                           + " is not served by this token: " + c.detail);
}

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

caf::expected<store::key_record>
make_key(pkcs11::session& sess, CK_OBJECT_HANDLE master, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle) {
  if (resident_handle != nullptr)
    *resident_handle = CK_INVALID_HANDLE;
  store::key_record rec;
  rec.key_id = std::string{key_id};
  rec.scheme = s;
  rec.created_at_ms = store::now_ms();
  if (resident) {
    auto label = resident_label(key_id);
    std::vector<uint8_t> id{key_id.begin(), key_id.end()};
    auto key = pkcs11::generate_resident(sess, s, id, label);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob.assign(label.begin(), label.end());
    rec.wrap_mechanism = std::string{store::resident_mechanism};
    if (resident_handle != nullptr)
      *resident_handle = key->handle;
  } else {
    auto key = pkcs11::generate_wrapped(sess, master, s);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob = std::move(key->wrapped_key);
    rec.wrap_mechanism = std::string{store::aes_key_wrap_pad};
  }
  return rec;
}

caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, CK_OBJECT_HANDLE master,
          const store::key_record& rec, std::span<const uint8_t> payload) {
  if (rec.resident()) {
    std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
    std::string label{rec.key_blob.begin(), rec.key_blob.end()};
    return pkcs11::sign_resident(sess, rec.scheme, id, label, payload);
  }
  return pkcs11::sign_wrapped(sess, master, rec.scheme, rec.key_blob,
                              payload);
}

caf::expected<store::key_record>
key_service::lookup(std::string_view key_id) {
  if (auto err = validate_key_id(key_id))
    return err;
  auto rec = store_.get(key_id);
  if (!rec)
    return rec.error();
  if (!*rec)
    return caf::make_error(key_errc::unknown_key,
                           "no key is stored under key_id '"
                             + std::string{key_id} + "'");
  return std::move(**rec);
}

caf::expected<key_view> key_service::generate(std::string_view key_id,
                                              std::string_view scheme_name) {
  if (auto err = validate_key_id(key_id))
    return err;
  auto s = parse_scheme_name(scheme_name);
  if (!s)
    return s.error();
  // Idempotent: a stored key is returned as it is; the HSM is not touched.
  auto existing = store_.get(key_id);
  if (!existing)
    return existing.error();
  if (*existing) {
    if ((*existing)->scheme != *s)
      return caf::make_error(key_errc::invalid_request,
                             "key_id '" + std::string{key_id}
                               + "' already holds a "
                               + std::string{to_string((*existing)->scheme)}
                               + " key");
    return make_key_view(**existing, false);
  }
  const auto& cap = caps_.of(*s);
  if (!cap.served)
    return scheme_not_served(cap);
  CK_OBJECT_HANDLE resident_handle = CK_INVALID_HANDLE;
  auto rec = make_key(sess_, master_, *s, key_id, cap.resident,
                      &resident_handle);
  if (!rec)
    return rec.error();
  // Durable before visible: the view is built from what the store committed.
  auto put = store_.put(*rec);
  if (!put || !put->inserted) {
    // The store failed, or another generation won: ours is never reported.
    if (resident_handle != CK_INVALID_HANDLE)
      static_cast<void>(sess_.destroy(resident_handle));
    if (!put)
      return put.error();
  }
  return make_key_view(put->record, put->inserted);
}

caf::expected<signature_view>
key_service::sign(std::string_view key_id, std::span<const uint8_t> payload) {
  auto rec = lookup(key_id);
  if (!rec)
    return rec.error();
  if (auto err = validate_payload(rec->scheme, payload))
    return err;
  const auto& cap = caps_.of(rec->scheme);
  if (!cap.served)
    return scheme_not_served(cap);
  auto raw = sign_with(sess_, master_, *rec, payload);
  if (!raw)
    return raw.error();
  auto sig = crypto::finish_signature(rec->scheme, rec->public_key, payload,
                                      *raw);
  if (!sig)
    return sig.error();
  return signature_view{rec->key_id, rec->scheme, std::move(*sig)};
}

caf::expected<key_view> key_service::show(std::string_view key_id) {
  auto rec = lookup(key_id);
  if (!rec)
    return rec.error();
  return make_key_view(*rec, false);
}

} // namespace hsm
