#pragma once

// A local PKI for the dev mode and the tests: a root standing for the
// vendor's CA, an intermediate CA, a server certificate for the reference
// proxy and a client (leaf) certificate for a driver. Made with OpenSSL 3
// (P-256 keys, SHA-256, X.509 v3 with the right extensions), written as PEM
// files with private keys in 0600 files. Not for production PKI.

#include "messages/errors.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace hsm::net {

/// The files `make_dev_pki` writes (all PEM).
struct dev_pki {
  /// The root CA certificate: what both sides trust (`--ca-cert`).
  std::filesystem::path root_cert;
  /// The intermediate CA certificate (signed by the root).
  std::filesystem::path intermediate_cert;
  /// The proxy's certificate followed by the intermediate (a chain file).
  std::filesystem::path server_chain;
  /// The proxy's private key.
  std::filesystem::path server_key;
  /// The driver's client certificate followed by the intermediate.
  std::filesystem::path driver_chain;
  /// The driver's private key.
  std::filesystem::path driver_key;
};

/// Options for `make_dev_pki`.
struct dev_pki_options {
  /// Subject alternative names of the server certificate (DNS names and IP
  /// addresses; IPs are recognised by their form).
  std::vector<std::string> server_names{"localhost", "127.0.0.1", "::1"};
  /// Common name of the driver's client certificate.
  std::string driver_name = "hsm-driver";
  /// Validity in days.
  int days = 30;
};

/// A dev certificate that expires within this many days is made again.
inline constexpr int dev_pki_renew_days = 7;

/// Writes a fresh PKI into `dir` (created if missing). Files present from an
/// earlier call are reused, so the dev mode keeps its PKI across restarts,
/// unless a certificate expires within `dev_pki_renew_days`: then it is
/// made again (for the root or the intermediate, the whole PKI). Failures
/// are `net_errc::bad_tls_material`.
[[nodiscard]] caf::expected<dev_pki>
make_dev_pki(const std::filesystem::path& dir,
             const dev_pki_options& opts = {});

/// Writes one more client certificate and key, signed by the intermediate of
/// `pki` (`<name>.chain.pem`, `<name>.key.pem` in `dir`): a second driver, or
/// a client a test expects to be refused when signed by another PKI.
[[nodiscard]] caf::expected<
  std::pair<std::filesystem::path, std::filesystem::path>>
issue_client_cert(const dev_pki& pki, const std::filesystem::path& dir,
                  const std::string& name, int days = 30);

} // namespace hsm::net
