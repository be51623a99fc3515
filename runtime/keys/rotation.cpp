#include "runtime/keys/rotation.hpp"

#include "runtime/crypto/signature.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rewrap.hpp"

#include <openssl/crypto.h>

namespace hsm::keys {

namespace {

/// Failures listed by name in a tally; the rest are counted.
constexpr size_t max_listed_failures = 20;

caf::error refused(const key_record& rec, std::string why) {
  return caf::make_error(key_errc::key_corrupted,
                         "key '" + printable(rec.key_id) + "': " + why);
}

/// A signature through `rec`'s key (resident, or its blob under `master`)
/// that verifies against the row's public key.
caf::error prove_by_signature(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                              const key_record& rec) {
  auto payload = fixed_payload(rec.scheme, "hsm-driver rotation check");
  caf::expected<std::vector<uint8_t>> raw{std::vector<uint8_t>{}};
  if (rec.resident()) {
    std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
    std::string label{rec.key_blob.begin(), rec.key_blob.end()};
    raw = pkcs11::sign_resident(sess, rec.scheme, id, label, payload);
  } else {
    raw = pkcs11::sign_wrapped(sess, master, rec.scheme, rec.key_blob, payload);
  }
  if (!raw)
    return raw.error();
  if (auto sig = crypto::finish_signature(rec.scheme, rec.public_key, payload,
                                          *raw);
      !sig)
    return refused(rec, "its key does not sign for its public key");
  return caf::none;
}

/// Proves a row under `from` before anything of it moves: a format-2 row
/// by its MAC, a format-1 row (no MAC) by a signature.
caf::error prove_source(pkcs11::session& sess, const master_key_set& from,
                        const key_record& rec) {
  if (!rec.resident() && rec.wrap_mechanism != aes_key_wrap_pad)
    return refused(rec, "unknown wrap mechanism '"
                          + printable(rec.wrap_mechanism) + "'");
  if (rec.format_version == 1)
    return prove_by_signature(sess, from.master, rec);
  if (rec.format_version != current_row_format)
    return refused(rec,
                   "unknown row format " + std::to_string(rec.format_version));
  bool ours = rec.master_key_id == from.label
              || (rec.resident() && rec.master_key_id.empty());
  if (!ours)
    return refused(rec, "names master key '" + printable(rec.master_key_id)
                          + "', not '" + from.label + "'");
  auto mac = compute_row_mac(sess, from, rec);
  if (!mac)
    return mac.error();
  if (mac->size() != rec.row_mac.size()
      || CRYPTO_memcmp(mac->data(), rec.row_mac.data(), mac->size()) != 0)
    return refused(rec, "the row MAC does not match; the row is left as it "
                        "is");
  return caf::none;
}

/// The row as it will be under `to`, proved through the path a real
/// signature takes.
caf::expected<key_record>
moved_row(pkcs11::session& sess, const master_key_set& from,
          const master_key_set& to, const key_record& rec) {
  key_record next = rec;
  next.format_version = current_row_format;
  next.master_key_id = to.label;
  if (!rec.resident() && from.master != to.master) {
    auto blob = pkcs11::rewrap(sess, from.master, to.master, rec.scheme,
                               rec.key_blob);
    if (!blob)
      return blob.error();
    next.key_blob = std::move(*blob);
  }
  auto mac = compute_row_mac(sess, to, next);
  if (!mac)
    return mac.error();
  next.row_mac = std::move(*mac);
  key_handles target;
  target.master = to.master;
  target.row_mac = to.row_mac;
  target.master_key_id = to.label;
  auto payload = fixed_payload(rec.scheme, "hsm-driver rotation check");
  auto raw = sign_with(sess, target, next, payload);
  if (!raw)
    return raw.error();
  if (auto sig = crypto::finish_signature(rec.scheme, rec.public_key, payload,
                                          *raw);
      !sig)
    return refused(rec, "the re-wrapped key does not sign for its public "
                        "key; the row is left as it is");
  return next;
}

/// A per-row failure (the row is left and listed) rather than one that
/// ends the pass (session, store, a master key that cannot give up keys).
bool row_failure(const caf::error& err) {
  return err.category() == caf::atom("key");
}

caf::expected<bool>
move_canary(pkcs11::session& sess, const master_key_set& from,
            const master_key_set& to, store::key_store& st) {
  auto c = st.get_canary();
  if (!c)
    return c.error();
  if (!*c || (*c)->master_key_label != from.label || from.label == to.label)
    return false;
  auto next = **c;
  auto blob = pkcs11::rewrap(sess, from.master, to.master, scheme::p256,
                             next.wrapped_key);
  if (!blob)
    return blob.error();
  next.wrapped_key = std::move(*blob);
  next.master_key_label = to.label;
  auto payload = fixed_payload(scheme::p256, "hsm-driver master-key canary");
  auto raw = pkcs11::sign_wrapped(sess, to.master, scheme::p256,
                                  next.wrapped_key, payload);
  if (!raw)
    return raw.error();
  if (auto sig = crypto::finish_signature(scheme::p256, next.public_key,
                                          payload, *raw);
      !sig)
    return caf::make_error(key_errc::master_key_mismatch,
                           std::string{"the re-wrapped canary does not sign "
                                       "for its public key"});
  return st.replace_canary(**c, next);
}

} // namespace

caf::expected<uint64_t> rows_left(store::key_store& st, std::string_view to) {
  auto counts = st.count_rows();
  if (!counts)
    return counts.error();
  uint64_t n = 0;
  for (auto& c : *counts)
    if (c.format_version != current_row_format || c.master_key_id != to)
      n += c.rows;
  return n;
}

caf::expected<rotation_tally>
rotate_rows(pkcs11::session& sess, const master_key_set& from,
            const master_key_set& to, store::key_store& st, size_t batch,
            const std::function<void(const rotation_tally&)>& progress) {
  rotation_tally tally;
  auto canary = move_canary(sess, from, to, st);
  if (!canary)
    return canary.error();
  tally.canary_moved = *canary;
  std::string after;
  for (;;) {
    auto rows = st.pending_rows(to.label, after, batch == 0 ? 1 : batch);
    if (!rows)
      return rows.error();
    if (rows->empty())
      break;
    after = rows->back().key_id;
    for (auto& rec : *rows) {
      auto err = prove_source(sess, from, rec);
      caf::expected<key_record> next{caf::error{}};
      if (!err) {
        next = moved_row(sess, from, to, rec);
        if (!next)
          err = next.error();
      }
      if (err) {
        if (!row_failure(err))
          return err;
        if (tally.failures.size() < max_listed_failures)
          tally.failures.push_back(describe(err));
        else if (tally.failures.size() == max_listed_failures)
          tally.failures.emplace_back("... (more rows failed; see the log)");
        continue;
      }
      auto swapped = st.replace_row(rec, *next);
      if (!swapped)
        return swapped.error();
      if (!*swapped)
        ++tally.raced;
      else if (rec.resident() || from.master == to.master)
        ++tally.resealed;
      else
        ++tally.rewrapped;
    }
    if (progress)
      progress(tally);
  }
  auto left = rows_left(st, to.label);
  if (!left)
    return left.error();
  tally.remaining = *left;
  return tally;
}

} // namespace hsm::keys
