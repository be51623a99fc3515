#include "runtime/app/commands.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "runtime/app/config.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "runtime/keys/key_service.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "runtime/app/store_open.hpp"

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

json to_json(const key_result& v) {
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

json to_json(const signature_result& v) {
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
  keys::capabilities caps;
};

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

caf::expected<key_context> open_keys(const driver_config& cfg) {
  auto tok = open_token_session(cfg);
  if (!tok)
    return tok.error();
  auto master = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!master)
    return master.error();
  auto st = open_store(cfg);
  if (!st)
    return st.error();
  auto guard = keys::check_master_key(tok->sess, *master, cfg.master_key_label,
                                **st, true);
  if (!guard)
    return guard.error();
  if (*guard == keys::canary_state::created)
    logger("runtime")->info("recorded the master-key canary in {}",
                            store_name(cfg));
  auto caps = keys::probe(tok->sess, *master, cfg.resident_schemes);
  if (!caps)
    return caps.error();
  log_capabilities(*caps);
  return key_context{std::move(*tok), *master, std::move(*st), *caps};
}

json capabilities_json(const keys::capabilities& caps) {
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
  auto caps = keys::probe(tok->sess, *master, cfg.resident_schemes);
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

int cmd_master_key_init(const driver_config& cfg,
                        const std::string& test_value_file) {
  std::vector<uint8_t> value;
  if (!test_value_file.empty()) {
    auto v = read_test_value(test_value_file);
    if (!v)
      return fail(v.error());
    value = std::move(*v);
  }
  auto tok = open_token_session(cfg);
  if (!tok)
    return fail(tok.error());
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
  auto tok = open_token_session(cfg);
  if (!tok)
    return fail(tok.error());
  auto master = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!master)
    return fail(master.error());
  auto st = open_store(cfg);
  if (!st)
    return fail(st.error());
  auto guard = keys::check_master_key(tok->sess, *master, cfg.master_key_label,
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
  keys::key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
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
  keys::key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
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
  keys::key_service svc{ctx->token.sess, ctx->master, *ctx->st, ctx->caps};
  auto key = svc.show(key_id);
  if (!key)
    return fail(key.error());
  print(json{{"ok", true}, {"key", to_json(*key)}});
  return exit_ok;
}

// -- the daemon, the reference proxy, the dev mode -------------------------------

/// Options of `run` (and `dev`) beyond the key options.
struct run_flags {
  std::string proxy_addr;
  std::string client_cert;
  std::string client_key;
  std::string ca_cert;
  std::string driver_id;
  size_t sessions = 2;
  long hsm_timeout_ms = 10000;
  long drain_timeout_ms = 30000;
  long poll_wait_ms = 20000;
};

std::string env_or(const char* var, const std::string& value) {
  if (!value.empty())
    return value;
  const char* v = std::getenv(var);
  return v != nullptr ? std::string{v} : std::string{};
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0')
    return "hsm-driver";
  return buf;
}

caf::expected<daemon_options> daemon_opts(const driver_config& cfg,
                                          const run_flags& f) {
  daemon_options o;
  o.cfg = cfg;
  o.proxy.proxy_addr = env_or("PROXY_ADDR", f.proxy_addr);
  o.proxy.tls.ca_cert = env_or("CA_CERT", f.ca_cert);
  o.proxy.tls.cert = env_or("CLIENT_CERT", f.client_cert);
  o.proxy.tls.key = env_or("CLIENT_KEY", f.client_key);
  o.proxy.driver_id = env_or("HSM_DRIVER_ID", f.driver_id);
  if (o.proxy.driver_id.empty())
    o.proxy.driver_id = host_name();
  struct required {
    const char* flag;
    std::string value;
  };
  for (auto& r : {required{"--proxy-addr", o.proxy.proxy_addr},
                  required{"--ca-cert", o.proxy.tls.ca_cert.string()},
                  required{"--client-cert", o.proxy.tls.cert.string()},
                  required{"--client-key", o.proxy.tls.key.string()}})
    if (r.value.empty())
      return caf::make_error(config_errc::missing_option,
                             std::string{r.flag},
                             std::string{r.flag} + " is required");
  if (f.sessions < 1 || f.sessions > 256)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--sessions"},
                           std::string{"--sessions must be 1..256"});
  auto check_ms = [](const char* flag, long v, long lo,
                     long hi) -> caf::error {
    if (v < lo || v > hi)
      return caf::make_error(config_errc::invalid_option, std::string{flag},
                             std::string{flag} + " must be "
                               + std::to_string(lo) + ".."
                               + std::to_string(hi) + " ms");
    return caf::none;
  };
  if (auto err = check_ms("--hsm-timeout", f.hsm_timeout_ms, 100, 600000))
    return err;
  if (auto err = check_ms("--drain-timeout", f.drain_timeout_ms, 0, 3600000))
    return err;
  if (auto err = check_ms("--poll-wait", f.poll_wait_ms, 0, 60000))
    return err;
  o.sessions = f.sessions;
  o.hsm_timeout = std::chrono::milliseconds{f.hsm_timeout_ms};
  o.drain_timeout = std::chrono::milliseconds{f.drain_timeout_ms};
  o.poll_wait = std::chrono::milliseconds{f.poll_wait_ms};
  return o;
}

/// Set when the daemon cannot go on; `run` then exits non-zero.
std::atomic<bool> fatal_stop{false};

int cmd_run(const driver_config& cfg, const run_flags& f) {
  auto opts = daemon_opts(cfg, f);
  if (!opts)
    return fail(opts.error());
  opts->on_fatal = [](const std::string& why) {
    logger("runtime")->critical("{}; stopping", why);
    fatal_stop = true;
    ::kill(::getpid(), SIGTERM); // wakes the signal wait below
  };
  auto d = daemon::start(*opts);
  if (!d)
    return fail(d.error());
  auto sig = wait_for_stop_signal();
  if (!fatal_stop)
    logger("runtime")->info("signal {} received", sig);
  (*d)->stop();
  return fatal_stop ? 3 : exit_ok;
}

struct proxy_flags {
  std::string listen = "127.0.0.1:8443";
  std::string admin_listen = "127.0.0.1:8444";
  std::string server_cert;
  std::string server_key;
  std::string client_ca;
  long lease_ms = 30000;
};

caf::error split_host_port(const std::string& addr, const char* flag,
                           std::string& host, uint16_t& port) {
  auto colon = addr.rfind(':');
  if (colon == std::string::npos)
    return caf::make_error(config_errc::invalid_option, std::string{flag},
                           std::string{flag} + " takes host:port");
  host = addr.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  auto p = std::strtol(addr.c_str() + colon + 1, nullptr, 10);
  if (p < 0 || p > 65535)
    return caf::make_error(config_errc::invalid_option, std::string{flag},
                           std::string{flag} + ": bad port");
  port = static_cast<uint16_t>(p);
  return caf::none;
}

int cmd_proxy(const proxy_flags& f) {
  net::reference_proxy_config pc;
  if (auto err = split_host_port(f.listen, "--listen", pc.host, pc.port))
    return fail(err);
  if (auto err = split_host_port(f.admin_listen, "--admin-listen",
                                 pc.admin_host, pc.admin_port))
    return fail(err);
  pc.server_cert = f.server_cert;
  pc.server_key = f.server_key;
  pc.client_ca = f.client_ca;
  pc.lease_duration = std::chrono::milliseconds{f.lease_ms};
  auto proxy = net::reference_proxy::start(pc);
  if (!proxy)
    return fail(proxy.error());
  print(json{{"ok", true},
             {"listen", pc.host + ":" + std::to_string((*proxy)->port())},
             {"admin", pc.admin_host + ":"
                         + std::to_string((*proxy)->admin_port())}});
  wait_for_stop_signal();
  (*proxy)->stop();
  return exit_ok;
}

/// Writes `n` random hex characters' worth of PIN into a 0600 file.
caf::error write_random_pin(const std::filesystem::path& path) {
  std::random_device rd;
  std::string pin;
  const char* digits = "0123456789abcdef";
  for (int i = 0; i < 24; ++i)
    pin += digits[rd() % 16];
  auto old = ::umask(077);
  std::ofstream out{path};
  out << pin << "\n";
  ::umask(old);
  if (!out)
    return caf::make_error(config_errc::bad_file, path.string(),
                           std::string{"cannot write"});
  return caf::none;
}

/// Waits until the reference proxy reports `id` done; nullopt on timeout.
std::optional<json> await_done(net::reference_proxy& proxy,
                               const std::string& id) {
  for (int i = 0; i < 600; ++i) {
    auto st = proxy.request_state(id);
    if (st && (*st)["state"] == "done")
      return json::parse(st->dump());
    std::this_thread::sleep_for(std::chrono::milliseconds{20});
  }
  return std::nullopt;
}

int cmd_dev(driver_config cfg, run_flags f, const std::string& data_dir_arg,
            bool resident_given) {
  namespace fs = std::filesystem;
  auto log = logger("runtime");
  fs::path dir = data_dir_arg.empty() ? fs::path{"hsm-driver-dev"}
                                      : fs::path{data_dir_arg};
  std::error_code ec;
  fs::create_directories(dir / "tokens", ec);
  dir = fs::absolute(dir);
  // A SoftHSMv2 token of our own, unless the caller picked a module.
  auto conf = dir / "softhsm2.conf";
  if (!fs::exists(conf)) {
    std::ofstream out{conf};
    out << "directories.tokendir = " << (dir / "tokens").string() << "\n"
        << "objectstore.backend = file\nlog.level = ERROR\n"
        << "slots.removable = false\n";
  }
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  cfg.sqlite_path = dir / "keys.db";
  if (!resident_given)
    cfg.resident_schemes = {scheme::ed25519};
  bool fresh = !fs::exists(dir / "user.pin");
  if (fresh) {
    if (auto err = write_random_pin(dir / "user.pin"))
      return fail(err);
    if (auto err = write_random_pin(dir / "so.pin"))
      return fail(err);
  }
  ::unsetenv("USER_PIN");
  ::setenv("USER_PIN_FILE", (dir / "user.pin").c_str(), 1);
  {
    auto so = pkcs11::secret_pin::from_file((dir / "so.pin").string());
    auto user = pkcs11::secret_pin::from_file((dir / "user.pin").string());
    if (!so || !user)
      return fail(!so ? so.error() : user.error());
    auto mod = pkcs11::module::load(cfg.pkcs11_module);
    if (!mod)
      return fail(mod.error());
    if (!mod->find_token(cfg.token_label)) {
      log->info("creating token '{}' under {}", cfg.token_label, dir.string());
      if (auto err = pkcs11::init_token(*mod, cfg.token_label, *so, *user))
        return fail(err);
    }
    auto slot = mod->find_token(cfg.token_label);
    if (!slot)
      return fail(slot.error());
    auto sess = pkcs11::session::open(*mod, *slot);
    if (!sess)
      return fail(sess.error());
    if (auto err = sess->login(*user))
      return fail(err);
    bool created = false;
    auto mk = pkcs11::create_master_key(*sess, cfg.master_key_label, &created);
    if (!mk)
      return fail(mk.error());
    if (created)
      log->info("created master key '{}'", cfg.master_key_label);
  } // the module is finalised again: the daemon loads it itself
  auto pki = net::make_dev_pki(dir / "pki");
  if (!pki)
    return fail(pki.error());
  net::reference_proxy_config pc;
  pc.server_cert = pki->server_chain;
  pc.server_key = pki->server_key;
  pc.client_ca = pki->root_cert;
  auto proxy = net::reference_proxy::start(pc);
  if (!proxy)
    return fail(proxy.error());
  f.proxy_addr = "127.0.0.1:" + std::to_string((*proxy)->port());
  f.ca_cert = pki->root_cert.string();
  f.client_cert = pki->driver_chain.string();
  f.client_key = pki->driver_key.string();
  if (f.driver_id.empty())
    f.driver_id = "dev-driver";
  if (f.poll_wait_ms == 20000)
    f.poll_wait_ms = 1000;
  auto opts = daemon_opts(cfg, f);
  if (!opts)
    return fail(opts.error());
  auto d = daemon::start(*opts);
  if (!d)
    return fail(d.error());
  // The demo, through the proxy: a key per scheme, a signature, a check.
  json demo = json::array();
  bool all_ok = true;
  for (auto s : all_schemes) {
    auto name = std::string{to_string(s)};
    auto key_id = "dev-" + name;
    auto gid = (*proxy)->enqueue("generate_key",
                                 {{"key_id", key_id}, {"scheme", name}});
    auto gen = await_done(**proxy, gid);
    if (!gen || !(*gen)["ok"].get<bool>()) {
      demo.push_back({{"scheme", name},
                      {"served", false},
                      {"error", gen ? (*gen)["error"] : json{"timeout"}}});
      continue;
    }
    auto pub = crypto::from_hex((*gen)["result"]["public_key"].get<std::string>());
    std::string msg = "hello from hsm-driver dev";
    std::vector<uint8_t> payload{msg.begin(), msg.end()};
    if (is_ecdsa(s)) {
      payload.resize(32);
      SHA256(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
             payload.data());
    }
    auto sid = (*proxy)->enqueue("sign", {{"key_id", key_id},
                                          {"payload", crypto::to_hex(payload)}});
    auto sig = await_done(**proxy, sid);
    bool verified = false;
    json entry{{"scheme", name}, {"key_id", key_id},
               {"public_key", (*gen)["result"]["public_key"]}};
    if (sig && (*sig)["ok"].get<bool>() && pub) {
      auto raw = crypto::from_hex(
        (*sig)["result"]["signature"].get<std::string>());
      verified = raw && crypto::verify(s, *pub, payload, *raw);
      entry["signature"] = (*sig)["result"]["signature"];
      if ((*sig)["result"].contains("recovery_id"))
        entry["recovery_id"] = (*sig)["result"]["recovery_id"];
    } else if (sig) {
      entry["error"] = (*sig)["error"];
    }
    entry["verified"] = verified;
    all_ok = all_ok && verified;
    demo.push_back(entry);
  }
  print(json{{"ok", all_ok},
             {"data_dir", dir.string()},
             {"proxy", f.proxy_addr},
             {"admin_api", "http://127.0.0.1:"
                             + std::to_string((*proxy)->admin_port())},
             {"demo", demo}});
  std::cerr << "hsm-driver dev: serving; enqueue requests with\n  curl -s "
               "-XPOST http://127.0.0.1:"
            << (*proxy)->admin_port()
            << "/v1/admin/requests -d "
               "'{\"kind\":\"generate_key\",\"params\":{\"key_id\":\"k1\","
               "\"scheme\":\"secp256k1\"}}'\n"
            << "Ctrl-C (SIGINT) or SIGTERM stops it.\n";
  wait_for_stop_signal();
  (*d)->stop();
  (*proxy)->stop();
  return all_ok ? exit_ok : exit_failed;
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
  app.add_option("--postgres-url", raw.postgres_url,
                 "PostgreSQL key store (libpq URI or connection string; "
                 "multi-host with target_session_attrs=read-write works) "
                 "[env: POSTGRES_URL]");
  app.add_option("--resident-schemes", raw.resident_schemes,
                 "comma-separated schemes whose keys stay on the token "
                 "(for tokens that cannot wrap them, e.g. ed25519 on "
                 "SoftHSMv2) [env: HSM_RESIDENT_SCHEMES]");
  app.add_option("--log-level", raw.log_level,
                 "trace, debug, info, warn, error, critical, off [env: "
                 "HSM_LOG_LEVEL; default: info]");

  auto* probe_cmd = app.add_subcommand(
    "probe", "run the keys::capability probe and print which schemes are served");

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
  std::string test_value_file;
  mk_init->add_option(
    "--test-value-file", test_value_file,
    "test and dev tokens only: create the key from the 32-byte value (64 "
    "hex characters) in this 0600 file, so that two test tokens share one "
    "master key; production HSMs use the vendor's cloning procedure");
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

  run_flags rf;
  auto add_run_flags = [&rf](CLI::App* cmd) {
    cmd->add_option("--proxy-addr", rf.proxy_addr,
                    "proxy host:port [env: PROXY_ADDR]");
    cmd->add_option("--client-cert", rf.client_cert,
                    "client certificate chain, PEM [env: CLIENT_CERT]");
    cmd->add_option("--client-key", rf.client_key,
                    "client private key, PEM [env: CLIENT_KEY]");
    cmd->add_option("--ca-cert", rf.ca_cert,
                    "CA that must sign the proxy's certificate [env: "
                    "CA_CERT]");
    cmd->add_option("--driver-id", rf.driver_id,
                    "this driver's id [env: HSM_DRIVER_ID; default: host "
                    "name]");
    cmd->add_option("--sessions", rf.sessions,
                    "PKCS#11 sessions (slots) [default: 2]");
    cmd->add_option("--hsm-timeout", rf.hsm_timeout_ms,
                    "deadline of one HSM call, ms [default: 10000]");
    cmd->add_option("--drain-timeout", rf.drain_timeout_ms,
                    "time to finish in-flight work on SIGTERM, ms [default: "
                    "30000]");
    cmd->add_option("--poll-wait", rf.poll_wait_ms,
                    "long-poll wait, ms [default: 20000]");
  };
  auto* run_cmd = app.add_subcommand(
    "run", "the daemon: pull requests from the proxy and serve them until "
           "SIGTERM/SIGINT");
  add_run_flags(run_cmd);
  const std::string shared_help
    = "\nAlso (before or after the subcommand):\n"
      "  --pkcs11-module PATH     [env: PKCS11_MODULE, PKCS11_THALES_MODULE, "
      "PKCS11_IBM_MODULE]\n"
      "  --token-label LABEL      [env: HSM_TOKEN_LABEL; default: "
      + std::string{default_token_label}
      + "]\n"
        "  --master-key-label LABEL [env: HSM_MASTER_KEY_LABEL; default: "
      + std::string{default_master_key_label}
      + "]\n"
        "  --sqlite-path PATH       [env: SQLITE_PATH; default: "
      + std::string{default_sqlite_path}
      + "]\n"
        "  --postgres-url URL       [env: POSTGRES_URL]\n"
        "  --resident-schemes LIST  [env: HSM_RESIDENT_SCHEMES]\n"
        "  --log-level LEVEL        [env: HSM_LOG_LEVEL; default: info]\n"
        "PIN: USER_PIN or USER_PIN_FILE (never on the command line).\n";
  run_cmd->footer(shared_help);
  std::string data_dir;
  auto* dev_cmd = app.add_subcommand(
    "dev", "the whole system on this machine: a SoftHSMv2 token, a local "
           "PKI, SQLite, the reference proxy and the driver, then a demo; "
           "serves until SIGTERM/SIGINT");
  dev_cmd->add_option("--data-dir", data_dir,
                      "where the token, PKI and database live [default: "
                      "./hsm-driver-dev]");
  add_run_flags(dev_cmd);
  dev_cmd->footer(shared_help);
  proxy_flags pf;
  auto* proxy_cmd = app.add_subcommand(
    "proxy", "the reference proxy (mTLS listener and admin API)");
  proxy_cmd->add_option("--listen", pf.listen, "host:port [127.0.0.1:8443]");
  proxy_cmd->add_option("--admin-listen", pf.admin_listen,
                        "admin API host:port [127.0.0.1:8444]");
  proxy_cmd->add_option("--server-cert", pf.server_cert, "chain, PEM")
    ->required();
  proxy_cmd->add_option("--server-key", pf.server_key, "key, PEM")
    ->required();
  proxy_cmd->add_option("--client-ca", pf.client_ca,
                        "CA that must sign client certificates")
    ->required();
  proxy_cmd->add_option("--lease-ms", pf.lease_ms, "lease duration [30000]");

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

  if (run_cmd->parsed() || dev_cmd->parsed() || proxy_cmd->parsed())
    block_stop_signals(); // before any thread exists
  if (proxy_cmd->parsed()) {
    if (auto err = init_logging(raw.log_level.empty() ? "info"
                                                      : raw.log_level))
      return fail(err);
    return cmd_proxy(pf);
  }
  if (dev_cmd->parsed() && raw.pkcs11_module.empty()
      && std::getenv("PKCS11_MODULE") == nullptr
      && std::getenv("PKCS11_THALES_MODULE") == nullptr
      && std::getenv("PKCS11_IBM_MODULE") == nullptr)
    raw.pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so";
  if (dev_cmd->parsed() && raw.token_label.empty())
    raw.token_label = "hsm-driver-dev";
  auto cfg = resolve(raw, process_env());
  if (!cfg)
    return fail(cfg.error());
  if (auto err = init_logging(cfg->log_level)) {
    std::cerr << "hsm-driver: " << describe(err) << "\n";
    return exit_usage;
  }

  if (run_cmd->parsed())
    return cmd_run(*cfg, rf);
  if (dev_cmd->parsed())
    return cmd_dev(*cfg, rf, data_dir, !raw.resident_schemes.empty());
  if (probe_cmd->parsed())
    return cmd_probe(*cfg);
  if (token_init->parsed())
    return cmd_token_init(*cfg);
  if (mk_init->parsed())
    return cmd_master_key_init(*cfg, test_value_file);
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
