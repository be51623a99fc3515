#include "tests/support/fault_table.hpp"

namespace hsm::test {

namespace {

class fault_table final : public pkcs11::function_table {
public:
  fault_table(std::unique_ptr<pkcs11::function_table> inner,
              std::shared_ptr<fault_plan> plan)
    : in_(std::move(inner)), plan_(std::move(plan)) {
    // nop
  }

  CK_RV initialize(CK_C_INITIALIZE_ARGS* a) override {
    return in_->initialize(a);
  }
  CK_RV finalize() override {
    return in_->finalize();
  }
  CK_RV get_slot_list(CK_BBOOL p, CK_SLOT_ID* l, CK_ULONG* n) override {
    return in_->get_slot_list(p, l, n);
  }
  CK_RV get_token_info(CK_SLOT_ID s, CK_TOKEN_INFO* i) override {
    return in_->get_token_info(s, i);
  }
  CK_RV init_token(CK_SLOT_ID s, CK_UTF8CHAR* p, CK_ULONG n,
                   CK_UTF8CHAR* l) override {
    return in_->init_token(s, p, n, l);
  }
  CK_RV open_session(CK_SLOT_ID s, CK_FLAGS f, CK_SESSION_HANDLE* h) override {
    ++plan_->counts.open_session;
    return in_->open_session(s, f, h);
  }
  CK_RV close_session(CK_SESSION_HANDLE h) override {
    return in_->close_session(h);
  }
  CK_RV login(CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR* p,
              CK_ULONG n) override {
    ++plan_->counts.login;
    return in_->login(h, u, p, n);
  }
  CK_RV logout(CK_SESSION_HANDLE h) override {
    return in_->logout(h);
  }
  CK_RV init_pin(CK_SESSION_HANDLE h, CK_UTF8CHAR* p, CK_ULONG n) override {
    return in_->init_pin(h, p, n);
  }
  CK_RV find_objects_init(CK_SESSION_HANDLE h, CK_ATTRIBUTE* t,
                          CK_ULONG n) override {
    return in_->find_objects_init(h, t, n);
  }
  CK_RV find_objects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE* o, CK_ULONG m,
                     CK_ULONG* n) override {
    return in_->find_objects(h, o, m, n);
  }
  CK_RV find_objects_final(CK_SESSION_HANDLE h) override {
    return in_->find_objects_final(h);
  }
  CK_RV get_attribute_value(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o,
                            CK_ATTRIBUTE* t, CK_ULONG n) override {
    return in_->get_attribute_value(h, o, t, n);
  }
  CK_RV create_object(CK_SESSION_HANDLE h, CK_ATTRIBUTE* t, CK_ULONG n,
                      CK_OBJECT_HANDLE* o) override {
    return in_->create_object(h, t, n, o);
  }
  CK_RV destroy_object(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o) override {
    return in_->destroy_object(h, o);
  }
  CK_RV generate_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_ATTRIBUTE* t,
                     CK_ULONG n, CK_OBJECT_HANDLE* k) override {
    return in_->generate_key(h, m, t, n, k);
  }
  CK_RV generate_key_pair(CK_SESSION_HANDLE h, CK_MECHANISM* m,
                          CK_ATTRIBUTE* pub, CK_ULONG npub,
                          CK_ATTRIBUTE* priv, CK_ULONG npriv,
                          CK_OBJECT_HANDLE* hpub,
                          CK_OBJECT_HANDLE* hpriv) override {
    auto n = ++plan_->counts.generate_key_pair;
    if (plan_->before_generate_key_pair)
      if (auto rv = plan_->before_generate_key_pair(n); rv != CKR_OK)
        return rv;
    return in_->generate_key_pair(h, m, pub, npub, priv, npriv, hpub, hpriv);
  }
  CK_RV wrap_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_OBJECT_HANDLE w,
                 CK_OBJECT_HANDLE k, CK_BYTE* o, CK_ULONG* n) override {
    return in_->wrap_key(h, m, w, k, o, n);
  }
  CK_RV unwrap_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_OBJECT_HANDLE u,
                   CK_BYTE* b, CK_ULONG n, CK_ATTRIBUTE* t, CK_ULONG c,
                   CK_OBJECT_HANDLE* k) override {
    ++plan_->counts.unwrap_key;
    return in_->unwrap_key(h, m, u, b, n, t, c, k);
  }
  CK_RV sign_init(CK_SESSION_HANDLE h, CK_MECHANISM* m,
                  CK_OBJECT_HANDLE k) override {
    return in_->sign_init(h, m, k);
  }
  CK_RV sign(CK_SESSION_HANDLE h, CK_BYTE* d, CK_ULONG n, CK_BYTE* s,
             CK_ULONG* sn) override {
    auto count = ++plan_->counts.sign;
    if (plan_->before_sign)
      if (auto rv = plan_->before_sign(count); rv != CKR_OK)
        return rv;
    return in_->sign(h, d, n, s, sn);
  }

private:
  std::unique_ptr<pkcs11::function_table> in_;
  std::shared_ptr<fault_plan> plan_;
};

} // namespace

pkcs11::table_decorator fault_decorator(std::shared_ptr<fault_plan> plan) {
  return [plan](std::unique_ptr<pkcs11::function_table> inner) {
    return std::make_unique<fault_table>(std::move(inner), plan);
  };
}

} // namespace hsm::test
