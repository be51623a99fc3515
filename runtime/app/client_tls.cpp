#include "runtime/app/client_tls.hpp"

#include "runtime/base/logging.hpp"

#include <utility>

namespace hsm {

namespace {

void log_in_use(const char* what, const net::client_tls& tls) {
  const auto& leaf = tls.leaf;
  logger("runtime")->info(
    "{}: client certificate '{}' (serial {}, issuer '{}'), valid until {} "
    "({} days), {} certificate(s) sent",
    what, leaf.subject, leaf.serial, leaf.issuer, leaf.not_after,
    leaf.days_left, tls.chain.size() - (tls.chain.size() > 1 ? 1 : 0));
}

void warn_expiry(const net::client_tls& tls, int warn_days) {
  const auto& leaf = tls.leaf;
  if (leaf.days_left < 0)
    logger("runtime")->error("the client certificate '{}' (serial {}) has "
                             "expired ({}): the proxy will refuse it",
                             leaf.subject, leaf.serial, leaf.not_after);
  else if (leaf.days_left < warn_days)
    logger("runtime")->warn("the client certificate '{}' (serial {}) expires "
                            "in {} day(s), on {}: renew it (hsm-driver pki "
                            "issue-leaf) and send SIGHUP",
                            leaf.subject, leaf.serial, leaf.days_left,
                            leaf.not_after);
}

} // namespace

caf::expected<std::shared_ptr<net::tls_source>>
open_client_tls(const net::tls_files& files, int warn_days) {
  auto tls = net::load_client_tls(files);
  if (!tls)
    return tls.error();
  log_in_use("TLS", **tls);
  warn_expiry(**tls, warn_days);
  return std::make_shared<net::tls_source>(std::move(*tls));
}

caf::error check_proxy_certificate(const net::proxy_client_config& cfg) {
  auto client = net::proxy_client::create(cfg);
  if (!client)
    return client.error();
  auto err = (*client)->handshake();
  if (!err)
    return caf::none;
  auto cause = net::cause_of(err);
  if (cause != net::cert_cause::other && cause != net::cert_cause::ok)
    return err;
  // Not reachable yet, or a failure without a named cause: the poller
  // retries with backoff and logs what it meets.
  logger("runtime")->warn("could not check the proxy's certificate at start: "
                          "{}",
                          describe(err));
  return caf::none;
}

void warn_if_expiring(const net::tls_source& source, int warn_days) {
  warn_expiry(*source.current().first, warn_days);
}

caf::error reload_client_tls(net::tls_source& source, int warn_days) {
  auto files = source.current().first->files;
  auto tls = net::load_client_tls(files);
  if (!tls) {
    logger("runtime")->error("SIGHUP: the new TLS files are refused, the ones "
                             "in use stay: {}",
                             describe(tls.error()));
    return tls.error();
  }
  log_in_use("SIGHUP: reloaded; new connections use", **tls);
  warn_expiry(**tls, warn_days);
  source.replace(std::move(*tls));
  return caf::none;
}

} // namespace hsm
