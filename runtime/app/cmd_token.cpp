// `hsm-driver token init`: a test or dev token on a free SoftHSMv2 slot.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/token_admin.hpp"

namespace hsm {

int cmd_token_init(const driver_config& cfg) {
  auto so_pin = pkcs11::secret_pin::from_environment("SO_PIN", "SO_PIN_FILE");
  if (!so_pin)
    return fail(so_pin.error());
  auto user_pin = pkcs11::secret_pin::from_environment();
  if (!user_pin)
    return fail(user_pin.error());
  auto mod = pkcs11::module::load(cfg.pkcs11_module);
  if (!mod)
    return fail(mod.error());
  if (auto err = pkcs11::init_token(*mod, cfg.token_label, *so_pin, *user_pin))
    return fail(err);
  logger("hsm")->info("initialised token '{}'", cfg.token_label);
  print(nlohmann::ordered_json{{"ok", true}, {"token_label", cfg.token_label}});
  return exit_ok;
}

} // namespace hsm
