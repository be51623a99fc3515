// `hsm-driver bench`: what an operator runs to size a deployment
// (bench/README.md). In one process run, per store, scheme, kind and
// session count: the raw PKCS#11 rate (bench_raw.hpp) and the full
// system's rate with the same sessions (bench_system.hpp: the reference
// proxy here, the driver as a child process), and their ratio. Or, with
// `--sweep`, the full system at several session counts through the PKCS#11
// latency shim, against the ideal that the 1-session raw loop sets. Or,
// with `--soak N`, one driver serving N requests chunk by chunk, its
// memory (VmRSS) read after each chunk.

#include "runtime/app/bench_raw.hpp"
#include "runtime/app/bench_report.hpp"
#include "runtime/app/bench_system.hpp"
#include "runtime/app/commands.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/local_token.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/run_options.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/base/secret_file.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "store/pg_conninfo.hpp"

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/format.h>
#include <pqxx/pqxx>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

extern char** environ;

namespace hsm {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using bench::op_kind;

/// The token label of the bench's own SoftHSMv2 token.
constexpr std::string_view bench_token_label = "hsm-driver-bench";

/// The driver's poll wait: short, so that a driver stops quickly.
constexpr long driver_poll_wait_ms = 1000;

/// A progress line on stderr.
template <class... Ts>
void progress(fmt::format_string<Ts...> format, Ts&&... xs) {
  std::cerr << "bench: " << fmt::format(format, std::forward<Ts>(xs)...)
            << std::endl;
}

// -- options ------------------------------------------------------------------

/// Defaults of the soak's options.
constexpr std::string_view default_soak_scheme = "p256";
constexpr std::string_view default_soak_kind = "sign";
constexpr size_t default_soak_chunk = 20000;
constexpr size_t default_soak_sessions = 2;
constexpr size_t max_soak_requests = 100000000;

/// `bench --soak*` as given. They live here, next to their only reader,
/// rather than in `bench_flags` (commands.hpp): `add_bench_options` binds
/// them and `cmd_bench` reads them, both in this file, once per process.
struct soak_flags {
  /// `--soak`: timed requests in all; 0 for no soak.
  size_t requests = 0;
  std::string scheme{default_soak_scheme};
  std::string kind{default_soak_kind};
  size_t chunk = default_soak_chunk;
  /// `--soak` and `--sessions`, to tell a given value from a default.
  const CLI::Option* soak_option = nullptr;
  const CLI::Option* sessions_option = nullptr;
};

soak_flags& soak_options() {
  static soak_flags flags;
  return flags;
}

/// `--soak` was given.
bool soak_given() {
  auto* o = soak_options().soak_option;
  return o != nullptr && o->count() > 0;
}

/// A usage error: the option and what is wrong (exit 2).
struct usage_error {
  std::string option;
  std::string message;
};

int report_usage(const usage_error& err) {
  std::cerr << "hsm-driver bench: " << err.option << ": " << err.message
            << "\n";
  return exit_usage;
}

/// Parses a comma-separated list of session counts, 1-256.
std::optional<usage_error> parse_counts(const std::string& text,
                                        const std::string& option,
                                        std::vector<size_t>& out) {
  for (auto& part : split_list(text)) {
    size_t value = 0;
    auto ok = !part.empty()
              && part.find_first_not_of("0123456789") == std::string::npos
              && part.size() <= 3;
    if (ok)
      value = std::stoul(part);
    if (!ok || value < 1 || value > 256)
      return usage_error{option,
                         "'" + part + "' is not a session count (1-256)"};
    if (std::find(out.begin(), out.end(), value) == out.end())
      out.push_back(value);
  }
  if (out.empty())
    return usage_error{option, "give at least one session count"};
  return std::nullopt;
}

/// The checked options.
struct bench_plan {
  std::vector<size_t> sessions;
  std::vector<scheme> schemes;
  std::vector<op_kind> kinds;
  std::vector<size_t> sweep;
  scheme sweep_scheme = scheme::p256;
  op_kind sweep_kind = op_kind::sign;
  fs::path latency_module;
  std::string latency_spec;
  std::optional<fs::path> gnuplot;
  /// The soak: requests in all (0: no soak), per chunk, and what.
  size_t soak = 0;
  size_t soak_chunk = default_soak_chunk;
  size_t soak_sessions = default_soak_sessions;
  scheme soak_scheme = scheme::p256;
  op_kind soak_kind = op_kind::sign;
};

/// The soak's options, checked into `p` (`--soak` was given).
std::optional<usage_error> check_soak_flags(const soak_flags& sf,
                                            bench_plan& p) {
  if (sf.requests < 1 || sf.requests > max_soak_requests)
    return usage_error{"--soak",
                       "must be 1-" + std::to_string(max_soak_requests)};
  if (sf.chunk < 1 || sf.chunk > 1000000)
    return usage_error{"--soak-chunk", "must be 1-1000000"};
  p.soak = sf.requests;
  p.soak_chunk = std::min(sf.chunk, sf.requests);
  auto s = parse_scheme(sf.scheme);
  if (!s)
    return usage_error{"--soak-scheme", "unknown scheme '" + sf.scheme
                                          + "' (secp256k1, p256, ed25519)"};
  p.soak_scheme = *s;
  auto k = bench::parse_op_kind(sf.kind);
  if (!k)
    return usage_error{"--soak-kind",
                       "unknown kind '" + sf.kind + "' (generate, sign)"};
  p.soak_kind = *k;
  if (sf.sessions_option != nullptr && sf.sessions_option->count() > 0) {
    if (p.sessions.size() != 1)
      return usage_error{"--sessions",
                         "the soak takes one session count, e.g. --sessions "
                         "2"};
    p.soak_sessions = p.sessions.front();
  }
  return std::nullopt;
}

std::optional<usage_error> check_flags(const bench_flags& f, bench_plan& p) {
  if (auto err = parse_counts(f.sessions, "--sessions", p.sessions))
    return err;
  for (auto& name : split_list(f.schemes)) {
    auto s = parse_scheme(name);
    if (!s)
      return usage_error{"--schemes", "unknown scheme '" + name
                                        + "' (secp256k1, p256, ed25519)"};
    if (std::find(p.schemes.begin(), p.schemes.end(), *s) == p.schemes.end())
      p.schemes.push_back(*s);
  }
  if (p.schemes.empty())
    return usage_error{"--schemes", "give at least one scheme"};
  for (auto& name : split_list(f.kinds)) {
    auto k = bench::parse_op_kind(name);
    if (!k)
      return usage_error{"--kinds",
                         "unknown kind '" + name + "' (generate, sign)"};
    if (std::find(p.kinds.begin(), p.kinds.end(), *k) == p.kinds.end())
      p.kinds.push_back(*k);
  }
  if (p.kinds.empty())
    return usage_error{"--kinds", "give at least one kind"};
  if (f.requests < 1 || f.requests > 1000000)
    return usage_error{"--requests", "must be 1-1000000"};
  if (f.pipeline < 1 || f.pipeline > 16)
    return usage_error{"--pipeline", "must be 1-16"};
  if (f.raw_ops > 10000000)
    return usage_error{"--raw-ops", "must be 0-10000000"};
  if (!(f.raw_seconds > 0 && f.raw_seconds <= 3600))
    return usage_error{"--raw-seconds", "must be more than 0 and at most 3600"};
  if (f.sign_keys < 1 || f.sign_keys > 100000)
    return usage_error{"--sign-keys", "must be 1-100000"};
  if (!f.json_file.empty()) {
    auto dir = fs::absolute(fs::path{f.json_file}).parent_path();
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
      return usage_error{"--json", "no folder " + dir.string()};
  }
  if (soak_given())
    return check_soak_flags(soak_options(), p);
  if (f.sweep.empty())
    return std::nullopt;
  if (auto err = parse_counts(f.sweep, "--sweep", p.sweep))
    return err;
  auto s = parse_scheme(f.sweep_scheme);
  if (!s)
    return usage_error{"--sweep-scheme", "unknown scheme '" + f.sweep_scheme
                                           + "' (secp256k1, p256, ed25519)"};
  p.sweep_scheme = *s;
  auto k = bench::parse_op_kind(f.sweep_kind);
  if (!k)
    return usage_error{"--sweep-kind",
                       "unknown kind '" + f.sweep_kind + "' (generate, sign)"};
  p.sweep_kind = *k;
  if (f.sweep_requests < 1 || f.sweep_requests > 100000)
    return usage_error{"--sweep-requests", "must be 1-100000"};
  if (f.latency_module.empty()) {
    std::error_code ec;
    auto exe = fs::read_symlink("/proc/self/exe", ec);
    p.latency_module = exe.parent_path() / bench_shim_file;
    if (ec || !fs::is_regular_file(p.latency_module, ec))
      return usage_error{"--latency-module",
                         "no latency shim at " + p.latency_module.string()
                           + " (build it: cmake --build <build> --target "
                             "hsm_pkcs11_shim), and none given"};
  } else {
    p.latency_module = fs::absolute(fs::path{f.latency_module});
    std::error_code ec;
    if (!fs::is_regular_file(p.latency_module, ec))
      return usage_error{"--latency-module",
                         "no such file: " + p.latency_module.string()};
  }
  p.latency_spec = f.latency_spec;
  if (p.latency_spec.empty())
    p.latency_spec = std::string{p.sweep_kind == op_kind::sign
                                   ? default_bench_sign_spec
                                   : default_bench_generate_spec};
  if (!f.plot_file.empty()) {
    p.gnuplot = bench::find_program("gnuplot");
    if (!p.gnuplot)
      return usage_error{"--plot", "gnuplot is not installed (on Debian: "
                                   "apt-get install gnuplot-nox)"};
    auto dir = fs::absolute(fs::path{f.plot_file}).parent_path();
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
      return usage_error{"--plot", "no folder " + dir.string()};
  }
  return std::nullopt;
}

// -- the environment ----------------------------------------------------------

/// Variables a driver child must not inherit: the bench sets what it
/// needs as flags or variables of its own.
const std::set<std::string>& withheld_vars() {
  static const std::set<std::string> names{"USER_PIN",
                                           "USER_PIN_FILE",
                                           "PKCS11_MODULE",
                                           "PKCS11_THALES_MODULE",
                                           "PKCS11_IBM_MODULE",
                                           "POSTGRES_URL",
                                           "SQLITE_PATH",
                                           "HSM_TOKEN_LABEL",
                                           "HSM_MASTER_KEY_LABEL",
                                           "HSM_RESIDENT_SCHEMES",
                                           "HSM_LOG_LEVEL",
                                           "PROXY_ADDR",
                                           "CA_CERT",
                                           "CLIENT_CERT",
                                           "CLIENT_KEY",
                                           "HSM_DRIVER_ID",
                                           "PGOPTIONS"};
  return names;
}

/// This process's environment without `withheld_vars`, plus `extra`.
std::vector<std::string> child_env(const std::vector<std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string entry{*e};
    auto name = entry.substr(0, entry.find('='));
    if (withheld_vars().count(name) == 0)
      out.push_back(std::move(entry));
  }
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

/// The temporary folder of one run; removed on destruction unless kept.
struct temp_dir {
  fs::path path;
  bool keep = false;
  /// Removed even when the folder is kept (a copy of a real token's PIN).
  std::vector<fs::path> secrets;

  ~temp_dir() {
    if (path.empty())
      return;
    std::error_code ec;
    for (auto& f : secrets)
      fs::remove(f, ec);
    if (keep) {
      std::cerr << "bench: kept " << path.string() << "\n";
      return;
    }
    fs::remove_all(path, ec);
  }
};

/// A PostgreSQL schema of the run's own (the driver finds its tables there
/// through PGOPTIONS=-c search_path=...): a fresh token's master key needs
/// a store without a canary, and the run leaves nothing behind. Dropped on
/// destruction.
struct pg_schema {
  std::string url;
  std::string name;

  ~pg_schema() {
    if (name.empty())
      return;
    try {
      pqxx::connection c{url};
      pqxx::nontransaction tx{c};
      tx.exec("DROP SCHEMA IF EXISTS " + name + " CASCADE");
    } catch (const std::exception& e) {
      std::cerr << "bench: could not drop the schema " << name << ": "
                << e.what() << "\n";
    }
  }
};

/// Ends the signal watcher: wakes it if no signal came.
struct signal_watcher {
  std::atomic<bool> stop{false};
  std::atomic<bool> finishing{false};
  std::thread thread;

  void start() {
    thread = std::thread{[this] {
      auto sig = wait_for_stop_signal();
      if (!finishing) {
        stop = true;
        std::cerr << "bench: signal " << sig
                  << " received; stopping (the driver drains first)"
                  << std::endl;
      }
    }};
  }

  ~signal_watcher() {
    if (!thread.joinable())
      return;
    finishing = true;
    ::pthread_kill(thread.native_handle(), SIGTERM);
    thread.join();
  }
};

// -- the token ----------------------------------------------------------------

/// What the bench runs on: the module loaded here, a session, the master
/// key, the PIN, and how a driver child logs in.
struct bench_token {
  token_session tok;
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  pkcs11::secret_pin pin;
  /// The PIN file the driver children get as USER_PIN_FILE.
  fs::path child_pin_file;
  /// The module the driver children load (the shim in a sweep).
  fs::path child_module;
  /// The probe's findings on this token.
  keys::capabilities caps;
};

/// A fresh SoftHSMv2 token under `dir` (SOFTHSM2_CONF of this process and
/// its children), with random PINs in 0600 files and a master key.
caf::expected<bench_token> fresh_token(const driver_config& cfg,
                                       const fs::path& load_path,
                                       const fs::path& dir) {
  auto t = prepare_local_token(cfg, load_path, dir);
  if (!t)
    return t.error();
  bench_token out{std::move(t->tok), t->master, std::move(t->pin),
                  dir / "user.pin",  load_path, {}};
  return out;
}

/// The token named by the options; the master key must exist.
caf::expected<bench_token> existing_token(const driver_config& cfg,
                                          const fs::path& load_path,
                                          const fs::path& dir) {
  std::optional<fs::path> pin_file;
  if (const char* f = std::getenv("USER_PIN_FILE"); f != nullptr && *f != 0)
    pin_file = fs::absolute(fs::path{f});
  auto pin = pkcs11::secret_pin::from_environment();
  if (!pin)
    return pin.error();
  auto mod = pkcs11::module::load(load_path);
  if (!mod)
    return mod.error();
  auto tok = open_token(std::move(*mod), cfg, *pin);
  if (!tok)
    return tok.error();
  auto mk = pkcs11::find_master_key(tok->sess, cfg.master_key_label);
  if (!mk)
    return mk.error();
  if (!pin_file) {
    // The PIN came from USER_PIN (now wiped from this process): the
    // children read it from a 0600 file in the run's own 0700 folder.
    pin_file = dir / "user.pin";
    if (auto err = write_secret_file(
          *pin_file, std::string_view{pin->data(), pin->size()}, "user PIN"))
      return err;
  }
  bench_token out{std::move(*tok), *mk,       std::move(*pin),
                  *pin_file,       load_path, {}};
  return out;
}

// -- the runs -----------------------------------------------------------------

/// One key store the full system runs on.
struct store_target {
  /// `sqlite` or `postgres`.
  std::string name;
  /// The driver's store flags and variables.
  std::vector<std::string> args;
  std::vector<std::string> env;
};

/// What every run shares.
struct bench_context {
  const driver_config* cfg = nullptr;
  const bench_flags* flags = nullptr;
  bench_token* token = nullptr;
  net::reference_proxy* proxy = nullptr;
  net::dev_pki pki;
  fs::path dir;
  std::string run_id;
  bool fresh = true;
  /// HSM_SHIM_* for the children of a sweep.
  std::vector<std::string> shim_env;
  const std::atomic<bool>* stop = nullptr;
};

bench::raw_target raw_target_of(bench_context& ctx) {
  bench::raw_target t;
  t.mod = &ctx.token->tok.mod;
  t.slot = ctx.token->tok.slot;
  t.pin = &ctx.token->pin;
  t.master_label = ctx.cfg->master_key_label;
  t.setup = &ctx.token->tok.sess;
  return t;
}

/// The driver child for one full-system run.
bench::driver_launch launch_of(bench_context& ctx, const store_target& store,
                               const std::string& tag) {
  auto& cfg = *ctx.cfg;
  bench::driver_launch l;
  l.args = {"run",
            "--proxy-addr",
            "127.0.0.1:" + std::to_string(ctx.proxy->port()),
            "--ca-cert",
            ctx.pki.root_cert.string(),
            "--client-cert",
            ctx.pki.driver_chain.string(),
            "--client-key",
            ctx.pki.driver_key.string(),
            "--driver-id",
            "bench-" + store.name,
            "--poll-wait",
            std::to_string(driver_poll_wait_ms),
            "--pkcs11-module",
            ctx.token->child_module.string(),
            "--token-label",
            cfg.token_label,
            "--master-key-label",
            cfg.master_key_label,
            "--log-level",
            cfg.log_level,
            "--pipeline",
            std::to_string(ctx.flags->pipeline)};
  if (!cfg.resident_schemes.empty()) {
    std::string list;
    for (auto s : cfg.resident_schemes)
      list += (list.empty() ? "" : ",") + std::string{to_string(s)};
    l.args.push_back("--resident-schemes");
    l.args.push_back(list);
  }
  l.args.insert(l.args.end(), store.args.begin(), store.args.end());
  auto extra = store.env;
  extra.push_back("USER_PIN_FILE=" + ctx.token->child_pin_file.string());
  extra.insert(extra.end(), ctx.shim_env.begin(), ctx.shim_env.end());
  l.env = child_env(extra);
  l.log = ctx.dir / ("driver-" + tag + ".log");
  return l;
}

/// Removes the token-resident keys a run made on a token the bench does
/// not own (a fresh token goes away with its folder).
void remove_resident_keys(bench_context& ctx, scheme s,
                          const std::vector<std::string>& key_ids) {
  if (ctx.fresh || ctx.cfg->resident_schemes.count(s) == 0)
    return;
  for (auto& id : key_ids) {
    std::vector<uint8_t> bytes{id.begin(), id.end()};
    static_cast<void>(pkcs11::destroy_resident(ctx.token->tok.sess, bytes));
  }
}

std::string row_tag(const std::string& store, scheme s, op_kind k,
                    size_t sessions) {
  return fmt::format("{}-{}-{}-s{}", store, to_string(s), to_string(k),
                     sessions);
}

/// The raw loop for one row.
bench::raw_result matrix_raw(bench_context& ctx, scheme s, op_kind k,
                             size_t n) {
  auto& f = *ctx.flags;
  bench::raw_plan rp;
  rp.s = s;
  rp.kind = k;
  rp.resident = ctx.token->caps.of(s).resident;
  rp.sessions = n;
  rp.ops = f.raw_ops;
  rp.duration = std::chrono::milliseconds{
    static_cast<long>(f.raw_seconds * 1000)};
  rp.key_id_prefix = "bench-" + ctx.run_id + "-raw";
  progress("raw loop: {} {}, {} session(s)...", to_string(s), to_string(k), n);
  auto raw = bench::run_raw(raw_target_of(ctx), rp, *ctx.stop);
  if (raw.error.empty())
    progress("raw loop: {} {}, {} session(s): {:.0f} ops/s, p50 {:.2f} ms, "
             "{:.0f} µs CPU/op",
             to_string(s), to_string(k), n, raw.ops_per_s, raw.latency.p50,
             raw.cpu_us_per_op);
  else
    progress("raw loop: {} {}, {} session(s) failed: {}", to_string(s),
             to_string(k), n, raw.error);
  return raw;
}

/// The matrix: per scheme, kind, session count and store, the raw loop
/// and right after it the full system (a shared machine's load drifts: the
/// two halves of a ratio are measured back to back).
void run_matrix(bench_context& ctx, const bench_plan& plan,
                const std::vector<store_target>& stores,
                const std::vector<scheme>& schemes, bench::report& rep) {
  auto& f = *ctx.flags;
  for (auto s : schemes) {
    for (auto k : plan.kinds) {
      for (auto n : plan.sessions) {
        for (auto& store : stores) {
          if (*ctx.stop)
            return;
          bench::matrix_row row;
          row.store = store.name;
          row.scheme = s;
          row.kind = k;
          row.sessions = n;
          row.resident = ctx.token->caps.of(s).resident;
          row.raw = matrix_raw(ctx, s, k, n);
          if (!row.raw.error.empty() || *ctx.stop) {
            row.e2e.error = *ctx.stop ? "interrupted"
                                      : "not run: the raw loop failed";
            rep.rows.push_back(std::move(row));
            continue;
          }
          auto tag = row_tag(store.name, s, k, n);
          bench::e2e_plan ep;
          ep.s = s;
          ep.kind = k;
          ep.sessions = n;
          ep.requests = f.requests;
          ep.sign_keys = std::min(f.sign_keys, f.requests);
          ep.warmup = std::max<size_t>(2 * n, 8);
          ep.key_prefix = "bench-" + ctx.run_id + "-" + tag;
          progress("full system: {}, {} {}, {} session(s), {} requests...",
                   store.name, to_string(s), to_string(k), n, f.requests);
          std::vector<std::string> key_ids;
          row.e2e = bench::run_e2e(*ctx.proxy, launch_of(ctx, store, tag), ep,
                                   *ctx.stop, key_ids);
          remove_resident_keys(ctx, s, key_ids);
          if (row.e2e.error.empty())
            progress("full system: {}, {} {}, {} session(s): {:.1f} req/s "
                     "(ratio {:.3f}), p50 {:.2f} ms, driver {:.0f} µs "
                     "CPU/req, host CPU {:.0f}%",
                     store.name, to_string(s), to_string(k), n,
                     row.e2e.ops_per_s, row.ratio(), row.e2e.latency.p50,
                     row.e2e.driver_cpu_us_per_request, row.e2e.host_cpu_pct);
          else
            progress("full system: {}, {} {}, {} session(s) failed: {}",
                     store.name, to_string(s), to_string(k), n, row.e2e.error);
          rep.rows.push_back(std::move(row));
        }
      }
    }
  }
}

/// The sweep: the raw loop with 1 session, then the full system at each
/// session count, all through the latency shim.
void run_sweep(bench_context& ctx, const bench_plan& plan,
               const store_target& store, bench::report& rep) {
  auto& f = *ctx.flags;
  bench::sweep_result sw;
  sw.store = store.name;
  sw.scheme = plan.sweep_scheme;
  sw.kind = plan.sweep_kind;
  sw.latency_module = plan.latency_module.string();
  sw.latency_spec = plan.latency_spec;
  bool resident = ctx.token->caps.of(sw.scheme).resident;
  bench::raw_plan rp;
  rp.s = sw.scheme;
  rp.kind = sw.kind;
  rp.resident = resident;
  rp.sessions = 1;
  rp.ops = f.raw_ops;
  rp.duration = std::chrono::milliseconds{
    static_cast<long>(f.raw_seconds * 1000)};
  rp.min_ops = 10;
  rp.key_id_prefix = "bench-" + ctx.run_id + "-raw";
  progress("sweep: raw loop, {} {}, 1 session, through the shim...",
           to_string(sw.scheme), to_string(sw.kind));
  sw.raw = bench::run_raw(raw_target_of(ctx), rp, *ctx.stop);
  if (!sw.raw.error.empty()) {
    progress("sweep: raw loop failed: {}", sw.raw.error);
    rep.sweep = std::move(sw);
    return;
  }
  sw.hsm_ms_per_request = 1000.0 / sw.raw.ops_per_s;
  progress("sweep: per-request HSM time {:.2f} ms ({:.1f} ops/s, {} ops)",
           sw.hsm_ms_per_request, sw.raw.ops_per_s, sw.raw.ops);
  for (auto n : plan.sweep) {
    if (*ctx.stop)
      break;
    bench::sweep_point pt;
    pt.sessions = n;
    pt.ideal_ops_per_s = static_cast<double>(n) * sw.raw.ops_per_s;
    auto tag = row_tag(store.name + "-sweep", sw.scheme, sw.kind, n);
    bench::e2e_plan ep;
    ep.s = sw.scheme;
    ep.kind = sw.kind;
    ep.sessions = n;
    ep.requests = f.sweep_requests * n;
    ep.sign_keys = std::min(f.sign_keys, ep.requests);
    ep.warmup = n;
    ep.key_prefix = "bench-" + ctx.run_id + "-" + tag;
    progress("sweep: {} session(s), {} requests (ideal {:.1f} req/s)...", n,
             ep.requests, pt.ideal_ops_per_s);
    std::vector<std::string> key_ids;
    pt.e2e = bench::run_e2e(*ctx.proxy, launch_of(ctx, store, tag), ep,
                            *ctx.stop, key_ids);
    remove_resident_keys(ctx, sw.scheme, key_ids);
    if (pt.e2e.error.empty()) {
      pt.efficiency = pt.e2e.ops_per_s / pt.ideal_ops_per_s;
      progress("sweep: {} session(s): {:.1f} req/s, efficiency {:.3f}, host "
               "CPU {:.0f}%",
               n, pt.e2e.ops_per_s, pt.efficiency, pt.e2e.host_cpu_pct);
    } else {
      progress("sweep: {} session(s) failed: {}", n, pt.e2e.error);
    }
    sw.points.push_back(std::move(pt));
  }
  rep.sweep = std::move(sw);
}

/// The soak: one driver (the real module, no shim) serving `--soak`
/// requests chunk by chunk, its memory read after each chunk.
void run_soak(bench_context& ctx, const bench_plan& plan,
              const store_target& store, bench::report& rep) {
  auto& f = *ctx.flags;
  auto tag = row_tag(store.name + "-soak", plan.soak_scheme, plan.soak_kind,
                     plan.soak_sessions);
  bench::soak_plan sp;
  sp.base.s = plan.soak_scheme;
  sp.base.kind = plan.soak_kind;
  sp.base.sessions = plan.soak_sessions;
  sp.base.sign_keys = std::min(f.sign_keys, plan.soak);
  sp.base.warmup = std::max<size_t>(2 * plan.soak_sessions, 8);
  sp.base.key_prefix = "bench-" + ctx.run_id + "-" + tag;
  sp.requests = plan.soak;
  sp.chunk = plan.soak_chunk;
  progress("soak: {}, {} {}, {} session(s), {} requests in chunks of {}...",
           store.name, to_string(plan.soak_scheme), to_string(plan.soak_kind),
           plan.soak_sessions, plan.soak, plan.soak_chunk);
  std::vector<std::string> key_ids;
  auto result = bench::run_soak(*ctx.proxy, launch_of(ctx, store, tag), sp,
                                store.name, *ctx.stop, key_ids,
                                [](const bench::soak_result& r) {
                                  progress("{}", bench::soak_progress_line(r));
                                });
  remove_resident_keys(ctx, plan.soak_scheme, key_ids);
  if (!result.error.empty())
    progress("soak failed: {}", result.error);
  else if (auto v = bench::verdict_of(result.samples))
    progress("soak: {}", bench::verdict_line(*v));
  rep.soak = std::move(result);
}

/// The local time, ISO 8601.
std::string now_iso() {
  auto t = std::time(nullptr);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S%z", &tm);
  return buf;
}

/// Resolves the key options for the bench: only flags name the module and
/// the store (an operator's environment must not point the bench at a
/// production HSM or database by accident); USER_PIN(_FILE) is read later,
/// and only for a token named by `--pkcs11-module`.
caf::expected<driver_config> resolve_bench_config(raw_options raw, bool fresh) {
  auto env = process_env();
  env_lookup filtered =
    [env](std::string_view name) -> std::optional<std::string> {
    static const std::set<std::string_view> ignored{
      "PKCS11_MODULE", "PKCS11_THALES_MODULE", "PKCS11_IBM_MODULE",
      "POSTGRES_URL", "SQLITE_PATH"};
    if (ignored.count(name) > 0)
      return std::nullopt;
    return env(name);
  };
  raw.sqlite_path.clear();
  raw.postgres_url.clear();
  if (fresh) {
    raw.pkcs11_module = std::string{dev_pkcs11_module};
    if (raw.token_label.empty())
      raw.token_label = std::string{bench_token_label};
  }
  return resolve(raw, filtered);
}

} // namespace

// -- the command line ---------------------------------------------------------

void add_bench_options(CLI::App* cmd, bench_flags& f,
                       const std::string& shared_footer) {
  auto dflt = [](auto value) {
    std::ostringstream os;
    os << value;
    return " [default: " + os.str() + "]";
  };
  auto sessions_help = "comma-separated session counts; each runs the raw "
                       "loop and the driver (--sessions) with that many; the "
                       "soak takes one [default: "
                       + std::string{default_bench_sessions} + "; soak: "
                       + std::to_string(default_soak_sessions) + "]";
  auto* sessions = cmd->add_option("--sessions", f.sessions, sessions_help)
                     ->type_name("LIST");
  cmd
    ->add_option("--schemes", f.schemes,
                 "secp256k1, p256, ed25519 (ed25519 only if the token wraps "
                 "it, or with --resident-schemes ed25519)"
                   + dflt(default_bench_schemes))
    ->type_name("LIST");
  cmd
    ->add_option("--kinds", f.kinds,
                 "generate (key pair + wrap), sign (unwrap + sign)"
                   + dflt(default_bench_kinds))
    ->type_name("LIST");
  cmd
    ->add_option("--pipeline", f.pipeline,
                 "the driver's leases per healthy session"
                   + dflt(default_pipeline))
    ->type_name("N");
  cmd
    ->add_option("--requests", f.requests,
                 "timed requests per full-system row, enqueued at once"
                   + dflt(default_bench_requests))
    ->type_name("N");
  cmd
    ->add_option("--raw-ops", f.raw_ops,
                 "operations per raw loop (all threads); 0 runs for "
                 "--raw-seconds [default: 0]")
    ->type_name("N");
  cmd
    ->add_option("--raw-seconds", f.raw_seconds,
                 "length of a raw loop" + dflt(default_bench_raw_seconds))
    ->type_name("SECONDS");
  cmd
    ->add_option("--sign-keys", f.sign_keys,
                 "keys a sign row makes through the proxy first (untimed) "
                 "and signs with in turn"
                   + dflt(default_bench_sign_keys))
    ->type_name("N");
  auto* sweep = cmd
                  ->add_option("--sweep", f.sweep,
                               "instead of the matrix: the full system at "
                               "each of these session counts through the "
                               "PKCS#11 latency shim, e.g. 1,2,4,8,16,32,64")
                  ->type_name("LIST");
  cmd
    ->add_option("--latency-module", f.latency_module,
                 "the latency shim (HSM_SHIM_MODULE is set to the real "
                 "module) [default: "
                   + std::string{bench_shim_file}
                   + " next to the hsm-driver binary]")
    ->type_name("PATH")
    ->needs(sweep);
  cmd
    ->add_option("--latency-spec", f.latency_spec,
                 "the shim's HSM_SHIM_SPEC [default: "
                   + std::string{default_bench_sign_spec} + " for sign, "
                   + std::string{default_bench_generate_spec}
                   + " for generate]")
    ->type_name("SPEC")
    ->needs(sweep);
  cmd
    ->add_option("--sweep-scheme", f.sweep_scheme,
                 "the sweep's scheme" + dflt(default_bench_sweep_scheme))
    ->type_name("SCHEME")
    ->needs(sweep);
  cmd
    ->add_option("--sweep-kind", f.sweep_kind,
                 "the sweep's kind" + dflt(default_bench_sweep_kind))
    ->type_name("KIND")
    ->needs(sweep);
  cmd
    ->add_option("--sweep-requests", f.sweep_requests,
                 "timed requests per session at each sweep point"
                   + dflt(default_bench_sweep_requests))
    ->type_name("N")
    ->needs(sweep);
  auto& sf = soak_options();
  auto* soak = cmd
                 ->add_option("--soak", sf.requests,
                              "instead of the matrix: N requests in all "
                              "through one driver (the real module), in "
                              "chunks, its VmRSS read after each chunk")
                 ->type_name("N")
                 ->excludes(sweep);
  sf.soak_option = soak;
  sf.sessions_option = sessions;
  cmd
    ->add_option("--soak-scheme", sf.scheme,
                 "the soak's scheme" + dflt(default_soak_scheme))
    ->type_name("SCHEME")
    ->needs(soak);
  cmd
    ->add_option("--soak-kind", sf.kind,
                 "the soak's kind" + dflt(default_soak_kind))
    ->type_name("KIND")
    ->needs(soak);
  cmd
    ->add_option("--soak-chunk", sf.chunk,
                 "requests enqueued at once, between two memory samples"
                   + dflt(default_soak_chunk))
    ->type_name("N")
    ->needs(soak);
  cmd
    ->add_option("--json", f.json_file,
                 "also write every number as JSON to FILE [default: none]")
    ->type_name("FILE");
  cmd
    ->add_option("--plot", f.plot_file,
                 "render the sweep as a PNG (throughput and efficiency vs. "
                 "sessions) with gnuplot (package gnuplot-nox)")
    ->type_name("FILE.png")
    ->needs(sweep);
  cmd->add_flag("--keep-dir", f.keep_dir,
                "keep the temporary folder (token, PKI, driver logs) and "
                "print its path");
  cmd->footer(
    shared_footer
    + "\nbench takes the module and the store from flags only (PKCS11_*MODULE, "
      "POSTGRES_URL and SQLITE_PATH are not read):\n"
      "  without --pkcs11-module: a fresh SoftHSMv2 token in a temporary "
      "folder, random PINs (USER_PIN is not read);\n"
      "  with --pkcs11-module: that token (--token-label, USER_PIN or "
      "USER_PIN_FILE); its master key must exist;\n"
      "  SQLite: a temporary file (--sqlite-path is refused); --postgres-url "
      "adds PostgreSQL rows, in a schema of the run's own, dropped at the "
      "end;\n"
      "  --resident-schemes applies to both the raw loop and the driver; "
      "--log-level is the driver's (the bench itself logs warnings).\n");
}

int cmd_bench(const raw_options& raw_in, const bench_flags& flags) {
  block_stop_signals(); // before any thread exists
  bench_plan plan;
  if (auto err = check_flags(flags, plan))
    return report_usage(*err);
  if (!raw_in.sqlite_path.empty())
    return report_usage({"--sqlite-path",
                         "bench uses a temporary SQLite file of its own "
                         "(and --postgres-url for PostgreSQL)"});
  auto pg_url = raw_in.postgres_url;
  if (!pg_url.empty()) {
    auto info = store::parse_conninfo(pg_url);
    if (!info)
      return report_usage({"--postgres-url", describe(info.error())});
    if (info->find("options") != nullptr)
      return report_usage({"--postgres-url",
                           "bench puts its tables in a schema of its own "
                           "through PGOPTIONS; remove 'options' from the "
                           "URL"});
  }
  bool fresh = raw_in.pkcs11_module.empty();
  auto raw = raw_in;
  // The bench's own log lines would mix with its progress: warn unless a
  // level is asked for. The driver children log at the resolved level.
  bool level_given = !raw.log_level.empty()
                     || process_env()("HSM_LOG_LEVEL").has_value();
  auto cfg = resolve_bench_config(raw, fresh);
  if (!cfg) {
    std::cerr << "hsm-driver bench: " << describe(cfg.error()) << "\n";
    return exit_usage;
  }
  if (auto err = init_logging(level_given ? cfg->log_level : "warn")) {
    std::cerr << "hsm-driver bench: " << describe(err) << "\n";
    return exit_usage;
  }
  if (fresh && !fs::exists(cfg->pkcs11_module))
    return report_usage(
      {"--pkcs11-module", "no SoftHSMv2 at " + cfg->pkcs11_module.string()
                            + " for the bench's own token (apt-get install "
                              "softhsm2), and no module given"});
  if (fresh)
    ::unsetenv("USER_PIN"); // not ours to read: the fresh token has its own
  signal_watcher signals;
  signals.start();
  auto run_id = crypto::random_hex(4);

  // The run's folder: token (fresh), PIN file, PKI, SQLite file, logs.
  temp_dir dir;
  dir.keep = flags.keep_dir;
  {
    auto base = fs::temp_directory_path() / "hsm-bench-XXXXXX";
    std::string tmpl = base.string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::cerr << "hsm-driver bench: cannot make a folder under "
                << fs::temp_directory_path().string() << ": "
                << std::strerror(errno) << "\n";
      return exit_failed;
    }
    dir.path = tmpl;
  }

  // The module this process loads: in a sweep, the shim over the real one.
  bool sweep = !plan.sweep.empty();
  bool soak = plan.soak > 0;
  auto load_path = cfg->pkcs11_module;
  std::vector<std::string> shim_env;
  if (sweep) {
    shim_env = {"HSM_SHIM_MODULE=" + cfg->pkcs11_module.string(),
                "HSM_SHIM_SPEC=" + plan.latency_spec};
    ::setenv("HSM_SHIM_MODULE", cfg->pkcs11_module.c_str(), 1);
    ::setenv("HSM_SHIM_SPEC", plan.latency_spec.c_str(), 1);
    load_path = plan.latency_module;
  }
  progress("{} token '{}' via {}{}",
           fresh ? "creating a fresh SoftHSMv2" : "using", cfg->token_label,
           cfg->pkcs11_module.string(),
           sweep ? " (through the shim " + load_path.string() + ")" : "");
  auto token = fresh ? fresh_token(*cfg, load_path, dir.path / "token")
                     : existing_token(*cfg, load_path, dir.path);
  if (!token) {
    // The shim refuses a bad spec from C_Initialize with
    // CKR_ARGUMENTS_BAD, after a line of its own on stderr.
    if (sweep && pkcs11::function_of(token.error()) == "C_Initialize"
        && pkcs11::rv_of(token.error()) == CKR_ARGUMENTS_BAD)
      return report_usage({"--latency-spec", "the shim refused HSM_SHIM_SPEC='"
                                               + plan.latency_spec
                                               + "' (see its line above)"});
    std::cerr << "hsm-driver bench: " << describe(token.error()) << "\n";
    if (sweep && token.error().category() == caf::atom("hsm"))
      std::cerr << "hsm-driver bench: (through the shim "
                << plan.latency_module.string()
                << ": it says why on stderr, above)\n";
    return token.error().category() == caf::atom("config") ? exit_usage
                                                           : exit_failed;
  }
  token->child_module = load_path;
  if (!fresh && token->child_pin_file.parent_path() == dir.path)
    dir.secrets.push_back(token->child_pin_file);
  auto caps = keys::probe(token->tok.sess, token->master,
                          cfg->resident_schemes);
  if (!caps) {
    std::cerr << "hsm-driver bench: capability probe: "
              << describe(caps.error()) << "\n";
    return exit_failed;
  }
  token->caps = *caps;

  bench::report rep;
  std::vector<scheme> schemes;
  auto consider = [&](scheme s) {
    auto& c = caps->of(s);
    if (c.served)
      return true;
    auto reason = "not served by this token: " + c.detail;
    progress("{} skipped: {}", to_string(s), reason);
    rep.skipped.push_back({std::string{to_string(s)}, reason});
    return false;
  };
  if (sweep) {
    if (!consider(plan.sweep_scheme)) {
      std::cerr << "hsm-driver bench: --sweep-scheme: "
                << to_string(plan.sweep_scheme) << " is not served\n";
      return exit_usage;
    }
  } else if (soak) {
    if (!consider(plan.soak_scheme)) {
      std::cerr << "hsm-driver bench: --soak-scheme: "
                << to_string(plan.soak_scheme) << " is not served\n";
      return exit_usage;
    }
  } else {
    for (auto s : plan.schemes)
      if (consider(s))
        schemes.push_back(s);
    if (schemes.empty()) {
      std::cerr << "hsm-driver bench: --schemes: this token serves none of "
                   "them; nothing to measure\n";
      return exit_failed;
    }
  }

  // The stores: SQLite (a file in the run's folder) and, with
  // --postgres-url, a schema of the run's own in that database (the sweep
  // and the soak run on one store: PostgreSQL when given).
  std::vector<store_target> stores;
  pg_schema schema;
  if (!(sweep || soak) || pg_url.empty())
    stores.push_back(
      {"sqlite", {"--sqlite-path", (dir.path / "keys.db").string()}, {}});
  if (!pg_url.empty()) {
    if (std::getenv("PGCONNECT_TIMEOUT") == nullptr)
      ::setenv("PGCONNECT_TIMEOUT", "10", 1);
    auto name = "hsm_bench_" + run_id;
    try {
      pqxx::connection c{pg_url};
      pqxx::nontransaction tx{c};
      tx.exec("CREATE SCHEMA " + name);
    } catch (const std::exception& e) {
      std::cerr << "hsm-driver bench: --postgres-url " << redact_url(pg_url)
                << ": " << e.what() << "\n";
      return exit_failed;
    }
    schema.url = pg_url;
    schema.name = name;
    stores.push_back(
      {"postgres",
       {},
       {"POSTGRES_URL=" + pg_url, "PGOPTIONS=-c search_path=" + name}});
  }

  // The remote side: a dev PKI and the reference proxy, in this process.
  auto pki = net::make_dev_pki(dir.path / "pki");
  if (!pki) {
    std::cerr << "hsm-driver bench: " << describe(pki.error()) << "\n";
    return exit_failed;
  }
  net::reference_proxy_config pc;
  pc.server_cert = pki->server_chain;
  pc.server_key = pki->server_key;
  pc.client_ca = pki->root_cert;
  pc.max_wait = std::chrono::milliseconds{driver_poll_wait_ms};
  auto proxy = net::reference_proxy::start(pc);
  if (!proxy) {
    std::cerr << "hsm-driver bench: " << describe(proxy.error()) << "\n";
    return exit_failed;
  }

  bench_context ctx;
  ctx.cfg = &*cfg;
  ctx.flags = &flags;
  ctx.token = &*token;
  ctx.proxy = proxy->get();
  ctx.pki = *pki;
  ctx.dir = dir.path;
  ctx.run_id = run_id;
  ctx.fresh = fresh;
  ctx.shim_env = shim_env;
  ctx.stop = &signals.stop;

  auto& info = token->tok.info;
  json store_names = json::array();
  for (auto& s : stores)
    store_names.push_back(s.name);
  rep.context = json{
    {"command", "hsm-driver bench"},
    {"run_id", run_id},
    {"started_at", now_iso()},
    {"host", json{{"name", host_name()}, {"cpus", bench::cpu_count()}}},
    {"token", json{{"module", cfg->pkcs11_module.string()},
                   {"label", cfg->token_label},
                   {"fresh_softhsm_token", fresh},
                   {"manufacturer", info.manufacturer},
                   {"model", info.model}}},
    {"stores", store_names},
    {"options", json{{"sessions", plan.sessions},
                     {"requests", flags.requests},
                     {"raw_ops", flags.raw_ops},
                     {"raw_seconds", flags.raw_seconds},
                     {"sign_keys", flags.sign_keys},
                     {"driver_log_level", cfg->log_level}}},
    {"method", "raw: S threads, one session each, keys::make_key / sign_with "
               "straight on the module; CPU = getrusage(RUSAGE_SELF). e2e: all "
               "requests enqueued at once at the reference proxy (this "
               "process), the driver a child process; latency = lease to "
               "result, seen by polling the proxy (every 1/20 of the latency "
               "seen, 0.1-5 ms); driver CPU = "
               "/proc/<pid>/stat utime+stime; peak RSS = VmHWM. soak: one "
               "driver, the requests enqueued a chunk at a time, the next "
               "chunk once the last is answered; driver VmRSS and VmHWM "
               "from /proc/<pid>/status after each chunk."}};
  if (sweep)
    rep.context["options"]["sweep"] = json{{"sessions", plan.sweep},
                                           {"requests_per_session",
                                            flags.sweep_requests}};

  if (soak)
    rep.context["options"]["soak"] = json{
      {"requests", plan.soak},
      {"chunk", plan.soak_chunk},
      {"sessions", plan.soak_sessions},
      {"scheme", std::string{to_string(plan.soak_scheme)}},
      {"kind", std::string{to_string(plan.soak_kind)}},
      {"pipeline", flags.pipeline}};

  if (sweep)
    run_sweep(ctx, plan, stores.front(), rep);
  else if (soak)
    run_soak(ctx, plan, stores.front(), rep);
  else
    run_matrix(ctx, plan, stores, schemes, rep);

  // The table: by store, then scheme, kind and sessions.
  std::stable_sort(rep.rows.begin(), rep.rows.end(),
                   [](const auto& a, const auto& b) {
                     return (a.store != b.store) && a.store == "sqlite";
                   });
  std::cout << fmt::format("hsm-driver bench: token '{}' ({} {}) via {}, {} "
                           "CPUs\n",
                           cfg->token_label, info.manufacturer, info.model,
                           cfg->pkcs11_module.string(), bench::cpu_count());
  for (auto& s : rep.skipped)
    std::cout << s.scheme << " skipped: " << s.reason << "\n";
  if (rep.sweep)
    bench::print_sweep(std::cout, *rep.sweep);
  else if (rep.soak)
    bench::print_soak(std::cout, *rep.soak);
  else
    bench::print_matrix(std::cout, rep.rows);
  std::cout.flush();

  bool ok = !signals.stop;
  for (auto& r : rep.rows)
    ok = ok && r.ok() && r.e2e.errors == 0;
  if (rep.sweep) {
    ok = ok && rep.sweep->raw.error.empty();
    for (auto& p : rep.sweep->points)
      ok = ok && p.e2e.error.empty() && p.e2e.errors == 0;
  }
  if (rep.soak)
    ok = ok && rep.soak->error.empty() && rep.soak->errors == 0
         && rep.soak->first_error.empty();
  if (!flags.json_file.empty()) {
    std::ofstream out{flags.json_file};
    out << bench::to_json(rep).dump(2, ' ', false,
                                    json::error_handler_t::replace)
        << "\n";
    if (!out) {
      std::cerr << "hsm-driver bench: --json: cannot write " << flags.json_file
                << "\n";
      ok = false;
    } else {
      progress("wrote {}", flags.json_file);
    }
  }
  if (!flags.plot_file.empty() && rep.sweep && plan.gnuplot) {
    auto why = bench::plot_sweep(*rep.sweep, *plan.gnuplot,
                                 fs::path{flags.plot_file}, dir.path);
    if (why.empty()) {
      progress("wrote {}", flags.plot_file);
    } else {
      std::cerr << "hsm-driver bench: --plot: " << why << "\n";
      ok = false;
    }
  }
  (*proxy)->stop();
  return ok ? exit_ok : exit_failed;
}

} // namespace hsm
