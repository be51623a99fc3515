#pragma once

// The subcommands of `hsm-driver` (README, "Command line"), one file per
// group: cmd_keys.cpp, cmd_master_key.cpp, cmd_token.cpp, cmd_probe.cpp,
// cmd_run.cpp, cmd_proxy.cpp, cmd_dev.cpp, cmd_bench.cpp. `cli.cpp` parses
// the command line and calls one of them. Each prints its JSON result on
// stdout (output.hpp; `bench` prints a table) and returns the process exit
// code. Main thread only.

#include "runtime/app/config.hpp"
#include "runtime/app/run_options.hpp"

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace CLI {
class App;
} // namespace CLI

namespace hsm {

// -- keys ---------------------------------------------------------------------

/// `keys generate`: a new key under `key_id`, or the stored one.
int cmd_keys_generate(const driver_config& cfg, const std::string& key_id,
                      const std::string& scheme_name);

/// `keys sign`: signs the hex `payload_hex` with the key `key_id`.
int cmd_keys_sign(const driver_config& cfg, const std::string& key_id,
                  const std::string& payload_hex);

/// `keys show`: a key's public data.
int cmd_keys_show(const driver_config& cfg, const std::string& key_id);

/// `keys reconcile`: token-resident key objects against the store (README,
/// "Reconciling token-resident keys"). Prints a report; with `apply`
/// destroys the losers, and with `include_orphans` (only with `apply`) the
/// orphans too.
int cmd_keys_reconcile(const driver_config& cfg, bool apply,
                       bool include_orphans);

// -- the token and its master key ---------------------------------------------

/// `token init`: initialises a free SoftHSMv2 slot as `--token-label`.
int cmd_token_init(const driver_config& cfg);

/// `master-key init`: creates the master key, from the value in
/// `test_value_file` when it is not empty (test and dev tokens only).
int cmd_master_key_init(const driver_config& cfg,
                        const std::string& test_value_file);

/// `master-key check`: the token's master keys against the store's canary,
/// their policy, the rotation's progress, and every row's MAC.
int cmd_master_key_check(const driver_config& cfg);

/// `audit verify`: checks every driver's hash chain in the audit trail;
/// prints each chain's length and head, and every break (an edited row, a
/// missing one); exit 1 if there is a break.
int cmd_audit_verify(const driver_config& cfg);

/// `db verify`: checks every row of the configured database (read-only)
/// against this HSM: MAC, key id binding, unwrap and a test signature; the
/// canary; exit 1 naming each bad row and its causes.
int cmd_db_verify(const driver_config& cfg);

/// `db export`: writes every row (wrapped blobs, public keys, MACs), the
/// canary and the rotation record to the new 0600 file `out_file`
/// (runtime/keys/key_export.hpp). The database only; no token.
int cmd_db_export(const driver_config& cfg, const std::string& out_file);

/// `db import`: checks the file, the canaries and each row's MAC on this
/// HSM, then inserts the rows into the configured database (migrated
/// first); the same row again is skipped, a key id holding another key is
/// refused; exit 1 naming each refused row.
int cmd_db_import(const driver_config& cfg, const std::string& in_file);

/// The options of `master-key rotate`.
struct rotate_options {
  /// The master key rows move to.
  std::string to;
  /// Create it (and its row-MAC key) if the token lacks it.
  bool create = false;
  /// Rows per store read.
  size_t batch = 100;
  /// Declare the rotation complete (every row and the canary moved).
  bool complete = false;
};

/// `master-key rotate`: moves every row to `opts.to` inside the HSM
/// (resumable), or with `opts.complete` declares the rotation complete.
int cmd_master_key_rotate(const driver_config& cfg, const rotate_options& opts);

/// `probe`: the capability probe, per scheme.
int cmd_probe(const driver_config& cfg);

// -- pki ----------------------------------------------------------------------

/// `pki csr`: the intermediate's key and CSR from the vendor's template.
struct pki_csr_flags {
  /// `--template`: the vendor's CSR template (JSON, README "PKI").
  std::string template_file;
  /// `--key-out`: the new key, written 0600; never overwritten.
  std::string key_out{"intermediate-key.pem"};
  /// `--csr-out`: the CSR for the vendor.
  std::string csr_out{"intermediate.csr"};
  /// `--passphrase-file`: encrypt the key with the passphrase in this
  /// 0600 file.
  std::string passphrase_file;
};

int cmd_pki_csr(const pki_csr_flags& flags);

/// Default `pki issue-leaf --days`.
inline constexpr int default_leaf_days = 90;

/// `pki issue-leaf`: a driver's certificate from the intermediate.
struct pki_issue_flags {
  /// `--intermediate-cert`, `--intermediate-key`,
  /// `--intermediate-passphrase-file`.
  std::string ca_cert;
  std::string ca_key;
  std::string ca_passphrase_file;
  /// `--name`: the driver's name (commonName, and the subjectAltName
  /// unless `--san` is given).
  std::string name;
  /// `--san`: subjectAltName entries (DNS names, IP addresses).
  std::vector<std::string> sans;
  /// `--days`.
  int days = default_leaf_days;
  /// `--out-dir`: where leaf.pem, leaf-key.pem, leaf-chain.pem (and
  /// chain.pem) go.
  std::string out_dir{"."};
  /// `--root`: the vendor's root; chain.pem (intermediate + root, the
  /// runbook's `--ca-cert`) is written and the new files are checked.
  std::string root;
};

int cmd_pki_issue_leaf(const pki_issue_flags& flags);

/// `pki verify`: the check the daemon runs at start.
struct pki_verify_flags {
  /// As for `run` (flags or CLIENT_CERT, CLIENT_KEY, CA_CERT, PROXY_ADDR).
  std::string client_cert;
  std::string client_key;
  std::string ca_cert;
  /// `--proxy-addr`: also check the proxy's certificate on one handshake.
  std::string proxy_addr;
  /// `--warn-days`: `expires_soon` when fewer days are left.
  int warn_days = 30;
};

int cmd_pki_verify(const pki_verify_flags& flags);

// -- the daemon, the reference proxy, the dev mode ----------------------------

/// `run`: the daemon, until SIGTERM or SIGINT (0), or until it cannot go on
/// (1: the module lost the token for good, or an HSM call was still stuck
/// when it stopped).
int cmd_run(const driver_config& cfg, const run_flags& flags);

/// Default `proxy --listen`.
inline constexpr std::string_view default_proxy_listen = "127.0.0.1:8443";
/// Default `proxy --admin-listen`.
inline constexpr std::string_view default_proxy_admin_listen = "127.0.0.1:8444";
/// Default `proxy --lease-ms`.
inline constexpr long default_proxy_lease_ms = 30000;

/// `proxy` options as given.
struct proxy_flags {
  /// `--listen`: the mTLS listener for drivers, `host:port`.
  std::string listen{default_proxy_listen};
  /// `--admin-listen`: the admin API, `host:port`.
  std::string admin_listen{default_proxy_admin_listen};
  /// `--server-cert`: the server's certificate chain, PEM.
  std::string server_cert;
  /// `--server-key`: the server's key, PEM.
  std::string server_key;
  /// `--client-ca`: the CA that must sign drivers' certificates.
  std::string client_ca;
  /// `--lease-ms`: how long a lease lasts.
  long lease_ms = default_proxy_lease_ms;
  /// `--admin-token-file`: the admin API's bearer token (made 0600 if the
  /// file does not exist).
  std::string admin_token_file;
  /// `--admin-allow-remote`: lets `--admin-listen` name an address that is
  /// not loopback.
  bool admin_remote = false;
  /// `--tls-min`: `1.3` (default) or `1.2`.
  std::string tls_min{"1.3"};
};

/// `proxy`: the reference proxy, until SIGTERM or SIGINT.
int cmd_proxy(const proxy_flags& flags);

/// Default `dev --data-dir`.
inline constexpr std::string_view default_dev_data_dir = "hsm-driver-dev";

/// `dev`: a token, a PKI, SQLite, the reference proxy and the daemon under
/// `data_dir`, then a demo; serves until SIGTERM or SIGINT. With
/// `resident_given` false, Ed25519 keys are token-resident.
int cmd_dev(driver_config cfg, run_flags flags, const std::string& data_dir,
            bool resident_given);

// -- bench --------------------------------------------------------------------

/// Default `bench --sessions`.
inline constexpr std::string_view default_bench_sessions = "1,2";
/// Default `bench --schemes`.
/// (ed25519 is skipped with a note where the token serves it not.)
inline constexpr std::string_view default_bench_schemes
  = "secp256k1,p256,ed25519";
/// Default `bench --kinds`.
inline constexpr std::string_view default_bench_kinds = "generate,sign";
/// Default `bench --requests`.
inline constexpr size_t default_bench_requests = 500;
/// Default `bench --raw-seconds`.
inline constexpr double default_bench_raw_seconds = 2.0;
/// Default `bench --sign-keys`.
inline constexpr size_t default_bench_sign_keys = 64;
/// Default `bench --sweep-scheme` and `--sweep-kind`.
inline constexpr std::string_view default_bench_sweep_scheme = "p256";
inline constexpr std::string_view default_bench_sweep_kind = "sign";
/// Default `bench --sweep-requests` (per session).
inline constexpr size_t default_bench_sweep_requests = 20;
/// Default `bench --latency-spec` (HSM_SHIM_SPEC) per kind: delays on the
/// calls of that kind's path only, 200 ms per request in all, so that the
/// CPU is not what limits the sweep (64 sessions ask for 320 requests/s;
/// at about 2 ms of CPU per request for the driver and the proxy together,
/// a third of a 2-CPU machine).
inline constexpr std::string_view default_bench_sign_spec
  = "delay=C_UnwrapKey:50ms,C_Sign:150ms";
inline constexpr std::string_view default_bench_generate_spec
  = "delay=C_GenerateKeyPair:150ms,C_WrapKey:50ms";
/// The shim's file name; `--latency-module` defaults to it next to the
/// hsm-driver binary (the build puts it there).
inline constexpr std::string_view bench_shim_file = "libhsm_pkcs11_shim.so";

/// `bench` options as given (bench/README.md).
struct bench_flags {
  /// `--sessions`: session counts of the matrix.
  std::string sessions{default_bench_sessions};
  /// `--schemes`.
  std::string schemes{default_bench_schemes};
  /// `--kinds`: `generate`, `sign`.
  std::string kinds{default_bench_kinds};
  /// `--requests`: timed requests per full-system row.
  size_t requests = default_bench_requests;
  /// `--pipeline`: the driver's leases per healthy session.
  size_t pipeline = default_pipeline;
  /// `--raw-ops`: operations per raw loop; 0 runs for `--raw-seconds`.
  size_t raw_ops = 0;
  /// `--raw-seconds`.
  double raw_seconds = default_bench_raw_seconds;
  /// `--sign-keys`: keys a sign row makes first and signs with in turn.
  size_t sign_keys = default_bench_sign_keys;
  /// `--sweep`: session counts of the sweep; empty for the matrix.
  std::string sweep;
  /// `--latency-module`: the PKCS#11 latency shim.
  std::string latency_module;
  /// `--latency-spec`: its HSM_SHIM_SPEC; empty for the kind's default.
  std::string latency_spec;
  /// `--sweep-scheme`, `--sweep-kind`.
  std::string sweep_scheme{default_bench_sweep_scheme};
  std::string sweep_kind{default_bench_sweep_kind};
  /// `--sweep-requests`: timed requests per session at each sweep point.
  size_t sweep_requests = default_bench_sweep_requests;
  /// `--json`: where to write the results as JSON; empty for none.
  std::string json_file;
  /// `--plot`: where to render the sweep as a PNG; empty for none.
  std::string plot_file;
  /// `--keep-dir`: keep the temporary folder (token, PKI, logs).
  bool keep_dir = false;
};

/// Declares the options of `bench` on `cmd`; its help ends with
/// `shared_footer` (the key options) and what `bench` makes of them.
void add_bench_options(CLI::App* cmd, bench_flags& flags,
                       const std::string& shared_footer);

/// `bench`: the raw PKCS#11 rate and the full system's rate (the reference
/// proxy here, the driver as a child process) per store, scheme, kind and
/// session count, or the session sweep through the latency shim; a table
/// on stdout, progress on stderr. Takes the key options as given (`raw`):
/// without `--pkcs11-module` it makes a SoftHSMv2 token of its own.
int cmd_bench(const raw_options& raw, const bench_flags& flags);

} // namespace hsm
