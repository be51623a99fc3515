#include "runtime/app/token_setup.hpp"

#include "runtime/app/store_open.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/pkcs11/key_policy.hpp"
#include "runtime/pkcs11/token_admin.hpp"

namespace hsm {

caf::expected<token_session> open_token(pkcs11::module mod,
                                        const driver_config& cfg,
                                        const pkcs11::secret_pin& pin) {
  auto slot = mod.find_token(cfg.token_label);
  if (!slot)
    return slot.error();
  pkcs11::token_description info;
  if (auto all = mod.tokens())
    for (auto& t : *all)
      if (t.slot == *slot)
        info = t;
  auto sess = pkcs11::session::open(mod, *slot);
  if (!sess)
    return sess.error();
  if (auto err = sess->login(pin))
    return err;
  logger("hsm")->info("logged in to token '{}' ({} {}, serial {}) via {}",
                      info.label, info.manufacturer, info.model, info.serial,
                      cfg.pkcs11_module.string());
  return token_session{std::move(mod), std::move(*sess), *slot,
                       std::move(info)};
}

caf::expected<token_session>
open_token(const driver_config& cfg, const pkcs11::secret_pin& pin,
           const pkcs11::table_decorator& decorate) {
  auto mod = pkcs11::module::load(cfg.pkcs11_module, decorate);
  if (!mod)
    return mod.error();
  return open_token(std::move(*mod), cfg, pin);
}

caf::expected<token_session> open_token(const driver_config& cfg) {
  auto pin = pkcs11::secret_pin::from_environment();
  if (!pin)
    return pin.error();
  return open_token(cfg, *pin);
}

void log_capabilities(const keys::capabilities& caps) {
  auto log = logger("hsm");
  for (auto& c : caps.schemes) {
    if (c.served)
      log->info("scheme {}: served ({})", to_string(c.scheme),
                c.resident ? "token-resident keys" : "wrapped keys");
    else
      log->warn("scheme {}: not served: {}", to_string(c.scheme), c.detail);
  }
}

caf::error check_master_key_policy(pkcs11::session& sess,
                                   CK_OBJECT_HANDLE master,
                                   const driver_config& cfg) {
  auto weak = pkcs11::inspect_master_key(sess, master);
  if (!weak)
    return weak.error();
  if (weak->empty())
    return caf::none;
  auto what = "the master key '" + cfg.master_key_label
              + "' lets a wrapped key leave the HSM: "
              + pkcs11::describe(*weak);
  if (!cfg.allow_weak_master_key)
    return caf::make_error(key_errc::master_key_weak,
                           what + "; " + pkcs11::weak_master_key_advice());
  logger("runtime")->error("{} -- started anyway because of "
                           "--allow-weak-master-key: anyone holding the user "
                           "PIN and a database dump can read private keys "
                           "until every row is re-wrapped under a sound "
                           "master key",
                           what);
  return caf::none;
}

caf::expected<key_setup>
set_up_keys(pkcs11::session& sess, const driver_config& cfg, key_steps steps) {
  key_setup out;
  auto keys = keys::find_key_handles(sess, cfg.master_key_label);
  if (!keys)
    return keys.error();
  out.keys = std::move(*keys);
  out.master = out.keys.master;
  if (auto err = check_master_key_policy(sess, out.master, cfg))
    return err;
  if (steps.guard) {
    auto st = open_store(cfg);
    if (!st)
      return st.error();
    auto guard = keys::check_master_key(sess, out.master, cfg.master_key_label,
                                        **st, steps.may_create_canary);
    if (!guard)
      return guard.error();
    auto unsealed = (*st)->unsealed_rows();
    if (!unsealed)
      return unsealed.error();
    if (*unsealed > 0)
      return caf::make_error(
        key_errc::key_corrupted,
        std::to_string(*unsealed) + " key row(s) in " + store_name(cfg)
          + " predate the row MAC (format 1) and would be refused on every "
            "sign: refusing to start rather than serve with keys that "
            "cannot sign. Seal them ('hsm-driver master-key seal', which "
            "checks each row before it MACs it) or restore the previous "
            "release");
    if (*guard == keys::canary_state::created)
      logger("runtime")->info("recorded the master-key canary in {}",
                              store_name(cfg));
    out.store = std::move(*st);
  }
  if (steps.probe) {
    auto caps = keys::probe(sess, out.master, cfg.resident_schemes);
    if (!caps)
      return caps.error();
    log_capabilities(*caps);
    out.caps = *caps;
  }
  return out;
}

} // namespace hsm
