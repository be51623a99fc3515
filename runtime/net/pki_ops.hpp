#pragma once

// The operator's PKI steps (`hsm-driver pki ...`, README "PKI"), with
// OpenSSL 3:
//
// - `csr_template` / `make_csr`: the customer's intermediate CA key and a
//   certificate signing request with exactly the subject, extensions and
//   key usage that the vendor's template asks for (the template format is
//   documented in the README and shipped in deploy/pki/);
// - `issue_leaf`: a driver's certificate signed by that intermediate
//   (clientAuth, a subjectAltName naming the driver), never outliving the
//   intermediate; tests use it with chosen dates and usages too.
//
// Private keys are returned in buffers that are wiped when dropped and are
// written 0600; a key may be encrypted (AES-256-CBC, PBKDF2 via PKCS#8)
// with a passphrase read from a 0600 file. Any thread.

#include "messages/errors.hpp"
#include "runtime/net/tls_material.hpp"

#include <nlohmann/json.hpp>

#include <ctime>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm::net {

/// A string that is wiped when dropped (private keys in PEM).
class secret_text {
public:
  secret_text() = default;
  explicit secret_text(std::string text) : text_(std::move(text)) {
    // nop
  }
  secret_text(secret_text&& other) noexcept;
  secret_text& operator=(secret_text&& other) noexcept;
  secret_text(const secret_text&) = delete;
  secret_text& operator=(const secret_text&) = delete;
  ~secret_text();

  /// The text.
  const std::string& str() const noexcept {
    return text_;
  }

private:
  std::string text_;
};

/// One relative distinguished name of a subject, e.g. `{"O", "Example"}`.
struct rdn_entry {
  /// OpenSSL's short name (`C`, `ST`, `L`, `O`, `OU`, `CN`, `serialNumber`,
  /// `DC`, `emailAddress`, ...) or a dotted OID.
  std::string type;
  std::string value;
};

/// A parsed CSR template (README, "The CSR template").
struct csr_template {
  /// `ec` (with `curve`), `rsa` (with `bits`) or `ed25519`.
  std::string key_algorithm = "ec";
  /// `P-256`, `P-384` or `P-521`.
  std::string curve = "P-256";
  /// 2048, 3072 or 4096.
  int rsa_bits = 3072;
  /// `sha256`, `sha384` or `sha512` (ignored for ed25519).
  std::string digest = "sha256";
  /// The subject, in order.
  std::vector<rdn_entry> subject;
  /// basicConstraints; absent: not requested.
  struct basic_constraints {
    bool critical = true;
    bool ca = true;
    std::optional<int> path_len;
  };
  std::optional<basic_constraints> basic;
  /// keyUsage (names as OpenSSL spells them: `keyCertSign`, `cRLSign`,
  /// `digitalSignature`, ...).
  struct usage {
    bool critical = false;
    std::vector<std::string> values;
  };
  std::optional<usage> key_usage;
  /// extendedKeyUsage (`clientAuth`, `serverAuth`, ... or dotted OIDs).
  std::optional<usage> extended_key_usage;
  /// nameConstraints: `DNS:`, `IP:addr/mask`, `email:`, `URI:` entries.
  struct constraints {
    bool critical = true;
    std::vector<std::string> permitted;
    std::vector<std::string> excluded;
  };
  std::optional<constraints> name_constraints;
  /// subjectAltName entries (`DNS:`, `IP:`, `email:`, `URI:`).
  std::vector<std::string> subject_alt_names;
};

/// Parses a template; an unknown field, a wrong type or a value outside the
/// lists above is `config_errc::invalid_option` naming the field (e.g.
/// `extensions.key_usage.values[2]`).
[[nodiscard]] caf::expected<csr_template>
parse_csr_template(const nlohmann::json& j);

/// Reads and parses a template file; errors name the file.
[[nodiscard]] caf::expected<csr_template>
load_csr_template(const std::filesystem::path& path);

/// A new key and the CSR for it.
struct csr_output {
  /// The private key, PEM (PKCS#8; encrypted if a passphrase was given).
  secret_text key_pem;
  /// The CSR, PEM.
  std::string csr_pem;
};

/// Makes a key as the template asks and a CSR signed with it. A non-empty
/// `passphrase` encrypts the key (AES-256-CBC).
[[nodiscard]] caf::expected<csr_output>
make_csr(const csr_template& t, std::string_view passphrase = {});

/// What a leaf certificate is made for.
struct leaf_spec {
  /// The subject's commonName (the driver's name).
  std::string common_name;
  /// subjectAltName: DNS names and IP addresses (told apart by form).
  std::vector<std::string> names;
  /// extendedKeyUsage: `clientAuth` (drivers), `serverAuth` (a proxy), or
  /// empty for none (tests).
  std::string eku = "clientAuth";
  /// Validity: from `not_before` (0: 5 minutes ago) for `days`, or until
  /// `not_after` if it is set.
  std::time_t not_before = 0;
  std::time_t not_after = 0;
  int days = 90;
  /// Refuse a notAfter beyond the issuer's (`pki issue-leaf`); tests turn
  /// it off to make odd certificates.
  bool within_issuer = true;
};

/// A new leaf: its key, the certificate, and the chain file's content.
struct leaf_output {
  secret_text key_pem;
  /// The leaf alone.
  std::string cert_pem;
  /// The leaf followed by the issuer's certificate(s) as given.
  std::string chain_pem;
  cert_info info;
};

/// The issuing CA: its certificate file (the issuer first; more
/// certificates after it go into the chain file too) and its key, maybe
/// encrypted with `passphrase`.
struct issuer_files {
  std::filesystem::path cert;
  std::filesystem::path key;
  std::string passphrase;
};

/// Issues a leaf (P-256 key, SHA-256) signed by `ca`. Errors are
/// `config_errc::invalid_option` for a bad spec (days, a notAfter beyond
/// the issuer's), `net_errc::bad_tls_material` for files.
[[nodiscard]] caf::expected<leaf_output> issue_leaf(const issuer_files& ca,
                                                    const leaf_spec& spec);

/// Whether `write_pem_file` may replace an existing file.
enum class pem_write : uint8_t {
  /// Replace it atomically (a renewal put in place for SIGHUP).
  replace,
  /// Fail if `path` exists (`pki csr`, `pki issue-leaf`: a key in use is
  /// never overwritten).
  create_new,
};

/// Writes `data` to `path` through a temporary file and a rename (or, with
/// `pem_write::create_new`, a link that fails if `path` exists), with
/// `mode` from creation on (0600 for keys).
[[nodiscard]] caf::error write_pem_file(const std::filesystem::path& path,
                                        std::string_view data, unsigned mode,
                                        pem_write how = pem_write::replace);

} // namespace hsm::net
