#include "runtime/pkcs11/session.hpp"

#include "runtime/pkcs11/rv.hpp"

#include <cstring>

namespace hsm::pkcs11 {

// -- attributes ---------------------------------------------------------------

CK_ATTRIBUTE& attributes::push(CK_ATTRIBUTE_TYPE type,
                               std::vector<uint8_t> value) {
  auto& stored = values_.emplace_back(std::move(value));
  CK_ATTRIBUTE attr{};
  attr.type = type;
  attr.pValue = stored.empty() ? nullptr : stored.data();
  attr.ulValueLen = static_cast<CK_ULONG>(stored.size());
  return attrs_.emplace_back(attr);
}

attributes& attributes::add_bool(CK_ATTRIBUTE_TYPE type, bool value) {
  push(type, {static_cast<uint8_t>(value ? CK_TRUE : CK_FALSE)});
  return *this;
}

attributes& attributes::add_ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value) {
  std::vector<uint8_t> buf(sizeof(CK_ULONG));
  std::memcpy(buf.data(), &value, sizeof(CK_ULONG));
  push(type, std::move(buf));
  return *this;
}

attributes& attributes::add_bytes(CK_ATTRIBUTE_TYPE type,
                                  std::span<const uint8_t> value) {
  push(type, {value.begin(), value.end()});
  return *this;
}

attributes& attributes::add_text(CK_ATTRIBUTE_TYPE type,
                                 std::string_view value) {
  push(type, {value.begin(), value.end()});
  return *this;
}

attributes& attributes::add_template(CK_ATTRIBUTE_TYPE type,
                                     attributes nested) {
  // The nested array moves with its vector's buffer: the pointer stays
  // valid for as long as this object lives.
  auto& kept = nested_.emplace_back(std::move(nested));
  CK_ATTRIBUTE attr{};
  attr.type = type;
  attr.pValue = kept.attrs_.empty() ? nullptr : kept.attrs_.data();
  attr.ulValueLen = static_cast<CK_ULONG>(kept.attrs_.size()
                                          * sizeof(CK_ATTRIBUTE));
  attrs_.push_back(attr);
  return *this;
}

// -- session ------------------------------------------------------------------

namespace {

CK_ULONG ulong_size(size_t n) {
  return static_cast<CK_ULONG>(n);
}

// PKCS#11 takes non-const pointers for input buffers it does not modify.
CK_BYTE* input_bytes(std::span<const uint8_t> data) {
  return const_cast<CK_BYTE*>(data.data());
}

} // namespace

caf::expected<session> session::open(const module& mod, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  auto rv = mod.fns().open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                   &h);
  if (rv != CKR_OK)
    return rv_error("C_OpenSession", rv);
  return session{&mod.fns(), h};
}

session::session(session&& other) noexcept
  : fns_(other.fns_), handle_(std::exchange(other.handle_, CK_INVALID_HANDLE)) {
  // nop
}

session& session::operator=(session&& other) noexcept {
  if (this != &other) {
    if (handle_ != CK_INVALID_HANDLE)
      fns_->close_session(handle_);
    fns_ = other.fns_;
    handle_ = std::exchange(other.handle_, CK_INVALID_HANDLE);
  }
  return *this;
}

session::~session() {
  if (handle_ != CK_INVALID_HANDLE)
    fns_->close_session(handle_);
}

CK_SESSION_HANDLE session::release() noexcept {
  return std::exchange(handle_, CK_INVALID_HANDLE);
}

caf::error session::login_as(CK_USER_TYPE user, const secret_pin& pin) {
  auto* chars = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin.data()));
  auto rv = fns_->login(handle_, user, chars, ulong_size(pin.size()));
  if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN)
    return caf::none;
  return rv_error("C_Login", rv);
}

caf::error session::login(const secret_pin& pin) {
  return login_as(CKU_USER, pin);
}

caf::error session::login_so(const secret_pin& pin) {
  return login_as(CKU_SO, pin);
}

caf::expected<std::vector<CK_OBJECT_HANDLE>> session::find(attributes& tmpl,
                                                           CK_ULONG max) {
  if (auto rv = fns_->find_objects_init(handle_, tmpl.data(), tmpl.size());
      rv != CKR_OK)
    return rv_error("C_FindObjectsInit", rv);
  std::vector<CK_OBJECT_HANDLE> found(max);
  CK_ULONG n = 0;
  auto rv = fns_->find_objects(handle_, found.data(), max, &n);
  auto rv_final = fns_->find_objects_final(handle_);
  if (rv != CKR_OK)
    return rv_error("C_FindObjects", rv);
  if (rv_final != CKR_OK)
    return rv_error("C_FindObjectsFinal", rv_final);
  found.resize(n);
  return found;
}

caf::expected<std::vector<uint8_t>> session::attribute(CK_OBJECT_HANDLE obj,
                                                       CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attr{type, nullptr, 0};
  if (auto rv = fns_->get_attribute_value(handle_, obj, &attr, 1); rv != CKR_OK)
    return rv_error("C_GetAttributeValue", rv);
  if (attr.ulValueLen == CK_UNAVAILABLE_INFORMATION)
    return rv_error("C_GetAttributeValue", CKR_ATTRIBUTE_TYPE_INVALID);
  std::vector<uint8_t> value(attr.ulValueLen);
  attr.pValue = value.data();
  if (auto rv = fns_->get_attribute_value(handle_, obj, &attr, 1); rv != CKR_OK)
    return rv_error("C_GetAttributeValue", rv);
  value.resize(attr.ulValueLen);
  return value;
}

caf::expected<std::vector<attribute_value>>
session::template_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) {
  // Three calls: the number of entries, the length of each, the values.
  CK_ATTRIBUTE outer{type, nullptr, 0};
  if (auto rv = fns_->get_attribute_value(handle_, obj, &outer, 1);
      rv != CKR_OK)
    return rv_error("C_GetAttributeValue", rv);
  if (outer.ulValueLen == CK_UNAVAILABLE_INFORMATION)
    return rv_error("C_GetAttributeValue", CKR_ATTRIBUTE_TYPE_INVALID);
  std::vector<CK_ATTRIBUTE> entries(outer.ulValueLen / sizeof(CK_ATTRIBUTE));
  outer.pValue = entries.data();
  outer.ulValueLen = ulong_size(entries.size() * sizeof(CK_ATTRIBUTE));
  if (auto rv = fns_->get_attribute_value(handle_, obj, &outer, 1);
      rv != CKR_OK)
    return rv_error("C_GetAttributeValue", rv);
  std::vector<attribute_value> out(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].ulValueLen == CK_UNAVAILABLE_INFORMATION)
      return rv_error("C_GetAttributeValue", CKR_ATTRIBUTE_TYPE_INVALID);
    out[i].type = entries[i].type;
    out[i].value.resize(entries[i].ulValueLen);
    entries[i].pValue = out[i].value.empty() ? nullptr : out[i].value.data();
  }
  if (!entries.empty()) {
    if (auto rv = fns_->get_attribute_value(handle_, obj, &outer, 1);
        rv != CKR_OK)
      return rv_error("C_GetAttributeValue", rv);
  }
  return out;
}

caf::error session::set_attributes(CK_OBJECT_HANDLE obj, attributes& tmpl) {
  if (auto rv = fns_->set_attribute_value(handle_, obj, tmpl.data(),
                                          tmpl.size());
      rv != CKR_OK)
    return rv_error("C_SetAttributeValue", rv);
  return caf::none;
}

caf::expected<CK_OBJECT_HANDLE> session::generate_key(CK_MECHANISM_TYPE mech,
                                                      attributes& tmpl) {
  CK_MECHANISM m{mech, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  if (auto rv = fns_->generate_key(handle_, &m, tmpl.data(), tmpl.size(), &key);
      rv != CKR_OK)
    return rv_error("C_GenerateKey", rv);
  return key;
}

caf::expected<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>
session::generate_key_pair(CK_MECHANISM_TYPE mech, attributes& pub,
                           attributes& priv) {
  CK_MECHANISM m{mech, nullptr, 0};
  CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE hpriv = CK_INVALID_HANDLE;
  if (auto rv = fns_->generate_key_pair(handle_, &m, pub.data(), pub.size(),
                                        priv.data(), priv.size(), &hpub,
                                        &hpriv);
      rv != CKR_OK)
    return rv_error("C_GenerateKeyPair", rv);
  return std::make_pair(hpub, hpriv);
}

caf::expected<CK_OBJECT_HANDLE> session::create(attributes& tmpl) {
  CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
  if (auto rv = fns_->create_object(handle_, tmpl.data(), tmpl.size(), &obj);
      rv != CKR_OK)
    return rv_error("C_CreateObject", rv);
  return obj;
}

caf::expected<std::vector<uint8_t>> session::wrap(CK_MECHANISM_TYPE mech,
                                                  CK_OBJECT_HANDLE wrapping_key,
                                                  CK_OBJECT_HANDLE key) {
  CK_MECHANISM m{mech, nullptr, 0};
  CK_ULONG len = 0;
  if (auto rv = fns_->wrap_key(handle_, &m, wrapping_key, key, nullptr, &len);
      rv != CKR_OK)
    return rv_error("C_WrapKey", rv);
  std::vector<uint8_t> out(len);
  if (auto rv = fns_->wrap_key(handle_, &m, wrapping_key, key, out.data(),
                               &len);
      rv != CKR_OK)
    return rv_error("C_WrapKey", rv);
  out.resize(len);
  return out;
}

caf::expected<CK_OBJECT_HANDLE>
session::unwrap(CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE unwrapping_key,
                std::span<const uint8_t> blob, attributes& tmpl) {
  CK_MECHANISM m{mech, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  if (auto rv = fns_->unwrap_key(handle_, &m, unwrapping_key, input_bytes(blob),
                                 ulong_size(blob.size()), tmpl.data(),
                                 tmpl.size(), &key);
      rv != CKR_OK)
    return rv_error("C_UnwrapKey", rv);
  return key;
}

caf::expected<std::vector<uint8_t>>
session::sign(CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE key,
              std::span<const uint8_t> data) {
  CK_MECHANISM m{mech, nullptr, 0};
  if (auto rv = fns_->sign_init(handle_, &m, key); rv != CKR_OK)
    return rv_error("C_SignInit", rv);
  // Both supported schemes give 64 bytes; a larger buffer leaves room for
  // tokens that answer in DER. One call avoids a second round trip.
  std::vector<uint8_t> sig(256);
  CK_ULONG len = ulong_size(sig.size());
  if (auto rv = fns_->sign(handle_, input_bytes(data), ulong_size(data.size()),
                           sig.data(), &len);
      rv != CKR_OK)
    return rv_error("C_Sign", rv);
  sig.resize(len);
  return sig;
}

caf::error session::destroy(CK_OBJECT_HANDLE obj) {
  if (auto rv = fns_->destroy_object(handle_, obj); rv != CKR_OK)
    return rv_error("C_DestroyObject", rv);
  return caf::none;
}

} // namespace hsm::pkcs11
