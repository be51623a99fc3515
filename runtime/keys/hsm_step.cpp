#include "runtime/keys/hsm_step.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/key_policy.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <openssl/crypto.h>
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

caf::expected<master_key_set> find_key_set(pkcs11::session& sess,
                                           std::string_view master_label) {
  auto master = pkcs11::find_master_key(sess, master_label);
  if (!master)
    return master.error();
  auto mac = pkcs11::find_row_mac_key(sess, master_label);
  if (!mac)
    return mac.error();
  auto trusted = pkcs11::is_trusted(sess, *master);
  if (!trusted)
    return trusted.error();
  return master_key_set{*master, *mac, std::string{master_label}, *trusted};
}

caf::expected<key_handles> find_key_handles(pkcs11::session& sess,
                                            std::string_view master_label) {
  master_key_plan plan;
  plan.current = std::string{master_label};
  return find_key_handles(sess, plan);
}

caf::expected<key_handles> find_key_handles(pkcs11::session& sess,
                                            const master_key_plan& plan) {
  auto cur = find_key_set(sess, plan.current);
  if (!cur)
    return cur.error();
  key_handles out;
  out.master = cur->master;
  out.row_mac = cur->row_mac;
  out.master_key_id = cur->label;
  out.master_trusted = cur->trusted;
  out.retired = plan.retired;
  out.allow_weak = plan.allow_weak;
  if (!plan.previous.empty() && plan.previous != plan.current) {
    // The source of a rotation may be a legacy key without a row-MAC key:
    // its rows are then all of format 1, which are not served anyway.
    auto prev = find_key_set(sess, plan.previous);
    if (!prev && prev.error() == key_errc::master_key_missing) {
      auto master = pkcs11::find_master_key(sess, plan.previous);
      if (!master)
        return master.error();
      prev = master_key_set{*master, CK_INVALID_HANDLE, plan.previous, false};
    }
    if (!prev)
      return prev.error();
    out.others.push_back(std::move(*prev));
  }
  return out;
}

namespace {

/// At most this many master keys found after start are kept: a rotation
/// adds one; more means rows name keys nobody rotated to.
constexpr size_t max_other_sets = 4;

} // namespace

caf::expected<master_key_set>
key_set_for(pkcs11::session& sess, key_handles& keys, std::string_view label) {
  if (label.empty() || label == keys.master_key_id)
    return keys.current();
  for (auto& set : keys.others)
    if (set.label == label)
      return set;
  auto refused = [&](std::string why) {
    return caf::make_error(key_errc::key_corrupted,
                           "master key '" + printable(label) + "': " + why);
  };
  for (auto& r : keys.retired)
    if (r == label)
      return refused("retired by a completed rotation; its rows are not "
                     "served");
  if (keys.others.size() >= max_other_sets)
    return refused("not one of the master keys this driver serves");
  auto set = find_key_set(sess, label);
  if (!set) {
    if (set.error() == key_errc::master_key_missing)
      return caf::make_error(key_errc::key_not_on_this_hsm,
                             "master key '" + printable(label)
                               + "': this token does not hold it (or its "
                                 "row-MAC key); a rotation moved rows to "
                                 "it: put it on every driver's HSM");
    return set.error();
  }
  auto weak = pkcs11::inspect_master_key(sess, set->master);
  if (!weak)
    return weak.error();
  if (!weak->empty() && !keys.allow_weak)
    return caf::make_error(key_errc::master_key_weak,
                           "master key '" + printable(label)
                             + "' lets a wrapped key leave the HSM: "
                             + pkcs11::describe(*weak));
  keys.others.push_back(*set);
  return std::move(*set);
}

namespace {

void append_field(std::vector<uint8_t>& out, std::span<const uint8_t> field) {
  auto n = static_cast<uint32_t>(field.size());
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<uint8_t>(n >> shift));
  out.insert(out.end(), field.begin(), field.end());
}

void append_text(std::vector<uint8_t>& out, std::string_view text) {
  append_field(out,
               {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

caf::error row_refused(const key_record& rec, std::string why) {
  return caf::make_error(key_errc::key_corrupted,
                         "key '" + rec.key_id + "': " + std::move(why));
}

} // namespace

caf::expected<std::vector<uint8_t>> compute_row_mac(pkcs11::session& sess,
                                                    const master_key_set& set,
                                                    const key_record& rec) {
  return sess.sign(CKM_SHA256_HMAC, set.row_mac, row_mac_input(rec));
}

std::vector<uint8_t> row_mac_input(const key_record& rec) {
  std::vector<uint8_t> out;
  out.reserve(64 + rec.key_id.size() + rec.public_key.size()
              + rec.key_blob.size() + rec.master_key_id.size());
  append_text(out, "hsm-driver key row");
  append_text(out, std::to_string(rec.format_version));
  append_text(out, rec.key_id);
  append_text(out, to_string(rec.scheme));
  append_field(out, rec.public_key);
  append_text(out, rec.wrap_mechanism);
  append_text(out, rec.master_key_id);
  append_field(out, rec.key_blob);
  return out;
}

caf::expected<master_key_set>
check_row(pkcs11::session& sess, key_handles& keys, const key_record& rec) {
  if (rec.format_version != current_row_format)
    return row_refused(rec, "row format " + std::to_string(rec.format_version)
                              + " is not served (this driver reads format "
                              + std::to_string(current_row_format)
                              + "; format-1 rows are sealed by 'hsm-driver "
                                "master-key rotate')");
  if (!rec.resident()) {
    if (rec.wrap_mechanism != aes_key_wrap_pad)
      return row_refused(rec, "unknown wrap mechanism '"
                                + printable(rec.wrap_mechanism) + "'");
    if (rec.master_key_id.empty())
      return row_refused(rec, "a wrapped row names no master key");
  }
  auto set = key_set_for(sess, keys, rec.master_key_id);
  if (!set) {
    if (set.error() == key_errc::key_corrupted)
      return row_refused(rec, describe(set.error()));
    return set.error();
  }
  if (set->row_mac == CK_INVALID_HANDLE)
    return row_refused(rec, "master key '" + set->label
                              + "' has no row-MAC key on this token");
  auto mac = compute_row_mac(sess, *set, rec);
  if (!mac)
    return mac.error();
  if (rec.row_mac.size() != mac->size()
      || CRYPTO_memcmp(rec.row_mac.data(), mac->data(), mac->size()) != 0)
    return row_refused(rec, "the row MAC does not match: the row was changed "
                            "or belongs to another key id; nothing was "
                            "unwrapped");
  return set;
}

caf::expected<key_record>
make_key(pkcs11::session& sess, key_handles& keys, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle, pkcs11::ed25519_params form) {
  if (resident_handle != nullptr)
    *resident_handle = CK_INVALID_HANDLE;
  key_record rec;
  rec.key_id = std::string{key_id};
  rec.scheme = s;
  rec.created_at_ms = now_ms();
  rec.format_version = current_row_format;
  if (resident) {
    auto label = resident_label(key_id);
    std::vector<uint8_t> id{key_id.begin(), key_id.end()};
    auto key = pkcs11::generate_resident(sess, s, id, label, form);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob.assign(label.begin(), label.end());
    rec.wrap_mechanism = std::string{resident_mechanism};
    rec.master_key_id = keys.master_key_id;
    if (resident_handle != nullptr)
      *resident_handle = key->handle;
  } else {
    auto key = pkcs11::generate_wrapped(sess, keys.master, s,
                                        keys.master_trusted, form);
    if (!key)
      return key.error();
    rec.public_key = std::move(key->public_key);
    rec.key_blob = std::move(key->wrapped_key);
    rec.wrap_mechanism = std::string{aes_key_wrap_pad};
    rec.master_key_id = keys.master_key_id;
  }
  auto mac = compute_row_mac(sess, keys.current(), rec);
  if (!mac)
    return mac.error();
  rec.row_mac = std::move(*mac);
  // The key proves itself through the path a real signature takes.
  auto payload = fixed_payload(s, "hsm-driver new key self-test");
  auto raw = sign_with(sess, keys, rec, payload);
  if (!raw)
    return raw.error();
  if (auto sig = crypto::finish_signature(s, rec.public_key, payload, *raw);
      !sig)
    return caf::make_error(hsm_errc::retryable,
                           "key '" + rec.key_id
                             + "': the new key's self-test signature does not "
                               "verify against its public key: "
                             + describe(sig.error()));
  return rec;
}

caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, key_handles& keys, const key_record& rec,
          std::span<const uint8_t> payload) {
  auto set = check_row(sess, keys, rec);
  if (!set)
    return set.error();
  if (rec.resident()) {
    std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
    std::string label{rec.key_blob.begin(), rec.key_blob.end()};
    return pkcs11::sign_resident(sess, rec.scheme, id, label, payload);
  }
  return pkcs11::sign_wrapped(sess, set->master, rec.scheme, rec.key_blob,
                              payload);
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
