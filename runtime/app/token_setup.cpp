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
                                   const keys::master_key_set& set,
                                   const driver_config& cfg) {
  auto weak = pkcs11::inspect_master_key(sess, set.master);
  if (!weak)
    return weak.error();
  if (weak->empty())
    return caf::none;
  auto what = "the master key '" + set.label
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

caf::expected<keys::master_key_plan>
plan_master_keys(const driver_config& cfg,
                 const std::optional<store::rotation_record>& rotation) {
  keys::master_key_plan plan;
  plan.current = cfg.master_key_label;
  plan.allow_weak = cfg.allow_weak_master_key;
  if (!rotation)
    return plan;
  const auto& r = *rotation;
  const auto& label = cfg.master_key_label;
  if (r.phase == store::rotation_phase::running) {
    if (label != r.from_label && label != r.to_label)
      return caf::make_error(
        config_errc::invalid_option, std::string{"--master-key-label"},
        "a master-key rotation from '" + r.from_label + "' to '" + r.to_label
          + "' is running; this driver is configured with '" + label
          + "', which is neither");
    // New keys go under the target, so that the rotation has nothing new
    // to move; rows still under the source are served until moved.
    plan.current = r.to_label;
    if (r.from_label != r.to_label)
      plan.previous = r.from_label;
    return plan;
  }
  if (r.from_label != r.to_label) {
    if (label == r.from_label)
      return caf::make_error(
        config_errc::invalid_option, std::string{"--master-key-label"},
        "the master-key rotation from '" + r.from_label + "' to '" + r.to_label
          + "' is complete: the old key is retired; start with "
            "--master-key-label "
          + r.to_label);
    plan.retired.push_back(r.from_label);
  }
  return plan;
}

caf::expected<key_setup>
set_up_keys(pkcs11::session& sess, const driver_config& cfg, key_steps steps) {
  key_setup out;
  std::optional<store::rotation_record> rotation;
  if (steps.guard) {
    auto st = open_store(cfg);
    if (!st)
      return st.error();
    out.store = std::move(*st);
    auto r = out.store->get_rotation();
    if (!r)
      return r.error();
    rotation = std::move(*r);
  }
  auto plan = plan_master_keys(cfg, rotation);
  if (!plan)
    return plan.error();
  // A weak master key is named before anything else is asked of it.
  if (auto master = pkcs11::find_master_key(sess, plan->current); master)
    if (auto err = check_master_key_policy(
          sess,
          keys::master_key_set{*master, CK_INVALID_HANDLE, plan->current,
                               false},
          cfg))
      return err;
  auto keys = keys::find_key_handles(sess, *plan);
  if (!keys) {
    if (keys.error() == key_errc::master_key_missing && rotation
        && rotation->phase == store::rotation_phase::running)
      return caf::make_error(
        key_errc::master_key_missing,
        describe(keys.error()) + " -- a rotation from '" + rotation->from_label
          + "' to '" + rotation->to_label
          + "' is running, and this driver serves rows under both: put both "
            "keys (each with its row-MAC key) on this token first");
    return keys.error();
  }
  out.keys = std::move(*keys);
  out.master = out.keys.master;
  out.plan = *plan;
  // The source of a running rotation is served until its rows are moved;
  // a weak one is why it is rotated off, so it is named, not refused.
  for (auto& other : out.keys.others) {
    auto weak = pkcs11::inspect_master_key(sess, other.master);
    if (!weak)
      return weak.error();
    if (!weak->empty())
      logger("runtime")->warn(
        "master key '{}', which a running rotation moves rows off, lets a "
        "wrapped key leave the HSM: {}",
        other.label, pkcs11::describe(*weak));
  }
  if (steps.guard) {
    // The canary is under the source of a rotation until the rotation
    // moves it; check it with the key it names.
    auto canary_set = out.keys.current();
    if (auto c = out.store->get_canary(); c && *c)
      for (auto& other : out.keys.others)
        if ((*c)->master_key_label == other.label)
          canary_set = other;
    auto guard = keys::check_master_key(sess, canary_set.master,
                                        canary_set.label, *out.store,
                                        steps.may_create_canary);
    if (!guard)
      return guard.error();
    auto unsealed = out.store->unsealed_rows();
    if (!unsealed)
      return unsealed.error();
    bool rotating = rotation
                    && rotation->phase == store::rotation_phase::running;
    if (*unsealed > 0 && !rotating)
      return caf::make_error(
        key_errc::key_corrupted,
        std::to_string(*unsealed) + " key row(s) in " + store_name(cfg)
          + " predate the row MAC (format 1) and would be refused on every "
            "sign: refusing to start rather than serve with keys that "
            "cannot sign. Seal them with 'hsm-driver master-key rotate --to "
            "LABEL' (a new master key, or '"
          + cfg.master_key_label
          + "' to seal in place), which checks each row before it MACs it, "
            "or restore the previous release");
    if (*guard == keys::canary_state::created)
      logger("runtime")->info("recorded the master-key canary in {}",
                              store_name(cfg));
    if (rotating)
      logger("runtime")->warn(
        "a master-key rotation from '{}' to '{}' is running: new keys are "
        "wrapped under '{}', rows under either key are served",
        rotation->from_label, rotation->to_label, rotation->to_label);
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
