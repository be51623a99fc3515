#pragma once

// The options of `run` and `dev` beyond the key options (README,
// "Configuration"): the proxy, the TLS files, the driver id and the
// daemon's limits. Flags win over the environment, which is read through
// `env_lookup` so that tests need no setenv. Defaults are named here.

#include "actors/dispatcher.hpp"
#include "messages/errors.hpp"
#include "runtime/app/config.hpp"
#include "runtime/app/daemon.hpp"

#include <chrono>
#include <cstddef>
#include <string>
#include <string_view>

namespace hsm {

/// Default `--sessions`.
inline constexpr size_t default_sessions = 2;
/// Default `--hsm-timeout`, ms.
inline constexpr long default_hsm_timeout_ms = 10000;
/// Default `--drain-timeout`, ms.
inline constexpr long default_drain_timeout_ms = 30000;
/// Default `--poll-wait`, ms.
inline constexpr long default_poll_wait_ms = 20000;
/// `--driver-id` when neither the flag, `HSM_DRIVER_ID` nor the host name
/// gives one.
inline constexpr std::string_view fallback_driver_id = "hsm-driver";

/// The module `dev` loads when no flag or variable names one.
inline constexpr std::string_view dev_pkcs11_module
  = "/usr/lib/softhsm/libsofthsm2.so";
/// The token label of `dev` when `--token-label` is not given.
inline constexpr std::string_view dev_token_label = "hsm-driver-dev";
/// The driver id of `dev` when `--driver-id` is not given.
inline constexpr std::string_view dev_driver_id = "dev-driver";
/// The poll wait of `dev` when `--poll-wait` is left at its default.
inline constexpr long dev_poll_wait_ms = 1000;

/// `run` and `dev` options as given on the command line.
/// Empty strings are "not given": the environment may fill them in.
struct run_flags {
  /// `--proxy-addr`.
  std::string proxy_addr;
  /// `--client-cert`.
  std::string client_cert;
  /// `--client-key`.
  std::string client_key;
  /// `--ca-cert`.
  std::string ca_cert;
  /// `--driver-id`.
  std::string driver_id;
  /// `--sessions`.
  size_t sessions = default_sessions;
  /// `--pipeline`.
  size_t pipeline = default_pipeline;
  /// `--hsm-timeout`, ms.
  long hsm_timeout_ms = default_hsm_timeout_ms;
  /// `--drain-timeout`, ms.
  long drain_timeout_ms = default_drain_timeout_ms;
  /// `--poll-wait`, ms.
  long poll_wait_ms = default_poll_wait_ms;
  /// `--tls-min`: `1.3` (default) or `1.2`.
  std::string tls_min;
  /// `--https-proxy`: an HTTPS proxy on the way to the proxy; none by
  /// default, whatever the environment's proxy variables say.
  std::string https_proxy;
  /// `--cert-warn-days`: warn when the client certificate expires within
  /// this many days; empty: `HSM_CERT_WARN_DAYS`, else
  /// `net::default_cert_warn_days`.
  std::string cert_warn_days;
  /// `--metrics-listen`: `host:port` of `/metrics`, `/healthz` and
  /// `/readyz`; none (and `off`): not served.
  std::string metrics_listen;
  /// `--metrics-allow-remote`: lets `--metrics-listen` name an address
  /// that is not loopback.
  bool metrics_allow_remote = false;
};

/// The metrics listener of `dev` when `--metrics-listen` is not given: a
/// free loopback port.
inline constexpr std::string_view dev_metrics_listen = "127.0.0.1:0";

/// Checks `flags` and fills in the environment (`PROXY_ADDR`, `CA_CERT`,
/// `CLIENT_CERT`, `CLIENT_KEY`, `HSM_DRIVER_ID`); the driver id defaults to
/// the host name. A missing address or TLS file is
/// `config_errc::missing_option`, a number out of range
/// `config_errc::invalid_option`; both name the flag.
[[nodiscard]] caf::expected<daemon_options>
resolve_run_options(const driver_config& cfg, const run_flags& flags,
                    const env_lookup& env);

/// What `dev` changes in the key options before they are resolved: the
/// SoftHSMv2 module unless `--pkcs11-module` or one of
/// `pkcs11_module_vars` names one, and `dev_token_label` unless
/// `--token-label` is given.
void apply_dev_defaults(raw_options& raw, const env_lookup& env);

/// This machine's host name; `fallback_driver_id` if it has none.
std::string host_name();

} // namespace hsm
