#include "runtime/net/cert_info.hpp"

#include "runtime/net/openssl_error.hpp"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <ctime>
#include <memory>

namespace hsm::net {

caf::expected<int64_t>
certificate_not_after(const std::filesystem::path& path) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio{BIO_new_file(path.c_str(), "r"),
                                                &BIO_free};
  if (!bio)
    return bad_tls_material("cannot read the certificate " + path.string());
  std::unique_ptr<X509, decltype(&X509_free)> cert{
    PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr), &X509_free};
  if (!cert)
    return bad_tls_material("no certificate in " + path.string());
  std::tm tm{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert.get()), &tm) != 1)
    return bad_tls_material("unreadable notAfter in " + path.string());
  return static_cast<int64_t>(::timegm(&tm));
}

} // namespace hsm::net
