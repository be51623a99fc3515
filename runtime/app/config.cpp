#include "runtime/app/config.hpp"

#include "runtime/base/secret_file.hpp"
#include "store/pg_conninfo.hpp"

#include <openssl/crypto.h>

#include <cstdlib>
#include <cstring>

namespace hsm {

env_lookup process_env() {
  return [](std::string_view name) -> std::optional<std::string> {
    std::string key{name};
    if (const char* v = std::getenv(key.c_str()); v != nullptr && *v != '\0')
      return std::string{v};
    return std::nullopt;
  };
}

std::string redact_url(std::string_view url) {
  return store::redact_conninfo(url);
}

bool url_has_password(std::string_view url) {
  auto info = store::parse_conninfo(url);
  return info && info->find("password") != nullptr;
}

void scrub_env(const char* name) {
  if (char* v = std::getenv(name); v != nullptr)
    OPENSSL_cleanse(v, std::strlen(v));
  ::unsetenv(name);
}

std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    auto end = text.find(',', pos);
    if (end == std::string_view::npos)
      end = text.size();
    auto part = text.substr(pos, end - pos);
    while (!part.empty() && part.front() == ' ')
      part.remove_prefix(1);
    while (!part.empty() && part.back() == ' ')
      part.remove_suffix(1);
    if (!part.empty())
      out.emplace_back(part);
    pos = end + 1;
  }
  return out;
}

namespace {

/// The first non-empty of a flag value and environment variables.
std::pair<std::string, std::string>
pick(const std::string& flag_value, std::string_view flag,
     std::initializer_list<std::string_view> vars, const env_lookup& env) {
  if (!flag_value.empty())
    return {flag_value, std::string{flag}};
  for (auto var : vars)
    if (auto v = env(var))
      return {*v, std::string{var}};
  return {};
}

caf::error resolve_module(const raw_options& raw, const env_lookup& env,
                          driver_config& cfg) {
  if (!raw.pkcs11_module.empty()) {
    cfg.pkcs11_module = raw.pkcs11_module;
    cfg.pkcs11_module_source = "--pkcs11-module";
    return caf::none;
  }
  std::string found_var;
  std::string found_path;
  for (auto var : pkcs11_module_vars) {
    auto v = env(var);
    if (!v)
      continue;
    if (!found_var.empty() && *v != found_path)
      return caf::make_error(config_errc::invalid_option, found_var,
                             found_var + " and " + std::string{var}
                               + " name different modules; the driver loads "
                                 "one module per process: set one, or pass "
                                 "--pkcs11-module");
    if (found_var.empty()) {
      found_var = std::string{var};
      found_path = *v;
    }
  }
  if (found_var.empty())
    return caf::make_error(config_errc::missing_option,
                           std::string{"--pkcs11-module"},
                           std::string{"no PKCS#11 module: pass "
                                       "--pkcs11-module or set PKCS11_MODULE "
                                       "(or PKCS11_THALES_MODULE, "
                                       "PKCS11_IBM_MODULE)"});
  cfg.pkcs11_module = found_path;
  cfg.pkcs11_module_source = found_var;
  return caf::none;
}

} // namespace

caf::expected<driver_config> resolve(const raw_options& raw,
                                     const env_lookup& env) {
  driver_config cfg;
  if (auto err = resolve_module(raw, env, cfg))
    return err;
  auto [label, label_src] = pick(raw.token_label, "--token-label",
                                 {"HSM_TOKEN_LABEL"}, env);
  cfg.token_label = label.empty() ? std::string{default_token_label} : label;
  if (cfg.token_label.size() > 32)
    return caf::make_error(
      config_errc::invalid_option, std::string{"--token-label"},
      "token labels have at most 32 characters (from " + label_src + ")");
  auto [mk, mk_src] = pick(raw.master_key_label, "--master-key-label",
                           {"HSM_MASTER_KEY_LABEL"}, env);
  cfg.master_key_label = mk.empty() ? std::string{default_master_key_label}
                                    : mk;
  auto [db, db_src] = pick(raw.sqlite_path, "--sqlite-path", {"SQLITE_PATH"},
                           env);
  cfg.sqlite_path = db.empty() ? std::string{default_sqlite_path} : db;
  auto [pg, pg_src] = pick(raw.postgres_url, "--postgres-url", {"POSTGRES_URL"},
                           env);
  if (auto file = env("POSTGRES_URL_FILE")) {
    if (!pg.empty())
      return caf::make_error(
        config_errc::invalid_option, std::string{"POSTGRES_URL_FILE"},
        "POSTGRES_URL_FILE and " + pg_src + " are both set; set one");
    auto text = read_secret_file(*file, "POSTGRES_URL_FILE");
    if (!text)
      return std::move(text.error());
    pg = std::move(*text);
    pg_src = "POSTGRES_URL_FILE";
  }
  cfg.postgres_url = pg;
  cfg.postgres_url_source = pg_src;
  if (!pg.empty() && !db.empty())
    return caf::make_error(config_errc::invalid_option, pg_src,
                           pg_src + " and " + db_src
                             + " are both set; the driver uses one key "
                               "store: set one");
  auto [res, res_src] = pick(raw.resident_schemes, "--resident-schemes",
                             {"HSM_RESIDENT_SCHEMES"}, env);
  for (auto& name : split_list(res)) {
    auto s = parse_scheme(name);
    if (!s)
      return caf::make_error(config_errc::invalid_option, res_src,
                             "unknown scheme '" + name + "' in " + res_src
                               + " (schemes: secp256k1, p256, ed25519)");
    cfg.resident_schemes.insert(*s);
  }
  auto [lvl, lvl_src] = pick(raw.log_level, "--log-level", {"HSM_LOG_LEVEL"},
                             env);
  cfg.log_level = lvl.empty() ? std::string{default_log_level} : lvl;
  cfg.allow_weak_master_key = raw.allow_weak_master_key;
  if (auto v = env("HSM_ALLOW_WEAK_MASTER_KEY"); v && !v->empty()) {
    if (*v == "1" || *v == "true")
      cfg.allow_weak_master_key = true;
    else if (*v != "0" && *v != "false")
      return caf::make_error(config_errc::invalid_option,
                             std::string{"HSM_ALLOW_WEAK_MASTER_KEY"},
                             "HSM_ALLOW_WEAK_MASTER_KEY is 1, true, 0 or "
                             "false, not '"
                               + *v + "'");
  }
  return cfg;
}

} // namespace hsm
