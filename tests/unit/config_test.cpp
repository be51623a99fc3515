#include "runtime/app/config.hpp"

#include "runtime/app/run_options.hpp"
#include "runtime/base/hardening.hpp"
#include "runtime/net/host_port.hpp"

#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

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

TEST(ConfigTest, PostgresUrlFromAPrivateFile) {
  auto dir = std::filesystem::path{::testing::TempDir()}
             / ("pg-url-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto file = dir / "url";
  { std::ofstream{file} << "postgresql://app:s3cret@db1/keys\n"; }
  std::filesystem::permissions(file,
                               std::filesystem::perms::owner_read
                                 | std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::replace);
  raw_options raw;
  raw.pkcs11_module = "/p.so";
  auto cfg = resolve(raw, fake_env({{"POSTGRES_URL_FILE", file.string()}}));
  ASSERT_TRUE(cfg) << describe(cfg.error());
  EXPECT_EQ(cfg->postgres_url, "postgresql://app:s3cret@db1/keys");
  EXPECT_EQ(cfg->postgres_url_source, "POSTGRES_URL_FILE");
  EXPECT_TRUE(url_has_password(cfg->postgres_url));
  EXPECT_FALSE(url_has_password("postgresql://app@db1/keys"));
  // With the URL also given another way: which one wins would surprise.
  auto both = resolve(raw, fake_env({{"POSTGRES_URL_FILE", file.string()},
                                     {"POSTGRES_URL", "postgresql://h/db"}}));
  ASSERT_FALSE(both);
  EXPECT_EQ(both.error(), config_errc::invalid_option);
  // Readable by others: refused, naming the variable and the cure.
  std::filesystem::permissions(file, std::filesystem::perms::others_read,
                               std::filesystem::perm_options::add);
  auto loose = resolve(raw, fake_env({{"POSTGRES_URL_FILE", file.string()}}));
  ASSERT_FALSE(loose);
  EXPECT_EQ(loose.error(), config_errc::bad_file);
  EXPECT_NE(describe(loose.error()).find("chmod 600"), std::string::npos);
  EXPECT_EQ(describe(loose.error()).find("s3cret"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(ConfigTest, HardenedProcessIsNotDumpableAndWritesNoCore) {
  // In a child, so that this test process stays as it was.
  auto pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (harden_process())
      ::_exit(1);
    rlimit core{};
    ::getrlimit(RLIMIT_CORE, &core);
    if (core.rlim_cur != 0 || core.rlim_max != 0)
      ::_exit(2);
    ::_exit(::prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
    << "1: harden failed, 2: core limit kept, 3: still dumpable";
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

// -- run and dev options ------------------------------------------------------

/// A run configuration with every required flag given.
run_flags complete_run_flags() {
  run_flags f;
  f.proxy_addr = "proxy:8443";
  f.ca_cert = "/pki/ca.pem";
  f.client_cert = "/pki/driver.pem";
  f.client_key = "/pki/driver.key";
  f.driver_id = "flag-driver";
  return f;
}

TEST(RunOptionsTest, DefaultsAreNamedConstants) {
  auto o = resolve_run_options(driver_config{}, complete_run_flags(),
                               fake_env({}));
  ASSERT_TRUE(o) << describe(o.error());
  EXPECT_EQ(o->sessions, default_sessions);
  EXPECT_EQ(o->hsm_timeout.count(), default_hsm_timeout_ms);
  EXPECT_EQ(o->drain_timeout.count(), default_drain_timeout_ms);
  EXPECT_EQ(o->poll_wait.count(), default_poll_wait_ms);
}

TEST(RunOptionsTest, FlagsWinOverTheEnvironmentThroughTheLookup) {
  auto env = fake_env({{"PROXY_ADDR", "env-proxy:1"},
                       {"CA_CERT", "/env/ca.pem"},
                       {"CLIENT_CERT", "/env/driver.pem"},
                       {"CLIENT_KEY", "/env/driver.key"},
                       {"HSM_DRIVER_ID", "env-driver"}});
  auto flagged = resolve_run_options(driver_config{}, complete_run_flags(),
                                     env);
  ASSERT_TRUE(flagged) << describe(flagged.error());
  EXPECT_EQ(flagged->proxy.proxy_addr, "proxy:8443");
  EXPECT_EQ(flagged->proxy.tls.ca_cert, "/pki/ca.pem");
  EXPECT_EQ(flagged->proxy.driver_id, "flag-driver");
  auto from_env = resolve_run_options(driver_config{}, run_flags{}, env);
  ASSERT_TRUE(from_env) << describe(from_env.error());
  EXPECT_EQ(from_env->proxy.proxy_addr, "env-proxy:1");
  EXPECT_EQ(from_env->proxy.tls.ca_cert, "/env/ca.pem");
  EXPECT_EQ(from_env->proxy.tls.cert, "/env/driver.pem");
  EXPECT_EQ(from_env->proxy.tls.key, "/env/driver.key");
  EXPECT_EQ(from_env->proxy.driver_id, "env-driver");
}

TEST(RunOptionsTest, CertWarnDaysFromFlagOrEnvironmentAndChecked) {
  auto o = resolve_run_options(driver_config{}, complete_run_flags(),
                               fake_env({}));
  ASSERT_TRUE(o) << describe(o.error());
  EXPECT_EQ(o->cert_warn_days, net::default_cert_warn_days);
  auto from_env = resolve_run_options(driver_config{}, complete_run_flags(),
                                      fake_env({{"HSM_CERT_WARN_DAYS", "7"}}));
  ASSERT_TRUE(from_env) << describe(from_env.error());
  EXPECT_EQ(from_env->cert_warn_days, 7);
  auto f = complete_run_flags();
  f.cert_warn_days = "14";
  auto flagged = resolve_run_options(driver_config{}, f,
                                     fake_env({{"HSM_CERT_WARN_DAYS", "7"}}));
  ASSERT_TRUE(flagged) << describe(flagged.error());
  EXPECT_EQ(flagged->cert_warn_days, 14);
  for (const char* bad : {"-1", "thirty", "30d", "4000"}) {
    f.cert_warn_days = bad;
    auto o2 = resolve_run_options(driver_config{}, f, fake_env({}));
    ASSERT_FALSE(o2) << bad;
    EXPECT_EQ(o2.error(), config_errc::invalid_option);
    EXPECT_NE(describe(o2.error()).find("--cert-warn-days"), std::string::npos);
  }
}

TEST(RunOptionsTest, DriverIdDefaultsToTheHostName) {
  auto f = complete_run_flags();
  f.driver_id.clear();
  auto o = resolve_run_options(driver_config{}, f, fake_env({}));
  ASSERT_TRUE(o) << describe(o.error());
  EXPECT_EQ(o->proxy.driver_id, host_name());
  EXPECT_FALSE(o->proxy.driver_id.empty());
}

TEST(RunOptionsTest, MissingRequiredOptionNamesTheFlag) {
  for (auto member : {&run_flags::proxy_addr, &run_flags::ca_cert,
                      &run_flags::client_cert, &run_flags::client_key}) {
    auto f = complete_run_flags();
    (f.*member).clear();
    auto o = resolve_run_options(driver_config{}, f, fake_env({}));
    ASSERT_FALSE(o);
    EXPECT_EQ(o.error(), config_errc::missing_option);
    EXPECT_NE(describe(o.error()).find("is required"), std::string::npos);
  }
  auto f = complete_run_flags();
  f.proxy_addr.clear();
  auto o = resolve_run_options(driver_config{}, f, fake_env({}));
  ASSERT_FALSE(o);
  EXPECT_NE(describe(o.error()).find("--proxy-addr"), std::string::npos);
}

TEST(RunOptionsTest, LimitsAreCheckedAndNameTheFlag) {
  struct bad_case {
    const char* flag;
    void (*set)(run_flags&);
  };
  const bad_case cases[] = {
    {"--sessions", [](run_flags& f) { f.sessions = 0; }},
    {"--sessions", [](run_flags& f) { f.sessions = 257; }},
    {"--hsm-timeout", [](run_flags& f) { f.hsm_timeout_ms = 99; }},
    {"--drain-timeout", [](run_flags& f) { f.drain_timeout_ms = -1; }},
    {"--poll-wait", [](run_flags& f) { f.poll_wait_ms = 60001; }},
  };
  for (auto& c : cases) {
    auto f = complete_run_flags();
    c.set(f);
    auto o = resolve_run_options(driver_config{}, f, fake_env({}));
    ASSERT_FALSE(o) << c.flag;
    EXPECT_EQ(o.error(), config_errc::invalid_option) << c.flag;
    EXPECT_NE(describe(o.error()).find(c.flag), std::string::npos) << c.flag;
  }
}

TEST(RunOptionsTest, DevUsesSoftHsmOnlyWhenNothingNamesAModule) {
  raw_options raw;
  apply_dev_defaults(raw, fake_env({}));
  EXPECT_EQ(raw.pkcs11_module, dev_pkcs11_module);
  EXPECT_EQ(raw.token_label, dev_token_label);
  for (auto var : pkcs11_module_vars) {
    raw_options from_env;
    apply_dev_defaults(from_env, fake_env({{std::string{var}, "/v.so"}}));
    EXPECT_TRUE(from_env.pkcs11_module.empty()) << var;
  }
  raw_options flagged;
  flagged.pkcs11_module = "/flag.so";
  flagged.token_label = "mine";
  apply_dev_defaults(flagged, fake_env({}));
  EXPECT_EQ(flagged.pkcs11_module, "/flag.so");
  EXPECT_EQ(flagged.token_label, "mine");
}

// -- host:port (one parser for --proxy-addr, --listen, --admin-listen) --------
// The forms a client refuses are in tests/net/proxy_client_test.cpp.

TEST(HostPortTest, SplitsHostAndPortAndUnbracketsIpv6) {
  auto v4 = net::parse_host_port("127.0.0.1:8443", "--listen");
  ASSERT_TRUE(v4) << describe(v4.error());
  EXPECT_EQ(v4->host, "127.0.0.1");
  EXPECT_EQ(v4->port, 8443);
  auto v6 = net::parse_host_port("[::1]:65535", "--listen");
  ASSERT_TRUE(v6) << describe(v6.error());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->port, 65535);
}

TEST(HostPortTest, PortZeroOnlyWhereAListenerMayPickOne) {
  auto refused = net::parse_host_port("localhost:0", "--proxy-addr");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error(), config_errc::invalid_option);
  auto allowed = net::parse_host_port("localhost:0", "--listen",
                                      net::port_zero::allowed);
  ASSERT_TRUE(allowed) << describe(allowed.error());
  EXPECT_EQ(allowed->port, 0);
}

TEST(HostPortTest, ErrorsNameTheFlag) {
  auto empty = net::parse_host_port("", "--admin-listen");
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error(), config_errc::missing_option);
  EXPECT_NE(describe(empty.error()).find("--admin-listen"), std::string::npos);
  for (auto bad :
       {"::1:8443", "localhost", "host:", "host:99999", "[::1]8443", "a b:1"}) {
    auto parsed = net::parse_host_port(bad, "--listen",
                                       net::port_zero::allowed);
    ASSERT_FALSE(parsed) << bad;
    EXPECT_EQ(parsed.error(), config_errc::invalid_option) << bad;
    EXPECT_NE(describe(parsed.error()).find("--listen"), std::string::npos)
      << bad;
  }
}

} // namespace
} // namespace hsm
