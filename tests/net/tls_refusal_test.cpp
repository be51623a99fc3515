// The driver's TLS files and the refusals on both sides, over real TLS on
// loopback: the check the daemon runs on its own certificate at start
// (`load_client_tls`), the driver refusing a proxy's certificate, the
// reference proxy refusing a driver's, and the runbook's layout (the leaf
// alone in --client-cert, the intermediate next to the vendor's root in
// --ca-cert) against a proxy that trusts only the root.

#include "runtime/net/pki.hpp"
#include "runtime/net/pki_ops.hpp"
#include "runtime/net/proxy_client.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "runtime/net/tls_material.hpp"
#include "runtime/net/x509_util.hpp"
#include "tests/net/pki_suite.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace hsm::net {
namespace {

using namespace std::chrono_literals;

constexpr std::time_t day = 86400;

/// A leaf's files in a folder of its own.
struct leaf_files {
  std::filesystem::path cert;  // the leaf alone
  std::filesystem::path chain; // leaf + intermediate
  std::filesystem::path key;
  std::string serial;
};

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in{p};
  return {std::istreambuf_iterator<char>{in}, {}};
}

class TlsRefusalTest : public pki_suite<TlsRefusalTest> {
public:
  static constexpr const char* suite_dir = "tls_refusal_test";

  static void SetUpTestSuite() {
    pki_suite<TlsRefusalTest>::SetUpTestSuite();
    auto other = make_dev_pki(*dir_ / "other");
    ASSERT_TRUE(other) << describe(other.error());
    other_ = new dev_pki{*other};
  }

  static void TearDownTestSuite() {
    delete other_;
    other_ = nullptr;
    pki_suite<TlsRefusalTest>::TearDownTestSuite();
  }

protected:
  void TearDown() override {
    if (proxy_)
      proxy_->stop();
  }

  /// Issues a leaf from `of`'s intermediate into `dir_/name`.
  static leaf_files issue(const dev_pki& of, const std::string& name,
                          leaf_spec spec) {
    leaf_files out;
    auto dir = *dir_ / "leaves" / name;
    std::filesystem::create_directories(dir);
    issuer_files ca{of.intermediate_cert,
                    of.intermediate_cert.parent_path() / "intermediate.key.pem",
                    {}};
    if (spec.common_name.empty())
      spec.common_name = name;
    spec.within_issuer = false;
    auto leaf = issue_leaf(ca, spec);
    EXPECT_TRUE(leaf) << describe(leaf.error());
    if (!leaf)
      return out;
    out.cert = dir / "leaf.pem";
    out.chain = dir / "leaf-chain.pem";
    out.key = dir / "leaf-key.pem";
    out.serial = leaf->info.serial;
    EXPECT_FALSE(write_pem_file(out.key, leaf->key_pem.str(), 0600));
    EXPECT_FALSE(write_pem_file(out.cert, leaf->cert_pem, 0644));
    EXPECT_FALSE(write_pem_file(out.chain, leaf->chain_pem, 0644));
    return out;
  }

  static leaf_spec dated(std::time_t from, std::time_t until,
                         std::string eku = "clientAuth") {
    leaf_spec s;
    s.not_before = from;
    s.not_after = until;
    s.eku = std::move(eku);
    return s;
  }

  /// The runbook's --ca-cert: the intermediate, then the root.
  static std::filesystem::path runbook_ca_chain() {
    auto path = *dir_ / "runbook-chain.pem";
    if (!std::filesystem::exists(path)) {
      EXPECT_FALSE(write_pem_file(
        path, slurp(pki_->intermediate_cert) + slurp(pki_->root_cert), 0644));
    }
    return path;
  }

  /// Starts the reference proxy with `server_chain`/`server_key`, trusting
  /// only the suite's root for clients.
  void start_proxy(const std::filesystem::path& server_chain,
                   const std::filesystem::path& server_key) {
    reference_proxy_config cfg;
    cfg.server_cert = server_chain;
    cfg.server_key = server_key;
    cfg.client_ca = pki_->root_cert;
    auto started = reference_proxy::start(cfg);
    ASSERT_TRUE(started) << describe(started.error());
    proxy_ = std::move(*started);
  }

  void start_proxy() {
    start_proxy(pki_->server_chain, pki_->server_key);
  }

  /// A client with `files`, not checked on the driver's side (so that the
  /// proxy gets to judge them).
  std::unique_ptr<proxy_client> client(const tls_files& files,
                                       const std::string& host = "127.0.0.1") {
    proxy_client_config cfg;
    cfg.proxy_addr = host + ":" + std::to_string(proxy_->port());
    cfg.tls = files;
    cfg.driver_id = "tls-test";
    cfg.connect_timeout = 5000ms;
    auto c = proxy_client::create(cfg);
    EXPECT_TRUE(c) << describe(c.error());
    return c ? std::move(*c) : nullptr;
  }

  bool proxy_saw(const std::string& serial) {
    for (const auto& c : proxy_->clients())
      if (c.serial == serial)
        return true;
    return false;
  }

  static inline dev_pki* other_ = nullptr;
  std::unique_ptr<reference_proxy> proxy_;
};

// -- the driver's own certificate ---------------------------------------------

TEST_F(TlsRefusalTest, DevPkiFilesPassTheCheck) {
  auto tls = load_client_tls(
    {pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  ASSERT_TRUE(tls) << describe(tls.error());
  EXPECT_EQ((*tls)->leaf.ekus, std::vector<std::string>{"clientAuth"});
  // Leaf, intermediate, and the root it verified against.
  ASSERT_EQ((*tls)->chain.size(), 3u);
  EXPECT_EQ(read_certs((*tls)->chain_pem).size(), 2u);
  EXPECT_GE((*tls)->leaf.days_left, 29);
}

TEST_F(TlsRefusalTest, RunbookLayoutFindsTheIntermediateInTheCaFile) {
  auto leaf = issue(*pki_, "runbook", {});
  auto tls = load_client_tls({runbook_ca_chain(), leaf.cert, leaf.key});
  ASSERT_TRUE(tls) << describe(tls.error());
  auto sent = read_certs((*tls)->chain_pem);
  ASSERT_EQ(sent.size(), 2u) << "the intermediate goes with the leaf";
  EXPECT_EQ(info_of(sent[1].get(), std::time(nullptr)).subject,
            "CN=hsm-driver dev intermediate CA,O=hsm-driver dev PKI");
}

TEST_F(TlsRefusalTest, LeafWithoutItsIntermediateAnywhereIsWrongCa) {
  auto leaf = issue(*pki_, "alone", {});
  auto tls = load_client_tls({pki_->root_cert, leaf.cert, leaf.key});
  ASSERT_FALSE(tls);
  EXPECT_EQ(cause_of(tls.error()), cert_cause::wrong_ca)
    << describe(tls.error());
}

TEST_F(TlsRefusalTest, StartCheckRefusesEachBadCertificateByName) {
  auto now = std::time(nullptr);
  auto other = issue(*other_, "other-ca", {});
  auto expired = issue(*pki_, "expired", dated(now - 10 * day, now - day));
  auto future = issue(*pki_, "future", dated(now + day, now + 10 * day));
  auto server_only = issue(*pki_, "server-eku",
                           dated(now - day, now + 10 * day, "serverAuth"));
  auto a = issue(*pki_, "key-a", {});
  auto b = issue(*pki_, "key-b", {});
  struct bad_case {
    const char* name;
    tls_files files;
    cert_cause cause;
  };
  const bad_case cases[] = {
    {"wrong CA",
     {pki_->root_cert, other.chain, other.key},
     cert_cause::wrong_ca},
    {"expired",
     {pki_->root_cert, expired.chain, expired.key},
     cert_cause::expired},
    {"not yet valid",
     {pki_->root_cert, future.chain, future.key},
     cert_cause::not_yet_valid},
    {"wrong EKU",
     {pki_->root_cert, server_only.chain, server_only.key},
     cert_cause::wrong_eku},
    {"key mismatch",
     {pki_->root_cert, a.chain, b.key},
     cert_cause::key_mismatch},
  };
  for (const auto& c : cases) {
    auto tls = load_client_tls(c.files);
    ASSERT_FALSE(tls) << c.name;
    EXPECT_EQ(tls.error(), net_errc::tls_failed) << c.name;
    EXPECT_EQ(cause_of(tls.error()), c.cause)
      << c.name << ": " << describe(tls.error());
    EXPECT_NE(describe(tls.error()).find(to_string(c.cause)), std::string::npos)
      << describe(tls.error());
    // Unchecked, the same files load: the check is what refuses them.
    client_tls_options unchecked;
    unchecked.verify = false;
    EXPECT_TRUE(load_client_tls(c.files, unchecked)) << c.name;
  }
}

TEST_F(TlsRefusalTest, EncryptedOrMissingKeyIsUnreadable) {
  auto leaf = issue(*pki_, "enc", {});
  auto key = read_key(slurp(leaf.key));
  ASSERT_TRUE(key);
  auto enc_path = *dir_ / "enc-key.pem";
  {
    crypto::bio_ptr bio{BIO_new(BIO_s_mem())};
    ASSERT_EQ(PEM_write_bio_PKCS8PrivateKey(bio.get(), key.get(),
                                            EVP_aes_256_cbc(), "pw", 2, nullptr,
                                            nullptr),
              1);
    char* data = nullptr;
    auto len = BIO_get_mem_data(bio.get(), &data);
    ASSERT_FALSE(write_pem_file(
      enc_path, std::string_view{data, static_cast<size_t>(len)}, 0600));
  }
  auto tls = load_client_tls({pki_->root_cert, leaf.chain, enc_path});
  ASSERT_FALSE(tls);
  EXPECT_EQ(cause_of(tls.error()), cert_cause::unreadable);
  EXPECT_NE(describe(tls.error()).find("--client-key"), std::string::npos);
  auto missing = load_client_tls(
    {pki_->root_cert, *dir_ / "nope.pem", leaf.key});
  ASSERT_FALSE(missing);
  EXPECT_NE(describe(missing.error()).find("--client-cert"), std::string::npos);
}

// -- the runbook's layout against a proxy that trusts only the root ----------

TEST_F(TlsRefusalTest, RunbookLayoutIsAcceptedByAProxyTrustingOnlyTheRoot) {
  start_proxy();
  auto leaf = issue(*pki_, "runbook-proxy", {});
  // The leaf alone in --client-cert; --ca-cert holds the intermediate and
  // the root: the driver must send the intermediate, which the proxy has
  // never seen.
  auto c = client({runbook_ca_chain(), leaf.cert, leaf.key});
  ASSERT_NE(c, nullptr);
  auto reply = c->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
  EXPECT_TRUE(proxy_saw(leaf.serial));
  // Without the intermediate (the root alone in --ca-cert), the same leaf
  // is refused by the same proxy: the intermediate is what made it work.
  auto bare = client({pki_->root_cert, leaf.cert, leaf.key});
  ASSERT_NE(bare, nullptr);
  auto refused = bare->poll(1, 0ms);
  EXPECT_FALSE(refused) << "status " << refused->status;
}

TEST_F(TlsRefusalTest, LeafAndIntermediateInClientCertAreAcceptedToo) {
  start_proxy();
  auto leaf = issue(*pki_, "layout-a", {});
  auto c = client({pki_->root_cert, leaf.chain, leaf.key});
  ASSERT_NE(c, nullptr);
  auto reply = c->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
  EXPECT_TRUE(proxy_saw(leaf.serial));
}

// -- the driver refusing the proxy's certificate -----------------------------

TEST_F(TlsRefusalTest, DriverRefusesAProxyCertificateFromAnotherCa) {
  start_proxy(other_->server_chain, other_->server_key);
  auto c = client({pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  ASSERT_NE(c, nullptr);
  auto err = c->handshake();
  ASSERT_TRUE(err);
  EXPECT_EQ(cause_of(err), cert_cause::wrong_ca) << describe(err);
  EXPECT_NE(describe(err).find("proxy certificate"), std::string::npos)
    << describe(err);
  auto reply = c->poll(1, 0ms);
  ASSERT_FALSE(reply);
  EXPECT_EQ(cause_of(reply.error()), cert_cause::wrong_ca)
    << describe(reply.error());
}

TEST_F(TlsRefusalTest, OnlyTheRootsOfTheCaFileAnchorTheProxysChain) {
  // The proxy's certificate comes from another PKI's intermediate, which
  // sits in --ca-cert next to the driver's root (as a customer's
  // intermediate does in the runbook's layout) while its own root does
  // not: an intermediate there completes the driver's chain, it does not
  // vouch for the proxy.
  start_proxy(other_->server_chain, other_->server_key);
  auto mixed = *dir_ / "mixed-ca.pem";
  ASSERT_FALSE(write_pem_file(
    mixed, slurp(pki_->root_cert) + slurp(other_->intermediate_cert), 0644));
  auto c = client({mixed, pki_->driver_chain, pki_->driver_key});
  ASSERT_NE(c, nullptr);
  auto err = c->handshake();
  ASSERT_TRUE(err) << "the proxy's chain was anchored at an intermediate";
  EXPECT_EQ(cause_of(err), cert_cause::wrong_ca) << describe(err);
  // With that PKI's root in the file instead, the same proxy is accepted.
  auto with_root = *dir_ / "other-root-ca.pem";
  ASSERT_FALSE(write_pem_file(
    with_root, slurp(pki_->root_cert) + slurp(other_->root_cert), 0644));
  auto ok = client({with_root, pki_->driver_chain, pki_->driver_key});
  ASSERT_NE(ok, nullptr);
  EXPECT_FALSE(ok->handshake());
}

TEST_F(TlsRefusalTest, DriverRefusesAnExpiredProxyCertificate) {
  auto now = std::time(nullptr);
  leaf_spec spec = dated(now - 10 * day, now - day, "serverAuth");
  spec.names = {"localhost", "127.0.0.1"};
  auto server = issue(*pki_, "server-expired", spec);
  start_proxy(server.chain, server.key);
  auto c = client({pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  ASSERT_NE(c, nullptr);
  auto err = c->handshake();
  ASSERT_TRUE(err);
  EXPECT_EQ(cause_of(err), cert_cause::expired) << describe(err);
}

TEST_F(TlsRefusalTest, DriverRefusesAProxyCertificateForAnotherName) {
  leaf_spec spec;
  spec.eku = "serverAuth";
  spec.names = {"proxy.elsewhere.example"};
  auto server = issue(*pki_, "server-elsewhere", spec);
  start_proxy(server.chain, server.key);
  auto c = client({pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  ASSERT_NE(c, nullptr);
  auto err = c->handshake();
  ASSERT_TRUE(err);
  EXPECT_EQ(cause_of(err), cert_cause::wrong_server_name) << describe(err);
  // The same proxy, the same files: a good name passes.
  start_proxy();
  auto good = client({pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  EXPECT_FALSE(good->handshake());
}

// -- the proxy refusing the driver's certificate -----------------------------

TEST_F(TlsRefusalTest, ProxyRefusesEachBadClientCertificate) {
  start_proxy();
  auto now = std::time(nullptr);
  auto other = issue(*other_, "p-other-ca", {});
  auto expired = issue(*pki_, "p-expired", dated(now - 10 * day, now - day));
  auto future = issue(*pki_, "p-future", dated(now + day, now + 10 * day));
  auto server_only = issue(*pki_, "p-server-eku",
                           dated(now - day, now + 10 * day, "serverAuth"));
  struct bad_case {
    const char* name;
    leaf_files files;
    cert_cause cause;
  };
  const bad_case cases[] = {
    {"wrong CA", other, cert_cause::wrong_ca},
    {"expired", expired, cert_cause::expired},
    {"not yet valid", future, cert_cause::not_yet_valid},
    {"wrong EKU", server_only, cert_cause::wrong_eku},
  };
  auto id = proxy_->enqueue("sign", {{"key_id", "k1"}, {"payload", "00"}});
  for (const auto& c : cases) {
    auto cl = client({pki_->root_cert, c.files.chain, c.files.key});
    ASSERT_NE(cl, nullptr) << c.name;
    auto reply = cl->poll(1, 0ms);
    ASSERT_FALSE(reply) << c.name << ": status " << reply->status;
    // With TLS 1.3 the proxy judges the client's certificate after the
    // client has finished its handshake; the client sees the alert only
    // if it reads before the connection closes, else a closed connection.
    EXPECT_TRUE(reply.error() == net_errc::tls_failed
                || reply.error() == net_errc::unreachable)
      << c.name << ": " << describe(reply.error());
    if (reply.error() == net_errc::tls_failed) {
      EXPECT_NE(describe(reply.error()).find("refused by the proxy"),
                std::string::npos)
        << describe(reply.error());
    }
    // The proxy refused it in the handshake, for that cause, and never
    // served it.
    std::vector<client_cert_refused> refusals;
    ASSERT_TRUE(test::wait_until(
      [&] {
        refusals = proxy_->refused_clients();
        return std::any_of(refusals.begin(), refusals.end(),
                           [&](const client_cert_refused& r) {
                             return r.serial == c.files.serial;
                           });
      },
      10s, "the proxy to record the refusal"))
      << c.name;
    for (const auto& r : refusals) {
      if (r.serial == c.files.serial) {
        EXPECT_EQ(r.cause, to_string(c.cause)) << c.name << ": " << r.reason;
      }
    }
    EXPECT_FALSE(proxy_saw(c.files.serial)) << c.name;
  }
  // Nothing was leased to any of them; the good certificate gets it.
  EXPECT_EQ((*proxy_->request_state(id))["deliveries"], 0);
  auto good = client({pki_->root_cert, pki_->driver_chain, pki_->driver_key});
  auto reply = good->poll(1, 0ms);
  ASSERT_TRUE(reply) << describe(reply.error());
  EXPECT_EQ(reply->status, 200);
  EXPECT_EQ((*proxy_->request_state(id))["deliveries"], 1);
  EXPECT_EQ(proxy_->refused_clients().size(), 4u);
}

} // namespace
} // namespace hsm::net
