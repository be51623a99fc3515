#include "store/audit.hpp"

#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"

#include <utility>

namespace hsm::store {

namespace {

/// Domain separation: a hash of this encoding is never a hash of another.
constexpr std::string_view audit_domain = "hsm-driver audit row v1";

void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8)
    out.push_back(static_cast<uint8_t>(v >> shift));
}

void put_bytes(std::vector<uint8_t>& out, const void* data, size_t size) {
  put_u64(out, size);
  auto* p = static_cast<const uint8_t*>(data);
  out.insert(out.end(), p, p + size);
}

void put_text(std::vector<uint8_t>& out, std::string_view text) {
  put_bytes(out, text.data(), text.size());
}

} // namespace

std::vector<uint8_t> audit_genesis() {
  return std::vector<uint8_t>(32, 0);
}

std::vector<uint8_t> audit_hash(std::string_view driver_id, uint64_t seq,
                                const std::vector<uint8_t>& prev_hash,
                                const audit_entry& e) {
  std::vector<uint8_t> in;
  put_text(in, audit_domain);
  put_text(in, driver_id);
  put_u64(in, seq);
  put_bytes(in, prev_hash.data(), prev_hash.size());
  put_text(in, e.request_id);
  put_text(in, audit_kind_name(e.kind));
  put_text(in, e.key_id);
  put_text(in, e.public_key_fingerprint);
  put_bytes(in, e.payload_sha256.data(), e.payload_sha256.size());
  put_text(in, e.outcome);
  put_u64(in, static_cast<uint64_t>(e.at_ms));
  return crypto::sha256(in);
}

audit_row chain_next(std::string_view driver_id,
                     const std::optional<audit_row>& prev, audit_entry e) {
  audit_row row;
  row.driver_id = std::string{driver_id};
  row.seq = prev ? prev->seq + 1 : 1;
  row.prev_hash = prev ? prev->entry_hash : audit_genesis();
  row.entry = std::move(e);
  row.entry_hash = audit_hash(row.driver_id, row.seq, row.prev_hash, row.entry);
  return row;
}

void audit_checker::add(const audit_row& row) {
  auto where = row.driver_id + " seq " + std::to_string(row.seq);
  bool new_chain = !last_ || last_->driver_id != row.driver_id;
  if (new_chain) {
    report_.chains.push_back({row.driver_id, 0, 0, {}});
    if (row.seq != 1)
      report_.breaks.push_back(where + ": the chain starts at seq "
                               + std::to_string(row.seq) + " (rows 1.."
                               + std::to_string(row.seq - 1) + " are missing)");
    else if (row.prev_hash != audit_genesis())
      report_.breaks.push_back(where
                               + ": the first row does not start "
                                 "from the genesis hash");
  } else if (row.seq != last_->seq + 1) {
    report_.breaks.push_back(where + ": follows seq "
                             + std::to_string(last_->seq) + " (rows "
                             + std::to_string(last_->seq + 1) + ".."
                             + std::to_string(row.seq - 1) + " are missing)");
  } else if (row.prev_hash != last_->entry_hash) {
    report_.breaks.push_back(where
                             + ": its previous hash is not the hash "
                               "of seq "
                             + std::to_string(last_->seq));
  }
  if (audit_hash(row.driver_id, row.seq, row.prev_hash, row.entry)
      != row.entry_hash)
    report_.breaks.push_back(where
                             + ": the row does not match its hash "
                               "(edited)");
  auto& c = report_.chains.back();
  ++c.rows;
  c.head_seq = row.seq;
  c.head_hash = row.entry_hash;
  last_ = row;
}

audit_report audit_checker::finish() {
  last_.reset();
  return std::exchange(report_, {});
}

} // namespace hsm::store
