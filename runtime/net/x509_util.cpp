#include "runtime/net/x509_util.hpp"

#include "runtime/base/secret_file.hpp"
#include "runtime/net/openssl_error.hpp"

#include <fcntl.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <system_error>

namespace hsm::net {

namespace {

using crypto::bio_ptr;
using asn1_time_ptr
  = std::unique_ptr<ASN1_TIME, crypto::ossl_deleter<ASN1_TIME_free>>;

/// Largest TLS file read.
constexpr std::uintmax_t max_tls_file_bytes = 1 << 20;

/// The passphrase callback: hands over `u` (a `std::string_view*`), or
/// nothing, so that OpenSSL never prompts on a terminal.
int passphrase_cb(char* buf, int size, int, void* u) {
  const auto* pass = static_cast<const std::string_view*>(u);
  if (pass == nullptr || pass->empty()
      || pass->size() > static_cast<size_t>(size))
    return -1;
  std::memcpy(buf, pass->data(), pass->size());
  return static_cast<int>(pass->size());
}

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  auto len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string{};
}

} // namespace

caf::expected<std::string> read_small_file(const std::filesystem::path& path,
                                           std::string_view option) {
  std::error_code ec;
  auto st = std::filesystem::status(path, ec);
  if (path.empty())
    return cert_error(option, cert_cause::unreadable, "no file given");
  if (ec || !std::filesystem::exists(st))
    return cert_error(option, cert_cause::unreadable,
                      "'" + path.string() + "' does not exist");
  if (!std::filesystem::is_regular_file(st))
    return cert_error(option, cert_cause::unreadable,
                      "'" + path.string() + "' is not a regular file");
  auto size = std::filesystem::file_size(path, ec);
  if (ec || size > max_tls_file_bytes)
    return cert_error(option, cert_cause::unreadable,
                      "'" + path.string() + "' is larger than 1 MiB");
  // Straight from the descriptor into the one buffer returned: a key read
  // here leaves no copy in a stream's buffer.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cert_error(option, cert_cause::unreadable,
                      "'" + path.string()
                        + "' is not readable: " + std::strerror(errno));
  std::string out(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    auto n = ::read(fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(done);
  return out;
}

caf::expected<std::string> read_key_file(const std::filesystem::path& path,
                                         std::string_view option,
                                         key_sharing sharing) {
  if (path.empty())
    return cert_error(option, cert_cause::unreadable, "no file given");
  secret_file_rules rules;
  rules.group_read = sharing == key_sharing::group_read;
  rules.max_bytes = max_tls_file_bytes;
  rules.strip_newlines = false;
  auto text = read_secret_file(path, option, rules);
  if (!text)
    return cert_error(option, cert_cause::unreadable, describe(text.error()));
  return text;
}

std::vector<crypto::x509_ptr> read_certs(std::string_view text) {
  std::vector<crypto::x509_ptr> out;
  bio_ptr bio{BIO_new_mem_buf(text.data(), static_cast<int>(text.size()))};
  if (!bio)
    return out;
  while (auto* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr))
    out.emplace_back(cert);
  // The loop ends on "no start line": not an error.
  ERR_clear_error();
  return out;
}

crypto::pkey_ptr read_key(std::string_view text, std::string_view passphrase) {
  bio_ptr bio{BIO_new_mem_buf(text.data(), static_cast<int>(text.size()))};
  if (!bio)
    return nullptr;
  crypto::pkey_ptr key{
    PEM_read_bio_PrivateKey(bio.get(), nullptr, passphrase_cb, &passphrase)};
  ERR_clear_error();
  return key;
}

std::string to_pem(X509* cert) {
  bio_ptr bio{BIO_new(BIO_s_mem())};
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1)
    return {};
  return bio_text(bio.get());
}

std::string iso_time(const ASN1_TIME* t) {
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1)
    return {};
  std::array<char, 32> buf{};
  auto n = std::strftime(buf.data(), buf.size(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return std::string(buf.data(), n);
}

std::string name_line(const X509_NAME* name) {
  bio_ptr bio{BIO_new(BIO_s_mem())};
  if (!bio
      || X509_NAME_print_ex(bio.get(), name, 0,
                            XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB)
           < 0)
    return {};
  return bio_text(bio.get());
}

bool self_signed(X509* cert) {
  return X509_self_signed(cert, 1) == 1;
}

cert_info info_of(X509* cert, std::time_t at) {
  cert_info out;
  out.subject = name_line(X509_get_subject_name(cert));
  out.issuer = name_line(X509_get_issuer_name(cert));
  if (crypto::bn_ptr bn{
        ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr)}) {
    if (char* hex = BN_bn2hex(bn.get())) {
      out.serial = hex;
      OPENSSL_free(hex);
    }
  }
  out.not_before = iso_time(X509_get0_notBefore(cert));
  out.not_after = iso_time(X509_get0_notAfter(cert));
  if (std::tm tm{}; ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) == 1)
    out.not_after_unix = static_cast<int64_t>(::timegm(&tm));
  int days = 0;
  int secs = 0;
  asn1_time_ptr now{ASN1_TIME_set(nullptr, at)};
  if (now
      && ASN1_TIME_diff(&days, &secs, now.get(), X509_get0_notAfter(cert)) == 1)
    out.days_left = days - (secs < 0 ? 1 : 0);
  using names_ptr = crypto::names_ptr;
  names_ptr sans{static_cast<GENERAL_NAMES*>(
    X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr))};
  for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans.get()); ++i) {
    const auto* gen = sk_GENERAL_NAME_value(sans.get(), i);
    if (gen->type == GEN_DNS) {
      const auto* s = gen->d.dNSName;
      out.names.push_back(
        "DNS:"
        + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                      static_cast<size_t>(ASN1_STRING_length(s))));
    } else if (gen->type == GEN_IPADD) {
      const auto* ip = gen->d.iPAddress;
      std::array<char, 64> buf{};
      auto len = ASN1_STRING_length(ip);
      const auto* bytes = ASN1_STRING_get0_data(ip);
      std::string text;
      if (len == 4) {
        text = std::to_string(bytes[0]) + "." + std::to_string(bytes[1]) + "."
               + std::to_string(bytes[2]) + "." + std::to_string(bytes[3]);
      } else if (len == 16) {
        for (int j = 0; j < 16; j += 2) {
          std::snprintf(buf.data(), buf.size(), "%s%x", j == 0 ? "" : ":",
                        (bytes[j] << 8) | bytes[j + 1]);
          text += buf.data();
        }
      }
      out.names.push_back("IP:" + text);
    } else if (gen->type == GEN_URI) {
      const auto* s = gen->d.uniformResourceIdentifier;
      out.names.push_back(
        "URI:"
        + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                      static_cast<size_t>(ASN1_STRING_length(s))));
    }
  }
  std::unique_ptr<EXTENDED_KEY_USAGE,
                  crypto::ossl_deleter<EXTENDED_KEY_USAGE_free>>
    eku{static_cast<EXTENDED_KEY_USAGE*>(
      X509_get_ext_d2i(cert, NID_ext_key_usage, nullptr, nullptr))};
  for (int i = 0; eku && i < sk_ASN1_OBJECT_num(eku.get()); ++i) {
    const auto* obj = sk_ASN1_OBJECT_value(eku.get(), i);
    auto nid = OBJ_obj2nid(obj);
    if (nid != NID_undef) {
      out.ekus.emplace_back(OBJ_nid2sn(nid));
    } else {
      std::array<char, 128> buf{};
      OBJ_obj2txt(buf.data(), static_cast<int>(buf.size()), obj, 1);
      out.ekus.emplace_back(buf.data());
    }
  }
  ERR_clear_error();
  return out;
}

caf::error set_random_serial(X509* cert) {
  constexpr int serial_bits = 159;
  crypto::bn_ptr bn{BN_new()};
  if (!bn
      || BN_rand(bn.get(), serial_bits, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY)
           != 1)
    return bad_tls_material("cannot draw a serial number");
  crypto::asn1_int_ptr serial{BN_to_ASN1_INTEGER(bn.get(), nullptr)};
  if (!serial || X509_set_serialNumber(cert, serial.get()) != 1)
    return bad_tls_material("cannot set the serial number");
  return caf::none;
}

} // namespace hsm::net
