#include "runtime/pkcs11/key_policy.hpp"

#include "runtime/pkcs11/rv.hpp"

#include <cstring>
#include <optional>

namespace hsm::pkcs11 {

attributes unwrap_policy() {
  attributes t;
  t.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
    .add_bool(CKA_SENSITIVE, true)
    .add_bool(CKA_EXTRACTABLE, false);
  return t;
}

attributes wrap_policy() {
  attributes t;
  t.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY).add_bool(CKA_SENSITIVE, true);
  return t;
}

namespace {

/// What the master key and the row-MAC key share: a secret key on the
/// token, private, sensitive, never extractable, changeable or copyable.
attributes sealed_secret_key(std::string_view label, CK_KEY_TYPE type) {
  attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_SECRET_KEY)
    .add_ulong(CKA_KEY_TYPE, type)
    .add_text(CKA_LABEL, label)
    .add_bool(CKA_TOKEN, true)
    .add_bool(CKA_PRIVATE, true)
    .add_bool(CKA_SENSITIVE, true)
    .add_bool(CKA_EXTRACTABLE, false)
    .add_bool(CKA_MODIFIABLE, false)
    .add_bool(CKA_COPYABLE, false);
  return tmpl;
}

} // namespace

attributes master_key_template(std::string_view label) {
  auto tmpl = sealed_secret_key(label, CKK_AES);
  tmpl.add_bool(CKA_WRAP, true)
    .add_bool(CKA_UNWRAP, true)
    .add_bool(CKA_ENCRYPT, false)
    .add_bool(CKA_DECRYPT, false)
    .add_bool(CKA_SIGN, false)
    .add_bool(CKA_VERIFY, false)
    .add_bool(CKA_DERIVE, false)
    .add_template(CKA_UNWRAP_TEMPLATE, unwrap_policy())
    .add_template(CKA_WRAP_TEMPLATE, wrap_policy());
  return tmpl;
}

attributes row_mac_key_template(std::string_view label) {
  auto tmpl = sealed_secret_key(label, CKK_GENERIC_SECRET);
  tmpl.add_bool(CKA_SIGN, true)
    .add_bool(CKA_VERIFY, true)
    .add_bool(CKA_ENCRYPT, false)
    .add_bool(CKA_DECRYPT, false)
    .add_bool(CKA_WRAP, false)
    .add_bool(CKA_UNWRAP, false)
    .add_bool(CKA_DERIVE, false);
  return tmpl;
}

namespace {

/// A CK_BBOOL attribute; nullopt when the token does not report it.
caf::expected<std::optional<bool>> read_bool(session& s, CK_OBJECT_HANDLE key,
                                             CK_ATTRIBUTE_TYPE type) {
  auto v = s.attribute(key, type);
  if (!v) {
    if (rv_of(v.error()) == CKR_ATTRIBUTE_TYPE_INVALID
        || rv_of(v.error()) == CKR_ATTRIBUTE_SENSITIVE)
      return std::optional<bool>{};
    return v.error();
  }
  if (v->size() != sizeof(CK_BBOOL))
    return std::optional<bool>{};
  return std::optional<bool>{(*v)[0] != CK_FALSE};
}

} // namespace

caf::expected<bool> is_trusted(session& s, CK_OBJECT_HANDLE key) {
  auto v = read_bool(s, key, CKA_TRUSTED);
  if (!v)
    return v.error();
  return v->value_or(false);
}

namespace {

const char* text(bool b) {
  return b ? "TRUE" : "FALSE";
}

/// True if `entries` holds `type` with exactly `value`.
bool holds(const std::vector<attribute_value>& entries, CK_ATTRIBUTE_TYPE type,
           std::span<const uint8_t> value) {
  for (auto& e : entries)
    if (e.type == type)
      return e.value.size() == value.size()
             && std::memcmp(e.value.data(), value.data(), value.size()) == 0;
  return false;
}

std::vector<uint8_t> ulong_bytes(CK_ULONG v) {
  std::vector<uint8_t> out(sizeof(CK_ULONG));
  std::memcpy(out.data(), &v, sizeof(CK_ULONG));
  return out;
}

std::vector<uint8_t> bool_bytes(bool b) {
  return {static_cast<uint8_t>(b ? CK_TRUE : CK_FALSE)};
}

/// Checks a template-valued attribute for the entries the policy needs.
caf::error check_template(session& s, CK_OBJECT_HANDLE key,
                          CK_ATTRIBUTE_TYPE type, const char* name,
                          bool want_non_extractable,
                          std::vector<weakness>& out) {
  std::string wanted = "{CKA_CLASS=CKO_PRIVATE_KEY, CKA_SENSITIVE=TRUE";
  wanted += want_non_extractable ? ", CKA_EXTRACTABLE=FALSE}" : "}";
  auto entries = s.template_attribute(key, type);
  if (!entries) {
    if (rv_of(entries.error()) == CKR_ATTRIBUTE_TYPE_INVALID) {
      out.push_back({name, "absent", wanted});
      return caf::none;
    }
    return entries.error();
  }
  bool ok = holds(*entries, CKA_CLASS, ulong_bytes(CKO_PRIVATE_KEY))
            && holds(*entries, CKA_SENSITIVE, bool_bytes(true))
            && (!want_non_extractable
                || holds(*entries, CKA_EXTRACTABLE, bool_bytes(false)));
  if (!ok)
    out.push_back({name,
                   entries->empty()
                     ? std::string{"empty"}
                     : std::to_string(entries->size()) + " entries, not these",
                   wanted});
  return caf::none;
}

} // namespace

caf::expected<std::vector<weakness>> inspect_master_key(session& s,
                                                        CK_OBJECT_HANDLE key) {
  struct flag {
    CK_ATTRIBUTE_TYPE type;
    const char* name;
    bool wanted;
  };
  // Each of these, the other way round, lets a blob leave the HSM: read the
  // key, copy or change it into one that decrypts, or use it to decrypt.
  static constexpr flag flags[] = {
    {CKA_SENSITIVE, "CKA_SENSITIVE", true},
    {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false},
    {CKA_MODIFIABLE, "CKA_MODIFIABLE", false},
    {CKA_COPYABLE, "CKA_COPYABLE", false},
    {CKA_DECRYPT, "CKA_DECRYPT", false},
    {CKA_ENCRYPT, "CKA_ENCRYPT", false},
    {CKA_DERIVE, "CKA_DERIVE", false},
  };
  std::vector<weakness> out;
  for (auto& f : flags) {
    auto v = read_bool(s, key, f.type);
    if (!v)
      return v.error();
    if (!*v)
      out.push_back({f.name, "not reported", text(f.wanted)});
    else if (**v != f.wanted)
      out.push_back({f.name, text(**v), text(f.wanted)});
  }
  if (auto err = check_template(s, key, CKA_UNWRAP_TEMPLATE,
                                "CKA_UNWRAP_TEMPLATE", true, out))
    return err;
  if (auto err = check_template(s, key, CKA_WRAP_TEMPLATE, "CKA_WRAP_TEMPLATE",
                                false, out))
    return err;
  return out;
}

std::string describe(const std::vector<weakness>& found) {
  std::string out;
  for (auto& w : found) {
    if (!out.empty())
      out += "; ";
    out += w.attribute + " is " + w.found + " (must be " + w.wanted + ")";
  }
  return out;
}

std::string weak_master_key_advice() {
  return "a key's attributes cannot be changed once it exists: create a "
         "master key with 'hsm-driver master-key init' (or the HSM vendor's "
         "tools with the same attributes; on a network HSM the partition "
         "policy must refuse private-key export and unwrapping into "
         "extractable or non-sensitive keys) and re-wrap every row under "
         "it; until then '--allow-weak-master-key' starts the driver with "
         "this key, loudly";
}

} // namespace hsm::pkcs11
