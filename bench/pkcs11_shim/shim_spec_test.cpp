// The shim's spec grammar (pure), its set-up errors (each in a fresh process:
// the shim reads its environment once per process), and the shim loaded
// over SoftHSMv2 with a temporary token: calls reach the real module, and a
// delay makes calls take at least that long (lower bounds only: the machine
// may be slow, never assume it is fast).

#include "bench/pkcs11_shim/shim_spec.hpp"

#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <p11-kit/pkcs11.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace hsm::shim {
namespace {

using namespace std::chrono_literals;

size_t index_of(std::string_view name) {
  auto i = function_index(name);
  EXPECT_TRUE(i) << name;
  return i.value_or(0);
}

spec parse_ok(std::string_view text) {
  auto parsed = parse_spec(text);
  EXPECT_TRUE(parsed) << text << ": " << parsed.error;
  return parsed.value.value_or(spec{});
}

// -- the grammar --------------------------------------------------------------

TEST(ShimSpecTest, FunctionNamesFollowTheFunctionList) {
  EXPECT_EQ(function_index("C_Initialize"), 0u);
  EXPECT_EQ(function_index("C_GetSlotList"), 3u); // C_GetFunctionList skipped
  EXPECT_EQ(function_index("C_WaitForSlotEvent"), function_count - 1);
  EXPECT_FALSE(function_index("C_GetFunctionList"));
  EXPECT_FALSE(function_index("C_Sing"));
  EXPECT_FALSE(function_index("c_sign"));
}

TEST(ShimSpecTest, AnEmptySpecForwardsAtOnce) {
  for (auto text : {"", "  ", ";", " ; ;\t", "\n"}) {
    auto s = parse_ok(text);
    EXPECT_TRUE(s.forwards_at_once()) << '"' << text << '"';
    EXPECT_EQ(to_string(s), "");
  }
}

TEST(ShimSpecTest, DelaysApplyToTheNamedFunctions) {
  auto s = parse_ok("delay=C_Sign:2ms,C_UnwrapKey:500us,*:0;");
  EXPECT_EQ(s.delay[index_of("C_Sign")], 2ms);
  EXPECT_EQ(s.delay[index_of("C_UnwrapKey")], 500us);
  EXPECT_EQ(s.delay[index_of("C_SignInit")], 0ns);
  EXPECT_EQ(s.delay[index_of("C_Initialize")], 0ns);
  EXPECT_FALSE(s.forwards_at_once());
}

TEST(ShimSpecTest, StarIsTheDelayOfEveryFunctionWithoutARule) {
  auto s = parse_ok("delay=*:1ms,C_Sign:0");
  EXPECT_EQ(s.delay[index_of("C_Sign")], 0ns);
  for (auto name : {"C_Initialize", "C_Login", "C_UnwrapKey", "C_GetInfo",
                    "C_WaitForSlotEvent"})
    EXPECT_EQ(s.delay[index_of(name)], 1ms) << name;
}

TEST(ShimSpecTest, WhitespaceAroundTokensIsIgnored) {
  EXPECT_EQ(parse_ok(" delay = C_Sign : 2ms , * : 1us ; "),
            parse_ok("delay=C_Sign:2ms,*:1us"));
}

TEST(ShimSpecTest, ClausesOfOneKindAddUp) {
  auto s = parse_ok("delay=C_Sign:1ms;delay=C_Login:2ms");
  EXPECT_EQ(s.delay[index_of("C_Sign")], 1ms);
  EXPECT_EQ(s.delay[index_of("C_Login")], 2ms);
}

TEST(ShimSpecTest, DurationsNeedAUnit) {
  struct row {
    const char* text;
    duration value;
  };
  const row good[] = {
    {"0", 0ns},       {"0ms", 0ns},      {"7ns", 7ns},
    {"250us", 250us}, {"2ms", 2ms},      {"3s", 3s},
    {"3600s", 1h},    {"3600000ms", 1h}, {" 15ms ", 15ms},
  };
  for (const auto& r : good) {
    auto d = parse_duration(r.text);
    ASSERT_TRUE(d) << r.text << ": " << d.error;
    EXPECT_EQ(*d.value, r.value) << r.text;
  }
  for (auto text :
       {"", "ms", "5", "1.5ms", "-1ms", "+1ms", "1h", "1 ms", "1msec", "3601s",
        "3600001ms", "99999999999999999999999ns", "0x10ms"}) {
    auto d = parse_duration(text);
    EXPECT_FALSE(d) << text;
    EXPECT_FALSE(d.error.empty()) << text;
  }
}

TEST(ShimSpecTest, ABadSpecIsAnErrorThatNamesTheProblem) {
  struct row {
    const char* text;
    const char* says;
  };
  const row rows[] = {
    {"delay", "expected <kind>=<rules>"},
    {"delay=", "empty rule"},
    {"delay=C_Sign:1ms,,C_Login:1ms", "empty rule"},
    {"delay=C_Sign", "expected <function>:<value>"},
    {"delay=C_Sing:1ms", "unknown PKCS#11 function \"C_Sing\""},
    {"delay=c_sign:1ms", "unknown PKCS#11 function \"c_sign\""},
    {"delay=C_Sign:1ms,C_Sign:2ms", "C_Sign is given twice"},
    {"delay=C_Sign:1ms;delay=C_Sign:1ms", "C_Sign is given twice"},
    {"delay=*:1ms,*:2ms", "\"*\" is given twice"},
    {"delay=C_GetFunctionList:1ms", "answered by the shim itself"},
    {"delay=C_Sign:2", "no unit"},
    {"delay=C_Sign:1.5ms", "unknown unit"},
    {"fail=C_Sign:CKR_DEVICE_ERROR", "unknown kind \"fail\""},
    {"delay=C_Sign:1ms;hang=C_Sign", "unknown kind \"hang\""},
  };
  for (const auto& r : rows) {
    auto parsed = parse_spec(r.text);
    ASSERT_FALSE(parsed) << r.text;
    EXPECT_NE(parsed.error.find(r.says), std::string::npos)
      << r.text << " gave: " << parsed.error;
  }
}

TEST(ShimSpecTest, TheCanonicalFormParsesToTheSameSpec) {
  struct row {
    const char* text;
    const char* canonical;
  };
  const row rows[] = {
    {"delay=C_Sign:2ms,C_UnwrapKey:500us,*:0",
     "delay=C_Sign:2ms,C_UnwrapKey:500us"},
    {"delay=*:1ms,C_Sign:0", "delay=C_Sign:0,*:1ms"},
    {"delay=*:1000us", "delay=*:1ms"},
    {"delay=C_Login:1500us", "delay=C_Login:1500us"},
    {"delay=C_Sign:0", ""},
  };
  for (const auto& r : rows) {
    auto s = parse_ok(r.text);
    EXPECT_EQ(to_string(s), r.canonical) << r.text;
    EXPECT_EQ(parse_ok(to_string(s)), s) << r.text;
  }
}

// -- set-up errors, each in a fresh process
// ------------------------------------

std::string softhsm_module() {
  if (const char* m = std::getenv("SOFTHSM2_MODULE"))
    return m;
  return "/usr/lib/softhsm/libsofthsm2.so";
}

void set_or_unset(const char* name, const char* value) {
  if (value != nullptr)
    ::setenv(name, value, 1);
  else
    ::unsetenv(name);
}

CK_FUNCTION_LIST* shim_function_list() {
  void* handle = ::dlopen(HSM_SHIM_LIBRARY, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr)
    return nullptr;
  void* sym = ::dlsym(handle, "C_GetFunctionList");
  if (sym == nullptr)
    return nullptr;
  CK_C_GetFunctionList get_list = nullptr;
  static_assert(sizeof(get_list) == sizeof(sym));
  std::memcpy(&get_list, &sym, sizeof(sym));
  CK_FUNCTION_LIST* list = nullptr;
  if (get_list(&list) != CKR_OK)
    return nullptr;
  return list;
}

/// Loads the shim with this environment, exits with C_Initialize's CK_RV.
[[noreturn]] void initialize_and_exit(const char* module, const char* spec) {
  set_or_unset("HSM_SHIM_MODULE", module);
  set_or_unset("HSM_SHIM_SPEC", spec);
  auto* list = shim_function_list();
  if (list == nullptr)
    std::_Exit(100);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  std::_Exit(static_cast<int>(list->C_Initialize(&args)));
}

class ShimSetUpDeathTest : public ::testing::Test {
protected:
  void SetUp() override {
    // A fresh process (re-executed, not forked): this one may have loaded
    // the shim already.
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
};

constexpr int general_error = static_cast<int>(CKR_GENERAL_ERROR);
constexpr int arguments_bad = static_cast<int>(CKR_ARGUMENTS_BAD);

TEST_F(ShimSetUpDeathTest, WithoutAModuleInitializeFails) {
  EXPECT_EXIT(initialize_and_exit(nullptr, nullptr),
              ::testing::ExitedWithCode(general_error),
              "hsm_pkcs11_shim: HSM_SHIM_MODULE is not set");
}

TEST_F(ShimSetUpDeathTest, AnUnloadableModuleFailsInitialize) {
  EXPECT_EXIT(initialize_and_exit("/nonexistent/libnothing.so", nullptr),
              ::testing::ExitedWithCode(general_error),
              "cannot load HSM_SHIM_MODULE=/nonexistent/libnothing.so");
}

TEST_F(ShimSetUpDeathTest, TheShimAsItsOwnModuleFailsInitialize) {
  EXPECT_EXIT(initialize_and_exit(HSM_SHIM_LIBRARY, nullptr),
              ::testing::ExitedWithCode(general_error), "is the shim itself");
}

TEST_F(ShimSetUpDeathTest, ABadSpecFailsInitialize) {
  auto module = softhsm_module();
  EXPECT_EXIT(initialize_and_exit(module.c_str(), "delay=C_Sing:1ms"),
              ::testing::ExitedWithCode(arguments_bad),
              "bad HSM_SHIM_SPEC: .*C_Sing");
}

// -- over SoftHSMv2
// -------------------------------------------------------------

/// The delay this process's shim puts on C_GetTokenInfo.
constexpr auto token_info_delay = 20ms;

constexpr std::string_view token_label = "shim-test";
constexpr std::string_view so_pin = "shim-so-pin-0815";
constexpr std::string_view user_pin = "shim-user-pin-4711";

/// One temporary SoftHSMv2 set-up and one shim-loaded module for every test
/// of the suite (the shim reads its environment once per process).
class ShimSoftHsmTest : public ::testing::Test {
protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(softhsm_module()))
      return;
    char dir_template[] = "/tmp/hsm-shim-test-XXXXXX";
    if (::mkdtemp(dir_template) == nullptr) {
      load_error_ = "mkdtemp failed";
      return;
    }
    dir_ = std::filesystem::path{dir_template};
    std::filesystem::create_directories(*dir_ / "tokens");
    auto conf = *dir_ / "softhsm2.conf";
    std::ofstream{conf} << "directories.tokendir = "
                        << (*dir_ / "tokens").string()
                        << "\nobjectstore.backend = file\nlog.level = ERROR\n"
                        << "slots.removable = false\n";
    ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
    ::setenv("HSM_SHIM_MODULE", softhsm_module().c_str(), 1);
    ::setenv("HSM_SHIM_SPEC", "delay=C_GetTokenInfo:20ms,*:0", 1);
    auto loaded = pkcs11::module::load(HSM_SHIM_LIBRARY);
    if (!loaded) {
      load_error_ = describe(loaded.error());
      return;
    }
    module_ = std::make_unique<pkcs11::module>(std::move(*loaded));
    pkcs11::secret_pin so{so_pin};
    pkcs11::secret_pin user{user_pin};
    if (auto err = pkcs11::init_token(*module_, token_label, so, user))
      load_error_ = "init_token: " + describe(err);
  }

  static void TearDownTestSuite() {
    module_.reset(); // C_Finalize through the shim
    if (dir_) {
      std::error_code ec;
      std::filesystem::remove_all(*dir_, ec);
      dir_.reset();
    }
  }

  void SetUp() override {
    if (!std::filesystem::exists(softhsm_module()))
      GTEST_SKIP() << "SoftHSMv2 not found at " << softhsm_module();
    ASSERT_EQ(load_error_, "");
    ASSERT_NE(module_, nullptr);
    auto slot = module_->find_token(token_label);
    ASSERT_TRUE(slot) << describe(slot.error());
    slot_ = *slot;
  }

  static pkcs11::module& mod() {
    return *module_;
  }

  CK_SLOT_ID slot_ = 0;

private:
  static inline std::optional<std::filesystem::path> dir_;
  static inline std::unique_ptr<pkcs11::module> module_;
  static inline std::string load_error_;
};

TEST_F(ShimSoftHsmTest, CallsTheDriverMakesReachTheRealModule) {
  // C_GetSlotList + C_GetTokenInfo
  auto tokens = mod().tokens();
  ASSERT_TRUE(tokens) << describe(tokens.error());
  ASSERT_FALSE(tokens->empty());
  EXPECT_EQ(tokens->front().manufacturer, "SoftHSM project");
  // C_OpenSession, C_Login, C_GenerateKey, C_FindObjects*, C_CloseSession
  auto sess = pkcs11::session::open(mod(), slot_);
  ASSERT_TRUE(sess) << describe(sess.error());
  pkcs11::secret_pin user{user_pin};
  auto err = sess->login(user);
  ASSERT_FALSE(err) << describe(err);
  bool created = false;
  auto key = pkcs11::create_master_key(*sess, "shim-master", &created);
  ASSERT_TRUE(key) << describe(key.error());
  auto found = pkcs11::find_master_key(*sess, "shim-master");
  ASSERT_TRUE(found) << describe(found.error());
  EXPECT_EQ(*found, *key);
}

TEST_F(ShimSoftHsmTest, CallsTheDriverDoesNotMakeAreForwardedToo) {
  auto* list = shim_function_list(); // the loaded shim: same list
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->version.major, 2);
  EXPECT_EQ(list->version.minor, 40);
  CK_INFO info{};
  ASSERT_EQ(list->C_GetInfo(&info), CKR_OK);
  EXPECT_EQ(pkcs11::trim_padded(info.manufacturerID,
                                sizeof(info.manufacturerID)),
            "SoftHSM");
  CK_ULONG count = 0;
  ASSERT_EQ(list->C_GetMechanismList(slot_, nullptr, &count), CKR_OK);
  EXPECT_GT(count, 0u);
  auto sess = pkcs11::session::open(mod(), slot_);
  ASSERT_TRUE(sess) << describe(sess.error());
  CK_SESSION_INFO sinfo{};
  ASSERT_EQ(list->C_GetSessionInfo(sess->handle(), &sinfo), CKR_OK);
  EXPECT_EQ(sinfo.slotID, slot_);
  std::vector<CK_BYTE> random(16);
  EXPECT_EQ(list->C_GenerateRandom(sess->handle(), random.data(),
                                   static_cast<CK_ULONG>(random.size())),
            CKR_OK);
  CK_FUNCTION_LIST* again = nullptr;
  ASSERT_EQ(list->C_GetFunctionList(&again), CKR_OK);
  EXPECT_EQ(again, list);
}

TEST_F(ShimSoftHsmTest, ADelayMakesEveryCallTakeAtLeastThatLong) {
  constexpr int calls = 10;
  CK_TOKEN_INFO info{};
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i)
    ASSERT_EQ(mod().fns().get_token_info(slot_, &info), CKR_OK);
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_GE(elapsed, calls * token_info_delay);
}

TEST_F(ShimSoftHsmTest, ConcurrentCallsEachWaitTheirOwnDelay) {
  constexpr int threads = 4;
  constexpr int calls = 5;
  std::vector<std::chrono::steady_clock::duration> elapsed(threads);
  std::vector<int> failures(threads, 0);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      CK_TOKEN_INFO info{};
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i)
        if (mod().fns().get_token_info(slot_, &info) != CKR_OK)
          ++failures[static_cast<size_t>(t)];
      elapsed[static_cast<size_t>(t)] = std::chrono::steady_clock::now()
                                        - start;
    });
  for (auto& w : workers)
    w.join();
  for (size_t t = 0; t < threads; ++t) {
    EXPECT_EQ(failures[t], 0) << "thread " << t;
    EXPECT_GE(elapsed[t], calls * token_info_delay) << "thread " << t;
  }
}

} // namespace
} // namespace hsm::shim
