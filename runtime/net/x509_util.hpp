#pragma once

// Small X.509 helpers over OpenSSL 3 shared by the TLS material, the PKI
// commands and their tests: PEM reading, time and name rendering, a
// certificate's facts for reports. Any thread.

#include "runtime/crypto/ossl.hpp"
#include "runtime/net/tls_material.hpp"

#include <openssl/x509.h>

#include <ctime>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::net {

/// The bytes of `path` (at most 1 MiB); `option` names it in errors, which
/// carry `cert_cause::unreadable`.
[[nodiscard]] caf::expected<std::string>
read_small_file(const std::filesystem::path& path, std::string_view option);

/// Who may read a private key file besides its owner.
enum class key_sharing {
  /// Nobody (an intermediate CA's key).
  owner_only,
  /// Its group too (a driver's TLS key shared with a group such as
  /// ssl-cert).
  group_read,
};

/// The PEM bytes of the private key in `path`, read as a secret file
/// (`read_secret_file`: no symbolic link, checked on the open descriptor
/// for type, owner, mode and ACL, at most 1 MiB); `option` names it in
/// errors, which carry `cert_cause::unreadable`. The caller wipes the
/// bytes.
[[nodiscard]] caf::expected<std::string>
read_key_file(const std::filesystem::path& path, std::string_view option,
              key_sharing sharing);

/// Every certificate in PEM `text`, in order (empty if none).
std::vector<crypto::x509_ptr> read_certs(std::string_view text);

/// The private key in PEM `text`; null if there is none or it is
/// encrypted and `passphrase` is empty or wrong. Never prompts.
crypto::pkey_ptr read_key(std::string_view text,
                          std::string_view passphrase = {});

/// `cert` as PEM.
std::string to_pem(X509* cert);

/// Gives `cert` a random 159-bit serial number: positive, at most 20
/// octets (RFC 5280 4.1.2.2) and unpredictable. Fails with
/// `net_errc::bad_tls_material`.
[[nodiscard]] caf::error set_random_serial(X509* cert);

/// An ASN.1 time as `YYYY-MM-DDTHH:MM:SSZ` (empty if it does not parse).
std::string iso_time(const ASN1_TIME* t);

/// A name as one RFC 2253 line.
std::string name_line(const X509_NAME* name);

/// True for a self-signed certificate (issuer and subject match and the
/// signature verifies with its own key).
bool self_signed(X509* cert);

/// The facts of `cert`, `days_left` counted from `at`.
cert_info info_of(X509* cert, std::time_t at);

} // namespace hsm::net
