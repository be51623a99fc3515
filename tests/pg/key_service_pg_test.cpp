// The key path on a real SoftHSMv2 token and a real PostgreSQL store: the
// row MAC catches a whole-row swap made in the shared database (as a DBA, or
// anyone with write access to it, could make) before the HSM unwraps
// anything. Runs in the integration binary (it needs the token set-up);
// the database comes from the PostgreSQL test cluster
// (tests/support/pg_cluster.hpp: HSM_TEST_POSTGRES_URL, or a private
// cluster; never skipped).

#include "runtime/keys/key_service.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "store/pg_store.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/pg_cluster.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include <memory>
#include <string>

namespace hsm {
namespace {

using test::sha256;

/// Runs `sql` on `url` behind the store's back; "" or the error.
std::string exec_sql(const std::string& url, const std::string& sql) {
  try {
    pqxx::connection conn{url};
    pqxx::nontransaction tx{conn};
    tx.exec0(sql);
    return {};
  } catch (const std::exception& e) {
    return e.what();
  }
}

class KeyServicePgTest : public ::testing::Test {
protected:
  void SetUp() override {
    url = test::fresh_database();
    ASSERT_FALSE(url.empty()) << "no PostgreSQL test database (see above)";
    token = std::make_unique<test::test_token>(
      test::make_token(test::unique_label("kspg")));
    auto opened = store::pg_store::open(url);
    ASSERT_TRUE(opened) << describe(opened.error());
    st = std::move(*opened);
    auto guard = keys::check_master_key(token->sess, token->master,
                                        "hsm-driver-master", *st, true);
    ASSERT_TRUE(guard) << describe(guard.error());
    ASSERT_EQ(*guard, keys::canary_state::created);
  }

  void TearDown() override {
    st.reset();
    if (!url.empty())
      test::drop_database(url);
  }

  keys::key_service service() {
    auto caps = keys::probe(token->sess, token->master, {});
    EXPECT_TRUE(caps) << describe(caps.error());
    auto h = keys::find_key_handles(token->sess, "hsm-driver-master");
    EXPECT_TRUE(h) << describe(h.error());
    return keys::key_service{token->sess, h ? *h : keys::key_handles{}, *st,
                             caps ? *caps : keys::capabilities{}};
  }

  std::string url;
  std::unique_ptr<test::test_token> token;
  std::unique_ptr<store::pg_store> st;
};

TEST_F(KeyServicePgTest, WholeRowSwapIsRefusedBeforeTheUnwrap) {
  auto svc = service();
  auto a = svc.generate("row-a", "secp256k1");
  auto b = svc.generate("row-b", "secp256k1");
  ASSERT_TRUE(a) << describe(a.error());
  ASSERT_TRUE(b) << describe(b.error());
  ASSERT_NE(a->public_key, b->public_key);
  // Both sign before the swap.
  ASSERT_TRUE(svc.sign("row-a", sha256("before")));
  // Everything of B's row but its key id, MAC included, under A's id: the
  // swap that would otherwise release B's signatures as A's.
  ASSERT_EQ(exec_sql(url, "UPDATE keys SET (public_key, key_blob, "
                          "wrap_mechanism, master_key_id, format_version, "
                          "row_mac) = (SELECT public_key, key_blob, "
                          "wrap_mechanism, master_key_id, format_version, "
                          "row_mac FROM keys WHERE key_id = 'row-b') "
                          "WHERE key_id = 'row-a'"),
            "");
  // The store now serves B's row under A's id.
  auto swapped = st->get("row-a");
  ASSERT_TRUE(swapped) << describe(swapped.error());
  ASSERT_TRUE(swapped->has_value());
  ASSERT_EQ((*swapped)->public_key, b->public_key);
  auto unwraps = test::counts().unwrap_key.load();
  auto sig = svc.sign("row-a", sha256("x"));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::key_corrupted) << describe(sig.error());
  EXPECT_NE(describe(sig.error()).find("row MAC"), std::string::npos)
    << describe(sig.error());
  EXPECT_EQ(test::counts().unwrap_key.load(), unwraps)
    << "the HSM unwrapped a swapped row";
  // B still signs under its own id, for its own public key.
  auto payload = sha256("x");
  auto sig_b = svc.sign("row-b", payload);
  ASSERT_TRUE(sig_b) << describe(sig_b.error());
  EXPECT_TRUE(test::openssl_verify(scheme::secp256k1, b->public_key, payload,
                                   sig_b->sig.der));
}

} // namespace
} // namespace hsm
