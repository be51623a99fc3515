// `hsm-driver master-key init | check`: the token's AES master key, and the
// check of it against the store's canary.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <openssl/crypto.h>

#include <vector>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

/// Reads a test master-key value: 64 hex characters in a 0600 file.
caf::expected<std::vector<uint8_t>> read_test_value(const std::string& path) {
  // The same checks as a PIN file: private, regular, not empty.
  auto text = pkcs11::secret_pin::from_file(path);
  if (!text)
    return caf::make_error(config_errc::bad_file,
                           std::string{"--test-value-file"},
                           describe(text.error()));
  auto value = crypto::from_hex(std::string_view{text->data(), text->size()});
  if (!value || value->size() != 32)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--test-value-file"},
                           std::string{"the file must hold 64 hex "
                                       "characters (32 bytes)"});
  return std::move(*value);
}

} // namespace

int cmd_master_key_init(const driver_config& cfg,
                        const std::string& test_value_file) {
  std::vector<uint8_t> value;
  if (!test_value_file.empty()) {
    auto v = read_test_value(test_value_file);
    if (!v)
      return fail(v.error());
    value = std::move(*v);
  }
  auto tok = open_token(cfg);
  if (!tok) {
    OPENSSL_cleanse(value.data(), value.size());
    return fail(tok.error());
  }
  bool created = false;
  auto key = value.empty()
               ? pkcs11::create_master_key(tok->sess, cfg.master_key_label,
                                           &created)
               : pkcs11::import_master_key(tok->sess, cfg.master_key_label,
                                           value, &created);
  OPENSSL_cleanse(value.data(), value.size());
  if (!key)
    return fail(key.error());
  logger("hsm")->info("master key '{}' {}", cfg.master_key_label,
                      created ? "created" : "exists already");
  print(json{{"ok", true},
             {"master_key_label", cfg.master_key_label},
             {"created", created}});
  return exit_ok;
}

int cmd_master_key_check(const driver_config& cfg) {
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto checked = set_up_keys(
    tok->sess, cfg, key_steps{.may_create_canary = false, .probe = false});
  if (!checked)
    return fail(checked.error());
  print(json{{"ok", true},
             {"master_key_label", cfg.master_key_label},
             {"matches", true}});
  return exit_ok;
}

} // namespace hsm
