#include "runtime/app/local_token.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/base/secret_file.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <openssl/crypto.h>

#include <fstream>

namespace hsm {

namespace fs = std::filesystem;

caf::expected<local_token> prepare_local_token(const driver_config& cfg,
                                               const fs::path& module,
                                               const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir / "tokens", ec);
  if (ec)
    return caf::make_error(config_errc::bad_file, dir.string(), ec.message());
  auto conf = dir / "softhsm2.conf";
  if (!fs::exists(conf)) {
    std::ofstream out{conf};
    out << "directories.tokendir = " << (dir / "tokens").string() << "\n"
        << "objectstore.backend = file\nlog.level = ERROR\n"
        << "slots.removable = false\n";
  }
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  for (auto name : {"so.pin", "user.pin"}) {
    if (fs::exists(dir / name))
      continue;
    auto pin = crypto::random_hex(12) + "\n";
    auto err = write_secret_file(dir / name, pin, name);
    OPENSSL_cleanse(pin.data(), pin.size());
    if (err)
      return err;
  }
  auto so = pkcs11::secret_pin::from_file((dir / "so.pin").string());
  auto user = pkcs11::secret_pin::from_file((dir / "user.pin").string());
  if (!so || !user)
    return !so ? so.error() : user.error();
  auto mod = pkcs11::module::load(module);
  if (!mod)
    return mod.error();
  if (!mod->find_token(cfg.token_label)) {
    logger("runtime")->info("creating token '{}' under {}", cfg.token_label,
                            dir.string());
    if (auto err = pkcs11::init_token(*mod, cfg.token_label, *so, *user))
      return err;
  }
  auto tok = open_token(std::move(*mod), cfg, *user);
  if (!tok)
    return tok.error();
  bool created = false;
  auto mk = pkcs11::create_master_key(tok->sess, cfg.master_key_label,
                                      &created);
  if (!mk)
    return mk.error();
  if (created)
    logger("runtime")->info("created master key '{}'", cfg.master_key_label);
  return local_token{std::move(*tok), *mk, std::move(*user), created};
}

} // namespace hsm
