// The production shape: several drivers, each with its own HSM (here its own
// SoftHSMv2 token folder) holding the same master key, one PostgreSQL, one
// proxy. Drivers are real `hsm-driver run` processes.

#include "runtime/crypto/hex.hpp"
#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "store/pg_store.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/pg_cluster.hpp"
#include "tests/support/process.hpp"
#include "tests/support/proxy_helpers.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <random>

namespace hsm {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr const char* user_pin = "redundancy-pin-1618";
constexpr const char* so_pin = "redundancy-so-1414";

/// Writes a 0600 file with 64 random hex characters: a test master key.
void write_master_value(const std::filesystem::path& path) {
  std::random_device rd;
  std::string hex;
  for (int i = 0; i < 64; ++i)
    hex += "0123456789abcdef"[rd() % 16];
  std::ofstream{path} << hex << "\n";
  std::filesystem::permissions(path, std::filesystem::perms::owner_read
                                       | std::filesystem::perms::owner_write);
}

class RedundancyTest : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path()
          / ("hsm-driver-red-" + std::to_string(::getpid()) + "-"
             + std::to_string(rd() % 100000));
    std::filesystem::create_directories(dir);
    pg_url = test::fresh_database();
    write_master_value(dir / "master.hex");
    write_master_value(dir / "other-master.hex");
    auto made = net::make_dev_pki(dir / "pki");
    ASSERT_TRUE(made) << describe(made.error());
    pki = *made;
    net::reference_proxy_config pc;
    pc.server_cert = pki.server_chain;
    pc.server_key = pki.server_key;
    pc.client_ca = pki.root_cert;
    pc.lease_duration = 1500ms;
    auto started = net::reference_proxy::start(pc);
    ASSERT_TRUE(started) << describe(started.error());
    proxy = std::move(*started);
  }

  void TearDown() override {
    for (auto& [name, p] : drivers)
      if (p.pid > 0) {
        ::kill(p.pid, SIGKILL);
        test::wait_exit(p, 5000);
      }
    if (proxy)
      proxy->stop();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  /// The environment of driver `name`: its own token folder, the shared
  /// database.
  std::map<std::string, std::string> driver_env(const std::string& name) {
    auto conf = dir / name / "softhsm2.conf";
    return {{"SOFTHSM2_CONF", conf.string()},
            {"PKCS11_MODULE", test::softhsm_module()},
            {"PKCS11_THALES_MODULE", ""},
            {"PKCS11_IBM_MODULE", ""},
            {"USER_PIN_FILE", ""},
            {"USER_PIN", user_pin},
            {"SO_PIN", so_pin},
            {"HSM_TOKEN_LABEL", "hsm-" + name},
            {"SQLITE_PATH", ""},
            {"POSTGRES_URL", pg_url},
            {"HSM_LOG_LEVEL", "info"}};
  }

  /// A token of its own for `name`, its master key made from `value_file`.
  void make_hsm(const std::string& name, const std::string& value_file) {
    test::write_softhsm_conf(dir / name);
    auto env = driver_env(name);
    auto init = test::run_driver({"token", "init"}, env);
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = test::run_driver({"master-key", "init", "--test-value-file",
                                (dir / value_file).string()},
                               env);
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
  }

  std::vector<std::string> run_args(const std::string& name) {
    return test::run_args(proxy->port(), pki,
                          {"--driver-id", name, "--poll-wait", "300",
                           "--sessions", "2", "--pipeline", "2"});
  }

  void start(const std::string& name) {
    drivers[name] = test::start_driver(run_args(name), driver_env(name),
                                       (dir / (name + ".log")).string());
  }

  void stop(const std::string& name) {
    auto& p = drivers[name];
    ::kill(p.pid, SIGTERM);
    EXPECT_EQ(test::wait_exit(p, 30000), 0) << log_of(name);
  }

  std::string log_of(const std::string& name) {
    std::ifstream in{dir / (name + ".log")};
    return {std::istreambuf_iterator<char>{in}, {}};
  }

  json await_done(const std::string& id) {
    return test::await_done(*proxy, id);
  }

  std::string enqueue_generate(const std::string& key_id,
                               const std::string& s) {
    return proxy->enqueue("generate_key", {{"key_id", key_id}, {"scheme", s}});
  }

  std::string enqueue_sign(const std::string& key_id,
                           const std::vector<uint8_t>& payload) {
    return proxy->enqueue("sign", {{"key_id", key_id},
                                   {"payload", crypto::to_hex(payload)}});
  }

  /// A mixed load: `n` requests, every third a generate, the rest signs
  /// with `keys`. Returns the request ids with what they are.
  std::vector<std::pair<std::string, std::string>>
  mixed_load(int n, const std::vector<std::string>& keys,
             const std::string& prefix) {
    std::vector<std::pair<std::string, std::string>> out;
    for (int i = 0; i < n; ++i) {
      if (i % 3 == 0) {
        auto key_id = prefix + "-gen-" + std::to_string(i);
        out.emplace_back(enqueue_generate(key_id, i % 2 ? "p256" : "secp256k1"),
                         key_id);
      } else {
        auto& key = keys[static_cast<size_t>(i) % keys.size()];
        out.emplace_back(
          enqueue_sign(key, test::sha256(prefix + std::to_string(i))), "");
      }
    }
    return out;
  }

  /// Two drivers `a` and `b` sharing one master key, serving, and one key
  /// `seed` generated through them.
  void start_pair_with_seed(const std::string& seed, const std::string& s) {
    make_hsm("a", "master.hex");
    make_hsm("b", "master.hex");
    start("a");
    start("b");
    auto done = await_done(enqueue_generate(seed, s));
    ASSERT_TRUE(done["ok"].get<bool>()) << done.dump();
  }

  /// Waits until `pred(proxy->stats())` holds; fails, naming `what`, if it
  /// does not within 60 s.
  template <class Pred>
  [[nodiscard]] ::testing::AssertionResult
  wait_for_stats(Pred pred, std::string_view what) {
    return test::wait_until([&] { return pred(proxy->stats()); }, 60s, what,
                            1ms);
  }

  /// Waits for every request of `load`; each must succeed. Returns the
  /// reported public key per generated key id.
  std::map<std::string, std::string>
  answers(const std::vector<std::pair<std::string, std::string>>& load) {
    std::map<std::string, std::string> reported;
    for (auto& [id, key_id] : load) {
      auto done = await_done(id);
      EXPECT_TRUE(done["ok"].get<bool>()) << done.dump();
      if (!key_id.empty() && done["ok"].get<bool>())
        reported[key_id] = done["result"]["public_key"].get<std::string>();
    }
    return reported;
  }

  /// Every reported public key is stored, and its blob signs on `name`'s
  /// HSM with a signature that verifies against the reported key.
  void check_reported_keys(const std::map<std::string, std::string>& reported) {
    auto st = store::pg_store::open(pg_url);
    ASSERT_TRUE(st) << describe(st.error());
    std::vector<std::pair<std::string, std::string>> signs;
    for (auto& [key_id, pub_hex] : reported) {
      auto rec = (*st)->get(key_id);
      ASSERT_TRUE(rec && *rec) << key_id;
      EXPECT_EQ(crypto::to_hex((*rec)->public_key), pub_hex) << key_id;
      signs.emplace_back(enqueue_sign(key_id, test::sha256("check " + key_id)),
                         key_id);
    }
    for (auto& [id, key_id] : signs) {
      auto done = await_done(id);
      ASSERT_TRUE(done["ok"].get<bool>()) << done.dump();
      auto rec = (*st)->get(key_id);
      EXPECT_TRUE(test::openssl_verify((*rec)->scheme, (*rec)->public_key,
                                       test::sha256("check " + key_id),
                                       test::unhex(done["result"]["der"])))
        << key_id;
    }
  }

  std::filesystem::path dir;
  std::string pg_url;
  net::dev_pki pki;
  std::unique_ptr<net::reference_proxy> proxy;
  std::map<std::string, test::background_process> drivers;
};

TEST_F(RedundancyTest, KeyGeneratedByOneDriverSignsOnTheOther) {
  make_hsm("a", "master.hex");
  make_hsm("b", "master.hex");
  start("a");
  {
    // The running driver keeps its secrets to itself: the database URL and
    // the PIN are wiped from its environment (/proc/<pid>/environ shows
    // the block the process started with; the names stay, the values are
    // zeroed), and it writes no core file.
    std::string env_text;
    ASSERT_TRUE(test::wait_until(
      [&] {
        std::ifstream again{"/proc/" + std::to_string(drivers["a"].pid)
                            + "/environ"};
        env_text.assign(std::istreambuf_iterator<char>{again}, {});
        return env_text.find(pg_url) == std::string::npos
               && env_text.find(user_pin) == std::string::npos;
      },
      30s, "the driver to wipe the URL and the PIN from its environment"));
    std::ifstream limits{"/proc/" + std::to_string(drivers["a"].pid)
                         + "/limits"};
    std::string line;
    bool core_off = false;
    while (std::getline(limits, line))
      if (line.starts_with("Max core file size"))
        core_off = line.find(" 0 ") != std::string::npos;
    EXPECT_TRUE(core_off) << "core files allowed";
  }
  std::vector<std::string> keys;
  std::map<std::string, std::string> reported;
  for (auto s : {"secp256k1", "p256"}) {
    auto key_id = std::string{"shared-"} + s;
    auto done = await_done(enqueue_generate(key_id, s));
    ASSERT_TRUE(done["ok"].get<bool>()) << done.dump() << log_of("a");
    keys.push_back(key_id);
    reported[key_id] = done["result"]["public_key"].get<std::string>();
  }
  stop("a");
  start("b");
  check_reported_keys(reported); // signed by b alone
  // Both under a mixed load: every request answered, both drivers served.
  start("a");
  auto generated = answers(mixed_load(90, keys, "mixed"));
  auto stats = proxy->stats();
  EXPECT_EQ(stats.max_in_flight.count("a"), 1u);
  EXPECT_EQ(stats.max_in_flight.count("b"), 1u);
  // Two sessions each, pipeline 2: at most 4 leases per driver.
  EXPECT_LE(stats.max_in_flight["a"], 4u);
  EXPECT_LE(stats.max_in_flight["b"], 4u);
  check_reported_keys(generated);
  stop("a");
  stop("b");
}

TEST_F(RedundancyTest, KillNineUnderLoadLosesNothing) {
  start_pair_with_seed("seed", "secp256k1");
  auto load = mixed_load(120, {"seed"}, "kill");
  // Kill `a` while it holds leases, part-way through the load.
  ASSERT_TRUE(wait_for_stats(
    [](net::proxy_stats st) { return st.done >= 30 && st.in_flight["a"] > 0; },
    "30 requests done and driver a holding leases"));
  ::kill(drivers["a"].pid, SIGKILL);
  EXPECT_NE(test::wait_exit(drivers["a"], 5000), -1);
  // What `a` holds now is lost with it, except a result it had sent that
  // the proxy has not read yet. No wait makes sure those are in, so the
  // test counts on no number of lost leases; it checks that each lease `a`
  // held ends (answered by such a late result, or expired after 1.5 s), ...
  auto held = proxy->stats().in_flight["a"];
  auto redelivered_before = proxy->stats().redelivered;
  ASSERT_TRUE(
    wait_for_stats([](net::proxy_stats st) { return st.in_flight["a"] == 0; },
                   "every lease the killed driver held to end"));
  // ... and the requests of the expired ones went out again and were
  // answered, like all the others.
  auto reported = answers(load);
  EXPECT_EQ(proxy->stats().in_flight["a"], 0u);
  std::cout << "[ info ] leases the killed driver held: " << held
            << "; requests handed out again since: "
            << proxy->stats().redelivered - redelivered_before << std::endl;
  // One key per key id, and each reported key is the stored one and signs.
  check_reported_keys(reported);
  stop("b");
}

TEST_F(RedundancyTest, PostgresRestartUnderLoadLosesNothing) {
  start_pair_with_seed("pg-seed", "p256");
  auto load = mixed_load(90, {"pg-seed"}, "pgr");
  ASSERT_TRUE(
    wait_for_stats([](const net::proxy_stats& st) { return st.done >= 10; },
                   "10 requests done before the restart"));
  test::restart_postgres();
  auto reported = answers(load);
  // The drivers recovered without a restart.
  EXPECT_EQ(::kill(drivers["a"].pid, 0), 0);
  EXPECT_EQ(::kill(drivers["b"].pid, 0), 0);
  check_reported_keys(reported);
  stop("a");
  stop("b");
}

TEST_F(RedundancyTest, DriverWithAnotherMasterKeyIsRefusedAtStartUp) {
  make_hsm("a", "master.hex");
  make_hsm("c", "other-master.hex");
  start("a");
  auto done = await_done(enqueue_generate("before-c", "p256"));
  ASSERT_TRUE(done["ok"].get<bool>());
  auto st = store::pg_store::open(pg_url);
  ASSERT_TRUE(st);
  start("c");
  auto code = test::wait_exit(drivers["c"], 30000);
  EXPECT_EQ(code, 1) << log_of("c");
  EXPECT_NE(log_of("c").find("master_key_mismatch"), std::string::npos)
    << log_of("c");
  // It never polled and wrote nothing: the canary is a's, its key is intact.
  EXPECT_EQ(proxy->stats().max_in_flight.count("c"), 0u);
  auto rec = (*st)->get("before-c");
  ASSERT_TRUE(rec && *rec);
  EXPECT_EQ(crypto::to_hex((*rec)->public_key),
            done["result"]["public_key"].get<std::string>());
  auto canary = (*st)->get_canary();
  ASSERT_TRUE(canary && *canary);
  EXPECT_EQ((*canary)->master_key_label, "hsm-driver-master");
  stop("a");
}

} // namespace
} // namespace hsm
