#include "tests/support/fault_table.hpp"

namespace hsm::test {

namespace {

/// Forwards to the real module; counts and injects per the plan.
class fault_table final : public pkcs11::forwarding_table {
public:
  fault_table(std::unique_ptr<pkcs11::function_table> inner,
              std::shared_ptr<fault_plan> plan)
    : forwarding_table(std::move(inner)), plan_(std::move(plan)) {
    // nop
  }

  CK_RV open_session(CK_SLOT_ID s, CK_FLAGS f, CK_SESSION_HANDLE* h) override {
    ++plan_->counts.open_session;
    return forwarding_table::open_session(s, f, h);
  }

  CK_RV login(CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR* p,
              CK_ULONG n) override {
    ++plan_->counts.login;
    return forwarding_table::login(h, u, p, n);
  }

  CK_RV generate_key_pair(CK_SESSION_HANDLE h, CK_MECHANISM* m,
                          CK_ATTRIBUTE* pub, CK_ULONG npub, CK_ATTRIBUTE* priv,
                          CK_ULONG npriv, CK_OBJECT_HANDLE* hpub,
                          CK_OBJECT_HANDLE* hpriv) override {
    auto n = ++plan_->counts.generate_key_pair;
    if (plan_->before_generate_key_pair)
      if (auto rv = plan_->before_generate_key_pair(n); rv != CKR_OK)
        return rv;
    if (plan_->check_public_template)
      if (auto rv = plan_->check_public_template(pub, npub); rv != CKR_OK)
        return rv;
    return forwarding_table::generate_key_pair(h, m, pub, npub, priv, npriv,
                                               hpub, hpriv);
  }

  CK_RV unwrap_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_OBJECT_HANDLE u,
                   CK_BYTE* b, CK_ULONG n, CK_ATTRIBUTE* t, CK_ULONG c,
                   CK_OBJECT_HANDLE* k) override {
    auto count = ++plan_->counts.unwrap_key;
    if (plan_->before_unwrap)
      if (auto rv = plan_->before_unwrap(count); rv != CKR_OK)
        return rv;
    return forwarding_table::unwrap_key(h, m, u, b, n, t, c, k);
  }

  CK_RV sign(CK_SESSION_HANDLE h, CK_BYTE* d, CK_ULONG n, CK_BYTE* s,
             CK_ULONG* sn) override {
    auto count = ++plan_->counts.sign;
    if (plan_->before_sign)
      if (auto rv = plan_->before_sign(count); rv != CKR_OK)
        return rv;
    return forwarding_table::sign(h, d, n, s, sn);
  }

  CK_RV close_session(CK_SESSION_HANDLE h) override {
    auto rv = forwarding_table::close_session(h);
    ++plan_->counts.closed_session;
    return rv;
  }

private:
  std::shared_ptr<fault_plan> plan_;
};

} // namespace

pkcs11::table_decorator fault_decorator(std::shared_ptr<fault_plan> plan) {
  return [plan](std::unique_ptr<pkcs11::function_table> inner) {
    return std::make_unique<fault_table>(std::move(inner), plan);
  };
}

} // namespace hsm::test
