#include "runtime/net/pki.hpp"

#include "tests/net/pki_suite.hpp"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace hsm::net {
namespace {

// -- OpenSSL helpers (independent of the code under test) ---------------------

struct x509_free_fn {
  void operator()(X509* x) const {
    X509_free(x);
  }
};
using x509_ptr = std::unique_ptr<X509, x509_free_fn>;

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in{path, std::ios::binary};
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

/// Every certificate in a PEM file, in order.
std::vector<x509_ptr> load_certs(const std::filesystem::path& path) {
  std::vector<x509_ptr> out;
  auto text = slurp(path);
  std::unique_ptr<BIO, decltype(&BIO_free)> bio{
    BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), &BIO_free};
  while (auto* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr))
    out.emplace_back(cert);
  ERR_clear_error();
  return out;
}

x509_ptr load_cert(const std::filesystem::path& path) {
  auto all = load_certs(path);
  return all.empty() ? nullptr : std::move(all.front());
}

/// Verifies the leaf of `chain_file` against `root_file` with the rest of
/// the chain file as untrusted intermediates; returns the OpenSSL verify
/// error (X509_V_OK on success).
int verify_chain(const std::filesystem::path& chain_file,
                 const std::filesystem::path& root_file, int purpose) {
  auto chain = load_certs(chain_file);
  auto root = load_cert(root_file);
  if (chain.empty() || !root)
    return -1;
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store{
    X509_STORE_new(), &X509_STORE_free};
  X509_STORE_add_cert(store.get(), root.get());
  auto free_stack = [](STACK_OF(X509) * sk) { sk_X509_free(sk); };
  std::unique_ptr<STACK_OF(X509), decltype(free_stack)> untrusted{
    sk_X509_new_null(), free_stack};
  for (size_t i = 1; i < chain.size(); ++i)
    sk_X509_push(untrusted.get(), chain[i].get());
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx{
    X509_STORE_CTX_new(), &X509_STORE_CTX_free};
  X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].get(), untrusted.get());
  X509_STORE_CTX_set_purpose(ctx.get(), purpose);
  auto ok = X509_verify_cert(ctx.get());
  auto err = X509_STORE_CTX_get_error(ctx.get());
  ERR_clear_error();
  return ok == 1 ? X509_V_OK : (err == X509_V_OK ? -2 : err);
}

unsigned mode_of(const std::filesystem::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0)
    return 0;
  return st.st_mode & 0777u;
}

std::string common_name(X509* cert) {
  char buf[256] = {};
  X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, buf,
                            sizeof(buf));
  return buf;
}

bool same_octets(const ASN1_OCTET_STRING* a, const ASN1_OCTET_STRING* b) {
  return a != nullptr && b != nullptr && ASN1_OCTET_STRING_cmp(a, b) == 0;
}

// -- fixture ------------------------------------------------------------------

class PkiTest : public pki_suite<PkiTest> {
public:
  static constexpr const char* suite_dir = "hsm_net_pki";

protected:
};

// -- files --------------------------------------------------------------------

TEST_F(PkiTest, WritesAllFilesWithPrivateKeys) {
  auto dir = *dir_ / "pki";
  for (const auto& p :
       {pki_->root_cert, pki_->intermediate_cert, pki_->server_chain,
        pki_->server_key, pki_->driver_chain, pki_->driver_key,
        dir / "intermediate.key.pem"}) {
    EXPECT_TRUE(std::filesystem::is_regular_file(p)) << p;
    EXPECT_GT(std::filesystem::file_size(p), 100u) << p;
  }
  EXPECT_EQ(mode_of(pki_->server_key), 0600u);
  EXPECT_EQ(mode_of(pki_->driver_key), 0600u);
  EXPECT_EQ(mode_of(dir / "intermediate.key.pem"), 0600u);
  // The root's key is not kept anywhere.
  for (const auto& entry : std::filesystem::directory_iterator{dir})
    EXPECT_NE(entry.path().filename(), "root.key.pem");
  EXPECT_EQ(load_certs(pki_->server_chain).size(), 2u);
  EXPECT_EQ(load_certs(pki_->driver_chain).size(), 2u);
}

// -- certificates -------------------------------------------------------------

TEST_F(PkiTest, ServerChainVerifiesAgainstRoot) {
  EXPECT_EQ(verify_chain(pki_->server_chain, pki_->root_cert,
                         X509_PURPOSE_SSL_SERVER),
            X509_V_OK);
  // The server certificate is not good for client authentication.
  EXPECT_NE(verify_chain(pki_->server_chain, pki_->root_cert,
                         X509_PURPOSE_SSL_CLIENT),
            X509_V_OK);
}

TEST_F(PkiTest, ServerCertificateNamesHostsAndAddresses) {
  auto leaf = load_cert(pki_->server_chain);
  ASSERT_TRUE(leaf);
  EXPECT_EQ(X509_check_host(leaf.get(), "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "127.0.0.1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "::1", 0), 1);
  EXPECT_NE(X509_check_host(leaf.get(), "example.com", 0, 0, nullptr), 1);
  EXPECT_NE(X509_check_ip_asc(leaf.get(), "10.0.0.1", 0), 1);
  // The names are SAN entries of the right type.
  auto* names = static_cast<GENERAL_NAMES*>(
    X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, nullptr, nullptr));
  ASSERT_NE(names, nullptr);
  int dns = 0;
  int ips = 0;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    auto* gen = sk_GENERAL_NAME_value(names, i);
    if (gen->type == GEN_DNS)
      ++dns;
    else if (gen->type == GEN_IPADD)
      ++ips;
  }
  GENERAL_NAMES_free(names);
  EXPECT_EQ(dns, 1);
  EXPECT_EQ(ips, 2);
}

TEST_F(PkiTest, CustomServerNamesAreUsed) {
  dev_pki_options opts;
  opts.server_names = {"proxy.example", "10.1.2.3", "fe80::1"};
  auto pki = make_dev_pki(*dir_ / "custom", opts);
  ASSERT_TRUE(pki) << describe(pki.error());
  auto leaf = load_cert(pki->server_chain);
  ASSERT_TRUE(leaf);
  EXPECT_EQ(X509_check_host(leaf.get(), "proxy.example", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "10.1.2.3", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "fe80::1", 0), 1);
  EXPECT_NE(X509_check_host(leaf.get(), "localhost", 0, 0, nullptr), 1);
}

TEST_F(PkiTest, DriverCertificateIsForClientAuth) {
  auto leaf = load_cert(pki_->driver_chain);
  ASSERT_TRUE(leaf);
  auto xku = X509_get_extended_key_usage(leaf.get());
  EXPECT_NE(xku & XKU_SSL_CLIENT, 0u);
  EXPECT_EQ(xku & XKU_SSL_SERVER, 0u);
  EXPECT_EQ(common_name(leaf.get()), "hsm-driver");
  EXPECT_EQ(verify_chain(pki_->driver_chain, pki_->root_cert,
                         X509_PURPOSE_SSL_CLIENT),
            X509_V_OK);
}

TEST_F(PkiTest, CasHaveTheRightConstraints) {
  auto root = load_cert(pki_->root_cert);
  auto inter = load_cert(pki_->intermediate_cert);
  auto server = load_cert(pki_->server_chain);
  ASSERT_TRUE(root && inter && server);
  EXPECT_GE(X509_check_ca(root.get()), 1);
  EXPECT_GE(X509_check_ca(inter.get()), 1);
  EXPECT_EQ(X509_check_ca(server.get()), 0);
  EXPECT_EQ(X509_get_pathlen(inter.get()), 0);
  EXPECT_EQ(X509_get_pathlen(root.get()), -1);
  for (auto* ca : {root.get(), inter.get()}) {
    auto ku = X509_get_key_usage(ca);
    EXPECT_NE(ku & KU_KEY_CERT_SIGN, 0u);
    EXPECT_NE(ku & KU_CRL_SIGN, 0u);
    int crit = 0;
    auto* bc = static_cast<BASIC_CONSTRAINTS*>(
      X509_get_ext_d2i(ca, NID_basic_constraints, &crit, nullptr));
    ASSERT_NE(bc, nullptr);
    EXPECT_NE(bc->ca, 0);
    EXPECT_EQ(crit, 1);
    BASIC_CONSTRAINTS_free(bc);
  }
  // P-256 keys and SHA-256 signatures.
  EXPECT_EQ(X509_get_signature_nid(server.get()), NID_ecdsa_with_SHA256);
  EXPECT_EQ(EVP_PKEY_get_bits(X509_get0_pubkey(server.get())), 256);
}

TEST_F(PkiTest, KeyIdentifiersLinkTheChain) {
  auto root = load_cert(pki_->root_cert);
  auto inter = load_cert(pki_->intermediate_cert);
  auto server = load_cert(pki_->server_chain);
  auto driver = load_cert(pki_->driver_chain);
  ASSERT_TRUE(root && inter && server && driver);
  EXPECT_TRUE(same_octets(X509_get0_authority_key_id(inter.get()),
                          X509_get0_subject_key_id(root.get())));
  EXPECT_TRUE(same_octets(X509_get0_authority_key_id(server.get()),
                          X509_get0_subject_key_id(inter.get())));
  EXPECT_TRUE(same_octets(X509_get0_authority_key_id(driver.get()),
                          X509_get0_subject_key_id(inter.get())));
  EXPECT_FALSE(same_octets(X509_get0_subject_key_id(server.get()),
                           X509_get0_subject_key_id(driver.get())));
}

TEST_F(PkiTest, SerialsAreRandomAndDistinct) {
  std::vector<x509_ptr> certs;
  certs.push_back(load_cert(pki_->root_cert));
  certs.push_back(load_cert(pki_->intermediate_cert));
  certs.push_back(load_cert(pki_->server_chain));
  certs.push_back(load_cert(pki_->driver_chain));
  for (size_t i = 0; i < certs.size(); ++i) {
    ASSERT_TRUE(certs[i]);
    auto* serial = X509_get0_serialNumber(certs[i].get());
    // 159 random bits: at least 8 octets unless astronomically unlucky.
    EXPECT_GE(ASN1_STRING_length(serial), 8);
    for (size_t j = 0; j < i; ++j)
      EXPECT_NE(
        ASN1_INTEGER_cmp(serial, X509_get0_serialNumber(certs[j].get())), 0);
  }
}

TEST_F(PkiTest, AnotherPkiDoesNotVerify) {
  auto other = make_dev_pki(*dir_ / "other");
  ASSERT_TRUE(other) << describe(other.error());
  EXPECT_NE(verify_chain(other->driver_chain, pki_->root_cert,
                         X509_PURPOSE_SSL_CLIENT),
            X509_V_OK);
  EXPECT_NE(verify_chain(pki_->server_chain, other->root_cert,
                         X509_PURPOSE_SSL_SERVER),
            X509_V_OK);
}

// -- reuse --------------------------------------------------------------------

TEST_F(PkiTest, SecondCallReusesTheFiles) {
  auto dir = *dir_ / "reuse";
  auto first = make_dev_pki(dir);
  ASSERT_TRUE(first) << describe(first.error());
  std::vector<std::string> before;
  for (const auto& entry : std::filesystem::directory_iterator{dir})
    before.push_back(entry.path().filename().string() + "="
                     + slurp(entry.path()));
  std::sort(before.begin(), before.end());
  auto second = make_dev_pki(dir);
  ASSERT_TRUE(second) << describe(second.error());
  std::vector<std::string> after;
  for (const auto& entry : std::filesystem::directory_iterator{dir})
    after.push_back(entry.path().filename().string() + "="
                    + slurp(entry.path()));
  std::sort(after.begin(), after.end());
  EXPECT_EQ(before.size(), 7u);
  EXPECT_EQ(before, after);
  EXPECT_EQ(second->server_key, first->server_key);
  EXPECT_EQ(second->driver_chain, first->driver_chain);
}

TEST_F(PkiTest, APkiNearItsExpiryIsMadeAgain) {
  auto dir = *dir_ / "expiring";
  dev_pki_options short_lived;
  short_lived.days = dev_pki_renew_days - 1;
  auto first = make_dev_pki(dir, short_lived);
  ASSERT_TRUE(first) << describe(first.error());
  auto root = slurp(first->root_cert);
  auto server = slurp(first->server_chain);
  auto driver = slurp(first->driver_chain);
  // Expiring within the renewal window: everything is made again.
  auto second = make_dev_pki(dir);
  ASSERT_TRUE(second) << describe(second.error());
  EXPECT_NE(slurp(second->root_cert), root);
  EXPECT_NE(slurp(second->server_chain), server);
  EXPECT_NE(slurp(second->driver_chain), driver);
  // Valid long enough now: kept as it is.
  auto renewed_root = slurp(second->root_cert);
  auto third = make_dev_pki(dir);
  ASSERT_TRUE(third) << describe(third.error());
  EXPECT_EQ(slurp(third->root_cert), renewed_root);
}

TEST_F(PkiTest, MissingLeafIsReissuedUnderTheSameCa) {
  auto dir = *dir_ / "partial";
  auto first = make_dev_pki(dir);
  ASSERT_TRUE(first) << describe(first.error());
  auto root = slurp(first->root_cert);
  auto server = slurp(first->server_chain);
  auto driver_key = slurp(first->driver_key);
  std::filesystem::remove(first->driver_key);
  auto second = make_dev_pki(dir);
  ASSERT_TRUE(second) << describe(second.error());
  EXPECT_EQ(slurp(second->root_cert), root);
  EXPECT_EQ(slurp(second->server_chain), server);
  EXPECT_NE(slurp(second->driver_key), driver_key);
  EXPECT_EQ(mode_of(second->driver_key), 0600u);
  EXPECT_EQ(verify_chain(second->driver_chain, second->root_cert,
                         X509_PURPOSE_SSL_CLIENT),
            X509_V_OK);
}

TEST_F(PkiTest, UnusableDirectoryIsBadTlsMaterial) {
  auto file = *dir_ / "a-file";
  std::ofstream{file} << "x";
  auto pki = make_dev_pki(file / "sub");
  ASSERT_FALSE(pki);
  EXPECT_EQ(pki.error(), net_errc::bad_tls_material);
}

// -- more clients -------------------------------------------------------------

TEST_F(PkiTest, IssuedClientCertificateVerifies) {
  auto out = *dir_ / "clients";
  auto issued = issue_client_cert(*pki_, out, "driver-2", 7);
  ASSERT_TRUE(issued) << describe(issued.error());
  EXPECT_EQ(issued->first, out / "driver-2.chain.pem");
  EXPECT_EQ(issued->second, out / "driver-2.key.pem");
  EXPECT_EQ(mode_of(issued->second), 0600u);
  EXPECT_EQ(verify_chain(issued->first, pki_->root_cert,
                         X509_PURPOSE_SSL_CLIENT),
            X509_V_OK);
  auto leaf = load_cert(issued->first);
  ASSERT_TRUE(leaf);
  EXPECT_EQ(common_name(leaf.get()), "driver-2");
  EXPECT_NE(X509_get_extended_key_usage(leaf.get()) & XKU_SSL_CLIENT, 0u);
}

TEST_F(PkiTest, IssueClientCertRefusesUnsafeNames) {
  for (auto name : {"", "../evil", "a/b", ".hidden"}) {
    auto issued = issue_client_cert(*pki_, *dir_ / "clients", name);
    ASSERT_FALSE(issued) << name;
    EXPECT_EQ(issued.error(), net_errc::bad_tls_material);
  }
}

TEST_F(PkiTest, IssueClientCertNeedsTheIntermediateKey) {
  auto broken = *pki_;
  broken.intermediate_cert = *dir_ / "nowhere" / "intermediate.pem";
  auto issued = issue_client_cert(broken, *dir_ / "clients", "x");
  ASSERT_FALSE(issued);
  EXPECT_EQ(issued.error(), net_errc::bad_tls_material);
}

} // namespace
} // namespace hsm::net
