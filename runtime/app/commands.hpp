#pragma once

// The subcommands of `hsm-driver` (README, "Command line"), one file per
// group: cmd_keys.cpp, cmd_master_key.cpp, cmd_token.cpp, cmd_probe.cpp,
// cmd_run.cpp, cmd_proxy.cpp, cmd_dev.cpp. `cli.cpp` parses the command line
// and calls one of them. Each prints its JSON result on stdout (output.hpp)
// and returns the process exit code. Main thread only.

#include "runtime/app/config.hpp"
#include "runtime/app/run_options.hpp"

#include <string>
#include <string_view>

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

// -- the token and its master key ---------------------------------------------

/// `token init`: initialises a free SoftHSMv2 slot as `--token-label`.
int cmd_token_init(const driver_config& cfg);

/// `master-key init`: creates the master key, from the value in
/// `test_value_file` when it is not empty (test and dev tokens only).
int cmd_master_key_init(const driver_config& cfg,
                        const std::string& test_value_file);

/// `master-key check`: the token's master key against the store's canary.
int cmd_master_key_check(const driver_config& cfg);

/// `probe`: the capability probe, per scheme.
int cmd_probe(const driver_config& cfg);

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

} // namespace hsm
