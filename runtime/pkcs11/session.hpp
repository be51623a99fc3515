#pragma once

// One open PKCS#11 session and the object operations the driver uses.
//
// Not thread-safe: a session is owned by exactly one user (the CLI, or one
// hsm_session actor on its own thread), and only that owner closes it: closing
// a session another thread is using crashes some modules (softhsm.md). A hung
// session is abandoned with `release()`, never closed from outside.
// Every failure is `rv_error(function, rv)` (see rv.hpp).

#include "messages/errors.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"

#include <cstdint>
#include <deque>
#include <list>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm::pkcs11 {

/// Builds a CK_ATTRIBUTE array that owns its values.
class attributes {
public:
  attributes() = default;
  attributes(attributes&&) noexcept = default;
  attributes& operator=(attributes&&) noexcept = default;
  /// Not copyable: the array points into this object's own value storage.
  attributes(const attributes&) = delete;
  attributes& operator=(const attributes&) = delete;

  /// Adds a CK_BBOOL attribute.
  attributes& add_bool(CK_ATTRIBUTE_TYPE type, bool value);
  /// Adds a CK_ULONG attribute (class, key type, value length, ...).
  attributes& add_ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value);
  /// Adds a byte-string attribute (EC params, id, ...).
  attributes& add_bytes(CK_ATTRIBUTE_TYPE type, std::span<const uint8_t> value);
  /// Adds a text attribute (label).
  attributes& add_text(CK_ATTRIBUTE_TYPE type, std::string_view value);
  /// Adds an attribute whose value is itself a template
  /// (`CKA_UNWRAP_TEMPLATE`, `CKA_WRAP_TEMPLATE`); this object keeps it.
  attributes& add_template(CK_ATTRIBUTE_TYPE type, attributes nested);

  CK_ATTRIBUTE* data() noexcept {
    return attrs_.data();
  }
  CK_ULONG size() const noexcept {
    return static_cast<CK_ULONG>(attrs_.size());
  }

private:
  CK_ATTRIBUTE& push(CK_ATTRIBUTE_TYPE type, std::vector<uint8_t> value);

  std::vector<CK_ATTRIBUTE> attrs_;
  std::deque<std::vector<uint8_t>> values_; // stable addresses
  std::list<attributes> nested_;            // their arrays stay put
};

/// One attribute as read back from the token: its type and raw value.
struct attribute_value {
  CK_ATTRIBUTE_TYPE type = 0;
  std::vector<uint8_t> value;
};

/// A logged-in (or not yet) session. Move-only.
class session {
public:
  /// Opens a read-write serial session on `slot`.
  [[nodiscard]] static caf::expected<session> open(const module& mod,
                                                   CK_SLOT_ID slot);

  session(session&& other) noexcept;
  session& operator=(session&& other) noexcept;
  session(const session&) = delete;
  session& operator=(const session&) = delete;
  /// C_CloseSession; no C_Logout: login state belongs to the application,
  /// and logging out one session logs out all of them.
  ~session();

  /// C_Login as the normal user. CKR_USER_ALREADY_LOGGED_IN counts as
  /// success. Never retried here: CKR_PIN_INCORRECT is fatal.
  [[nodiscard]] caf::error login(const secret_pin& pin);

  /// C_Login as the security officer (token set-up only).
  [[nodiscard]] caf::error login_so(const secret_pin& pin);

  /// Handles of objects matching `tmpl`, at most `max`.
  [[nodiscard]] caf::expected<std::vector<CK_OBJECT_HANDLE>>
  find(attributes& tmpl, CK_ULONG max = 16);

  /// The value of one attribute.
  [[nodiscard]] caf::expected<std::vector<uint8_t>>
  attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type);

  /// The value of a template-valued attribute (`CKA_UNWRAP_TEMPLATE`): its
  /// entries. A token that does not have the attribute on the object
  /// answers `CKR_ATTRIBUTE_TYPE_INVALID` (an error, as from `attribute`).
  [[nodiscard]] caf::expected<std::vector<attribute_value>>
  template_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type);

  /// C_SetAttributeValue.
  [[nodiscard]] caf::error set_attributes(CK_OBJECT_HANDLE obj,
                                          attributes& tmpl);

  /// C_GenerateKey.
  [[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
  generate_key(CK_MECHANISM_TYPE mech, attributes& tmpl);

  /// C_GenerateKeyPair; returns (public, private).
  [[nodiscard]] caf::expected<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>
  generate_key_pair(CK_MECHANISM_TYPE mech, attributes& pub, attributes& priv);

  /// C_CreateObject.
  [[nodiscard]] caf::expected<CK_OBJECT_HANDLE> create(attributes& tmpl);

  /// C_WrapKey with a parameterless mechanism.
  [[nodiscard]] caf::expected<std::vector<uint8_t>>
  wrap(CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE wrapping_key,
       CK_OBJECT_HANDLE key);

  /// C_UnwrapKey with a parameterless mechanism.
  [[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
  unwrap(CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE unwrapping_key,
         std::span<const uint8_t> blob, attributes& tmpl);

  /// C_SignInit + C_Sign with a parameterless mechanism.
  [[nodiscard]] caf::expected<std::vector<uint8_t>>
  sign(CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE key,
       std::span<const uint8_t> data);

  /// C_DestroyObject.
  [[nodiscard]] caf::error destroy(CK_OBJECT_HANDLE obj);

  /// The raw handle.
  CK_SESSION_HANDLE handle() const noexcept {
    return handle_;
  }

  /// Forgets the session without closing it (for a session stuck in a call
  /// on another thread). Returns the handle.
  CK_SESSION_HANDLE release() noexcept;

private:
  session(function_table* fns, CK_SESSION_HANDLE handle)
    : fns_(fns), handle_(handle) {
    // nop
  }

  caf::error login_as(CK_USER_TYPE user, const secret_pin& pin);

  function_table* fns_ = nullptr;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
};

/// A session object destroyed when this goes out of scope (invariant 4:
/// generated and unwrapped private keys never outlive their operation).
class scoped_object {
public:
  scoped_object(session& s, CK_OBJECT_HANDLE h) : s_(&s), h_(h) {
    // nop
  }
  scoped_object(const scoped_object&) = delete;
  scoped_object& operator=(const scoped_object&) = delete;
  ~scoped_object() {
    if (h_ != CK_INVALID_HANDLE)
      static_cast<void>(s_->destroy(h_));
  }

  CK_OBJECT_HANDLE get() const noexcept {
    return h_;
  }

private:
  session* s_;
  CK_OBJECT_HANDLE h_;
};

} // namespace hsm::pkcs11
