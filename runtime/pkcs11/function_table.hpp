#pragma once

// The seam over CK_FUNCTION_LIST: one virtual per C_* function the driver
// uses, nothing more. `module` forwards to the loaded library through it;
// fault-injection tests wrap the real table in a decorator that counts calls
// or returns chosen CK_RVs (device removed mid-sign, session closed, ...).
//
// Thread-safety is the module's: the driver initialises with
// CKF_OS_LOCKING_OK, and each session is used by one thread at a time.

#include "runtime/pkcs11/pkcs11.hpp"

#include <memory>

namespace hsm::pkcs11 {

/// Abstract PKCS#11 function table. Names drop the `C_` prefix.
class function_table {
public:
  virtual ~function_table() = default;

  // -- library -------------------------------------------------------------

  virtual CK_RV initialize(CK_C_INITIALIZE_ARGS* args) = 0;
  virtual CK_RV finalize() = 0;
  virtual CK_RV get_slot_list(CK_BBOOL token_present, CK_SLOT_ID* list,
                              CK_ULONG* count)
    = 0;
  virtual CK_RV get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO* info) = 0;
  virtual CK_RV init_token(CK_SLOT_ID slot, CK_UTF8CHAR* so_pin,
                           CK_ULONG so_pin_len, CK_UTF8CHAR* label)
    = 0;

  // -- sessions ------------------------------------------------------------

  virtual CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags,
                             CK_SESSION_HANDLE* session)
    = 0;
  virtual CK_RV close_session(CK_SESSION_HANDLE session) = 0;
  virtual CK_RV login(CK_SESSION_HANDLE session, CK_USER_TYPE user,
                      CK_UTF8CHAR* pin, CK_ULONG pin_len)
    = 0;
  virtual CK_RV logout(CK_SESSION_HANDLE session) = 0;
  virtual CK_RV init_pin(CK_SESSION_HANDLE session, CK_UTF8CHAR* pin,
                         CK_ULONG pin_len)
    = 0;

  // -- objects -------------------------------------------------------------

  virtual CK_RV find_objects_init(CK_SESSION_HANDLE session, CK_ATTRIBUTE* tmpl,
                                  CK_ULONG count)
    = 0;
  virtual CK_RV find_objects(CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE* objects, CK_ULONG max,
                             CK_ULONG* count)
    = 0;
  virtual CK_RV find_objects_final(CK_SESSION_HANDLE session) = 0;
  virtual CK_RV get_attribute_value(CK_SESSION_HANDLE session,
                                    CK_OBJECT_HANDLE object, CK_ATTRIBUTE* tmpl,
                                    CK_ULONG count)
    = 0;
  virtual CK_RV create_object(CK_SESSION_HANDLE session, CK_ATTRIBUTE* tmpl,
                              CK_ULONG count, CK_OBJECT_HANDLE* object)
    = 0;
  virtual CK_RV destroy_object(CK_SESSION_HANDLE session,
                               CK_OBJECT_HANDLE object)
    = 0;

  // -- keys ----------------------------------------------------------------

  virtual CK_RV generate_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                             CK_ATTRIBUTE* tmpl, CK_ULONG count,
                             CK_OBJECT_HANDLE* key)
    = 0;
  virtual CK_RV generate_key_pair(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                                  CK_ATTRIBUTE* pub, CK_ULONG pub_count,
                                  CK_ATTRIBUTE* priv, CK_ULONG priv_count,
                                  CK_OBJECT_HANDLE* pub_key,
                                  CK_OBJECT_HANDLE* priv_key)
    = 0;
  virtual CK_RV wrap_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                         CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key,
                         CK_BYTE* wrapped, CK_ULONG* wrapped_len)
    = 0;
  virtual CK_RV unwrap_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                           CK_OBJECT_HANDLE unwrapping_key, CK_BYTE* wrapped,
                           CK_ULONG wrapped_len, CK_ATTRIBUTE* tmpl,
                           CK_ULONG count, CK_OBJECT_HANDLE* key)
    = 0;
  virtual CK_RV sign_init(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                          CK_OBJECT_HANDLE key)
    = 0;
  virtual CK_RV sign(CK_SESSION_HANDLE session, CK_BYTE* data,
                     CK_ULONG data_len, CK_BYTE* signature,
                     CK_ULONG* signature_len)
    = 0;
  virtual CK_RV set_attribute_value(CK_SESSION_HANDLE session,
                                    CK_OBJECT_HANDLE object, CK_ATTRIBUTE* tmpl,
                                    CK_ULONG count)
    = 0;
  virtual CK_RV copy_object(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                            CK_ATTRIBUTE* tmpl, CK_ULONG count,
                            CK_OBJECT_HANDLE* copy)
    = 0;
};

/// Forwards every call to another table. Derive from it and override only
/// the calls to observe or change (fault injection, counting in tests).
class forwarding_table : public function_table {
public:
  explicit forwarding_table(std::unique_ptr<function_table> inner)
    : inner_(std::move(inner)) {
    // nop
  }

  CK_RV initialize(CK_C_INITIALIZE_ARGS* args) override;
  CK_RV finalize() override;
  CK_RV get_slot_list(CK_BBOOL token_present, CK_SLOT_ID* list,
                      CK_ULONG* count) override;
  CK_RV get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO* info) override;
  CK_RV init_token(CK_SLOT_ID slot, CK_UTF8CHAR* so_pin, CK_ULONG so_pin_len,
                   CK_UTF8CHAR* label) override;
  CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags,
                     CK_SESSION_HANDLE* session) override;
  CK_RV close_session(CK_SESSION_HANDLE session) override;
  CK_RV login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR* pin,
              CK_ULONG pin_len) override;
  CK_RV logout(CK_SESSION_HANDLE session) override;
  CK_RV init_pin(CK_SESSION_HANDLE session, CK_UTF8CHAR* pin,
                 CK_ULONG pin_len) override;
  CK_RV find_objects_init(CK_SESSION_HANDLE session, CK_ATTRIBUTE* tmpl,
                          CK_ULONG count) override;
  CK_RV find_objects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE* objects,
                     CK_ULONG max, CK_ULONG* count) override;
  CK_RV find_objects_final(CK_SESSION_HANDLE session) override;
  CK_RV get_attribute_value(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                            CK_ATTRIBUTE* tmpl, CK_ULONG count) override;
  CK_RV create_object(CK_SESSION_HANDLE session, CK_ATTRIBUTE* tmpl,
                      CK_ULONG count, CK_OBJECT_HANDLE* object) override;
  CK_RV destroy_object(CK_SESSION_HANDLE session,
                       CK_OBJECT_HANDLE object) override;
  CK_RV generate_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                     CK_ATTRIBUTE* tmpl, CK_ULONG count,
                     CK_OBJECT_HANDLE* key) override;
  CK_RV generate_key_pair(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                          CK_ATTRIBUTE* pub, CK_ULONG pub_count,
                          CK_ATTRIBUTE* priv, CK_ULONG priv_count,
                          CK_OBJECT_HANDLE* pub_key,
                          CK_OBJECT_HANDLE* priv_key) override;
  CK_RV wrap_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                 CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key,
                 CK_BYTE* wrapped, CK_ULONG* wrapped_len) override;
  CK_RV unwrap_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                   CK_OBJECT_HANDLE unwrapping_key, CK_BYTE* wrapped,
                   CK_ULONG wrapped_len, CK_ATTRIBUTE* tmpl, CK_ULONG count,
                   CK_OBJECT_HANDLE* key) override;
  CK_RV sign_init(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                  CK_OBJECT_HANDLE key) override;
  CK_RV sign(CK_SESSION_HANDLE session, CK_BYTE* data, CK_ULONG data_len,
             CK_BYTE* signature, CK_ULONG* signature_len) override;
  CK_RV set_attribute_value(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                            CK_ATTRIBUTE* tmpl, CK_ULONG count) override;
  CK_RV copy_object(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                    CK_ATTRIBUTE* tmpl, CK_ULONG count,
                    CK_OBJECT_HANDLE* copy) override;

private:
  std::unique_ptr<function_table> inner_;
};

} // namespace hsm::pkcs11
