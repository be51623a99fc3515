#include "runtime/keys/master_key_guard.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"

namespace hsm::keys {

caf::error check_canary(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                        std::string_view master_label,
                        const store::canary_record& c) {
  auto payload = fixed_payload(scheme::p256, "hsm-driver master-key canary");
  auto mismatch = [&](const std::string& why) {
    return caf::make_error(
      key_errc::master_key_mismatch,
      "the master key '" + std::string{master_label}
        + "' on this token is not the one that protects this database's "
          "keys (the canary was wrapped by master key '"
        + c.master_key_label + "'): " + why
        + ". Refusing to serve: give this driver a token holding the same "
          "master key, or point it at its own database");
  };
  auto raw = pkcs11::sign_wrapped(sess, master, scheme::p256, c.wrapped_key,
                                  payload);
  if (!raw) {
    // Another master key shows as any unwrap failure (SoftHSMv2 answers
    // CKR_GENERAL_ERROR), unless the session or token itself went away.
    auto rv = pkcs11::rv_of(raw.error());
    bool unwrap_step = pkcs11::function_of(raw.error()) == "C_UnwrapKey";
    if (raw.error() == key_errc::key_corrupted
        || (unwrap_step && rv && !pkcs11::session_lost(*rv)))
      return mismatch("it cannot unwrap the canary");
    return raw.error();
  }
  if (auto sig = crypto::finish_signature(scheme::p256, c.public_key, payload,
                                          *raw);
      !sig)
    return mismatch("the canary's signature does not verify");
  return caf::none;
}

caf::expected<canary_state>
check_master_key(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                 std::string_view master_label, store::key_store& st,
                 bool may_create) {
  auto log = logger("runtime");
  auto stored = st.get_canary();
  if (!stored)
    return stored.error();
  auto state = canary_state::matches;
  if (!*stored) {
    if (!may_create)
      return caf::make_error(key_errc::master_key_missing,
                             std::string{"the database holds no master-key "
                                         "canary yet; start the driver once "
                                         "to record it"});
    auto key = pkcs11::generate_wrapped(sess, master, scheme::p256);
    if (!key)
      return key.error();
    store::canary_record c;
    c.public_key = std::move(key->public_key);
    c.wrapped_key = std::move(key->wrapped_key);
    c.wrap_mechanism = std::string{aes_key_wrap_pad};
    c.master_key_label = std::string{master_label};
    c.created_at_ms = now_ms();
    auto written = st.put_canary(c);
    if (!written)
      return written.error();
    // Another driver may have won the race: check against what is stored.
    state = written->public_key == c.public_key ? canary_state::created
                                                : canary_state::matches;
    stored = std::optional<store::canary_record>{std::move(*written)};
  }
  if (auto err = check_canary(sess, master, master_label, **stored))
    return err;
  log->debug("master key '{}' matches the database canary", master_label);
  return state;
}

} // namespace hsm::keys
