#include "runtime/keys/db_check.hpp"

#include "runtime/crypto/signature.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"

#include <openssl/crypto.h>

namespace hsm::keys {

namespace {

/// What `verify_row` signs: the same for every row, so that a signature
/// can be nothing but a test signature.
constexpr std::string_view test_digest_text = "hsm-driver db verify";

/// True if `mac` equals the MAC `set` makes over `rec`; nullopt if the
/// HSM could not make it (`err` set).
std::optional<bool> mac_matches(pkcs11::session& sess,
                                const master_key_set& set,
                                const key_record& rec, caf::error& err) {
  auto mac = compute_row_mac(sess, set, rec);
  if (!mac) {
    err = mac.error();
    return std::nullopt;
  }
  return rec.row_mac.size() == mac->size()
         && CRYPTO_memcmp(rec.row_mac.data(), mac->data(), mac->size()) == 0;
}

} // namespace

std::string_view to_string(row_fault f) {
  switch (f) {
    case row_fault::unsupported_format:
      return "unsupported_format";
    case row_fault::unknown_master_key:
      return "unknown_master_key";
    case row_fault::mac_broken:
      return "mac_broken";
    case row_fault::key_id_binding:
      return "key_id_binding";
    case row_fault::unwrap_failed:
      return "unwrap_failed";
    case row_fault::signature_mismatch:
      return "signature_mismatch";
    case row_fault::resident_missing:
      return "resident_missing";
  }
  return "unknown";
}

caf::expected<row_verdict> verify_row(pkcs11::session& sess, key_handles& keys,
                                      const key_record& rec) {
  row_verdict out;
  if (!rec.resident() && rec.wrap_mechanism != aes_key_wrap_pad) {
    out.add(row_fault::unsupported_format,
            "unknown wrap mechanism '" + printable(rec.wrap_mechanism) + "'");
    return out;
  }
  if (rec.format_version != current_row_format)
    out.add(row_fault::unsupported_format,
            "row format " + std::to_string(rec.format_version)
              + " is not served (format-1 rows are sealed by 'hsm-driver "
                "master-key rotate')");
  auto set = key_set_for(sess, keys, rec.master_key_id);
  if (!set) {
    if (pkcs11::session_gone(set.error()))
      return set.error();
    out.add(row_fault::unknown_master_key, describe(set.error()));
    return out;
  }
  // The MAC of a sealed row.
  std::optional<bool> mac_ok;
  if (rec.format_version == current_row_format) {
    if (set->row_mac == CK_INVALID_HANDLE) {
      out.add(row_fault::unknown_master_key,
              "master key '" + set->label
                + "' has no row-MAC key on this token");
      return out;
    }
    caf::error err;
    mac_ok = mac_matches(sess, *set, rec, err);
    if (!mac_ok)
      return err;
    // The MAC is checked before any unwrap (DESIGN, invariants): a row that
    // fails it is never handed to the HSM.
    if (!*mac_ok) {
      out.add(row_fault::mac_broken,
              "the row MAC does not hold: the row was changed (its key id, "
              "blob, public key, another field or the MAC itself); not "
              "unwrapped");
      return out;
    }
  }
  // The key itself: a test signature inside the HSM, verified here.
  auto payload = fixed_payload(rec.scheme, test_digest_text);
  caf::expected<std::vector<uint8_t>> raw{std::vector<uint8_t>{}};
  if (rec.resident()) {
    std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
    std::string label{rec.key_blob.begin(), rec.key_blob.end()};
    raw = pkcs11::sign_resident(sess, rec.scheme, id, label, payload);
  } else {
    raw = pkcs11::sign_wrapped(sess, set->master, rec.scheme, rec.key_blob,
                               payload);
  }
  if (!raw) {
    const auto& err = raw.error();
    auto fn = pkcs11::function_of(err);
    if (rec.resident() && err == key_errc::key_not_on_this_hsm)
      out.add(row_fault::resident_missing,
              "this token holds no key object with the row's key id and "
              "label (a token-resident key lives in one HSM): "
                + describe(err));
    else if (pkcs11::session_gone(err))
      return err;
    else if (!rec.resident()
             && (err == key_errc::key_corrupted || fn == "C_UnwrapKey"))
      out.add(row_fault::unwrap_failed,
              "the HSM refused to unwrap the blob under master key '"
                + set->label + "': " + describe(err));
    else
      out.add(row_fault::signature_mismatch,
              "the HSM could not sign with the key: " + describe(err));
  } else if (auto sig = crypto::finish_signature(rec.scheme, rec.public_key,
                                                 payload, *raw);
             !sig) {
    out.add(row_fault::signature_mismatch,
            "the key's test signature does not verify against the stored "
            "public key: the blob belongs to another key, or the public key "
            "was changed");
  } else {
    out.key_pair_intact = true;
  }
  return out;
}

bool mac_holds_for(pkcs11::session& sess, key_handles& keys,
                   const key_record& rec, std::string_view other_key_id) {
  auto set = key_set_for(sess, keys, rec.master_key_id);
  if (!set || set->row_mac == CK_INVALID_HANDLE)
    return false;
  auto moved = rec;
  moved.key_id = std::string{other_key_id};
  caf::error err;
  auto ok = mac_matches(sess, *set, moved, err);
  return ok && *ok;
}

} // namespace hsm::keys
