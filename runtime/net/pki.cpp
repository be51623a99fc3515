#include "runtime/net/pki.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/crypto/ossl.hpp"
#include "runtime/net/openssl_error.hpp"
#include "runtime/net/x509_util.hpp"

#include <fcntl.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace hsm::net {

namespace {

using crypto::bio_ptr;
using crypto::ext_ptr;
using crypto::names_ptr;
using crypto::pkey_ptr;
using crypto::x509_ptr;
using gen_name_ptr
  = std::unique_ptr<GENERAL_NAME, crypto::ossl_deleter<GENERAL_NAME_free>>;
using octets_ptr = std::unique_ptr<
  ASN1_OCTET_STRING, crypto::ossl_deleter<ASN1_OCTET_STRING_free>>;
using ia5_ptr
  = std::unique_ptr<ASN1_IA5STRING, crypto::ossl_deleter<ASN1_IA5STRING_free>>;

// -- file names ---------------------------------------------------------------

constexpr const char* root_cert_file = "root.pem";
constexpr const char* intermediate_cert_file = "intermediate.pem";
constexpr const char* intermediate_key_file = "intermediate.key.pem";
constexpr const char* server_chain_file = "server.chain.pem";
constexpr const char* server_key_file = "server.key.pem";
constexpr const char* driver_chain_file = "driver.chain.pem";
constexpr const char* driver_key_file = "driver.key.pem";

/// Backdating of notBefore, so that a peer with a slightly slow clock
/// accepts a certificate made a moment ago.
constexpr long backdate_seconds = 300;

// -- helpers ------------------------------------------------------------------

bool is_file(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::is_regular_file(p, ec);
}

/// Writes `data` to `path` through a temporary file and a rename, so that a
/// crash never leaves a half-written file; `mode` applies from creation on
/// (a key is never readable by others, not even for a moment).
caf::error write_file(const std::filesystem::path& path,
                      const std::string& data, mode_t mode) {
  auto tmp = path;
  tmp += ".tmp";
  auto tmp_str = tmp.string();
  ::unlink(tmp_str.c_str());
  int fd = ::open(tmp_str.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                  mode);
  if (fd < 0)
    return caf::make_error(net_errc::bad_tls_material, path.string(),
                           std::string{"cannot create: "}
                             + std::strerror(errno));
  // The umask may have cleared bits of `mode`; never add any it did not.
  if (::fchmod(fd, mode) != 0) {
    auto err = errno;
    ::close(fd);
    ::unlink(tmp_str.c_str());
    return caf::make_error(net_errc::bad_tls_material, path.string(),
                           std::string{"cannot chmod: "} + std::strerror(err));
  }
  size_t done = 0;
  while (done < data.size()) {
    auto n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      auto err = errno;
      ::close(fd);
      ::unlink(tmp_str.c_str());
      return caf::make_error(net_errc::bad_tls_material, path.string(),
                             std::string{"cannot write: "}
                               + std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    auto err = errno;
    ::unlink(tmp_str.c_str());
    return caf::make_error(net_errc::bad_tls_material, path.string(),
                           std::string{"cannot write: "} + std::strerror(err));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    ::unlink(tmp_str.c_str());
    return caf::make_error(net_errc::bad_tls_material, path.string(),
                           "cannot rename: " + ec.message());
  }
  return caf::none;
}

caf::expected<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return caf::make_error(net_errc::bad_tls_material, path.string(),
                           std::string{"cannot open"});
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

caf::expected<pkey_ptr> make_key() {
  pkey_ptr key{EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")};
  if (!key)
    return bad_tls_material("cannot generate a P-256 key");
  return key;
}

caf::expected<std::string> key_pem(EVP_PKEY* key) {
  bio_ptr bio{BIO_new(BIO_s_mem())};
  if (!bio
      || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr,
                                  nullptr)
           != 1)
    return bad_tls_material("cannot encode a private key");
  char* data = nullptr;
  auto len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

caf::expected<std::string> cert_pem(X509* cert) {
  bio_ptr bio{BIO_new(BIO_s_mem())};
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1)
    return bad_tls_material("cannot encode a certificate");
  char* data = nullptr;
  auto len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

/// Reads one PEM object of `path` with `read` (PEM_read_bio_X509,
/// PEM_read_bio_PrivateKey, ...); `what` names it in errors.
template <class Ptr, class Reader>
caf::expected<Ptr> load_pem(const std::filesystem::path& path, Reader read,
                            const char* what) {
  auto text = read_file(path);
  if (!text)
    return std::move(text.error());
  bio_ptr bio{BIO_new_mem_buf(text->data(), static_cast<int>(text->size()))};
  if (!bio)
    return bad_tls_material("cannot read " + path.string());
  Ptr obj{read(bio.get(), nullptr, nullptr, nullptr)};
  if (!obj)
    return bad_tls_material(path.string() + ": no PEM " + what);
  return obj;
}

caf::expected<x509_ptr> load_cert(const std::filesystem::path& path) {
  return load_pem<x509_ptr>(path, PEM_read_bio_X509, "certificate");
}

caf::expected<pkey_ptr> load_key(const std::filesystem::path& path) {
  return load_pem<pkey_ptr>(path, PEM_read_bio_PrivateKey, "private key");
}

/// Adds one extension in OpenSSL's configuration syntax (e.g.
/// `critical,CA:TRUE`), with `cert` as subject and `issuer` as issuer.
caf::error add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ext_ptr ext{X509V3_EXT_nconf_nid(nullptr, &ctx, nid, value)};
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1)
    return bad_tls_material(std::string{"cannot add extension "}
                            + OBJ_nid2sn(nid) + " = " + value);
  return caf::none;
}

/// Adds a subjectAltName with a DNS entry per name and an IP entry per
/// address (IPv4 or IPv6, recognised by their form).
caf::error add_san(X509* cert, const std::vector<std::string>& names) {
  names_ptr gens{GENERAL_NAMES_new()};
  if (!gens)
    return bad_tls_material("cannot allocate subjectAltName");
  for (const auto& name : names) {
    gen_name_ptr gen{GENERAL_NAME_new()};
    if (!gen)
      return bad_tls_material("cannot allocate subjectAltName");
    if (octets_ptr ip{a2i_IPADDRESS(name.c_str())}) {
      GENERAL_NAME_set0_value(gen.get(), GEN_IPADD, ip.release());
    } else {
      ERR_clear_error();
      ia5_ptr dns{ASN1_IA5STRING_new()};
      if (!dns
          || ASN1_STRING_set(dns.get(), name.data(),
                             static_cast<int>(name.size()))
               != 1)
        return bad_tls_material("cannot encode DNS name " + name);
      GENERAL_NAME_set0_value(gen.get(), GEN_DNS, dns.release());
    }
    if (sk_GENERAL_NAME_push(gens.get(), gen.get()) == 0)
      return bad_tls_material("cannot add " + name + " to subjectAltName");
    gen.release();
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, gens.get(), 0,
                        X509V3_ADD_DEFAULT)
      != 1)
    return bad_tls_material("cannot add subjectAltName");
  return caf::none;
}

/// What kind of certificate `make_cert` makes.
enum class cert_role { root, intermediate, server, client };

struct cert_request {
  cert_role role;
  std::string common_name;
  EVP_PKEY* key;        // the subject's key
  X509* issuer;         // nullptr for the self-signed root
  EVP_PKEY* issuer_key; // the key that signs
  int days;
  std::vector<std::string> names; // server only
};

caf::expected<x509_ptr> make_cert(const cert_request& req) {
  x509_ptr cert{X509_new()};
  if (!cert)
    return bad_tls_material("cannot allocate a certificate");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1)
    return bad_tls_material("cannot set the version");
  // -- serial ---------------------------------------------------------------
  if (auto err = set_random_serial(cert.get()))
    return err;
  // -- validity -------------------------------------------------------------
  if (X509_gmtime_adj(X509_getm_notBefore(cert.get()), -backdate_seconds)
        == nullptr
      || X509_time_adj_ex(X509_getm_notAfter(cert.get()), req.days, 0, nullptr)
           == nullptr)
    return bad_tls_material("cannot set the validity");
  // -- names and key --------------------------------------------------------
  auto* name = X509_get_subject_name(cert.get());
  auto add_entry = [name](const char* field, const std::string& value) {
    return X509_NAME_add_entry_by_txt(
             name, field, MBSTRING_UTF8,
             reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1, 0)
           == 1;
  };
  if (!add_entry("O", "hsm-driver dev PKI")
      || !add_entry("CN", req.common_name))
    return bad_tls_material("cannot set the subject name");
  auto* issuer = req.issuer != nullptr ? req.issuer : cert.get();
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(issuer)) != 1
      || X509_set_pubkey(cert.get(), req.key) != 1)
    return bad_tls_material("cannot set the issuer or the public key");
  // -- extensions -----------------------------------------------------------
  // The subject key identifier goes first: the authority key identifier of a
  // self-signed root is computed from it.
  if (auto err = add_ext(cert.get(), issuer, NID_subject_key_identifier,
                         "hash"))
    return err;
  if (auto err = add_ext(cert.get(), issuer, NID_authority_key_identifier,
                         "keyid:always"))
    return err;
  switch (req.role) {
    case cert_role::root:
      if (auto err = add_ext(cert.get(), issuer, NID_basic_constraints,
                             "critical,CA:TRUE"))
        return err;
      if (auto err = add_ext(cert.get(), issuer, NID_key_usage,
                             "critical,keyCertSign,cRLSign"))
        return err;
      break;
    case cert_role::intermediate:
      if (auto err = add_ext(cert.get(), issuer, NID_basic_constraints,
                             "critical,CA:TRUE,pathlen:0"))
        return err;
      if (auto err = add_ext(cert.get(), issuer, NID_key_usage,
                             "critical,keyCertSign,cRLSign"))
        return err;
      break;
    case cert_role::server:
    case cert_role::client: {
      auto is_server = req.role == cert_role::server;
      if (auto err = add_ext(cert.get(), issuer, NID_basic_constraints,
                             "critical,CA:FALSE"))
        return err;
      if (auto err = add_ext(cert.get(), issuer, NID_key_usage,
                             "critical,digitalSignature"))
        return err;
      if (auto err = add_ext(cert.get(), issuer, NID_ext_key_usage,
                             is_server ? "serverAuth" : "clientAuth"))
        return err;
      if (is_server && !req.names.empty())
        if (auto err = add_san(cert.get(), req.names))
          return err;
      break;
    }
  }
  if (X509_sign(cert.get(), req.issuer_key, EVP_sha256()) <= 0)
    return bad_tls_material("cannot sign the certificate for "
                            + req.common_name);
  return cert;
}

/// A leaf's files: its key (0600) and its chain (leaf + intermediate).
caf::error issue_leaf(cert_role role, const std::string& common_name,
                      const std::vector<std::string>& names, X509* ca,
                      EVP_PKEY* ca_key, int days,
                      const std::filesystem::path& chain_path,
                      const std::filesystem::path& key_path) {
  auto key = make_key();
  if (!key)
    return std::move(key.error());
  auto cert = make_cert(
    {role, common_name, key->get(), ca, ca_key, days, names});
  if (!cert)
    return std::move(cert.error());
  auto key_text = key_pem(key->get());
  if (!key_text)
    return std::move(key_text.error());
  auto leaf_text = cert_pem(cert->get());
  if (!leaf_text)
    return std::move(leaf_text.error());
  auto ca_text = cert_pem(ca);
  if (!ca_text)
    return std::move(ca_text.error());
  if (auto err = write_file(key_path, *key_text, 0600))
    return err;
  return write_file(chain_path, *leaf_text + *ca_text, 0644);
}

dev_pki paths_in(const std::filesystem::path& dir) {
  return dev_pki{dir / root_cert_file,    dir / intermediate_cert_file,
                 dir / server_chain_file, dir / server_key_file,
                 dir / driver_chain_file, dir / driver_key_file};
}

/// A name is used as a file name: keep it to a safe alphabet.
bool is_safe_name(const std::string& name) {
  if (name.empty() || name.size() > 64 || name.front() == '.')
    return false;
  for (auto c : name) {
    auto ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok)
      return false;
  }
  return true;
}

/// True if the first certificate in `path` can be read and is still valid
/// `days` from now (false for a file that does not load).
bool valid_for(const std::filesystem::path& path, int days) {
  auto cert = load_cert(path);
  if (!cert)
    return false;
  auto until = std::time(nullptr) + static_cast<std::time_t>(days) * 86400;
  // X509_cmp_time: -1 if notAfter is before `until`, 0 on error.
  return X509_cmp_time(X509_get0_notAfter(cert->get()), &until) > 0;
}

caf::error check_days(int days) {
  if (days <= 0)
    return caf::make_error(net_errc::bad_tls_material,
                           "validity must be positive, got "
                             + std::to_string(days) + " days");
  return caf::none;
}

} // namespace

caf::expected<dev_pki> make_dev_pki(const std::filesystem::path& dir,
                                    const dev_pki_options& opts) {
  if (auto err = check_days(opts.days))
    return err;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return caf::make_error(net_errc::bad_tls_material, dir.string(),
                           "cannot create the directory: " + ec.message());
  auto pki = paths_in(dir);
  auto intermediate_key = dir / intermediate_key_file;
  auto have_ca = is_file(pki.root_cert) && is_file(pki.intermediate_cert)
                 && is_file(intermediate_key);
  auto have_server = is_file(pki.server_chain) && is_file(pki.server_key);
  auto have_driver = is_file(pki.driver_chain) && is_file(pki.driver_key);
  // Certificates that expire within `dev_pki_renew_days` are made again
  // (a CA with everything it issued), so that the dev mode keeps working
  // past its PKI's validity.
  auto renew = [&](bool& have, const std::filesystem::path& cert,
                   const char* what) {
    if (have && !valid_for(cert, dev_pki_renew_days)) {
      logger("runtime")->info("dev PKI: the {} certificate {} expires within "
                              "{} days; making a new one",
                              what, cert.string(), dev_pki_renew_days);
      have = false;
    }
  };
  renew(have_ca, pki.root_cert, "root");
  renew(have_ca, pki.intermediate_cert, "intermediate");
  renew(have_server, pki.server_chain, "server");
  renew(have_driver, pki.driver_chain, "driver");
  if (have_ca && have_server && have_driver)
    return pki;
  x509_ptr ca;
  pkey_ptr ca_key;
  if (have_ca) {
    // Keep the CA (and so every certificate issued by it); only make the
    // leaves that are missing.
    auto cert = load_cert(pki.intermediate_cert);
    if (!cert)
      return std::move(cert.error());
    auto key = load_key(intermediate_key);
    if (!key)
      return std::move(key.error());
    if (X509_check_private_key(cert->get(), key->get()) != 1)
      return bad_tls_material(intermediate_key.string() + " does not match "
                              + pki.intermediate_cert.string());
    ca = std::move(*cert);
    ca_key = std::move(*key);
  } else {
    // A fresh PKI: the root's key is used once, to sign the intermediate,
    // and never written anywhere.
    auto root_key = make_key();
    if (!root_key)
      return std::move(root_key.error());
    auto root = make_cert({cert_role::root,
                           "hsm-driver dev root CA",
                           root_key->get(),
                           nullptr,
                           root_key->get(),
                           opts.days,
                           {}});
    if (!root)
      return std::move(root.error());
    auto key = make_key();
    if (!key)
      return std::move(key.error());
    auto cert = make_cert({cert_role::intermediate,
                           "hsm-driver dev intermediate CA",
                           key->get(),
                           root->get(),
                           root_key->get(),
                           opts.days,
                           {}});
    if (!cert)
      return std::move(cert.error());
    auto root_text = cert_pem(root->get());
    if (!root_text)
      return std::move(root_text.error());
    auto cert_text = cert_pem(cert->get());
    if (!cert_text)
      return std::move(cert_text.error());
    auto key_text = key_pem(key->get());
    if (!key_text)
      return std::move(key_text.error());
    if (auto err = write_file(intermediate_key, *key_text, 0600))
      return err;
    if (auto err = write_file(pki.intermediate_cert, *cert_text, 0644))
      return err;
    if (auto err = write_file(pki.root_cert, *root_text, 0644))
      return err;
    ca = std::move(*cert);
    ca_key = std::move(*key);
    // Leaves of an earlier CA would not chain to the new root.
    have_server = false;
    have_driver = false;
  }
  if (!have_server) {
    auto cn = opts.server_names.empty() ? std::string{"hsm-proxy"}
                                        : opts.server_names.front();
    if (auto err = issue_leaf(cert_role::server, cn, opts.server_names,
                              ca.get(), ca_key.get(), opts.days,
                              pki.server_chain, pki.server_key))
      return err;
  }
  if (!have_driver) {
    if (auto err = issue_leaf(cert_role::client, opts.driver_name, {}, ca.get(),
                              ca_key.get(), opts.days, pki.driver_chain,
                              pki.driver_key))
      return err;
  }
  return pki;
}

caf::expected<std::pair<std::filesystem::path, std::filesystem::path>>
issue_client_cert(const dev_pki& pki, const std::filesystem::path& dir,
                  const std::string& name, int days) {
  if (auto err = check_days(days))
    return err;
  if (!is_safe_name(name))
    return caf::make_error(net_errc::bad_tls_material,
                           "client name '" + name
                             + "' is not a safe file name "
                               "([A-Za-z0-9._-], not starting with '.')");
  auto intermediate_key = pki.intermediate_cert.parent_path()
                          / intermediate_key_file;
  auto ca = load_cert(pki.intermediate_cert);
  if (!ca)
    return std::move(ca.error());
  auto ca_key = load_key(intermediate_key);
  if (!ca_key)
    return std::move(ca_key.error());
  if (X509_check_private_key(ca->get(), ca_key->get()) != 1)
    return bad_tls_material(intermediate_key.string() + " does not match "
                            + pki.intermediate_cert.string());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return caf::make_error(net_errc::bad_tls_material, dir.string(),
                           "cannot create the directory: " + ec.message());
  auto chain = dir / (name + ".chain.pem");
  auto key = dir / (name + ".key.pem");
  if (auto err = issue_leaf(cert_role::client, name, {}, ca->get(),
                            ca_key->get(), days, chain, key))
    return err;
  return std::make_pair(chain, key);
}

} // namespace hsm::net
