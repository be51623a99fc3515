#include "runtime/commands.hpp"

#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "runtime/config.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/key_service.hpp"
#include "runtime/logging.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "store/sqlite_store.hpp"

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

constexpr int exit_ok = 0;
constexpr int exit_failed = 1;
constexpr int exit_usage = 2;

void print(const json& j) {
  std::cout << j.dump(2, ' ', false, json::error_handler_t::replace)
            << std::endl;
}

bool is_config_error(const caf::error& err) {
  return err.category() == caf::atom("config");
}

/// Prints an error result and returns the exit code for it.
int fail(const caf::error& err) {
  logger("runtime")->error("{}", describe(err));
  json j;
  j["ok"] = false;
  j["error"] = {{"code", wire_code(err)},
                {"message", describe(err)},
                {"retryable", is_retryable(err)}};
  print(j);
  return is_config_error(err) ? exit_usage : exit_failed;
}

json to_json(const key_view& v) {
  json j;
  j["key_id"] = v.key_id;
  j["scheme"] = std::string{to_string(v.scheme)};
  j["public_key"] = crypto::to_hex(v.public_key);
  if (!v.public_key_compressed.empty())
    j["public_key_compressed"] = crypto::to_hex(v.public_key_compressed);
  j["storage"] = v.storage;
  j["created_at_ms"] = v.created_at_ms;
  return j;
}

json to_json(const signature_view& v) {
  json j;
  j["key_id"] = v.key_id;
  j["scheme"] = std::string{to_string(v.scheme)};
  j["signature"] = crypto::to_hex(v.sig.raw);
  if (v.sig.recovery_id)
    j["recovery_id"] = *v.sig.recovery_id;
  if (!v.sig.der.empty())
    j["der"] = crypto::to_hex(v.sig.der);
  return j;
}

/// A loaded module and one logged-in session on the configured token.
/// Member order matters: the session closes before the module finalises.
struct open_token {
  pkcs11::module mod;
  pkcs11::session sess;
  pkcs11::token_description info;
};

caf::expected<open_token> open_token_session(const driver_config& cfg) {
  auto pin = pkcs11::secret_pin::from_environment();
  if (!pin)
    return pin.error();
  auto mod = pkcs11::module::load(cfg.pkcs11_module);
  if (!mod)
    return mod.error();
  auto slot = mod->find_token(cfg.token_label);
  if (!slot)
    return slot.error();
  pkcs11::token_description info;
  if (auto all = mod->tokens())
    for (auto& t : *all)
      if (t.slot == *slot)
        info = t;
  auto sess = pkcs11::session::open(*mod, *slot);
  if (!sess)
    return sess.error();
  if (auto err = sess->login(*pin))
    return err;
  logger("hsm")->info("logged in to token '{}' ({} {}, serial {}) via {}",
                      info.label, info.manufacturer, info.model, info.serial,
                      cfg.pkcs11_module.string());
  return open_token{std::move(*mod), std::move(*sess), std::move(info)};
}

/// Everything a key command needs: token, master key, store, guard, probe.
struct key_context {
  open_token token;
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  std::unique_ptr<store::key_store> st;
  capabilities caps;
};

void log_capabilities(const capabilities& caps) {
  auto log = logger("hsm");
  for (auto& c : caps.schemes) {
    if (c.served)
      log->info("scheme {}: served ({})", to_string(c.scheme),
                c.resident ? "token-resident keys" : "wrapped keys");
    else
      log->warn("scheme {}: not served: {}", to_string(c.scheme), c.detail);
  }
}

caf::expected<key_context> open_keys(const driver_config& cfg) {
  auto tok = open_token_session(cfg);
  if (!tok)
    return tok.error();
  auto master = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!master)
    return master.error();
  auto st = store::sqlite_store::open(cfg.sqlite_path);
  if (!st)
    return st.error();
  auto guard = check_master_key(tok->sess, *master, cfg.master_key_label,
                                **st, true);
  if (!guard)
    return guard.error();
  if (*guard == canary_state::created)
    logger("runtime")->info("recorded the master-key canary in {}",
                            cfg.sqlite_path.string());
  auto caps = probe(tok->sess, *master, cfg.resident_schemes);
  if (!caps)
    return caps.error();
  log_capabilities(*caps);
  return key_context{std::move(*tok), *master, std::move(*st), *caps};
}

json capabilities_json(const capabilities& caps) {
  json arr = json::array();
  for (auto& c : caps.schemes)
    arr.push_back({{"scheme", std::string{to_string(c.scheme)}},
                   {"served", c.served},
                   {"mode", c.resident ? "token-resident" : "wrapped"},
                   {"detail", c.detail}});
  return arr;
}

// -- subcommands ----------------------------------------------------------------

int cmd_probe(const driver_config& cfg) {
  auto tok = open_token_session(cfg);
  if (!tok)
    return fail(tok.error());
  auto master = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!master)
    return fail(master.error());
  auto caps = probe(tok->sess, *master, cfg.resident_schemes);
  if (!caps)
    return fail(caps.error());
  log_capabilities(*caps);
  json j;
  j["ok"] = true;
  j["token"] = {{"label", tok->info.label},
                {"manufacturer", tok->info.manufacturer},
                {"model", tok->info.model},
                {"serial", tok->info.serial}};
  j["schemes"] = capabilities_json(*caps);
  print(j);
  return exit_ok;
}

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
  if (auto err = pkcs11::init_token(*mod, cfg.token_label, *so_pin,
                                    *user_pin))
    return fail(err);
  logger("hsm")->info("initialised token '{}'", cfg.token_label);
  print(json{{"ok", true}, {"token_label", cfg.token_label}});
  return exit_ok;
}

int cmd_master_key_init(const driver_config& cfg) {
  auto tok = open_token_session(cfg);
  if (!tok)
    return fail(tok.error());
  bool created = false;
  auto key = pkcs11::create_master_key(tok->sess, cfg.master_key_label,
                                       &created);
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
  auto tok = open_token_session(cfg);
  if (!tok)
    return fail(tok.error());
  auto master = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!master)
    return fail(master.error());
  auto st = store::sqlite_store::open(cfg.sqlite_path);
  if (!st)
    return fail(st.error());
  auto guard = check_master_key(tok->sess, *master, cfg.master_key_label,
                                **st, false);
  if (!guard)
    return fail(guard.error());
  print(json{{"ok", true},
             {"master_key_label", cfg.master_key_label},
             {"matches", true}});
  return exit_ok;
}

int cmd_keys_generate(const driver_config& cfg, const std::string& key_id,
                      const std::string& scheme_name) {
  auto ctx = open_keys(cfg);
  if (!ctx)
    return fail(ctx.error());
  key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
  auto v = svc.generate(key_id, scheme_name);
  if (!v)
    return fail(v.error());
  logger("runtime")->info("key {} ({}): {}", v->key_id, to_string(v->scheme),
                          v->created ? "generated" : "exists already");
  auto j = to_json(*v);
  j["created"] = v->created;
  j = json{{"ok", true}, {"key", j}};
  print(j);
  return exit_ok;
}

int cmd_keys_sign(const driver_config& cfg, const std::string& key_id,
                  const std::string& payload_hex) {
  auto payload = crypto::from_hex(payload_hex);
  if (!payload)
    return fail(caf::make_error(key_errc::invalid_request,
                                "--payload: " + describe(payload.error())));
  auto ctx = open_keys(cfg);
  if (!ctx)
    return fail(ctx.error());
  key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
  auto sig = svc.sign(key_id, *payload);
  if (!sig)
    return fail(sig.error());
  auto key = svc.show(key_id);
  if (!key)
    return fail(key.error());
  logger("runtime")->info("signed {} bytes with key {} ({}), verified",
                          payload->size(), key_id, to_string(sig->scheme));
  print(json{{"ok", true},
             {"key", to_json(*key)},
             {"signature", to_json(*sig)}});
  return exit_ok;
}

int cmd_keys_show(const driver_config& cfg, const std::string& key_id) {
  auto ctx = open_keys(cfg);
  if (!ctx)
    return fail(ctx.error());
  key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
  auto key = svc.show(key_id);
  if (!key)
    return fail(key.error());
  print(json{{"ok", true}, {"key", to_json(*key)}});
  return exit_ok;
}

/// Refuses anything that looks like a PIN on the command line, without
/// echoing it.
bool pin_on_command_line(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg{argv[i]};
    if (arg.rfind("--pin", 0) == 0 || arg.rfind("--user-pin", 0) == 0
        || arg.rfind("--so-pin", 0) == 0)
      return true;
  }
  return false;
}

} // namespace

int run_cli(int argc, char** argv) {
  if (pin_on_command_line(argc, argv)) {
    std::cerr << "hsm-driver: PINs are not accepted on the command line; set "
                 "USER_PIN or USER_PIN_FILE\n";
    return exit_usage;
  }
  CLI::App app{"hsm-driver: keeps private keys in a PKCS#11 HSM; generates "
               "keys and signs with them.\nPIN: USER_PIN or USER_PIN_FILE "
               "(never on the command line)."};
  app.require_subcommand(1);
  app.fallthrough();
  raw_options raw;
  app.add_option("--pkcs11-module", raw.pkcs11_module,
                 "PKCS#11 module to load [env: PKCS11_MODULE, "
                 "PKCS11_THALES_MODULE, PKCS11_IBM_MODULE]");
  app.add_option("--token-label", raw.token_label,
                 "label of the token to use [env: HSM_TOKEN_LABEL; default: "
                 + std::string{default_token_label} + "]");
  app.add_option("--master-key-label", raw.master_key_label,
                 "label of the AES master key on the token [env: "
                 "HSM_MASTER_KEY_LABEL; default: "
                   + std::string{default_master_key_label} + "]");
  app.add_option("--sqlite-path", raw.sqlite_path,
                 "SQLite key store [env: SQLITE_PATH; default: "
                   + std::string{default_sqlite_path} + "]");
  app.add_option("--resident-schemes", raw.resident_schemes,
                 "comma-separated schemes whose keys stay on the token "
                 "(for tokens that cannot wrap them, e.g. ed25519 on "
                 "SoftHSMv2) [env: HSM_RESIDENT_SCHEMES]");
  app.add_option("--log-level", raw.log_level,
                 "trace, debug, info, warn, error, critical, off [env: "
                 "HSM_LOG_LEVEL; default: info]");

  auto* probe_cmd = app.add_subcommand(
    "probe", "run the capability probe and print which schemes are served");

  auto* token = app.add_subcommand("token", "test and dev tokens");
  token->require_subcommand(1);
  token->fallthrough();
  auto* token_init = token->add_subcommand(
    "init", "initialise a free slot as --token-label (SO_PIN or SO_PIN_FILE, "
            "and USER_PIN or USER_PIN_FILE)");

  auto* mk = app.add_subcommand("master-key", "the token's AES master key");
  mk->require_subcommand(1);
  mk->fallthrough();
  auto* mk_init = mk->add_subcommand(
    "init", "create the master key on a test or dev token (AES-256, "
            "sensitive, not extractable, wrap/unwrap)");
  auto* mk_check = mk->add_subcommand(
    "check", "check that the token's master key matches the database");

  auto* keys = app.add_subcommand("keys", "generate, sign, show");
  keys->require_subcommand(1);
  keys->fallthrough();
  std::string key_id;
  std::string scheme_name;
  std::string payload_hex;
  auto* gen = keys->add_subcommand("generate", "generate a key (idempotent "
                                               "by key id)");
  gen->add_option("--key-id", key_id, "the key's id")->required();
  gen->add_option("--scheme", scheme_name, "secp256k1, p256 or ed25519")
    ->required();
  auto* sign = keys->add_subcommand("sign", "sign a payload (32-byte hash "
                                            "for ECDSA, message for ed25519)");
  sign->add_option("--key-id", key_id, "the key's id")->required();
  sign->add_option("--payload", payload_hex, "the payload, hex")->required();
  auto* show = keys->add_subcommand("show", "print a key's public data");
  show->add_option("--key-id", key_id, "the key's id")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ExtrasError&) {
    // Not echoed: a mistyped secret must not land in a terminal log.
    std::cerr << "hsm-driver: unexpected arguments (not shown); run "
                 "'hsm-driver --help'\n";
    return exit_usage;
  } catch (const CLI::ParseError& e) {
    std::cerr << "hsm-driver: " << e.what() << "\n";
    return exit_usage;
  }

  auto cfg = resolve(raw, process_env());
  if (!cfg)
    return fail(cfg.error());
  if (auto err = init_logging(cfg->log_level)) {
    std::cerr << "hsm-driver: " << describe(err) << "\n";
    return exit_usage;
  }

  if (probe_cmd->parsed())
    return cmd_probe(*cfg);
  if (token_init->parsed())
    return cmd_token_init(*cfg);
  if (mk_init->parsed())
    return cmd_master_key_init(*cfg);
  if (mk_check->parsed())
    return cmd_master_key_check(*cfg);
  if (gen->parsed())
    return cmd_keys_generate(*cfg, key_id, scheme_name);
  if (sign->parsed())
    return cmd_keys_sign(*cfg, key_id, payload_hex);
  if (show->parsed())
    return cmd_keys_show(*cfg, key_id);
  std::cerr << app.help();
  return exit_usage;
}

} // namespace hsm
