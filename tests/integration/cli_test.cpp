// The real `hsm-driver` binary on a real SoftHSMv2 token and SQLite file.

#include "runtime/crypto/hex.hpp"
#include "runtime/net/pki.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace hsm {
namespace {

using json = nlohmann::json;

std::vector<uint8_t> unhex(const json& j) {
  auto v = crypto::from_hex(j.get<std::string>());
  return v ? *v : std::vector<uint8_t>{};
}

class CliTest : public ::testing::Test {
protected:
  void SetUp() override {
    label = test::unique_label("cli");
    dir = test::fresh_dir("cli");
    env = {{"SOFTHSM2_CONF", test::softhsm_conf()},
           {"PKCS11_MODULE", test::softhsm_module()},
           {"PKCS11_THALES_MODULE", ""},
           {"PKCS11_IBM_MODULE", ""},
           {"USER_PIN_FILE", ""},
           {"USER_PIN", std::string{test::user_pin}},
           {"SO_PIN", std::string{test::so_pin}},
           {"HSM_TOKEN_LABEL", label},
           {"SQLITE_PATH", (dir / "keys.db").string()}};
    auto init = run({"token", "init"});
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = run({"master-key", "init"});
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
    EXPECT_TRUE(json::parse(mk.out)["created"].get<bool>());
  }

  test::run_result run(const std::vector<std::string>& args,
                       std::map<std::string, std::string> extra = {}) {
    auto e = env;
    for (auto& [k, v] : extra)
      e[k] = v;
    auto res = test::run_driver(args, e);
    all_output += res.out + res.err;
    return res;
  }

  std::string label;
  std::filesystem::path dir;
  std::map<std::string, std::string> env;
  std::string all_output;
};

TEST_F(CliTest, GenerateSignShowPrintJsonThatVerifies) {
  for (std::string s : {"secp256k1", "p256"}) {
    auto id = "cli-" + s;
    auto gen = run({"keys", "generate", "--scheme", s, "--key-id", id});
    ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
    auto g = json::parse(gen.out);
    EXPECT_TRUE(g["ok"].get<bool>());
    EXPECT_TRUE(g["key"]["created"].get<bool>());
    auto pub = unhex(g["key"]["public_key"]);
    ASSERT_EQ(pub.size(), 65u);
    auto hash = test::sha256("cli payload " + s);
    auto sign = run(
      {"keys", "sign", "--key-id", id, "--payload", crypto::to_hex(hash)});
    ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
    auto j = json::parse(sign.out);
    auto der = unhex(j["signature"]["der"]);
    auto raw = unhex(j["signature"]["signature"]);
    auto scheme_value = *parse_scheme(s);
    EXPECT_TRUE(test::openssl_verify(scheme_value, pub, hash, der));
    EXPECT_EQ(raw.size(), 64u);
    EXPECT_TRUE(j["signature"].contains("recovery_id"));
    if (s == "secp256k1") {
      EXPECT_TRUE(test::is_low_s_secp256k1(raw));
    }
    auto show = run({"keys", "show", "--key-id", id});
    ASSERT_EQ(show.exit_code, 0) << show.err;
    EXPECT_EQ(json::parse(show.out)["key"]["public_key"],
              g["key"]["public_key"]);
    auto again = run({"keys", "generate", "--scheme", s, "--key-id", id});
    ASSERT_EQ(again.exit_code, 0);
    auto a = json::parse(again.out);
    EXPECT_FALSE(a["key"]["created"].get<bool>());
    EXPECT_EQ(a["key"]["public_key"], g["key"]["public_key"]);
  }
  // Key commands are audited too, in this host's own chain: two generates,
  // two signs and two repeated generates; shows are not operations.
  auto verify = run({"audit", "verify"});
  ASSERT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  auto report = json::parse(verify.out);
  ASSERT_EQ(report["chains"].size(), 1u) << verify.out;
  EXPECT_EQ(
    report["chains"][0]["driver_id"].get<std::string>().rfind("cli@", 0), 0u);
  EXPECT_EQ(report["chains"][0]["rows"], 6) << verify.out;
}

TEST_F(CliTest, JsonLogsAreOneObjectPerLineWithTheRequestIdAsAField) {
  auto gen = run({"--log-format", "json", "keys", "generate", "--scheme",
                  "p256", "--key-id", "json-logs"});
  ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
  auto sign = run({"--log-format", "json", "keys", "sign", "--key-id",
                   "json-logs", "--payload",
                   crypto::to_hex(test::sha256("json logs"))});
  ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
  int audited = 0;
  std::istringstream lines{gen.err + sign.err};
  for (std::string l; std::getline(lines, l);) {
    auto j = json::parse(l, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "not a JSON line: " << l;
    EXPECT_TRUE(j.contains("ts") && j.contains("level") && j.contains("msg"))
      << l;
    if (j.value("logger", "") == "audit") {
      ++audited;
      EXPECT_EQ(j["req"].get<std::string>().rfind("cli-", 0), 0u) << l;
    }
  }
  EXPECT_EQ(audited, 2) << gen.err << sign.err;
}

TEST_F(CliTest, GenerateShowAndSignNameTheSameFingerprint) {
  for (std::string s : {"p256", "ed25519"}) {
    auto id = "fp-" + s;
    auto gen = run({"--resident-schemes", "ed25519", "keys", "generate",
                    "--scheme", s, "--key-id", id});
    ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
    auto g = json::parse(gen.out)["key"];
    // Computed here, apart from the driver: SHA-256 of the public key bytes.
    auto pub = unhex(g["public_key"]);
    auto expected = "sha256:"
                    + crypto::to_hex(test::sha256(std::string_view{
                      reinterpret_cast<const char*>(pub.data()), pub.size()}));
    EXPECT_EQ(g["public_key_fingerprint"], expected) << s;
    auto show = run({"keys", "show", "--key-id", id});
    ASSERT_EQ(show.exit_code, 0) << show.out << show.err;
    EXPECT_EQ(json::parse(show.out)["key"]["public_key_fingerprint"], expected)
      << s;
    auto payload = s == "p256" ? crypto::to_hex(test::sha256("fp payload"))
                               : std::string{"6670"};
    auto sign = run({"--resident-schemes", "ed25519", "keys", "sign",
                     "--key-id", id, "--payload", payload});
    ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
    auto j = json::parse(sign.out);
    EXPECT_EQ(j["signature"]["public_key_fingerprint"], expected) << s;
    EXPECT_EQ(j["key"]["public_key_fingerprint"], expected) << s;
  }
  // Two keys, two fingerprints.
  auto a = json::parse(run({"keys", "show", "--key-id", "fp-p256"}).out);
  auto b = json::parse(run({"keys", "show", "--key-id", "fp-ed25519"}).out);
  EXPECT_NE(a["key"]["public_key_fingerprint"],
            b["key"]["public_key_fingerprint"]);
}

TEST_F(CliTest, ReconcileDestroysOrphansOnlyWithApplyAndIncludeOrphans) {
  for (std::string id : {"rc-kept", "rc-orphan"}) {
    auto gen = run({"--resident-schemes", "ed25519", "keys", "generate",
                    "--scheme", "ed25519", "--key-id", id});
    ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
  }
  // A generation whose put never committed: its row is gone, its object
  // stays.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir / "keys.db").c_str(), &db), SQLITE_OK);
  EXPECT_EQ(sqlite3_exec(db, "DELETE FROM keys WHERE key_id = 'rc-orphan'",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto report = [&](std::vector<std::string> flags) {
    std::vector<std::string> args{"keys", "reconcile"};
    args.insert(args.end(), flags.begin(), flags.end());
    auto res = run(args);
    EXPECT_EQ(res.exit_code, 0) << res.out << res.err;
    return json::parse(res.out);
  };
  auto dry = report({});
  EXPECT_TRUE(dry["ok"].get<bool>());
  EXPECT_TRUE(dry["dry_run"].get<bool>());
  EXPECT_EQ(dry["kept"]["count"], 1);
  EXPECT_EQ(dry["kept"]["key_ids"], json::array({"rc-kept"}));
  EXPECT_EQ(dry["orphans"]["count"], 1);
  EXPECT_EQ(dry["orphans"]["key_ids"], json::array({"rc-orphan"}));
  EXPECT_EQ(dry["orphans"]["destroyed"], 0);
  EXPECT_EQ(dry["losers"]["count"], 0);
  // --include-orphans without --apply is a usage error, not a dry run.
  auto alone = run({"keys", "reconcile", "--include-orphans"});
  EXPECT_EQ(alone.exit_code, 2) << alone.out << alone.err;
  auto losers_only = report({"--apply"});
  EXPECT_FALSE(losers_only["dry_run"].get<bool>());
  EXPECT_EQ(losers_only["orphans"]["count"], 1);
  EXPECT_EQ(losers_only["orphans"]["destroyed"], 0);
  auto with_orphans = report({"--apply", "--include-orphans"});
  EXPECT_EQ(with_orphans["orphans"]["destroyed"], 1);
  EXPECT_EQ(with_orphans["kept"]["count"], 1);
  auto after = report({});
  EXPECT_EQ(after["orphans"]["count"], 0);
  EXPECT_EQ(after["kept"]["count"], 1);
  auto sign = run({"--resident-schemes", "ed25519", "keys", "sign", "--key-id",
                   "rc-kept", "--payload", "6b"});
  EXPECT_EQ(sign.exit_code, 0) << sign.out << sign.err;
}

TEST_F(CliTest, Ed25519NeedsTheResidentOptInOnSoftHsm) {
  auto refused = run(
    {"keys", "generate", "--scheme", "ed25519", "--key-id", "ed"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_EQ(json::parse(refused.out)["error"]["code"], "scheme_unsupported");
  auto probe = run({"probe"});
  ASSERT_EQ(probe.exit_code, 0) << probe.err;
  auto p = json::parse(probe.out);
  for (auto& s : p["schemes"])
    EXPECT_EQ(s["served"].get<bool>(), s["scheme"] != "ed25519") << s.dump();
  auto gen = run({"--resident-schemes", "ed25519", "keys", "generate",
                  "--scheme", "ed25519", "--key-id", "ed"});
  ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
  auto pub = unhex(json::parse(gen.out)["key"]["public_key"]);
  ASSERT_EQ(pub.size(), 32u);
  auto sign = run({"--resident-schemes", "ed25519", "keys", "sign", "--key-id",
                   "ed", "--payload", "68656c6c6f"});
  ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
  auto sig = unhex(json::parse(sign.out)["signature"]["signature"]);
  std::vector<uint8_t> msg{'h', 'e', 'l', 'l', 'o'};
  EXPECT_TRUE(test::openssl_verify(scheme::ed25519, pub, msg, sig));
}

TEST_F(CliTest, BadInputGetsClearErrors) {
  ASSERT_EQ(
    run({"keys", "generate", "--scheme", "p256", "--key-id", "k"}).exit_code,
    0);
  struct bad_case {
    std::vector<std::string> args;
    std::string code;
  };
  std::vector<bad_case> cases{
    {{"keys", "sign", "--key-id", "nope", "--payload", std::string(64, 'a')},
     "unknown_key"},
    {{"keys", "sign", "--key-id", "k", "--payload", std::string(62, 'a')},
     "invalid_payload"},
    {{"keys", "sign", "--key-id", "k", "--payload", "zz"}, "invalid_request"},
    {{"keys", "generate", "--scheme", "schnorr", "--key-id", "s"},
     "scheme_unsupported"},
  };
  for (auto& c : cases) {
    auto res = run(c.args);
    EXPECT_EQ(res.exit_code, 1) << res.out << res.err;
    auto j = json::parse(res.out);
    EXPECT_FALSE(j["ok"].get<bool>());
    EXPECT_EQ(j["error"]["code"], c.code) << res.out;
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty());
  }
}

TEST_F(CliTest, MissingModuleFailsWithAClearMessage) {
  auto res = run({"probe"}, {{"PKCS11_MODULE", "/nonexistent/libp11.so"}});
  EXPECT_EQ(res.exit_code, 2);
  EXPECT_NE(res.out.find("/nonexistent/libp11.so"), std::string::npos)
    << res.out;
  auto none = run({"probe"}, {{"PKCS11_MODULE", ""}});
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_NE(none.out.find("--pkcs11-module"), std::string::npos) << none.out;
}

TEST_F(CliTest, WrongPinFailsWithoutRetry) {
  auto res = run({"probe"}, {{"USER_PIN", "not-the-pin"}});
  // Configuration (exit 2): a service manager must not restart into
  // another login with the same PIN.
  EXPECT_EQ(res.exit_code, 2);
  auto j = json::parse(res.out);
  EXPECT_EQ(j["error"]["code"], "hsm_error");
  EXPECT_FALSE(j["error"]["retryable"].get<bool>());
  EXPECT_NE(j["error"]["message"].get<std::string>().find("CKR_PIN_INCORRECT"),
            std::string::npos);
  // The right PIN still works: nothing was locked by a retry loop.
  EXPECT_EQ(run({"probe"}).exit_code, 0);
}

TEST_F(CliTest, PinFileMustBePrivate) {
  auto file = dir / "pin";
  std::ofstream{file} << test::user_pin << "\n";
  ::chmod(file.c_str(), 0644);
  auto loose = run({"probe"},
                   {{"USER_PIN", ""}, {"USER_PIN_FILE", file.string()}});
  EXPECT_EQ(loose.exit_code, 2);
  EXPECT_NE(loose.out.find("USER_PIN_FILE"), std::string::npos) << loose.out;
  ::chmod(file.c_str(), 0600);
  auto ok = run({"probe"},
                {{"USER_PIN", ""}, {"USER_PIN_FILE", file.string()}});
  EXPECT_EQ(ok.exit_code, 0) << ok.out << ok.err;
}

TEST_F(CliTest, PinNeverAppearsInOutputOrOnTheCommandLine) {
  auto trace = std::map<std::string, std::string>{{"HSM_LOG_LEVEL", "trace"}};
  run({"keys", "generate", "--scheme", "p256", "--key-id", "p"}, trace);
  run({"keys", "sign", "--key-id", "p", "--payload", std::string(64, '1')},
      trace);
  run({"probe"}, {{"HSM_LOG_LEVEL", "trace"}, {"USER_PIN", "wrong-pin-xyz"}});
  auto flag = run({"probe", "--pin", "secret-on-argv-1"});
  EXPECT_EQ(flag.exit_code, 2);
  EXPECT_NE(flag.err.find("USER_PIN"), std::string::npos);
  auto eq = run({"probe", "--user-pin=secret-on-argv-2"});
  EXPECT_EQ(eq.exit_code, 2);
  auto extra = run({"probe", "secret-on-argv-3"});
  EXPECT_EQ(extra.exit_code, 2);
  for (auto secret :
       {std::string{test::user_pin}, std::string{test::so_pin},
        std::string{"wrong-pin-xyz"}, std::string{"secret-on-argv-1"},
        std::string{"secret-on-argv-2"}, std::string{"secret-on-argv-3"}})
    EXPECT_EQ(all_output.find(secret), std::string::npos) << secret;
  EXPECT_FALSE(all_output.empty());
}

TEST_F(CliTest, TokenWithAnotherMasterKeyIsRefusedAndWritesNothing) {
  ASSERT_EQ(run({"keys", "generate", "--scheme", "p256", "--key-id", "first"})
              .exit_code,
            0);
  auto other = test::unique_label("cli-other");
  ASSERT_EQ(run({"token", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code, 0);
  ASSERT_EQ(run({"master-key", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code,
            0);
  auto check = run({"master-key", "check"}, {{"HSM_TOKEN_LABEL", other}});
  EXPECT_EQ(check.exit_code, 1);
  EXPECT_EQ(json::parse(check.out)["error"]["code"], "master_key_mismatch");
  auto gen = run({"keys", "generate", "--scheme", "p256", "--key-id", "second"},
                 {{"HSM_TOKEN_LABEL", other}});
  EXPECT_EQ(gen.exit_code, 1);
  EXPECT_EQ(json::parse(gen.out)["error"]["code"], "master_key_mismatch");
  // The right token sees no trace of the refused request.
  auto show = run({"keys", "show", "--key-id", "second"});
  EXPECT_EQ(json::parse(show.out)["error"]["code"], "unknown_key");
  auto good = run({"master-key", "check"});
  EXPECT_EQ(good.exit_code, 0) << good.out << good.err;
}

TEST_F(CliTest, RunOptionsAreCheckedBeforeTheDaemonStarts) {
  std::map<std::string, std::string> no_proxy{{"PROXY_ADDR", ""},
                                              {"CA_CERT", ""},
                                              {"CLIENT_CERT", ""},
                                              {"CLIENT_KEY", ""}};
  auto missing = run({"run"}, no_proxy);
  EXPECT_EQ(missing.exit_code, 2) << missing.out << missing.err;
  auto j = json::parse(missing.out);
  EXPECT_EQ(j["error"]["code"], "config_error");
  EXPECT_NE(j["error"]["message"].get<std::string>().find("--proxy-addr"),
            std::string::npos)
    << missing.out;
  // The environment fills in what the flags leave out; a bad limit is
  // still refused, naming its flag.
  auto limit = run({"run", "--sessions", "0"},
                   {{"PROXY_ADDR", "127.0.0.1:1"},
                    {"CA_CERT", (dir / "ca.pem").string()},
                    {"CLIENT_CERT", (dir / "driver.pem").string()},
                    {"CLIENT_KEY", (dir / "driver.key").string()}});
  EXPECT_EQ(limit.exit_code, 2) << limit.out << limit.err;
  EXPECT_NE(json::parse(limit.out)["error"]["message"].get<std::string>().find(
              "--sessions"),
            std::string::npos)
    << limit.out;
  // The numeric flags have variables too, checked the same way; a flag
  // given wins over its variable.
  std::map<std::string, std::string> proxy_env{
    {"PROXY_ADDR", "127.0.0.1:1"},
    {"CA_CERT", (dir / "ca.pem").string()},
    {"CLIENT_CERT", (dir / "driver.pem").string()},
    {"CLIENT_KEY", (dir / "driver.key").string()}};
  struct var_case {
    const char* var;
    const char* value;
    const char* flag;
  };
  for (auto [var, value, flag] :
       {var_case{"HSM_SESSIONS", "300", "--sessions"},
        var_case{"HSM_PIPELINE", "17", "--pipeline"},
        var_case{"HSM_HSM_TIMEOUT_MS", "5", "--hsm-timeout"},
        var_case{"HSM_DRAIN_TIMEOUT_MS", "-1", "--drain-timeout"},
        var_case{"HSM_POLL_WAIT_MS", "70000", "--poll-wait"}}) {
    auto e = proxy_env;
    e[var] = value;
    auto bad = run({"run"}, e);
    EXPECT_EQ(bad.exit_code, 2) << var << ": " << bad.out << bad.err;
    EXPECT_NE((bad.out + bad.err).find(flag), std::string::npos)
      << var << ": " << bad.out << bad.err;
  }
  auto e = proxy_env;
  e["HSM_SESSIONS"] = "300";
  auto overridden = run({"run", "--sessions", "0"}, e);
  EXPECT_NE(overridden.out.find("--sessions must be 1..256"), std::string::npos)
    << overridden.out;
}

TEST_F(CliTest, StartUpOnAHungHsmEndsOnSigtermAndAtItsDeadline) {
  // The fault-injecting module in front of SoftHSMv2: C_Login never
  // returns, as on an HSM that stopped answering.
  auto pki = net::make_dev_pki(dir / "pki");
  ASSERT_TRUE(pki) << describe(pki.error());
  std::map<std::string, std::string> hung{
    {"PKCS11_MODULE", HSM_SHIM_LIBRARY},
    {"HSM_SHIM_MODULE", test::softhsm_module()},
    {"HSM_SHIM_SPEC", "hang=C_Login:@1+"},
    {"PROXY_ADDR", "127.0.0.1:1"},
    {"CA_CERT", pki->root_cert.string()},
    {"CLIENT_CERT", pki->driver_chain.string()},
    {"CLIENT_KEY", pki->driver_key.string()}};
  auto e = env;
  for (auto& [k, v] : hung)
    e[k] = v;
  {
    auto proc = test::start_driver({"run", "--hsm-timeout", "500"}, e,
                                   (dir / "hung-sigterm.log").string());
    test::kill_on_exit guard{proc};
    std::this_thread::sleep_for(std::chrono::milliseconds{700});
    auto sent = std::chrono::steady_clock::now();
    ASSERT_EQ(::kill(proc.pid, SIGTERM), 0);
    auto code = test::wait_exit(proc, 5000);
    auto took = std::chrono::steady_clock::now() - sent;
    EXPECT_EQ(code, 1);
    EXPECT_LT(took, std::chrono::seconds{4});
    std::ifstream log{dir / "hung-sigterm.log"};
    std::string text{std::istreambuf_iterator<char>{log}, {}};
    EXPECT_NE(text.find("while start-up was still waiting"), std::string::npos)
      << text;
  }
  {
    // Nobody stops it: start-up gives up at its deadline (30 s plus three
    // HSM timeouts; here 30.3 s).
    auto proc = test::start_driver({"run", "--hsm-timeout", "100"}, e,
                                   (dir / "hung-deadline.log").string());
    test::kill_on_exit guard{proc};
    auto code = test::wait_exit(proc, 45000);
    EXPECT_EQ(code, 1);
    std::ifstream log{dir / "hung-deadline.log"};
    std::string text{std::istreambuf_iterator<char>{log}, {}};
    EXPECT_NE(text.find("start-up did not finish within 30300 ms"),
              std::string::npos)
      << text;
  }
}

TEST_F(CliTest, PasswordOnTheCommandLineIsWarnedAboutAndNeverPrinted) {
  auto e = env;
  e["SQLITE_PATH"] = "";
  e["PROXY_ADDR"] = "";
  // `run` without a proxy address stops at its own options, after the
  // warning and before any connection.
  auto res = test::run_driver(
    {"--postgres-url", "postgresql://app:hunter2@127.0.0.1:1/keys", "run"}, e);
  EXPECT_EQ(res.exit_code, 2) << res.out << res.err;
  EXPECT_NE(res.err.find("POSTGRES_URL_FILE"), std::string::npos) << res.err;
  EXPECT_EQ(res.err.find("hunter2"), std::string::npos) << res.err;
  EXPECT_EQ(res.out.find("hunter2"), std::string::npos) << res.out;
  // From the environment: no warning (not in /proc/<pid>/cmdline).
  e["POSTGRES_URL"] = "postgresql://app:hunter2@127.0.0.1:1/keys";
  res = test::run_driver({"run"}, e);
  EXPECT_EQ(res.exit_code, 2) << res.out << res.err;
  EXPECT_EQ(res.err.find("POSTGRES_URL_FILE"), std::string::npos) << res.err;
  EXPECT_EQ(res.err.find("hunter2"), std::string::npos) << res.err;
}

TEST_F(CliTest, ProxyListenAddressesUseTheSharedParser) {
  for (auto flag : {"--listen", "--admin-listen"}) {
    auto res = run({"proxy", flag, "::1:8443", "--server-cert", "c.pem",
                    "--server-key", "k.pem", "--client-ca", "ca.pem",
                    "--admin-token-file", (dir / "admin-token").string()});
    EXPECT_EQ(res.exit_code, 2) << res.out << res.err;
    auto j = json::parse(res.out);
    EXPECT_EQ(j["error"]["code"], "config_error") << res.out;
    EXPECT_NE(j["error"]["message"].get<std::string>().find(flag),
              std::string::npos)
      << res.out;
  }
}

} // namespace
} // namespace hsm
