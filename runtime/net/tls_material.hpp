#pragma once

// The driver's TLS files as the proxy client uses them: the CA bundle that
// must sign the proxy's certificate (`--ca-cert`), the driver's certificate
// (`--client-cert`) and its key (`--client-key`), read once into memory,
// checked, and handed to libcurl as blobs. Reading them into memory is what
// lets SIGHUP swap them safely: a new set is loaded and checked first and
// replaces the old one only if it passes (`tls_source`).
//
// The chain the driver sends is its certificate followed by every
// intermediate found for it, in the `--client-cert` file or among the
// certificates of `--ca-cert` that are not self-signed, so that both
// layouts work: leaf and intermediate in `--client-cert`, or the leaf alone
// with the intermediate next to the vendor's root in `--ca-cert`.
//
// `check_client_tls` is `hsm-driver pki verify` and the daemon's start-up
// check: the chain reaches a self-signed root of `--ca-cert`, every
// certificate is within its validity, the leaf carries extendedKeyUsage
// clientAuth, and the key is the certificate's. A refusal is
// `net_errc::tls_failed` with context (whose certificate, the cause's name,
// details); `cause_of` reads the cause back.
//
// Free functions are thread-safe; `tls_source` may be used from any thread.

#include "messages/errors.hpp"

#include <cstdint>
#include <ctime>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::net {

/// TLS files of one side.
struct tls_files {
  /// CA bundle that must sign the peer's chain.
  std::filesystem::path ca_cert;
  /// Own certificate (chain) in PEM.
  std::filesystem::path cert;
  /// Own private key in PEM.
  std::filesystem::path key;
};

/// Why a certificate is refused.
enum class cert_cause : uint8_t {
  /// Nothing wrong.
  ok,
  /// A file is missing, unreadable, open to others, or holds no PEM object
  /// of the kind expected.
  unreadable,
  /// The chain does not lead to a trusted root (an unknown or wrong CA, a
  /// missing intermediate, a bad signature).
  wrong_ca,
  /// A certificate of the chain is past its notAfter.
  expired,
  /// A certificate of the chain is before its notBefore.
  not_yet_valid,
  /// The leaf is not for this use (no extendedKeyUsage clientAuth for a
  /// client, serverAuth for a server).
  wrong_eku,
  /// The private key is not the certificate's.
  key_mismatch,
  /// The proxy's certificate does not name the host of `--proxy-addr`.
  wrong_server_name,
  /// Any other TLS failure.
  other,
};

/// The cause's name: `wrong_ca`, `expired`, ...
const char* to_string(cert_cause x);

/// `net_errc::tls_failed` with context `whose` ("client certificate",
/// "proxy certificate"), the cause's name and `detail`.
caf::error cert_error(std::string_view whose, cert_cause cause,
                      std::string detail);

/// The cause of an error made by `cert_error`; `cert_cause::other` for
/// any other error.
cert_cause cause_of(const caf::error& err);

/// The cause of an OpenSSL verify result (`X509_V_ERR_*`).
cert_cause cause_of_verify_result(long code);

/// What a certificate says, for reports.
struct cert_info {
  /// Subject and issuer, one line (RFC 2253).
  std::string subject;
  std::string issuer;
  /// Serial number, uppercase hex.
  std::string serial;
  /// Validity, `YYYY-MM-DDTHH:MM:SSZ`.
  std::string not_before;
  std::string not_after;
  /// notAfter in Unix seconds (the expiry metric).
  int64_t not_after_unix = 0;
  /// Whole days from the check's time to notAfter (negative once expired).
  int64_t days_left = 0;
  /// subjectAltName entries, `DNS:name` / `IP:addr`.
  std::vector<std::string> names;
  /// extendedKeyUsage short names (`clientAuth`, ...).
  std::vector<std::string> ekus;
};

/// The TLS files read into memory. The key is wiped when this is dropped.
struct client_tls {
  client_tls() = default;
  client_tls(const client_tls&) = delete;
  client_tls& operator=(const client_tls&) = delete;
  ~client_tls();

  /// The files they came from.
  tls_files files;
  /// The self-signed roots of `--ca-cert`: what the proxy's chain must
  /// reach (its intermediates only help build the driver's own chain).
  std::string ca_pem;
  /// What the driver sends: its certificate and the intermediates found
  /// for it, leaf first, no root.
  std::string chain_pem;
  /// The private key (PEM). Never logged.
  std::string key_pem;
  /// The leaf.
  cert_info leaf;
  /// Every certificate sent, leaf first, then the root it verified against
  /// (when checked).
  std::vector<cert_info> chain;
};

/// Options of `load_client_tls`.
struct client_tls_options {
  /// Check the chain, the validity, the EKU and the key (start-up, SIGHUP,
  /// `pki verify`). Off: only read the files and assemble the chain (tests
  /// that present a bad certificate to the proxy).
  bool verify = true;
  /// The time to check at; 0: now.
  std::time_t at = 0;
};

/// Reads and (by default) checks the files. Errors name the file's option
/// and the cause (`cause_of`): `unreadable`, `wrong_ca`, `expired`,
/// `not_yet_valid`, `wrong_eku`, `key_mismatch`.
[[nodiscard]] caf::expected<std::shared_ptr<const client_tls>>
load_client_tls(const tls_files& files, const client_tls_options& opts = {});

/// The TLS files in use, replaced as a whole on reload. Connections made
/// after `replace` use the new set; those open keep theirs until they close.
class tls_source {
public:
  explicit tls_source(std::shared_ptr<const client_tls> first);

  /// The current set and its generation (1 for the first, +1 per replace).
  [[nodiscard]] std::pair<std::shared_ptr<const client_tls>, uint64_t>
  current() const;

  /// Installs `next` as the current set.
  void replace(std::shared_ptr<const client_tls> next);

private:
  mutable std::mutex mtx_;
  std::shared_ptr<const client_tls> current_;
  uint64_t generation_ = 1;
};

/// Default of `--cert-warn-days`: the driver warns when its certificate
/// expires within this many days.
inline constexpr int default_cert_warn_days = 30;

} // namespace hsm::net
