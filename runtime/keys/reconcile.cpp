#include "runtime/keys/reconcile.hpp"

#include "runtime/crypto/hex.hpp"
#include "runtime/keys/requests.hpp"

#include <algorithm>
#include <map>
#include <tuple>

namespace hsm::keys {

namespace {

/// Hex digits in a resident label's per-generation part (hsm_step.cpp,
/// `resident_label`: 8 random bytes).
constexpr size_t label_nonce_digits = 16;

/// The first listing asks for this many handles; doubled until the token
/// returns fewer than asked.
constexpr CK_ULONG first_batch = 256;

std::string as_text(const std::vector<uint8_t>& bytes) {
  return {bytes.begin(), bytes.end()};
}

/// Every private key token object: one C_FindObjects call per attempt,
/// with room for twice as many until the token returns fewer than asked.
caf::expected<std::vector<CK_OBJECT_HANDLE>>
list_private_keys(pkcs11::session& sess) {
  for (CK_ULONG max = first_batch;; max *= 2) {
    pkcs11::attributes tmpl;
    tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY).add_bool(CKA_TOKEN, true);
    auto found = sess.find(tmpl, max);
    if (!found)
      return found.error();
    if (found->size() < max)
      return found;
  }
}

/// The CKA_ID and CKA_LABEL of `h` as text.
caf::expected<std::pair<std::string, std::string>>
id_and_label(pkcs11::session& sess, CK_OBJECT_HANDLE h) {
  auto id = sess.attribute(h, CKA_ID);
  if (!id)
    return id.error();
  auto label = sess.attribute(h, CKA_LABEL);
  if (!label)
    return label.error();
  return std::make_pair(as_text(*id), as_text(*label));
}

bool to_destroy(const resident_object& obj, const reconcile_options& opts) {
  if (!opts.apply)
    return false;
  switch (obj.what) {
    case resident_class::loser:
      return true;
    case resident_class::orphan:
      return opts.include_orphans;
    case resident_class::kept:
      break;
  }
  return false;
}

} // namespace

std::string_view to_string(resident_class x) {
  switch (x) {
    case resident_class::kept:
      return "kept";
    case resident_class::loser:
      return "loser";
    case resident_class::orphan:
      break;
  }
  return "orphan";
}

bool is_resident_label(std::string_view key_id, std::string_view label) {
  if (key_id.empty() || label.size() != key_id.size() + 1 + label_nonce_digits
      || !label.starts_with(key_id) || label[key_id.size()] != '/')
    return false;
  auto nonce = label.substr(key_id.size() + 1);
  return std::all_of(nonce.begin(), nonce.end(), [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
  });
}

resident_class classify(std::string_view label,
                        const std::optional<key_record>& row) {
  if (!row)
    return resident_class::orphan;
  if (row->resident() && as_text(row->key_blob) == label)
    return resident_class::kept;
  return resident_class::loser;
}

size_t reconcile_report::count(resident_class x) const {
  return static_cast<size_t>(
    std::count_if(objects.begin(), objects.end(),
                  [x](const resident_object& o) { return o.what == x; }));
}

size_t reconcile_report::destroyed(resident_class x) const {
  return static_cast<size_t>(std::count_if(objects.begin(), objects.end(),
                                           [x](const resident_object& o) {
                                             return o.what == x && o.destroyed;
                                           }));
}

std::vector<std::string> reconcile_report::key_ids(resident_class x) const {
  std::vector<std::string> out;
  for (const auto& o : objects)
    if (o.what == x)
      out.push_back(o.key_id);
  return out;
}

caf::expected<reconcile_report>
reconcile_resident_keys(pkcs11::session& sess, store::key_store& st,
                        reconcile_options opts) {
  reconcile_report out;
  // 1. List and classify; any error here returns before anything is
  //    destroyed.
  auto handles = list_private_keys(sess);
  if (!handles)
    return handles.error();
  for (auto h : *handles) {
    auto attrs = id_and_label(sess, h);
    if (!attrs)
      return attrs.error();
    auto& [key_id, label] = *attrs;
    // validate_key_id refuses the probe's reserved ids.
    if (validate_key_id(key_id) || !is_resident_label(key_id, label)) {
      ++out.ignored;
      continue;
    }
    out.objects.push_back(resident_object{
      h, std::move(key_id), std::move(label), resident_class::orphan, false});
  }
  std::sort(out.objects.begin(), out.objects.end(),
            [](const resident_object& a, const resident_object& b) {
              return std::tie(a.key_id, a.label, a.handle)
                     < std::tie(b.key_id, b.label, b.handle);
            });
  std::map<std::string, std::optional<key_record>, std::less<>> rows;
  for (auto& obj : out.objects) {
    auto row = rows.find(obj.key_id);
    if (row == rows.end()) {
      auto got = st.get(obj.key_id);
      if (!got)
        return got.error();
      row = rows.emplace(obj.key_id, std::move(*got)).first;
    }
    obj.what = classify(obj.label, row->second);
  }
  // 2. Destroy what may go, by handle, each after checking that the handle
  //    still names the object listed.
  for (auto& obj : out.objects) {
    if (!to_destroy(obj, opts))
      continue;
    auto what = obj.key_id + " (" + obj.label + "): ";
    auto now = id_and_label(sess, obj.handle);
    if (!now) {
      out.failures.push_back(what + describe(now.error()));
      continue;
    }
    if (now->first != obj.key_id || now->second != obj.label) {
      out.failures.push_back(what
                             + "the object changed since it was "
                               "listed; left");
      continue;
    }
    if (auto err = sess.destroy(obj.handle)) {
      out.failures.push_back(what + describe(err));
      continue;
    }
    obj.destroyed = true;
  }
  return out;
}

} // namespace hsm::keys
