#include "runtime/net/pki_ops.hpp"

#include "runtime/crypto/ossl.hpp"
#include "runtime/net/openssl_error.hpp"
#include "runtime/net/x509_util.hpp"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <system_error>

namespace hsm::net {

namespace {

using crypto::bio_ptr;
using crypto::ext_ptr;
using crypto::pkey_ptr;
using crypto::x509_ptr;
using json = nlohmann::json;
using req_ptr = std::unique_ptr<X509_REQ, crypto::ossl_deleter<X509_REQ_free>>;
struct ext_stack_free {
  void operator()(STACK_OF(X509_EXTENSION) * s) const {
    sk_X509_EXTENSION_pop_free(s, X509_EXTENSION_free);
  }
};
using ext_stack_ptr = std::unique_ptr<STACK_OF(X509_EXTENSION), ext_stack_free>;
using octets_ptr = std::unique_ptr<
  ASN1_OCTET_STRING, crypto::ossl_deleter<ASN1_OCTET_STRING_free>>;

/// notBefore of a new leaf lies this far in the past, for peers whose
/// clocks are a little slow.
constexpr std::time_t backdate_seconds = 300;

/// Longest leaf validity `issue_leaf` accepts.
constexpr int max_leaf_days = 3650;

// -- template parsing ---------------------------------------------------------

caf::error bad_field(const std::string& field, const std::string& why) {
  return caf::make_error(config_errc::invalid_option, "template: " + field,
                         field + ": " + why);
}

/// Refuses members of `j` not in `known`.
caf::error only_fields(const json& j, const std::string& where,
                       std::initializer_list<std::string_view> known) {
  if (!j.is_object())
    return bad_field(where.empty() ? "(top level)" : where,
                     "must be an object");
  for (const auto& [name, value] : j.items())
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      std::string list;
      for (auto k : known)
        list += (list.empty() ? "" : ", ") + std::string{k};
      return bad_field(where.empty() ? name : where + "." + name,
                       "unknown field (known: " + list + ")");
    }
  return caf::none;
}

caf::error get_string(const json& j, const std::string& where,
                      std::string& out) {
  if (!j.is_string())
    return bad_field(where, "must be a string");
  out = j.get<std::string>();
  if (out.empty())
    return bad_field(where, "must not be empty");
  return caf::none;
}

caf::error get_bool(const json& j, const std::string& where, bool& out) {
  if (!j.is_boolean())
    return bad_field(where, "must be true or false");
  out = j.get<bool>();
  return caf::none;
}

/// No character that would change the meaning of OpenSSL's extension
/// syntax (`,` separates values) or hide in a log line.
bool plain_value(std::string_view s) {
  return !s.empty() && std::none_of(s.begin(), s.end(), [](char c) {
    return c == ',' || static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
  });
}

bool dotted_oid(std::string_view s) {
  if (s.empty() || s.front() == '.' || s.back() == '.')
    return false;
  int dots = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '.') {
      if (s[i - 1] == '.')
        return false;
      ++dots;
    } else if (s[i] < '0' || s[i] > '9') {
      return false;
    }
  }
  return dots >= 1;
}

/// A general name as the template spells it: `DNS:`, `IP:`, `email:`,
/// `URI:` and a value without commas.
bool general_name(std::string_view s, bool ip_mask) {
  for (std::string_view prefix : {"DNS:", "IP:", "email:", "URI:"}) {
    if (s.substr(0, prefix.size()) == prefix) {
      auto value = s.substr(prefix.size());
      if (!plain_value(value))
        return false;
      if (prefix == "IP:" && ip_mask != (value.find('/') != value.npos))
        return false;
      return true;
    }
  }
  return false;
}

caf::error get_list(const json& j, const std::string& where,
                    std::vector<std::string>& out, auto&& valid,
                    const std::string& expected) {
  if (!j.is_array())
    return bad_field(where, "must be an array of strings");
  for (size_t i = 0; i < j.size(); ++i) {
    auto field = where + "[" + std::to_string(i) + "]";
    std::string v;
    if (auto err = get_string(j[i], field, v))
      return err;
    if (!valid(v))
      return bad_field(field, "'" + v + "' is not " + expected);
    if (std::find(out.begin(), out.end(), v) != out.end())
      return bad_field(field, "'" + v + "' is listed twice");
    out.push_back(std::move(v));
  }
  return caf::none;
}

constexpr std::array key_usage_names{"digitalSignature", "nonRepudiation",
                                     "keyEncipherment",  "dataEncipherment",
                                     "keyAgreement",     "keyCertSign",
                                     "cRLSign",          "encipherOnly",
                                     "decipherOnly"};

constexpr std::array eku_names{"serverAuth",   "clientAuth",
                               "codeSigning",  "emailProtection",
                               "timeStamping", "OCSPSigning"};

template <size_t N>
bool one_of(const std::array<const char*, N>& names, std::string_view v) {
  return std::any_of(names.begin(), names.end(),
                     [v](const char* n) { return v == n; });
}

caf::error parse_usage(const json& j, const std::string& where,
                       csr_template::usage& out, bool extended) {
  if (auto err = only_fields(j, where, {"critical", "values"}))
    return err;
  if (j.contains("critical"))
    if (auto err = get_bool(j["critical"], where + ".critical", out.critical))
      return err;
  if (!j.contains("values"))
    return bad_field(where + ".values", "missing");
  auto valid = [extended](const std::string& v) {
    return extended ? one_of(eku_names, v) || dotted_oid(v)
                    : one_of(key_usage_names, v);
  };
  if (auto err = get_list(j["values"], where + ".values", out.values, valid,
                          extended ? "serverAuth, clientAuth, codeSigning, "
                                     "emailProtection, timeStamping, "
                                     "OCSPSigning or a dotted OID"
                                   : "a keyUsage name (digitalSignature, "
                                     "keyCertSign, cRLSign, ...)"))
    return err;
  if (out.values.empty())
    return bad_field(where + ".values", "must not be empty");
  return caf::none;
}

// -- certificates -------------------------------------------------------------

caf::expected<x509_ptr> first_cert(const std::filesystem::path& path,
                                   std::string& text) {
  auto read = read_small_file(path, "--intermediate-cert");
  if (!read)
    return caf::make_error(net_errc::bad_tls_material, describe(read.error()));
  text = std::move(*read);
  auto certs = read_certs(text);
  if (certs.empty())
    return caf::make_error(net_errc::bad_tls_material,
                           "'" + path.string() + "' holds no certificate");
  return std::move(certs.front());
}

caf::error add_ext(X509* cert, X509* issuer, int nid, const std::string& v) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ext_ptr ext{X509V3_EXT_nconf_nid(nullptr, &ctx, nid, v.c_str())};
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1)
    return bad_tls_material(std::string{"cannot add extension "}
                            + OBJ_nid2sn(nid) + " = " + v);
  return caf::none;
}

/// `DNS:a,IP:1.2.3.4` for the names, told apart by form.
std::string san_value(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) {
    octets_ptr ip{a2i_IPADDRESS(n.c_str())};
    ERR_clear_error();
    out += (out.empty() ? "" : ",") + std::string{ip ? "IP:" : "DNS:"} + n;
  }
  return out;
}

caf::expected<std::string> encode_key(EVP_PKEY* key,
                                      std::string_view passphrase) {
  bio_ptr bio{BIO_new(BIO_s_mem())};
  int ok = 0;
  if (bio) {
    if (passphrase.empty())
      ok = PEM_write_bio_PKCS8PrivateKey(bio.get(), key, nullptr, nullptr, 0,
                                         nullptr, nullptr);
    else
      ok = PEM_write_bio_PKCS8PrivateKey(bio.get(), key, EVP_aes_256_cbc(),
                                         passphrase.data(),
                                         static_cast<int>(passphrase.size()),
                                         nullptr, nullptr);
  }
  if (ok != 1)
    return bad_tls_material("cannot encode the private key");
  char* data = nullptr;
  auto len = BIO_get_mem_data(bio.get(), &data);
  std::string out(data, static_cast<size_t>(len));
  // The memory BIO's buffer held the key too.
  OPENSSL_cleanse(data, static_cast<size_t>(len));
  return out;
}

} // namespace

// -- secret_text --------------------------------------------------------------

secret_text::secret_text(secret_text&& other) noexcept
  : text_(std::move(other.text_)) {
  other.text_.clear();
}

secret_text& secret_text::operator=(secret_text&& other) noexcept {
  if (this != &other) {
    OPENSSL_cleanse(text_.data(), text_.size());
    text_ = std::move(other.text_);
    other.text_.clear();
  }
  return *this;
}

secret_text::~secret_text() {
  OPENSSL_cleanse(text_.data(), text_.size());
}

// -- templates ----------------------------------------------------------------

caf::expected<csr_template> parse_csr_template(const json& j) {
  csr_template t;
  if (auto err = only_fields(
        j, "", {"description", "key", "digest", "subject", "extensions"}))
    return err;
  if (j.contains("description") && !j["description"].is_string())
    return bad_field("description", "must be a string");
  if (!j.contains("key"))
    return bad_field("key", "missing");
  const auto& key = j["key"];
  if (auto err = only_fields(key, "key", {"algorithm", "curve", "bits"}))
    return err;
  if (!key.contains("algorithm"))
    return bad_field("key.algorithm", "missing");
  if (auto err = get_string(key["algorithm"], "key.algorithm", t.key_algorithm))
    return err;
  if (t.key_algorithm == "ec") {
    if (key.contains("bits"))
      return bad_field("key.bits", "only for rsa");
    if (key.contains("curve"))
      if (auto err = get_string(key["curve"], "key.curve", t.curve))
        return err;
    if (t.curve != "P-256" && t.curve != "P-384" && t.curve != "P-521")
      return bad_field("key.curve",
                       "'" + t.curve + "' is not P-256, P-384 or P-521");
  } else if (t.key_algorithm == "rsa") {
    if (key.contains("curve"))
      return bad_field("key.curve", "only for ec");
    if (key.contains("bits")) {
      if (!key["bits"].is_number_integer())
        return bad_field("key.bits", "must be 2048, 3072 or 4096");
      t.rsa_bits = key["bits"].get<int>();
    }
    if (t.rsa_bits != 2048 && t.rsa_bits != 3072 && t.rsa_bits != 4096)
      return bad_field("key.bits", "must be 2048, 3072 or 4096");
  } else if (t.key_algorithm == "ed25519") {
    if (key.contains("curve") || key.contains("bits"))
      return bad_field("key", "ed25519 takes no curve or bits");
  } else {
    return bad_field("key.algorithm",
                     "'" + t.key_algorithm + "' is not ec, rsa or ed25519");
  }
  if (j.contains("digest")) {
    if (auto err = get_string(j["digest"], "digest", t.digest))
      return err;
    if (t.digest != "sha256" && t.digest != "sha384" && t.digest != "sha512")
      return bad_field("digest",
                       "'" + t.digest + "' is not sha256, sha384 or sha512");
  }
  if (!j.contains("subject"))
    return bad_field("subject", "missing");
  const auto& subject = j["subject"];
  if (!subject.is_array() || subject.empty())
    return bad_field("subject", "must be a non-empty array of one-member "
                                "objects, e.g. [{\"O\": \"Example\"}, "
                                "{\"CN\": \"Example CA\"}]");
  for (size_t i = 0; i < subject.size(); ++i) {
    auto field = "subject[" + std::to_string(i) + "]";
    const auto& rdn = subject[i];
    if (!rdn.is_object() || rdn.size() != 1)
      return bad_field(field, "must be an object with one member, e.g. "
                              "{\"CN\": \"Example CA\"}");
    auto it = rdn.begin();
    rdn_entry e{it.key(), {}};
    if (auto err = get_string(it.value(), field + "." + e.type, e.value))
      return err;
    auto nid = OBJ_txt2nid(e.type.c_str());
    if (nid == NID_undef && !dotted_oid(e.type))
      return bad_field(field, "'" + e.type
                                + "' is not an attribute type OpenSSL "
                                  "knows (C, ST, L, O, OU, CN, "
                                  "serialNumber, DC, ...) or a dotted OID");
    t.subject.push_back(std::move(e));
  }
  if (j.contains("extensions")) {
    const auto& ext = j["extensions"];
    if (auto err = only_fields(ext, "extensions",
                               {"basic_constraints", "key_usage",
                                "extended_key_usage", "name_constraints",
                                "subject_alt_name"}))
      return err;
    if (ext.contains("basic_constraints")) {
      const auto& bc = ext["basic_constraints"];
      std::string w = "extensions.basic_constraints";
      if (auto err = only_fields(bc, w, {"critical", "ca", "path_len"}))
        return err;
      csr_template::basic_constraints b;
      if (bc.contains("critical"))
        if (auto err = get_bool(bc["critical"], w + ".critical", b.critical))
          return err;
      if (!bc.contains("ca"))
        return bad_field(w + ".ca", "missing");
      if (auto err = get_bool(bc["ca"], w + ".ca", b.ca))
        return err;
      if (bc.contains("path_len")) {
        if (!bc["path_len"].is_number_integer() || bc["path_len"].get<int>() < 0
            || bc["path_len"].get<int>() > 16)
          return bad_field(w + ".path_len", "must be an integer 0..16");
        if (!b.ca)
          return bad_field(w + ".path_len", "only with \"ca\": true");
        b.path_len = bc["path_len"].get<int>();
      }
      t.basic = b;
    }
    if (ext.contains("key_usage")) {
      csr_template::usage u;
      if (auto err = parse_usage(ext["key_usage"], "extensions.key_usage", u,
                                 false))
        return err;
      t.key_usage = std::move(u);
    }
    if (ext.contains("extended_key_usage")) {
      csr_template::usage u;
      if (auto err = parse_usage(ext["extended_key_usage"],
                                 "extensions.extended_key_usage", u, true))
        return err;
      t.extended_key_usage = std::move(u);
    }
    if (ext.contains("name_constraints")) {
      const auto& nc = ext["name_constraints"];
      std::string w = "extensions.name_constraints";
      if (auto err = only_fields(nc, w, {"critical", "permitted", "excluded"}))
        return err;
      csr_template::constraints c;
      if (nc.contains("critical"))
        if (auto err = get_bool(nc["critical"], w + ".critical", c.critical))
          return err;
      // An IP constraint is an address and a mask; the others are names.
      auto valid = [](const std::string& v) {
        return general_name(v, v.rfind("IP:", 0) == 0);
      };
      for (auto* side : {"permitted", "excluded"}) {
        if (!nc.contains(side))
          continue;
        auto& list = std::string_view{side} == "permitted" ? c.permitted
                                                           : c.excluded;
        if (auto err = get_list(nc[side], w + "." + side, list, valid,
                                "DNS:, email:, URI: or IP:address/mask"))
          return err;
      }
      if (c.permitted.empty() && c.excluded.empty())
        return bad_field(w, "needs permitted or excluded entries");
      t.name_constraints = std::move(c);
    }
    if (ext.contains("subject_alt_name")) {
      auto valid = [](const std::string& v) { return general_name(v, false); };
      if (auto err = get_list(ext["subject_alt_name"],
                              "extensions.subject_alt_name",
                              t.subject_alt_names, valid,
                              "DNS:, IP:, email: or URI: and a value"))
        return err;
    }
  }
  return t;
}

caf::expected<csr_template>
load_csr_template(const std::filesystem::path& path) {
  std::ifstream in{path};
  if (!in)
    return caf::make_error(config_errc::bad_file, std::string{"--template"},
                           "cannot open '" + path.string() + "'");
  std::string text{std::istreambuf_iterator<char>{in}, {}};
  auto j = json::parse(text, nullptr, false);
  if (j.is_discarded())
    return caf::make_error(config_errc::bad_file, std::string{"--template"},
                           "'" + path.string() + "' is not valid JSON");
  auto t = parse_csr_template(j);
  if (!t)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--template"},
                           path.string() + ": " + describe(t.error()));
  return t;
}

// -- CSR ----------------------------------------------------------------------

caf::expected<csr_output> make_csr(const csr_template& t,
                                   std::string_view passphrase) {
  pkey_ptr key;
  if (t.key_algorithm == "ec")
    key.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", t.curve.c_str()));
  else if (t.key_algorithm == "rsa")
    key.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA",
                                static_cast<size_t>(t.rsa_bits)));
  else
    key.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  if (!key)
    return bad_tls_material("cannot generate a " + t.key_algorithm + " key");
  req_ptr req{X509_REQ_new()};
  if (!req || X509_REQ_set_version(req.get(), X509_REQ_VERSION_1) != 1
      || X509_REQ_set_pubkey(req.get(), key.get()) != 1)
    return bad_tls_material("cannot make the CSR");
  auto* name = X509_REQ_get_subject_name(req.get());
  for (const auto& e : t.subject)
    if (X509_NAME_add_entry_by_txt(
          name, e.type.c_str(), MBSTRING_UTF8,
          reinterpret_cast<const unsigned char*>(e.value.c_str()), -1, -1, 0)
        != 1)
      return bad_tls_material("cannot add " + e.type + "=" + e.value
                              + " to the subject");
  ext_stack_ptr exts{sk_X509_EXTENSION_new_null()};
  if (!exts)
    return bad_tls_material("cannot allocate extensions");
  auto add = [&](int nid, const std::string& value) -> caf::error {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, nullptr, nullptr, req.get(), nullptr, 0);
    ext_ptr ext{X509V3_EXT_nconf_nid(nullptr, &ctx, nid, value.c_str())};
    if (!ext || sk_X509_EXTENSION_push(exts.get(), ext.get()) == 0)
      return bad_tls_material(std::string{"cannot encode "} + OBJ_nid2sn(nid)
                              + " = " + value);
    ext.release();
    return caf::none;
  };
  auto crit = [](bool c) {
    return c ? std::string{"critical,"} : std::string{};
  };
  if (t.basic) {
    auto v = crit(t.basic->critical) + (t.basic->ca ? "CA:TRUE" : "CA:FALSE");
    if (t.basic->path_len)
      v += ",pathlen:" + std::to_string(*t.basic->path_len);
    if (auto err = add(NID_basic_constraints, v))
      return err;
  }
  auto joined = [](const std::vector<std::string>& xs) {
    std::string out;
    for (const auto& x : xs)
      out += (out.empty() ? "" : ",") + x;
    return out;
  };
  if (t.key_usage)
    if (auto err = add(NID_key_usage, crit(t.key_usage->critical)
                                        + joined(t.key_usage->values)))
      return err;
  if (t.extended_key_usage)
    if (auto err = add(NID_ext_key_usage,
                       crit(t.extended_key_usage->critical)
                         + joined(t.extended_key_usage->values)))
      return err;
  if (t.name_constraints) {
    std::string v = crit(t.name_constraints->critical);
    std::string entries;
    for (const auto& p : t.name_constraints->permitted)
      entries += (entries.empty() ? "" : ",") + ("permitted;" + p);
    for (const auto& x : t.name_constraints->excluded)
      entries += (entries.empty() ? "" : ",") + ("excluded;" + x);
    if (auto err = add(NID_name_constraints, v + entries))
      return err;
  }
  if (!t.subject_alt_names.empty())
    if (auto err = add(NID_subject_alt_name, joined(t.subject_alt_names)))
      return err;
  if (sk_X509_EXTENSION_num(exts.get()) > 0
      && X509_REQ_add_extensions(req.get(), exts.get()) != 1)
    return bad_tls_material("cannot add the extensions to the CSR");
  const EVP_MD* md = nullptr;
  if (t.key_algorithm != "ed25519")
    md = EVP_get_digestbyname(t.digest.c_str());
  if (X509_REQ_sign(req.get(), key.get(), md) <= 0)
    return bad_tls_material("cannot sign the CSR");
  bio_ptr bio{BIO_new(BIO_s_mem())};
  if (!bio || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1)
    return bad_tls_material("cannot encode the CSR");
  char* data = nullptr;
  auto len = BIO_get_mem_data(bio.get(), &data);
  csr_output out;
  out.csr_pem.assign(data, static_cast<size_t>(len));
  auto key_text = encode_key(key.get(), passphrase);
  if (!key_text)
    return key_text.error();
  out.key_pem = secret_text{std::move(*key_text)};
  return out;
}

// -- leaves -------------------------------------------------------------------

caf::expected<leaf_output> issue_leaf(const issuer_files& ca,
                                      const leaf_spec& spec) {
  if (spec.common_name.empty() || !plain_value(spec.common_name))
    return caf::make_error(config_errc::invalid_option, std::string{"--name"},
                           std::string{"the name must be non-empty, without "
                                       "commas or control characters"});
  for (const auto& n : spec.names)
    if (!plain_value(n))
      return caf::make_error(config_errc::invalid_option, std::string{"--san"},
                             "'" + n
                               + "' is not a plain DNS name or IP "
                                 "address");
  if (spec.not_after == 0 && (spec.days < 1 || spec.days > max_leaf_days))
    return caf::make_error(config_errc::invalid_option, std::string{"--days"},
                           "--days must be 1.."
                             + std::to_string(max_leaf_days));
  std::string ca_text;
  auto issuer = first_cert(ca.cert, ca_text);
  if (!issuer)
    return issuer.error();
  auto key_text = read_key_file(ca.key, "--intermediate-key",
                                key_sharing::owner_only);
  if (!key_text)
    return caf::make_error(net_errc::bad_tls_material,
                           describe(key_text.error()));
  secret_text key_holder{std::move(*key_text)};
  auto ca_key = read_key(key_holder.str(), ca.passphrase);
  if (!ca_key)
    return caf::make_error(net_errc::bad_tls_material,
                           "'" + ca.key.string() + "' holds no private key "
                             + (ca.passphrase.empty()
                                  ? "(an encrypted key needs its passphrase "
                                    "file)"
                                  : "(or the passphrase is wrong)"));
  if (X509_check_private_key(issuer->get(), ca_key.get()) != 1) {
    ERR_clear_error();
    return caf::make_error(net_errc::bad_tls_material,
                           "'" + ca.key.string()
                             + "' is not the key of the CA certificate in '"
                             + ca.cert.string() + "'");
  }
  auto now = std::time(nullptr);
  auto not_before = spec.not_before != 0 ? spec.not_before
                                         : now - backdate_seconds;
  auto not_after = spec.not_after != 0
                     ? spec.not_after
                     : now + static_cast<std::time_t>(spec.days) * 86400;
  if (spec.within_issuer) {
    // X509_cmp_time: -1 if the issuer's notAfter is before `not_after`.
    auto cmp = X509_cmp_time(X509_get0_notAfter(issuer->get()), &not_after);
    if (cmp <= 0) {
      auto info = info_of(issuer->get(), now);
      return caf::make_error(
        config_errc::invalid_option, std::string{"--days"},
        "the leaf would outlive its issuer (notAfter " + info.not_after + ", "
          + std::to_string(std::max<int64_t>(info.days_left, 0))
          + " days from now): ask for fewer days");
    }
  }
  pkey_ptr key{EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")};
  if (!key)
    return bad_tls_material("cannot generate a P-256 key");
  x509_ptr cert{X509_new()};
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1)
    return bad_tls_material("cannot allocate a certificate");
  if (auto err = set_random_serial(cert.get()))
    return err;
  if (X509_time_adj_ex(X509_getm_notBefore(cert.get()), 0, 0, &not_before)
        == nullptr
      || X509_time_adj_ex(X509_getm_notAfter(cert.get()), 0, 0, &not_after)
           == nullptr)
    return bad_tls_material("cannot set the validity");
  auto* name = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(
                                   spec.common_name.c_str()),
                                 -1, -1, 0)
      != 1)
    return bad_tls_material("cannot set the subject");
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(issuer->get()))
        != 1
      || X509_set_pubkey(cert.get(), key.get()) != 1)
    return bad_tls_material("cannot set the issuer or the public key");
  if (auto err = add_ext(cert.get(), issuer->get(), NID_basic_constraints,
                         "critical,CA:FALSE"))
    return err;
  if (auto err = add_ext(cert.get(), issuer->get(), NID_key_usage,
                         "critical,digitalSignature"))
    return err;
  if (!spec.eku.empty())
    if (auto err = add_ext(cert.get(), issuer->get(), NID_ext_key_usage,
                           spec.eku))
      return err;
  if (auto err = add_ext(cert.get(), issuer->get(), NID_subject_key_identifier,
                         "hash"))
    return err;
  if (auto err = add_ext(cert.get(), issuer->get(),
                         NID_authority_key_identifier, "keyid:always"))
    return err;
  if (!spec.names.empty())
    if (auto err = add_ext(cert.get(), issuer->get(), NID_subject_alt_name,
                           san_value(spec.names)))
      return err;
  if (X509_sign(cert.get(), ca_key.get(), EVP_sha256()) <= 0)
    return bad_tls_material("cannot sign the certificate");
  leaf_output out;
  auto encoded = encode_key(key.get(), {});
  if (!encoded)
    return encoded.error();
  out.key_pem = secret_text{std::move(*encoded)};
  out.cert_pem = to_pem(cert.get());
  out.chain_pem = out.cert_pem;
  for (const auto& c : read_certs(ca_text))
    out.chain_pem += to_pem(c.get());
  out.info = info_of(cert.get(), now);
  return out;
}

caf::error write_pem_file(const std::filesystem::path& path,
                          std::string_view data, unsigned mode, pem_write how) {
  auto tmp = path;
  tmp += ".tmp";
  auto tmp_str = tmp.string();
  ::unlink(tmp_str.c_str());
  auto fail = [&](const char* what, int err) {
    ::unlink(tmp_str.c_str());
    return caf::make_error(config_errc::bad_file, path.string(),
                           std::string{what} + ": " + std::strerror(err));
  };
  int fd = ::open(tmp_str.c_str(),
                  O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                  static_cast<mode_t>(mode));
  if (fd < 0)
    return caf::make_error(config_errc::bad_file, path.string(),
                           std::string{"cannot create: "}
                             + std::strerror(errno));
  // Exactly `mode`, whatever the umask (certificates stay 0644 under
  // UMask=0077; keys are 0600 either way).
  if (::fchmod(fd, static_cast<mode_t>(mode)) != 0) {
    auto err = errno;
    ::close(fd);
    return fail("cannot chmod", err);
  }
  size_t done = 0;
  while (done < data.size()) {
    auto n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      auto err = errno;
      ::close(fd);
      return fail("cannot write", err);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    auto err = errno;
    ::close(fd);
    return fail("cannot write", err);
  }
  if (::close(fd) != 0)
    return fail("cannot write", errno);
  if (how == pem_write::create_new) {
    // link() never replaces: an existing file (a key in use) stays.
    if (::link(tmp_str.c_str(), path.c_str()) != 0) {
      auto err = errno;
      ::unlink(tmp_str.c_str());
      return caf::make_error(
        config_errc::bad_file, path.string(),
        err == EEXIST ? std::string{"exists; move it away first (a "
                                    "key or certificate is never "
                                    "overwritten)"}
                      : std::string{"cannot create: "} + std::strerror(err));
    }
    ::unlink(tmp_str.c_str());
    return caf::none;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    ::unlink(tmp_str.c_str());
    return caf::make_error(config_errc::bad_file, path.string(),
                           "cannot rename: " + ec.message());
  }
  return caf::none;
}

} // namespace hsm::net
