#include "runtime/app/cli.hpp"

#include "runtime/app/commands.hpp"
#include "runtime/app/config.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/run_options.hpp"
#include "runtime/base/hardening.hpp"
#include "runtime/base/logging.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm {

namespace {

// -- option documentation -----------------------------------------------------

/// Where PINs come from; said in the top-level help and under `run`, `dev`.
constexpr std::string_view pin_note
  = "PIN: USER_PIN or USER_PIN_FILE (never on the command line).";

/// An option's help: the one place it is written.
struct option_doc {
  std::string_view flag;
  /// What the value is, for the footer (`PATH`, `LABEL`, ...).
  std::string_view value_name;
  std::string_view help;
  /// The environment variables that stand in for the flag, or empty.
  std::string_view env;
  /// The default as shown, or empty for none.
  std::string default_value;
};

/// `[env: X; default: Y]`, or empty when the option has neither.
std::string env_and_default(const option_doc& doc) {
  std::string out;
  if (!doc.env.empty())
    out += "env: " + std::string{doc.env};
  if (!doc.default_value.empty())
    out += (out.empty() ? "" : "; ") + std::string{"default: "}
           + doc.default_value;
  return out.empty() ? out : "[" + out + "]";
}

/// The help text CLI11 shows: the help, then env and default.
std::string help_text(const option_doc& doc) {
  auto extra = env_and_default(doc);
  return extra.empty() ? std::string{doc.help}
                       : std::string{doc.help} + " " + extra;
}

/// Declares `field` as the option `doc` on `cmd`.
template <class T>
CLI::Option* add_documented(CLI::App* cmd, const option_doc& doc, T& field) {
  auto* opt = cmd->add_option(std::string{doc.flag}, field, help_text(doc));
  if (!doc.value_name.empty())
    opt->type_name(std::string{doc.value_name});
  return opt;
}

/// CLI11's help layout without its own "(Env:NAME)" after an option read
/// from a variable: the help text already says `[env: NAME; ...]`.
class help_formatter : public CLI::Formatter {
public:
  std::string make_option_opts(const CLI::Option* opt) const override {
    auto out = CLI::Formatter::make_option_opts(opt);
    if (!opt->get_envname().empty()) {
      auto tag = " (" + get_label("Env") + ":" + opt->get_envname() + ")";
      if (auto at = out.find(tag); at != std::string::npos)
        out.erase(at, tag.size());
    }
    return out;
  }
};

/// The help of `--allow-weak-master-key`.
constexpr std::string_view weak_master_key_help
  = "start with a master key whose attributes let a blob leave the HSM (a "
    "legacy key, until every row is re-wrapped under a sound one); logged "
    "as an error [env: HSM_ALLOW_WEAK_MASTER_KEY=1]";

/// An option every subcommand takes (before or after the subcommand).
struct shared_option {
  option_doc doc;
  std::string raw_options::*field;
};

/// The key options (README, "Configuration").
const std::array<shared_option, 8>& shared_options() {
  static const std::array<shared_option, 8> table{{
    {{"--pkcs11-module", "PATH", "PKCS#11 module to load",
      "PKCS11_MODULE, PKCS11_THALES_MODULE, PKCS11_IBM_MODULE", ""},
     &raw_options::pkcs11_module},
    {{"--token-label", "LABEL", "label of the token to use", "HSM_TOKEN_LABEL",
      std::string{default_token_label}},
     &raw_options::token_label},
    {{"--master-key-label", "LABEL", "label of the AES master key on the token",
      "HSM_MASTER_KEY_LABEL", std::string{default_master_key_label}},
     &raw_options::master_key_label},
    {{"--sqlite-path", "PATH", "SQLite key store", "SQLITE_PATH",
      std::string{default_sqlite_path}},
     &raw_options::sqlite_path},
    {{"--postgres-url", "URL",
      "PostgreSQL key store (libpq URI or connection string; multi-host with "
      "target_session_attrs=read-write works)",
      "POSTGRES_URL", ""},
     &raw_options::postgres_url},
    {{"--resident-schemes", "LIST",
      "comma-separated schemes whose keys stay on the token (for tokens that "
      "cannot wrap them, e.g. ed25519 on SoftHSMv2)",
      "HSM_RESIDENT_SCHEMES", ""},
     &raw_options::resident_schemes},
    {{"--log-level", "LEVEL", "trace, debug, info, warn, error, critical, off",
      "HSM_LOG_LEVEL", std::string{default_log_level}},
     &raw_options::log_level},
    {{"--log-format", "FORMAT",
      "text, or json (one object per line, the request id a field of its "
      "own)",
      "HSM_LOG_FORMAT", "text"},
     &raw_options::log_format},
  }};
  return table;
}

/// The shared options as a footer for subcommands whose own help would not
/// show them (CLI11 lists only a subcommand's own options).
std::string shared_options_footer() {
  std::string out = "\nAlso (before or after the subcommand):\n";
  for (auto& opt : shared_options()) {
    auto name = std::string{opt.doc.flag} + " "
                + std::string{opt.doc.value_name};
    name.resize(std::max<size_t>(name.size() + 1, 25), ' ');
    out += "  " + name + env_and_default(opt.doc) + "\n";
  }
  out += "  --allow-weak-master-key  [env: HSM_ALLOW_WEAK_MASTER_KEY=1]\n";
  return out + std::string{pin_note} + "\n";
}

/// Declares the options of `run` and `dev` on `cmd`.
void add_run_flags(CLI::App* cmd, run_flags& f) {
  auto num = [](auto value) { return std::to_string(value); };
  add_documented(cmd, {"--proxy-addr", "", "proxy host:port", "PROXY_ADDR", ""},
                 f.proxy_addr);
  add_documented(cmd,
                 {"--client-cert", "", "client certificate chain, PEM",
                  "CLIENT_CERT", ""},
                 f.client_cert);
  add_documented(
    cmd, {"--client-key", "", "client private key, PEM", "CLIENT_KEY", ""},
    f.client_key);
  add_documented(cmd,
                 {"--ca-cert", "", "CA that must sign the proxy's certificate",
                  "CA_CERT", ""},
                 f.ca_cert);
  add_documented(
    cmd, {"--driver-id", "", "this driver's id", "HSM_DRIVER_ID", "host name"},
    f.driver_id);
  add_documented(cmd,
                 {"--sessions", "", "PKCS#11 sessions, 1-256", "HSM_SESSIONS",
                  num(default_sessions)},
                 f.sessions)
    ->envname("HSM_SESSIONS");
  add_documented(cmd,
                 {"--pipeline", "",
                  "leases held per healthy session, 1-16 (the next request "
                  "is fetched and looked up while one is in the HSM)",
                  "HSM_PIPELINE", num(default_pipeline)},
                 f.pipeline)
    ->envname("HSM_PIPELINE");
  add_documented(cmd,
                 {"--hsm-timeout", "", "deadline of one HSM call, ms",
                  "HSM_HSM_TIMEOUT_MS", num(default_hsm_timeout_ms)},
                 f.hsm_timeout_ms)
    ->envname("HSM_HSM_TIMEOUT_MS");
  add_documented(cmd,
                 {"--drain-timeout", "",
                  "time to finish in-flight work on SIGTERM, ms",
                  "HSM_DRAIN_TIMEOUT_MS", num(default_drain_timeout_ms)},
                 f.drain_timeout_ms)
    ->envname("HSM_DRAIN_TIMEOUT_MS");
  add_documented(cmd,
                 {"--poll-wait", "", "long-poll wait, ms", "HSM_POLL_WAIT_MS",
                  num(default_poll_wait_ms)},
                 f.poll_wait_ms)
    ->envname("HSM_POLL_WAIT_MS");
  add_documented(cmd,
                 {"--tls-min", "VERSION",
                  "lowest TLS version to the proxy: 1.3, or 1.2 for a proxy "
                  "that cannot speak 1.3",
                  "HSM_TLS_MIN", "1.3"},
                 f.tls_min);
  add_documented(cmd,
                 {"--https-proxy", "URL",
                  "an HTTPS proxy on the way to the proxy; without it none "
                  "is used, whatever https_proxy or HTTPS_PROXY say",
                  "HSM_HTTPS_PROXY", "none"},
                 f.https_proxy);
  add_documented(cmd,
                 {"--cert-warn-days", "DAYS",
                  "warn (at start and once a day) when the client "
                  "certificate expires within DAYS days",
                  "HSM_CERT_WARN_DAYS", num(net::default_cert_warn_days)},
                 f.cert_warn_days);
  add_documented(cmd,
                 {"--metrics-listen", "HOST:PORT",
                  "serve /metrics (Prometheus), /healthz and /readyz here, "
                  "plain HTTP; a loopback address unless "
                  "--metrics-allow-remote; port 0 picks a free one; off: "
                  "not served",
                  "HSM_METRICS_LISTEN", "off (dev: 127.0.0.1:0)"},
                 f.metrics_listen);
  cmd->add_flag("--metrics-allow-remote", f.metrics_allow_remote,
                "let --metrics-listen name an address that is not loopback "
                "(it has no authentication: put TLS and access control in "
                "front)");
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

/// A subcommand group that needs one of its subcommands.
CLI::App* add_group(CLI::App& app, const std::string& name,
                    const std::string& help) {
  auto* group = app.add_subcommand(name, help);
  group->require_subcommand(1);
  group->fallthrough();
  return group;
}

} // namespace

int run_cli(int argc, char** argv) {
  if (pin_on_command_line(argc, argv)) {
    std::cerr << "hsm-driver: PINs are not accepted on the command line; set "
                 "USER_PIN or USER_PIN_FILE\n";
    return exit_usage;
  }
  // Before any secret is read: no core file, no ptrace by another process.
  if (auto err = harden_process()) {
    std::cerr << "hsm-driver: " << describe(err) << "\n";
    return exit_failed;
  }
  CLI::App app{"hsm-driver: keeps private keys in a PKCS#11 HSM; generates "
               "keys and signs with them.\n"
               + std::string{pin_note}};
  app.formatter(std::make_shared<help_formatter>());
  app.require_subcommand(1);
  app.fallthrough();
  raw_options raw;
  for (auto& opt : shared_options())
    add_documented(&app, opt.doc, raw.*opt.field);
  app.add_flag("--allow-weak-master-key", raw.allow_weak_master_key,
               std::string{weak_master_key_help});
  auto footer = shared_options_footer();

  // The subcommands that work on the configured token, with their handlers.
  std::vector<std::pair<CLI::App*, std::function<int(const driver_config&)>>>
    token_commands;
  auto* probe = app.add_subcommand("probe", "run the keys::capability probe "
                                            "and print which schemes are "
                                            "served");
  token_commands.emplace_back(probe, cmd_probe);

  auto* token = add_group(app, "token", "test and dev tokens");
  auto* token_init = token->add_subcommand(
    "init", "initialise a free slot as --token-label (SO_PIN or SO_PIN_FILE, "
            "and USER_PIN or USER_PIN_FILE)");
  token_commands.emplace_back(token_init, cmd_token_init);

  auto* mk = add_group(app, "master-key", "the token's AES master key");
  auto* mk_init = mk->add_subcommand(
    "init", "create the master key on a test or dev token (AES-256, "
            "sensitive, not extractable, wrap/unwrap)");
  std::string test_value_file;
  mk_init->add_option(
    "--test-value-file", test_value_file,
    "test and dev tokens only: create the key from the 32-byte value (64 "
    "hex characters) in this 0600 file, so that two test tokens share one "
    "master key; production HSMs use the vendor's cloning procedure");
  token_commands.emplace_back(mk_init, [&](const driver_config& cfg) {
    return cmd_master_key_init(cfg, test_value_file);
  });
  auto* mk_check = mk->add_subcommand(
    "check", "check that the token's master key matches the database");
  token_commands.emplace_back(mk_check, cmd_master_key_check);
  rotate_options rotate;
  auto* mk_rotate = mk->add_subcommand(
    "rotate", "move every key row to another master key inside the HSM "
              "(resumable; drivers keep serving); also seals rows from "
              "before the row MAC");
  mk_rotate->add_option("--to", rotate.to, "label of the new master key")
    ->required();
  mk_rotate->add_flag("--create", rotate.create,
                      "create the new master key (and its row-MAC key) if "
                      "the token lacks it");
  mk_rotate->add_option("--batch", rotate.batch,
                        "rows per batch [default: 100]");
  mk_rotate->add_flag("--complete", rotate.complete,
                      "declare the rotation complete: drivers refuse rows "
                      "under the old key from their next start");
  token_commands.emplace_back(mk_rotate, [&](const driver_config& cfg) {
    return cmd_master_key_rotate(cfg, rotate);
  });

  auto* audit = add_group(app, "audit", "the audit trail");
  auto* audit_verify = audit->add_subcommand(
    "verify", "check every driver's hash chain in the audit trail (the "
              "database only; no token)");
  token_commands.emplace_back(audit_verify, cmd_audit_verify);
  auto* db = add_group(app, "db", "verify, export and import the key store");
  auto* db_verify = db->add_subcommand(
    "verify", "check every row against this HSM (MAC, key id, unwrap, a test "
              "signature) without writing anything; exit 1 naming each bad "
              "row");
  token_commands.emplace_back(db_verify, cmd_db_verify);
  std::string db_file;
  auto* db_export = db->add_subcommand(
    "export", "write every wrapped row with its MAC, the canary and the "
              "rotation record to a new 0600 file (no token needed)");
  db_export->add_option("--out", db_file, "the file to create")->required();
  token_commands.emplace_back(db_export, [&](const driver_config& cfg) {
    return cmd_db_export(cfg, db_file);
  });
  auto* db_import = db->add_subcommand(
    "import", "insert the rows of an export whose MACs hold on this HSM; "
              "skips rows already there, never overwrites a key id");
  db_import->add_option("--in", db_file, "the export file")->required();
  token_commands.emplace_back(db_import, [&](const driver_config& cfg) {
    return cmd_db_import(cfg, db_file);
  });
  auto* keys = add_group(app, "keys", "generate, sign, show, reconcile");
  std::string key_id;
  std::string scheme_name;
  std::string payload_hex;
  auto* gen = keys->add_subcommand("generate", "generate a key (idempotent "
                                               "by key id)");
  auto* sign = keys->add_subcommand("sign", "sign a payload (32-byte hash "
                                            "for ECDSA, message for ed25519)");
  auto* show = keys->add_subcommand("show", "print a key's public data");
  for (auto* cmd : {gen, sign, show})
    cmd->add_option("--key-id", key_id, "the key's id")->required();
  gen->add_option("--scheme", scheme_name, "secp256k1, p256 or ed25519")
    ->required();
  sign->add_option("--payload", payload_hex, "the payload, hex")->required();
  token_commands.emplace_back(gen, [&](const driver_config& cfg) {
    return cmd_keys_generate(cfg, key_id, scheme_name);
  });
  token_commands.emplace_back(sign, [&](const driver_config& cfg) {
    return cmd_keys_sign(cfg, key_id, payload_hex);
  });
  token_commands.emplace_back(show, [&](const driver_config& cfg) {
    return cmd_keys_show(cfg, key_id);
  });
  bool apply = false;
  bool include_orphans = false;
  auto* reconcile = keys->add_subcommand(
    "reconcile", "compare token-resident key objects with the store; prints "
                 "kept, losers (lost a generation race) and orphans (no "
                 "row); a dry run unless --apply");
  reconcile->add_flag("--apply", apply,
                      "destroy the losers (safe while drivers run)");
  reconcile->add_flag("--include-orphans", include_orphans,
                      "with --apply, destroy the orphans too; only with "
                      "every driver on this token stopped (an orphan may be "
                      "a generation still storing its key)");
  token_commands.emplace_back(reconcile, [&](const driver_config& cfg) {
    return cmd_keys_reconcile(cfg, apply, include_orphans);
  });

  run_flags rf;
  auto* run_cmd = app.add_subcommand(
    "run", "the daemon: pull requests from the proxy and serve them until "
           "SIGTERM/SIGINT");
  add_run_flags(run_cmd, rf);
  run_cmd->footer(footer);
  token_commands.emplace_back(run_cmd, [&](const driver_config& cfg) {
    return cmd_run(cfg, rf);
  });

  std::string data_dir;
  auto* dev_cmd = app.add_subcommand(
    "dev", "the whole system on this machine: a SoftHSMv2 token, a local "
           "PKI, SQLite, the reference proxy and the driver, then a demo; "
           "serves until SIGTERM/SIGINT");
  dev_cmd->add_option("--data-dir", data_dir,
                      "where the token, PKI and database live [default: ./"
                        + std::string{default_dev_data_dir} + "]");
  add_run_flags(dev_cmd, rf);
  dev_cmd->footer(footer);
  token_commands.emplace_back(dev_cmd, [&](const driver_config& cfg) {
    return cmd_dev(cfg, rf, data_dir, !raw.resident_schemes.empty());
  });

  proxy_flags pf;
  auto* proxy_cmd = app.add_subcommand(
    "proxy", "the reference proxy (mTLS listener and admin API)");
  proxy_cmd->add_option("--listen", pf.listen,
                        "host:port; port 0 picks a free one [default: "
                          + std::string{default_proxy_listen} + "]");
  proxy_cmd->add_option("--admin-listen", pf.admin_listen,
                        "admin API host:port [default: "
                          + std::string{default_proxy_admin_listen} + "]");
  proxy_cmd->add_option("--server-cert", pf.server_cert, "chain, PEM")
    ->required();
  proxy_cmd->add_option("--server-key", pf.server_key, "key, PEM")->required();
  proxy_cmd
    ->add_option("--client-ca", pf.client_ca,
                 "CA that must sign client certificates")
    ->required();
  proxy_cmd->add_option("--lease-ms", pf.lease_ms,
                        "lease duration [default: "
                          + std::to_string(default_proxy_lease_ms) + "]");
  proxy_cmd
    ->add_option("--admin-token-file", pf.admin_token_file,
                 "the admin API's bearer token (Authorization: Bearer ...), "
                 "a 0600 file; made with a random token if it does not exist")
    ->required();
  proxy_cmd
    ->add_option("--tls-min", pf.tls_min,
                 "lowest TLS version drivers may use: 1.3, or 1.2 [default: "
                 "1.3]")
    ->check(CLI::IsMember({"1.3", "1.2"}));
  proxy_cmd->add_flag("--admin-allow-remote", pf.admin_remote,
                      "let --admin-listen bind an address that is not "
                      "loopback (plain HTTP; put TLS in front)");

  auto* pki = add_group(app, "pki",
                        "the driver's certificates: the "
                        "intermediate's CSR, leaves, the check");
  pki_csr_flags csr_f;
  auto* pki_csr = pki->add_subcommand(
    "csr", "make the intermediate CA's key (0600) and a CSR exactly as the "
           "vendor's template asks");
  pki_csr
    ->add_option("--template", csr_f.template_file,
                 "the vendor's CSR template, JSON (README, \"PKI\")")
    ->required();
  pki_csr->add_option("--key-out", csr_f.key_out,
                      "the new key, 0600, never overwritten [default: "
                      "intermediate-key.pem]");
  pki_csr->add_option("--csr-out", csr_f.csr_out,
                      "the CSR [default: intermediate.csr]");
  pki_csr->add_option("--passphrase-file", csr_f.passphrase_file,
                      "encrypt the key with the passphrase in this 0600 "
                      "file");
  pki_issue_flags issue_f;
  auto* pki_issue = pki->add_subcommand(
    "issue-leaf", "issue a driver's certificate (clientAuth) signed by the "
                  "intermediate: leaf.pem, leaf-key.pem (0600), "
                  "leaf-chain.pem (leaf + intermediate)");
  pki_issue
    ->add_option("--intermediate-cert", issue_f.ca_cert,
                 "the intermediate's certificate, PEM")
    ->required();
  pki_issue
    ->add_option("--intermediate-key", issue_f.ca_key,
                 "the intermediate's key, PEM")
    ->required();
  pki_issue->add_option("--intermediate-passphrase-file",
                        issue_f.ca_passphrase_file,
                        "the key's passphrase, in a 0600 file");
  pki_issue->add_option("--name", issue_f.name, "the driver's name (CN)")
    ->required();
  pki_issue->add_option("--san", issue_f.sans,
                        "subjectAltName entries, DNS names or IP addresses "
                        "[default: the name]");
  pki_issue->add_option("--days", issue_f.days,
                        "validity, never beyond the intermediate's [default: "
                          + std::to_string(default_leaf_days) + "]");
  pki_issue->add_option("--out-dir", issue_f.out_dir,
                        "where the files go [default: .]");
  pki_issue->add_option("--root", issue_f.root,
                        "the vendor's root: also write chain.pem "
                        "(intermediate + root, for --ca-cert) and check the "
                        "new files against it");
  pki_verify_flags verify_f;
  auto* pki_verify = pki->add_subcommand(
    "verify", "check the driver's TLS files as the daemon does at start: "
              "chain to the root, validity, clientAuth, key match, days "
              "left; with --proxy-addr also the proxy's certificate");
  pki_verify->add_option("--client-cert", verify_f.client_cert,
                         "[env: CLIENT_CERT]");
  pki_verify->add_option("--client-key", verify_f.client_key,
                         "[env: CLIENT_KEY]");
  pki_verify->add_option("--ca-cert", verify_f.ca_cert, "[env: CA_CERT]");
  pki_verify->add_option("--proxy-addr", verify_f.proxy_addr,
                         "[env: PROXY_ADDR]");
  pki_verify->add_option("--warn-days", verify_f.warn_days,
                         "expires_soon below this many days [default: 30]");

  bench_flags bf;
  auto* bench_cmd = app.add_subcommand(
    "bench", "measure a deployment: the raw PKCS#11 rate and the full "
             "system's (reference proxy + driver) with the same sessions, and "
             "their ratio; or a session sweep through a latency shim. "
             "Without --pkcs11-module it makes a SoftHSMv2 token of its own "
             "(bench/README.md)");
  add_bench_options(bench_cmd, bf, footer);

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

  {
    auto format = raw.log_format;
    if (format.empty())
      format = process_env()("HSM_LOG_FORMAT").value_or("text");
    if (auto err = set_log_format(format)) {
      std::cerr << "hsm-driver: " << describe(err) << "\n";
      return exit_usage;
    }
  }
  if (bench_cmd->parsed())
    return cmd_bench(raw, bf);
  if (run_cmd->parsed() || dev_cmd->parsed() || proxy_cmd->parsed())
    block_stop_signals(); // before any thread exists
  if (proxy_cmd->parsed()) {
    if (auto err = init_logging(raw.log_level.empty() ? default_log_level
                                                      : raw.log_level))
      return fail(err);
    return cmd_proxy(pf);
  }
  if (pki->parsed()) {
    if (auto err = init_logging(raw.log_level.empty() ? default_log_level
                                                      : raw.log_level))
      return fail(err);
    if (pki_csr->parsed())
      return cmd_pki_csr(csr_f);
    if (pki_issue->parsed())
      return cmd_pki_issue_leaf(issue_f);
    return cmd_pki_verify(verify_f);
  }
  auto env = process_env();
  if (dev_cmd->parsed())
    apply_dev_defaults(raw, env);
  auto cfg = resolve(raw, env);
  // The URL (and its password) is in `cfg` now; not in the environment.
  scrub_env("POSTGRES_URL");
  if (!cfg)
    return fail(cfg.error());
  if (auto err = init_logging(cfg->log_level)) {
    std::cerr << "hsm-driver: " << describe(err) << "\n";
    return exit_usage;
  }
  if (cfg->postgres_url_source == "--postgres-url"
      && url_has_password(cfg->postgres_url))
    logger("runtime")->warn(
      "--postgres-url carries a password, which any local user can read in "
      "/proc/<pid>/cmdline; put the URL in a 0600 file named by "
      "POSTGRES_URL_FILE, or the password in ~/.pgpass");
  for (auto& [cmd, handler] : token_commands)
    if (cmd->parsed())
      return handler(*cfg);
  std::cerr << app.help();
  return exit_usage;
}

} // namespace hsm
