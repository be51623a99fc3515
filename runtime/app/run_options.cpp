#include "runtime/app/run_options.hpp"

#include "runtime/net/host_port.hpp"
#include "runtime/net/metrics_server.hpp"

#include <unistd.h>

#include <algorithm>

namespace hsm {

namespace {

/// The flag's value, else the variable's, else empty.
std::string flag_or_env(const std::string& value, std::string_view var,
                        const env_lookup& env) {
  if (!value.empty())
    return value;
  return env(var).value_or(std::string{});
}

/// Checks that `value` (ms) lies in [lo, hi]; the error names `flag`.
caf::error check_ms(const char* flag, long value, long lo, long hi) {
  if (value < lo || value > hi)
    return caf::make_error(config_errc::invalid_option, std::string{flag},
                           std::string{flag} + " must be " + std::to_string(lo)
                             + ".." + std::to_string(hi) + " ms");
  return caf::none;
}

} // namespace

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0')
    return std::string{fallback_driver_id};
  return buf;
}

caf::expected<daemon_options> resolve_run_options(const driver_config& cfg,
                                                  const run_flags& flags,
                                                  const env_lookup& env) {
  daemon_options o;
  o.cfg = cfg;
  o.proxy.proxy_addr = flag_or_env(flags.proxy_addr, "PROXY_ADDR", env);
  o.proxy.tls.ca_cert = flag_or_env(flags.ca_cert, "CA_CERT", env);
  o.proxy.tls.cert = flag_or_env(flags.client_cert, "CLIENT_CERT", env);
  o.proxy.tls.key = flag_or_env(flags.client_key, "CLIENT_KEY", env);
  o.proxy.driver_id = flag_or_env(flags.driver_id, "HSM_DRIVER_ID", env);
  o.proxy.https_proxy = flag_or_env(flags.https_proxy, "HSM_HTTPS_PROXY", env);
  auto tls_min = flag_or_env(flags.tls_min, "HSM_TLS_MIN", env);
  if (tls_min == "1.2")
    o.proxy.allow_tls12 = true;
  else if (!tls_min.empty() && tls_min != "1.3")
    return caf::make_error(
      config_errc::invalid_option, std::string{"--tls-min"},
      "--tls-min must be 1.3 or 1.2, not '" + tls_min + "'");
  if (o.proxy.driver_id.empty())
    o.proxy.driver_id = host_name();
  if (auto days = flag_or_env(flags.cert_warn_days, "HSM_CERT_WARN_DAYS", env);
      !days.empty()) {
    size_t used = 0;
    int n = -1;
    try {
      n = std::stoi(days, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != days.size() || n < 0 || n > 3650)
      return caf::make_error(
        config_errc::invalid_option, std::string{"--cert-warn-days"},
        "--cert-warn-days must be 0..3650, not '" + days + "'");
    o.cert_warn_days = n;
  }
  struct required {
    const char* flag;
    std::string value;
  };
  for (auto& r : {required{"--proxy-addr", o.proxy.proxy_addr},
                  required{"--ca-cert", o.proxy.tls.ca_cert.string()},
                  required{"--client-cert", o.proxy.tls.cert.string()},
                  required{"--client-key", o.proxy.tls.key.string()}})
    if (r.value.empty())
      return caf::make_error(config_errc::missing_option, std::string{r.flag},
                             std::string{r.flag} + " is required");
  if (flags.sessions < 1 || flags.sessions > 256)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--sessions"},
                           std::string{"--sessions must be 1..256"});
  if (flags.pipeline < 1 || flags.pipeline > 16)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--pipeline"},
                           std::string{"--pipeline must be 1..16"});
  if (auto err = check_ms("--hsm-timeout", flags.hsm_timeout_ms, 100, 600000))
    return err;
  if (auto err = check_ms("--drain-timeout", flags.drain_timeout_ms, 0,
                          3600000))
    return err;
  if (auto err = check_ms("--poll-wait", flags.poll_wait_ms, 0, 60000))
    return err;
  o.sessions = flags.sessions;
  o.pipeline = flags.pipeline;
  o.hsm_timeout = std::chrono::milliseconds{flags.hsm_timeout_ms};
  o.drain_timeout = std::chrono::milliseconds{flags.drain_timeout_ms};
  o.poll_wait = std::chrono::milliseconds{flags.poll_wait_ms};
  auto metrics = flag_or_env(flags.metrics_listen, "HSM_METRICS_LISTEN", env);
  if (!metrics.empty() && metrics != "off") {
    auto hp = net::parse_host_port(metrics, "--metrics-listen",
                                   net::port_zero::allowed);
    if (!hp)
      return hp.error();
    if (!flags.metrics_allow_remote && !net::is_loopback_host(hp->host))
      return caf::make_error(
        config_errc::invalid_option, std::string{"--metrics-listen"},
        "--metrics-listen must name a loopback address (127.0.0.1, ::1, "
        "localhost), not '"
          + hp->host
          + "': it is plain HTTP without authentication; add "
            "--metrics-allow-remote to serve it on another address");
    o.metrics_listen = net::metrics_listen{hp->host, hp->port,
                                           flags.metrics_allow_remote};
  }
  return o;
}

void apply_dev_defaults(raw_options& raw, const env_lookup& env) {
  auto named = [&env](std::string_view var) { return env(var).has_value(); };
  if (raw.pkcs11_module.empty()
      && std::none_of(pkcs11_module_vars.begin(), pkcs11_module_vars.end(),
                      named))
    raw.pkcs11_module = std::string{dev_pkcs11_module};
  if (raw.token_label.empty())
    raw.token_label = std::string{dev_token_label};
}

} // namespace hsm
