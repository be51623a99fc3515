#include "runtime/pkcs11/function_table.hpp"

namespace hsm::pkcs11 {

CK_RV forwarding_table::initialize(CK_C_INITIALIZE_ARGS* args) {
  return inner_->initialize(args);
}

CK_RV forwarding_table::finalize() {
  return inner_->finalize();
}

CK_RV forwarding_table::get_slot_list(CK_BBOOL token_present, CK_SLOT_ID* list,
                                      CK_ULONG* count) {
  return inner_->get_slot_list(token_present, list, count);
}

CK_RV forwarding_table::get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO* info) {
  return inner_->get_token_info(slot, info);
}

CK_RV forwarding_table::init_token(CK_SLOT_ID slot, CK_UTF8CHAR* so_pin,
                                   CK_ULONG so_pin_len, CK_UTF8CHAR* label) {
  return inner_->init_token(slot, so_pin, so_pin_len, label);
}

CK_RV forwarding_table::open_session(CK_SLOT_ID slot, CK_FLAGS flags,
                                     CK_SESSION_HANDLE* session) {
  return inner_->open_session(slot, flags, session);
}

CK_RV forwarding_table::close_session(CK_SESSION_HANDLE session) {
  return inner_->close_session(session);
}

CK_RV forwarding_table::login(CK_SESSION_HANDLE session, CK_USER_TYPE user,
                              CK_UTF8CHAR* pin, CK_ULONG pin_len) {
  return inner_->login(session, user, pin, pin_len);
}

CK_RV forwarding_table::logout(CK_SESSION_HANDLE session) {
  return inner_->logout(session);
}

CK_RV forwarding_table::init_pin(CK_SESSION_HANDLE session, CK_UTF8CHAR* pin,
                                 CK_ULONG pin_len) {
  return inner_->init_pin(session, pin, pin_len);
}

CK_RV forwarding_table::find_objects_init(CK_SESSION_HANDLE session,
                                          CK_ATTRIBUTE* tmpl, CK_ULONG count) {
  return inner_->find_objects_init(session, tmpl, count);
}

CK_RV forwarding_table::find_objects(CK_SESSION_HANDLE session,
                                     CK_OBJECT_HANDLE* objects, CK_ULONG max,
                                     CK_ULONG* count) {
  return inner_->find_objects(session, objects, max, count);
}

CK_RV forwarding_table::find_objects_final(CK_SESSION_HANDLE session) {
  return inner_->find_objects_final(session);
}

CK_RV forwarding_table::get_attribute_value(CK_SESSION_HANDLE session,
                                            CK_OBJECT_HANDLE object,
                                            CK_ATTRIBUTE* tmpl,
                                            CK_ULONG count) {
  return inner_->get_attribute_value(session, object, tmpl, count);
}

CK_RV forwarding_table::create_object(CK_SESSION_HANDLE session,
                                      CK_ATTRIBUTE* tmpl, CK_ULONG count,
                                      CK_OBJECT_HANDLE* object) {
  return inner_->create_object(session, tmpl, count, object);
}

CK_RV forwarding_table::destroy_object(CK_SESSION_HANDLE session,
                                       CK_OBJECT_HANDLE object) {
  return inner_->destroy_object(session, object);
}

CK_RV forwarding_table::generate_key(CK_SESSION_HANDLE session,
                                     CK_MECHANISM* mech, CK_ATTRIBUTE* tmpl,
                                     CK_ULONG count, CK_OBJECT_HANDLE* key) {
  return inner_->generate_key(session, mech, tmpl, count, key);
}

CK_RV forwarding_table::generate_key_pair(
  CK_SESSION_HANDLE session, CK_MECHANISM* mech, CK_ATTRIBUTE* pub,
  CK_ULONG pub_count, CK_ATTRIBUTE* priv, CK_ULONG priv_count,
  CK_OBJECT_HANDLE* pub_key, CK_OBJECT_HANDLE* priv_key) {
  return inner_->generate_key_pair(session, mech, pub, pub_count, priv,
                                   priv_count, pub_key, priv_key);
}

CK_RV forwarding_table::wrap_key(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                                 CK_OBJECT_HANDLE wrapping_key,
                                 CK_OBJECT_HANDLE key, CK_BYTE* wrapped,
                                 CK_ULONG* wrapped_len) {
  return inner_->wrap_key(session, mech, wrapping_key, key, wrapped,
                          wrapped_len);
}

CK_RV forwarding_table::unwrap_key(CK_SESSION_HANDLE session,
                                   CK_MECHANISM* mech,
                                   CK_OBJECT_HANDLE unwrapping_key,
                                   CK_BYTE* wrapped, CK_ULONG wrapped_len,
                                   CK_ATTRIBUTE* tmpl, CK_ULONG count,
                                   CK_OBJECT_HANDLE* key) {
  return inner_->unwrap_key(session, mech, unwrapping_key, wrapped, wrapped_len,
                            tmpl, count, key);
}

CK_RV forwarding_table::sign_init(CK_SESSION_HANDLE session, CK_MECHANISM* mech,
                                  CK_OBJECT_HANDLE key) {
  return inner_->sign_init(session, mech, key);
}

CK_RV forwarding_table::sign(CK_SESSION_HANDLE session, CK_BYTE* data,
                             CK_ULONG data_len, CK_BYTE* signature,
                             CK_ULONG* signature_len) {
  return inner_->sign(session, data, data_len, signature, signature_len);
}

CK_RV forwarding_table::set_attribute_value(CK_SESSION_HANDLE session,
                                            CK_OBJECT_HANDLE object,
                                            CK_ATTRIBUTE* tmpl,
                                            CK_ULONG count) {
  return inner_->set_attribute_value(session, object, tmpl, count);
}

CK_RV forwarding_table::copy_object(CK_SESSION_HANDLE session,
                                    CK_OBJECT_HANDLE object, CK_ATTRIBUTE* tmpl,
                                    CK_ULONG count, CK_OBJECT_HANDLE* copy) {
  return inner_->copy_object(session, object, tmpl, count, copy);
}

} // namespace hsm::pkcs11
