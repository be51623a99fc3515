#include "runtime/app/config.hpp"

#include <map>

#include <gtest/gtest.h>

namespace hsm {
namespace {

env_lookup fake_env(std::map<std::string, std::string> vars) {
  return [vars](std::string_view name) -> std::optional<std::string> {
    auto i = vars.find(std::string{name});
    if (i == vars.end())
      return std::nullopt;
    return i->second;
  };
}

TEST(ConfigTest, DefaultsAreNamedConstants) {
  raw_options raw;
  raw.pkcs11_module = "/lib/p11.so";
  auto cfg = resolve(raw, fake_env({}));
  ASSERT_TRUE(cfg) << describe(cfg.error());
  EXPECT_EQ(cfg->pkcs11_module, "/lib/p11.so");
  EXPECT_EQ(cfg->pkcs11_module_source, "--pkcs11-module");
  EXPECT_EQ(cfg->token_label, default_token_label);
  EXPECT_EQ(cfg->master_key_label, default_master_key_label);
  EXPECT_EQ(cfg->sqlite_path, default_sqlite_path);
  EXPECT_EQ(cfg->log_level, default_log_level);
  EXPECT_TRUE(cfg->resident_schemes.empty());
}

TEST(ConfigTest, ModuleComesFromExactlyOneVariable) {
  raw_options raw;
  for (auto var :
       {"PKCS11_MODULE", "PKCS11_THALES_MODULE", "PKCS11_IBM_MODULE"}) {
    auto cfg = resolve(raw, fake_env({{var, "/x.so"}}));
    ASSERT_TRUE(cfg) << var;
    EXPECT_EQ(cfg->pkcs11_module, "/x.so");
    EXPECT_EQ(cfg->pkcs11_module_source, var);
  }
  auto both = resolve(raw, fake_env({{"PKCS11_THALES_MODULE", "/a.so"},
                                     {"PKCS11_IBM_MODULE", "/b.so"}}));
  ASSERT_FALSE(both);
  EXPECT_EQ(both.error(), config_errc::invalid_option);
  EXPECT_NE(describe(both.error()).find("PKCS11_IBM_MODULE"),
            std::string::npos);
  // The same path twice is no conflict; the flag wins over everything.
  EXPECT_TRUE(resolve(raw, fake_env({{"PKCS11_MODULE", "/a.so"},
                                     {"PKCS11_IBM_MODULE", "/a.so"}})));
  raw.pkcs11_module = "/flag.so";
  auto flag = resolve(raw, fake_env({{"PKCS11_THALES_MODULE", "/a.so"},
                                     {"PKCS11_IBM_MODULE", "/b.so"}}));
  ASSERT_TRUE(flag);
  EXPECT_EQ(flag->pkcs11_module, "/flag.so");
}

TEST(ConfigTest, MissingModuleNamesTheOption) {
  auto cfg = resolve(raw_options{}, fake_env({}));
  ASSERT_FALSE(cfg);
  EXPECT_EQ(cfg.error(), config_errc::missing_option);
  EXPECT_NE(describe(cfg.error()).find("--pkcs11-module"), std::string::npos);
}

TEST(ConfigTest, ResidentSchemesAreChecked) {
  raw_options raw;
  raw.pkcs11_module = "/p.so";
  raw.resident_schemes = " ed25519 , p256";
  auto cfg = resolve(raw, fake_env({}));
  ASSERT_TRUE(cfg);
  EXPECT_EQ(cfg->resident_schemes,
            (std::set<scheme>{scheme::ed25519, scheme::p256}));
  raw.resident_schemes = "ed25519,schnorr";
  auto bad = resolve(raw, fake_env({}));
  ASSERT_FALSE(bad);
  EXPECT_NE(describe(bad.error()).find("--resident-schemes"),
            std::string::npos);
  raw.resident_schemes.clear();
  auto from_env = resolve(raw, fake_env({{"HSM_RESIDENT_SCHEMES", "stark"}}));
  ASSERT_FALSE(from_env);
  EXPECT_NE(describe(from_env.error()).find("HSM_RESIDENT_SCHEMES"),
            std::string::npos);
}

TEST(ConfigTest, FlagsWinOverEnvironment) {
  raw_options raw;
  raw.pkcs11_module = "/p.so";
  raw.token_label = "flag-label";
  auto cfg = resolve(raw, fake_env({{"HSM_TOKEN_LABEL", "env-label"},
                                    {"SQLITE_PATH", "/env/keys.db"}}));
  ASSERT_TRUE(cfg);
  EXPECT_EQ(cfg->token_label, "flag-label");
  EXPECT_EQ(cfg->sqlite_path, "/env/keys.db");
}

TEST(ConfigTest, OverlongTokenLabelIsRefused) {
  raw_options raw;
  raw.pkcs11_module = "/p.so";
  raw.token_label = std::string(33, 'x');
  auto cfg = resolve(raw, fake_env({}));
  ASSERT_FALSE(cfg);
  EXPECT_NE(describe(cfg.error()).find("--token-label"), std::string::npos);
}

TEST(ConfigTest, OneKeyStoreAtATime) {
  raw_options raw;
  raw.pkcs11_module = "/p.so";
  auto pg = resolve(raw, fake_env({{"POSTGRES_URL", "postgresql://h/db"}}));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->postgres_url, "postgresql://h/db");
  raw.sqlite_path = "/k.db";
  auto both = resolve(raw, fake_env({{"POSTGRES_URL", "postgresql://h/db"}}));
  ASSERT_FALSE(both);
  EXPECT_EQ(both.error(), config_errc::invalid_option);
  EXPECT_NE(describe(both.error()).find("--sqlite-path"), std::string::npos);
}

// The cases of every libpq form are in pg_conninfo_test.cpp; this checks that
// the logging entry point uses that parser.
TEST(ConfigTest, RedactUrlHidesPasswords) {
  EXPECT_EQ(redact_url("postgresql://app:s3cret@db1:5432,db2/keys"
                       "?target_session_attrs=read-write"),
            "postgresql://app:***@db1:5432,db2/keys"
            "?target_session_attrs=read-write");
  EXPECT_EQ(redact_url("host=db user=app password = 's3 cret' dbname=keys"),
            "host=db user=app password = *** dbname=keys");
  EXPECT_EQ(redact_url("host=db password='s3cret"),
            "<unparsable connection string>");
}

TEST(ConfigTest, SplitListTrimsAndDropsEmptyParts) {
  EXPECT_EQ(split_list(" a, b ,,c "),
            (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(split_list("").empty());
}

} // namespace
} // namespace hsm
