// The operator's PKI steps: the CSR from the vendor's template (parsed
// back with OpenSSL, and with the `openssl req` command line), the
// template's refusals, and leaves issued by the intermediate.

#include "runtime/net/pki_ops.hpp"

#include "runtime/crypto/ossl.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/tls_material.hpp"
#include "runtime/net/x509_util.hpp"
#include "tests/net/pki_suite.hpp"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#ifndef HSM_DRIVER_SOURCE_DIR
#  error "HSM_DRIVER_SOURCE_DIR must name the source tree"
#endif

namespace hsm::net {
namespace {

using json = nlohmann::json;
using req_ptr = std::unique_ptr<X509_REQ, crypto::ossl_deleter<X509_REQ_free>>;
struct ext_stack_free {
  void operator()(STACK_OF(X509_EXTENSION) * s) const {
    sk_X509_EXTENSION_pop_free(s, X509_EXTENSION_free);
  }
};
using ext_stack_ptr = std::unique_ptr<STACK_OF(X509_EXTENSION), ext_stack_free>;

std::filesystem::path example_template() {
  return std::filesystem::path{HSM_DRIVER_SOURCE_DIR} / "deploy" / "pki"
         / "csr-template.example.json";
}

req_ptr parse_csr(const std::string& pem) {
  crypto::bio_ptr bio{
    BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()))};
  return req_ptr{PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr)};
}

/// The subject's entries in order, as `type=value`.
std::vector<std::string> subject_entries(X509_REQ* req) {
  std::vector<std::string> out;
  auto* name = X509_REQ_get_subject_name(req);
  for (int i = 0; i < X509_NAME_entry_count(name); ++i) {
    auto* e = X509_NAME_get_entry(name, i);
    auto nid = OBJ_obj2nid(X509_NAME_ENTRY_get_object(e));
    const auto* data = X509_NAME_ENTRY_get_data(e);
    out.push_back(
      std::string{OBJ_nid2sn(nid)} + "="
      + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
                    static_cast<size_t>(ASN1_STRING_length(data))));
  }
  return out;
}

/// Runs `cmd` and returns its stdout.
std::string run(const std::string& cmd) {
  std::string out;
  if (auto* p = ::popen(cmd.c_str(), "r")) {
    std::array<char, 4096> buf{};
    size_t n = 0;
    while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0)
      out.append(buf.data(), n);
    ::pclose(p);
  }
  return out;
}

/// The line after the one that holds `header`, without its indentation.
std::string line_after(const std::string& text, const std::string& header) {
  auto at = text.find(header);
  if (at == std::string::npos)
    return {};
  auto start = text.find('\n', at);
  if (start == std::string::npos)
    return {};
  auto end = text.find('\n', start + 1);
  auto line = text.substr(start + 1, end - start - 1);
  line.erase(0, line.find_first_not_of(' '));
  return line;
}

class PkiOpsTest : public pki_suite<PkiOpsTest> {
public:
  static constexpr const char* suite_dir = "pki_ops_test";
};

TEST_F(PkiOpsTest, ExampleTemplateMakesACsrWithExactlyItsSubjectAndExtensions) {
  auto t = load_csr_template(example_template());
  ASSERT_TRUE(t) << describe(t.error());
  auto made = make_csr(*t);
  ASSERT_TRUE(made) << describe(made.error());
  auto req = parse_csr(made->csr_pem);
  ASSERT_TRUE(req);
  // The signature verifies with the CSR's own key, which is the new key.
  crypto::pkey_ptr pub{X509_REQ_get_pubkey(req.get())};
  ASSERT_TRUE(pub);
  EXPECT_EQ(X509_REQ_verify(req.get(), pub.get()), 1);
  auto key = read_key(made->key_pem.str());
  ASSERT_TRUE(key);
  EXPECT_EQ(EVP_PKEY_eq(key.get(), pub.get()), 1);
  EXPECT_EQ(EVP_PKEY_get_bits(pub.get()), 384);
  EXPECT_EQ(X509_REQ_get_signature_nid(req.get()), NID_ecdsa_with_SHA384);
  EXPECT_EQ(subject_entries(req.get()),
            (std::vector<std::string>{"C=CH", "O=Example Wallet Customer AG",
                                      "OU=HSM drivers",
                                      "CN=Example Wallet Customer hsm-driver "
                                      "CA"}));
  ext_stack_ptr exts{X509_REQ_get_extensions(req.get())};
  ASSERT_TRUE(exts);
  ASSERT_EQ(sk_X509_EXTENSION_num(exts.get()), 4);
  std::vector<int> nids;
  for (int i = 0; i < sk_X509_EXTENSION_num(exts.get()); ++i) {
    auto* ext = sk_X509_EXTENSION_value(exts.get(), i);
    auto nid = OBJ_obj2nid(X509_EXTENSION_get_object(ext));
    nids.push_back(nid);
    auto critical = X509_EXTENSION_get_critical(ext) == 1;
    if (nid == NID_basic_constraints) {
      EXPECT_TRUE(critical);
      std::unique_ptr<BASIC_CONSTRAINTS,
                      crypto::ossl_deleter<BASIC_CONSTRAINTS_free>>
        bc{static_cast<BASIC_CONSTRAINTS*>(X509V3_EXT_d2i(ext))};
      ASSERT_TRUE(bc);
      EXPECT_NE(bc->ca, 0);
      ASSERT_NE(bc->pathlen, nullptr);
      EXPECT_EQ(ASN1_INTEGER_get(bc->pathlen), 0);
    } else if (nid == NID_key_usage) {
      EXPECT_TRUE(critical);
      std::unique_ptr<ASN1_BIT_STRING,
                      crypto::ossl_deleter<ASN1_BIT_STRING_free>>
        ku{static_cast<ASN1_BIT_STRING*>(X509V3_EXT_d2i(ext))};
      ASSERT_TRUE(ku);
      // keyCertSign is bit 5, cRLSign bit 6; nothing else.
      for (int bit = 0; bit < 9; ++bit)
        EXPECT_EQ(ASN1_BIT_STRING_get_bit(ku.get(), bit) == 1,
                  bit == 5 || bit == 6)
          << "keyUsage bit " << bit;
    } else if (nid == NID_ext_key_usage) {
      EXPECT_FALSE(critical);
      std::unique_ptr<EXTENDED_KEY_USAGE,
                      crypto::ossl_deleter<EXTENDED_KEY_USAGE_free>>
        eku{static_cast<EXTENDED_KEY_USAGE*>(X509V3_EXT_d2i(ext))};
      ASSERT_TRUE(eku);
      ASSERT_EQ(sk_ASN1_OBJECT_num(eku.get()), 1);
      EXPECT_EQ(OBJ_obj2nid(sk_ASN1_OBJECT_value(eku.get(), 0)),
                NID_client_auth);
    } else if (nid == NID_name_constraints) {
      EXPECT_TRUE(critical);
      std::unique_ptr<NAME_CONSTRAINTS,
                      crypto::ossl_deleter<NAME_CONSTRAINTS_free>>
        nc{static_cast<NAME_CONSTRAINTS*>(X509V3_EXT_d2i(ext))};
      ASSERT_TRUE(nc);
      ASSERT_EQ(sk_GENERAL_SUBTREE_num(nc->permittedSubtrees), 1);
      auto* dns = sk_GENERAL_SUBTREE_value(nc->permittedSubtrees, 0)->base;
      ASSERT_EQ(dns->type, GEN_DNS);
      EXPECT_EQ(
        std::string(reinterpret_cast<const char*>(
                      ASN1_STRING_get0_data(dns->d.dNSName)),
                    static_cast<size_t>(ASN1_STRING_length(dns->d.dNSName))),
        ".drivers.customer.example");
      ASSERT_EQ(sk_GENERAL_SUBTREE_num(nc->excludedSubtrees), 1);
      EXPECT_EQ(sk_GENERAL_SUBTREE_value(nc->excludedSubtrees, 0)->base->type,
                GEN_IPADD);
    }
  }
  EXPECT_EQ(nids, (std::vector<int>{NID_basic_constraints, NID_key_usage,
                                    NID_ext_key_usage, NID_name_constraints}));
}

TEST_F(PkiOpsTest, OpensslCommandLineReadsTheCsrTheSameWay) {
  auto t = load_csr_template(example_template());
  ASSERT_TRUE(t) << describe(t.error());
  auto made = make_csr(*t);
  ASSERT_TRUE(made) << describe(made.error());
  auto path = *dir_ / "example.csr";
  ASSERT_FALSE(write_pem_file(path, made->csr_pem, 0644));
  auto text = run("openssl req -in '" + path.string()
                  + "' -noout -text -verify 2>&1");
  EXPECT_NE(text.find("verify OK"), std::string::npos) << text;
  EXPECT_NE(text.find("Subject: C = CH, O = Example Wallet Customer AG, OU = "
                      "HSM drivers, CN = Example Wallet Customer hsm-driver "
                      "CA"),
            std::string::npos)
    << text;
  EXPECT_NE(text.find("NIST CURVE: P-384"), std::string::npos) << text;
  EXPECT_EQ(line_after(text, "X509v3 Basic Constraints: critical"),
            "CA:TRUE, pathlen:0")
    << text;
  EXPECT_EQ(line_after(text, "X509v3 Key Usage: critical"),
            "Certificate Sign, CRL Sign")
    << text;
  EXPECT_EQ(line_after(text, "X509v3 Extended Key Usage:"),
            "TLS Web Client Authentication")
    << text;
  EXPECT_NE(text.find("TLS Web Client Authentication"), std::string::npos)
    << text;
  EXPECT_NE(text.find("X509v3 Name Constraints: critical"), std::string::npos)
    << text;
  EXPECT_NE(text.find("DNS:.drivers.customer.example"), std::string::npos)
    << text;
  EXPECT_NE(text.find("ecdsa-with-SHA384"), std::string::npos) << text;
}

TEST_F(PkiOpsTest, KeyIsEncryptedWithThePassphraseWhenOneIsGiven) {
  auto t = load_csr_template(example_template());
  ASSERT_TRUE(t);
  auto made = make_csr(*t, "correct horse battery staple");
  ASSERT_TRUE(made) << describe(made.error());
  EXPECT_NE(made->key_pem.str().find("BEGIN ENCRYPTED PRIVATE KEY"),
            std::string::npos);
  EXPECT_FALSE(read_key(made->key_pem.str()));
  EXPECT_FALSE(read_key(made->key_pem.str(), "wrong"));
  EXPECT_TRUE(read_key(made->key_pem.str(), "correct horse battery staple"));
  auto path = *dir_ / "encrypted-key.pem";
  ASSERT_FALSE(write_pem_file(path, made->key_pem.str(), 0600));
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(PkiOpsTest, RsaAndEd25519TemplatesMakeThoseKeys) {
  auto rsa = parse_csr_template(json::parse(
    R"({"key":{"algorithm":"rsa","bits":2048},"subject":[{"CN":"r"}]})"));
  ASSERT_TRUE(rsa) << describe(rsa.error());
  auto r = make_csr(*rsa);
  ASSERT_TRUE(r) << describe(r.error());
  crypto::pkey_ptr rpub{X509_REQ_get_pubkey(parse_csr(r->csr_pem).get())};
  EXPECT_EQ(EVP_PKEY_get_base_id(rpub.get()), EVP_PKEY_RSA);
  EXPECT_EQ(EVP_PKEY_get_bits(rpub.get()), 2048);
  auto ed = parse_csr_template(
    json::parse(R"({"key":{"algorithm":"ed25519"},"subject":[{"CN":"e"}]})"));
  ASSERT_TRUE(ed) << describe(ed.error());
  auto e = make_csr(*ed);
  ASSERT_TRUE(e) << describe(e.error());
  crypto::pkey_ptr epub{X509_REQ_get_pubkey(parse_csr(e->csr_pem).get())};
  EXPECT_EQ(EVP_PKEY_get_base_id(epub.get()), EVP_PKEY_ED25519);
}

TEST_F(PkiOpsTest, TemplateRefusesUnknownFieldsAndBadValuesNamingTheField) {
  struct bad_case {
    const char* text;
    const char* field;
  };
  const bad_case cases[] = {
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],"validity":1})",
     "validity"},
    {R"({"key":{"algorithm":"ec","size":256},"subject":[{"CN":"x"}]})",
     "key.size"},
    {R"({"key":{"algorithm":"dsa"},"subject":[{"CN":"x"}]})", "key.algorithm"},
    {R"({"key":{"algorithm":"ec","curve":"secp256k1"},"subject":[{"CN":"x"}]})",
     "key.curve"},
    {R"({"key":{"algorithm":"ec"},"digest":"md5","subject":[{"CN":"x"}]})",
     "digest"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x","O":"y"}]})",
     "subject[0]"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"NoSuchType":"x"}]})",
     "subject[0]"},
    {R"({"key":{"algorithm":"ec"},"subject":[]})", "subject"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"policies":{}}})",
     "extensions.policies"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"key_usage":{"values":["keyCertSign","signEverything"]}}})",
     "extensions.key_usage.values[1]"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"key_usage":{"critical":"yes","values":["cRLSign"]}}})",
     "extensions.key_usage.critical"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"basic_constraints":{"ca":true,"pathlen":0}}})",
     "extensions.basic_constraints.pathlen"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"extended_key_usage":{"values":["clientAuth,serverAuth"]}}})",
     "extensions.extended_key_usage.values[0]"},
    {R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
         "extensions":{"name_constraints":{"permitted":["IP:10.0.0.1"]}}})",
     "extensions.name_constraints.permitted[0]"},
  };
  for (const auto& c : cases) {
    auto t = parse_csr_template(json::parse(c.text));
    ASSERT_FALSE(t) << c.text;
    EXPECT_EQ(t.error(), config_errc::invalid_option) << c.text;
    auto text = describe(t.error());
    EXPECT_NE(text.find(std::string{c.field} + ":"), std::string::npos)
      << c.text << " -> " << text;
  }
}

TEST_F(PkiOpsTest, TemplateThatIsNotJsonNamesTheFile) {
  auto path = *dir_ / "broken.json";
  std::ofstream{path} << "{ not json";
  auto t = load_csr_template(path);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error(), config_errc::bad_file);
  EXPECT_NE(describe(t.error()).find(path.string()), std::string::npos);
}

TEST_F(PkiOpsTest, LeafIsForClientAuthNamesTheDriverAndChainsToTheRoot) {
  issuer_files ca{pki_->intermediate_cert,
                  pki_->intermediate_cert.parent_path()
                    / "intermediate.key.pem",
                  {}};
  leaf_spec spec;
  spec.common_name = "driver-7";
  spec.names = {"driver-7", "127.0.0.1"};
  spec.days = 10;
  auto leaf = issue_leaf(ca, spec);
  ASSERT_TRUE(leaf) << describe(leaf.error());
  EXPECT_EQ(leaf->info.subject, "CN=driver-7");
  EXPECT_EQ(leaf->info.ekus, std::vector<std::string>{"clientAuth"});
  EXPECT_EQ(leaf->info.names,
            (std::vector<std::string>{"DNS:driver-7", "IP:127.0.0.1"}));
  EXPECT_TRUE(leaf->info.days_left == 9 || leaf->info.days_left == 10)
    << leaf->info.days_left;
  EXPECT_EQ(read_certs(leaf->chain_pem).size(), 2u);
  auto dir = *dir_ / "leaf7";
  std::filesystem::create_directories(dir);
  ASSERT_FALSE(write_pem_file(dir / "leaf-key.pem", leaf->key_pem.str(), 0600));
  ASSERT_FALSE(write_pem_file(dir / "leaf-chain.pem", leaf->chain_pem, 0644));
  auto checked = load_client_tls(
    {pki_->root_cert, dir / "leaf-chain.pem", dir / "leaf-key.pem"});
  ASSERT_TRUE(checked) << describe(checked.error());
  EXPECT_EQ((*checked)->leaf.serial, leaf->info.serial);
}

TEST_F(PkiOpsTest, LeafMayNotOutliveItsIntermediate) {
  issuer_files ca{pki_->intermediate_cert,
                  pki_->intermediate_cert.parent_path()
                    / "intermediate.key.pem",
                  {}};
  leaf_spec spec;
  spec.common_name = "driver-long";
  spec.days = 400; // the dev intermediate lasts 30 days
  auto leaf = issue_leaf(ca, spec);
  ASSERT_FALSE(leaf);
  EXPECT_EQ(leaf.error(), config_errc::invalid_option);
  EXPECT_NE(describe(leaf.error()).find("outlive its issuer"),
            std::string::npos)
    << describe(leaf.error());
}

TEST_F(PkiOpsTest, LeafNeedsTheIntermediatesKey) {
  auto other = make_dev_pki(*dir_ / "other");
  ASSERT_TRUE(other);
  issuer_files ca{pki_->intermediate_cert,
                  other->intermediate_cert.parent_path()
                    / "intermediate.key.pem",
                  {}};
  leaf_spec spec;
  spec.common_name = "driver-x";
  auto leaf = issue_leaf(ca, spec);
  ASSERT_FALSE(leaf);
  EXPECT_NE(describe(leaf.error()).find("is not the key"), std::string::npos)
    << describe(leaf.error());
}

TEST_F(PkiOpsTest, IntermediateKeyReadableByItsGroupIsRefused) {
  // A CA's key is the owner's alone (a driver's TLS key may be shared with
  // its group; this one may not), and it is not read through a link.
  auto key = *dir_ / "shared-intermediate.key.pem";
  std::filesystem::copy_file(
    pki_->intermediate_cert.parent_path() / "intermediate.key.pem", key,
    std::filesystem::copy_options::overwrite_existing);
  issuer_files ca{pki_->intermediate_cert, key, {}};
  leaf_spec spec;
  spec.common_name = "driver-g";
  spec.days = 10;
  ASSERT_EQ(::chmod(key.c_str(), 0640), 0);
  auto leaf = issue_leaf(ca, spec);
  ASSERT_FALSE(leaf);
  EXPECT_NE(describe(leaf.error()).find("chmod 600"), std::string::npos)
    << describe(leaf.error());
  auto link = *dir_ / "linked-intermediate.key.pem";
  std::filesystem::remove(link);
  std::filesystem::create_symlink(key, link);
  ASSERT_EQ(::chmod(key.c_str(), 0600), 0);
  ca.key = link;
  leaf = issue_leaf(ca, spec);
  ASSERT_FALSE(leaf);
  EXPECT_NE(describe(leaf.error()).find("symbolic link"), std::string::npos)
    << describe(leaf.error());
  ca.key = key;
  leaf = issue_leaf(ca, spec);
  EXPECT_TRUE(leaf) << describe(leaf.error());
}

} // namespace
} // namespace hsm::net
