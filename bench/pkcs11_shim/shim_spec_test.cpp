// The shim's spec grammar (pure), its set-up errors (each in a fresh process:
// the shim reads its environment once per process), and the shim loaded
// over SoftHSMv2 with a temporary token: calls reach the real module, and a
// delay makes calls take at least that long (lower bounds only: the machine
// may be slow, never assume it is fast).

#include "bench/pkcs11_shim/shim_spec.hpp"

#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <dlfcn.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <p11-kit/pkcs11.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
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
    {"drop=C_Sign:1ms", "unknown kind \"drop\" (known: delay, fail, hang"},
    {"delay=C_Sign:1ms;Delay=C_Login:1ms", "unknown kind \"Delay\""},
    // fail
    {"fail=C_Sign", "expected <function>:<value>"},
    {"fail=C_Sign:", "missing CK_RV"},
    {"fail=C_Sign:@3", "missing CK_RV"},
    {"fail=C_Sign:CKR_DEVICE_EROR", "unknown CK_RV \"CKR_DEVICE_EROR\""},
    {"fail=C_Sign:ckr_device_error", "unknown CK_RV"},
    {"fail=C_Sign:CKR_OK", "CKR_OK, not a fault"},
    {"fail=C_Sign:0x0", "CKR_OK, not a fault"},
    {"fail=C_Sign:0xZZ", "not a hexadecimal number"},
    {"fail=C_Sign:CKR_DEVICE_ERROR|", "missing CK_RV"},
    {"fail=C_Sign:CKR_DEVICE_ERROR@0", "counted from 1"},
    {"fail=C_Sign:CKR_DEVICE_ERROR/0", "counted from 1"},
    {"fail=C_Sign:CKR_DEVICE_ERROR@3++", "expected a call count"},
    {"fail=C_Sign:CKR_DEVICE_ERROR%0", "selects no call"},
    {"fail=C_Sign:CKR_DEVICE_ERROR%100.5", "above 100"},
    {"fail=C_Sign:CKR_DEVICE_ERROR%0.0000001", "more than 6 decimals"},
    {"fail=C_Sign:CKR_DEVICE_ERROR%1%", "expected a percentage"},
    {"fail=C_Sign:CKR_DEVICE_ERROR@2s", "a time @T is for outage only"},
    {"fail=C_Sign:CKR_DEVICE_ERROR for 2s", "\"for\" belongs to hang"},
    {"fail=C_Sign:CKR_DEVICE_ERROR#3", "unknown CK_RV"},
    {"fail=C_Sign:none,C_Sign:CKR_DEVICE_ERROR", "C_Sign is given twice"},
    {"fail=*:CKR_DEVICE_ERROR;fail=*:CKR_GENERAL_ERROR", "\"*\" is given"},
    // hang
    {"hang=C_Sign:CKR_DEVICE_ERROR@3", "a hang takes no CK_RV"},
    {"hang=C_Sign:@3 for 0", "lasts no time"},
    {"hang=C_Sign:@3 for 3601s", "longer than the limit of 1h"},
    {"hang=C_Sign:@3 for 2h", "unknown unit"},
    {"hang=C_Sign:@3 for", "expected @N or @N+"},
    {"hang=C_Sign:%", "expected a percentage"},
    // invalidate
    {"invalidate=C_Sign:CKR_DEVICE_ERROR", "invalidate takes no CK_RV"},
    {"invalidate=C_Sign:@3 for 1s", "\"for\" belongs to hang"},
    {"invalidate=C_Sign:@", "expected @N or @N+"},
    // outage
    {"outage=C_Sign:CKR_DEVICE_REMOVED@3", "an outage needs its length"},
    {"outage=C_Sign:@3 for 1s", "missing CK_RV"},
    {"outage=C_Sign:CKR_DEVICE_REMOVED|CKR_DEVICE_ERROR@3 for 1s", "one CK_RV"},
    {"outage=C_Sign:CKR_DEVICE_REMOVED@3 for 0", "lasts no time"},
    {"outage=*:CKR_DEVICE_REMOVED@2x for 1s", "unknown unit"},
    // settings
    {"seed=", "expected a seed of decimal digits"},
    {"seed=-1", "expected a seed of decimal digits"},
    {"seed=99999999999999999999", "expected a seed of decimal digits"},
    {"seed=1;seed=2", "the seed is given twice"},
    {"counts=", "missing the path of the counts file"},
    {"counts=/tmp/a;counts=/tmp/b", "the counts file is given twice"},
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
    {"fail=C_Sign:CKR_DEVICE_ERROR%1", "fail=C_Sign:CKR_DEVICE_ERROR%1"},
    {"fail=C_Sign:0x30|0x80000001/10",
     "fail=C_Sign:CKR_DEVICE_ERROR|0x80000001/10"},
    {"fail=C_Sign:CKR_GENERAL_ERROR%0.500",
     "fail=C_Sign:CKR_GENERAL_ERROR%0.5"},
    {"fail=*:CKR_DEVICE_ERROR%1,C_Initialize:none,C_Finalize:none",
     "fail=C_Initialize:none,C_Finalize:none,*:CKR_DEVICE_ERROR%1"},
    {"fail=C_Sign:none", ""},
    {"hang=C_Sign:@10,C_Login:@2+ for 30s, C_Logout: for 1000ms",
     "hang=C_Login:@2+ for 30s,C_Logout:for 1s,C_Sign:@10"},
    {"invalidate=C_Sign:%2.25,C_FindObjects:",
     "invalidate=C_FindObjects:,C_Sign:%2.25"},
    {"outage=C_Sign:CKR_DEVICE_REMOVED@100 for 5000ms",
     "outage=C_Sign:CKR_DEVICE_REMOVED@100 for 5s"},
    {"outage=*:CKR_TOKEN_NOT_PRESENT@2s for 500ms",
     "outage=*:CKR_TOKEN_NOT_PRESENT@2s for 500ms"},
    {"counts=/tmp/c;seed=7;delay=C_Sign:1ms;fail=C_Sign:CKR_DEVICE_ERROR",
     "seed=7;counts=/tmp/c;delay=C_Sign:1ms;fail=C_Sign:CKR_DEVICE_ERROR"},
  };
  for (const auto& r : rows) {
    auto s = parse_ok(r.text);
    EXPECT_EQ(to_string(s), r.canonical) << r.text;
    EXPECT_EQ(parse_ok(to_string(s)), s) << r.text;
  }
}

TEST(ShimSpecTest, SessionAndOperationFunctionsFollowTheStandard) {
  for (auto name : {"C_InitPIN", "C_SetPIN", "C_CloseSession",
                    "C_GetSessionInfo", "C_Login", "C_Sign", "C_UnwrapKey",
                    "C_GenerateRandom", "C_CancelFunction"})
    EXPECT_TRUE(takes_session(index_of(name))) << name;
  for (auto name :
       {"C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_InitToken",
        "C_OpenSession", "C_CloseAllSessions", "C_WaitForSlotEvent"})
    EXPECT_FALSE(takes_session(index_of(name))) << name;
  for (auto name : {"C_Sign", "C_SignFinal", "C_Encrypt", "C_DecryptFinal",
                    "C_Digest", "C_Verify", "C_VerifyRecover"})
    EXPECT_TRUE(ends_operation(index_of(name))) << name;
  for (auto name : {"C_SignInit", "C_SignUpdate", "C_UnwrapKey",
                    "C_OpenSession", "C_GenerateRandom"})
    EXPECT_FALSE(ends_operation(index_of(name))) << name;
}

TEST(ShimSpecTest, CkrNamesAreThoseOfTheHeaderAndTheDriver) {
  ASSERT_GT(known_rvs().size(), 90u);
  EXPECT_EQ(known_rvs().front().name, "CKR_OK");
  for (const auto& r : known_rvs()) {
    // The driver's table (runtime/pkcs11/rv.cpp) prints the names it lacks
    // as CKR_0x...; every name it has must agree.
    if (auto driver = pkcs11::rv_name(r.code); !driver.starts_with("CKR_0x")) {
      EXPECT_EQ(driver, r.name);
    }
    EXPECT_EQ(rv_name(r.code), r.name);
    if (r.code == CKR_OK)
      continue;
    auto parsed = parse_rv(r.name);
    ASSERT_TRUE(parsed) << r.name << ": " << parsed.error;
    EXPECT_EQ(*parsed.value, r.code) << r.name;
  }
  EXPECT_EQ(parse_rv("CKR_DEVICE_ERROR").value, CKR_DEVICE_ERROR);
  EXPECT_EQ(parse_rv("CKR_DEVICE_REMOVED").value, CKR_DEVICE_REMOVED);
  EXPECT_EQ(parse_rv(" CKR_TOKEN_NOT_PRESENT ").value, CKR_TOKEN_NOT_PRESENT);
  EXPECT_EQ(parse_rv("CKR_SESSION_HANDLE_INVALID").value,
            CKR_SESSION_HANDLE_INVALID);
  EXPECT_EQ(parse_rv("CKR_UNWRAPPING_KEY_HANDLE_INVALID").value,
            CKR_UNWRAPPING_KEY_HANDLE_INVALID);
  EXPECT_EQ(parse_rv("CKR_FUNCTION_REJECTED").value, CKR_FUNCTION_REJECTED);
  EXPECT_EQ(parse_rv("0x30").value, CKR_DEVICE_ERROR);
  EXPECT_EQ(parse_rv("0x80000001").value, CKR_VENDOR_DEFINED + 1);
  EXPECT_EQ(rv_name(CKR_VENDOR_DEFINED + 1), "0x80000001");
  for (auto text : {"", "CKR_OK", "0x0", "0x", "0xg", "48", "CKR_DEVICE",
                    "CKR_VENDOR_DEFINED", "0x10000000000000000"})
    EXPECT_FALSE(parse_rv(text)) << text;
}

TEST(ShimSpecTest, SelectorsReadEveryForm) {
  using m = selector::mode;
  struct row {
    const char* text;
    m how;
    uint64_t n;
    uint32_t millionths;
  };
  const row rows[] = {
    {"", m::every_call, 0, 0},
    {"@3", m::nth, 3, 0},
    {" @ 7 ", m::nth, 7, 0},
    {"@3+", m::from_nth, 3, 0},
    {"/10", m::every_nth, 10, 0},
    {"/1", m::every_nth, 1, 0},
    {"%1", m::chance, 0, 1'000'000},
    {"%0.5", m::chance, 0, 500'000},
    {"%0.000001", m::chance, 0, 1},
    {"%100", m::chance, 0, all_millionths},
    {"%100.000000", m::chance, 0, all_millionths},
  };
  for (const auto& r : rows) {
    auto sel = parse_selector(r.text, false);
    ASSERT_TRUE(sel) << r.text << ": " << sel.error;
    EXPECT_EQ(sel.value->how, r.how) << r.text;
    EXPECT_EQ(sel.value->n, r.n) << r.text;
    EXPECT_EQ(sel.value->millionths, r.millionths) << r.text;
  }
  auto at = parse_selector("@1500ms", true);
  ASSERT_TRUE(at) << at.error;
  EXPECT_EQ(at.value->how, m::at_time);
  EXPECT_EQ(at.value->at, 1500ms);
  EXPECT_EQ(parse_selector("@3", true).value->how, m::nth);
  auto refused = parse_selector("@1500ms", false);
  EXPECT_FALSE(refused);
  EXPECT_NE(refused.error.find("for outage only"), std::string::npos)
    << refused.error;
  for (auto text :
       {"@", "@0", "@-1", "@3++", "/", "/0", "/x", "%", "%0", "%-1", "%101",
        "%1.", "%.5", "%1e2", "3", "#3", "@1.5", "%0.0000001"})
    EXPECT_FALSE(parse_selector(text, true)) << text;
}

TEST(ShimSpecTest, CallSelectorsCountCallsFromOne) {
  auto count = [](const char* text) {
    auto sel = parse_selector(text, false);
    EXPECT_TRUE(sel) << text;
    std::vector<uint64_t> hits;
    for (uint64_t n = 1; n <= 100; ++n)
      if (selects(*sel.value, n, 0, fault_kind::fail, 0))
        hits.push_back(n);
    return hits;
  };
  EXPECT_EQ(count(""), [] {
    std::vector<uint64_t> all(100);
    for (uint64_t i = 0; i < 100; ++i)
      all[i] = i + 1;
    return all;
  }());
  EXPECT_EQ(count("@7"), std::vector<uint64_t>{7});
  EXPECT_EQ(count("@96+"), (std::vector<uint64_t>{96, 97, 98, 99, 100}));
  EXPECT_EQ(count("/25"), (std::vector<uint64_t>{25, 50, 75, 100}));
  EXPECT_EQ(count("/7").size(), 14u);
  EXPECT_EQ(count("%100").size(), 100u);
  EXPECT_TRUE(count("@101").empty());
}

TEST(ShimSpecTest, ChancesAreSeededAndNearTheirRate) {
  constexpr uint64_t calls = 100'000;
  auto hits = [&](uint64_t seed, fault_kind kind, uint32_t millionths) {
    std::vector<uint64_t> out;
    for (uint64_t n = 1; n <= calls; ++n)
      if (chance_hit(seed, kind, index_of("C_Sign"), n, millionths))
        out.push_back(n);
    return out;
  };
  // Binomial(100000, 1 %): mean 1000, standard deviation 31.5.
  auto one_percent = hits(42, fault_kind::fail, 1'000'000);
  EXPECT_GE(one_percent.size(), 900u);
  EXPECT_LE(one_percent.size(), 1100u);
  EXPECT_EQ(hits(42, fault_kind::fail, 1'000'000), one_percent);
  EXPECT_NE(hits(43, fault_kind::fail, 1'000'000), one_percent);
  EXPECT_NE(hits(42, fault_kind::hang, 1'000'000), one_percent);
  // Binomial(100000, 0.1 %): mean 100, standard deviation 10.
  auto tenth = hits(42, fault_kind::fail, 100'000).size();
  EXPECT_GE(tenth, 60u);
  EXPECT_LE(tenth, 140u);
  EXPECT_EQ(hits(1, fault_kind::outage, all_millionths).size(), calls);
  // Two codes, each about half of the time, always the same for a call.
  std::vector<rv_code> codes{CKR_DEVICE_ERROR, CKR_GENERAL_ERROR};
  size_t device_errors = 0;
  for (uint64_t n = 1; n <= 10'000; ++n) {
    auto code = pick_code(codes, 42, 5, n);
    EXPECT_EQ(code, pick_code(codes, 42, 5, n));
    device_errors += code == CKR_DEVICE_ERROR ? 1 : 0;
  }
  EXPECT_GE(device_errors, 4700u); // mean 5000, standard deviation 50
  EXPECT_LE(device_errors, 5300u);
  EXPECT_EQ(pick_code({CKR_DEVICE_REMOVED}, 42, 5, 1), CKR_DEVICE_REMOVED);
}

TEST(ShimSpecTest, FaultRulesApplyToTheNamedFunctions) {
  auto s = parse_ok("fail=C_Sign:CKR_DEVICE_ERROR|CKR_GENERAL_ERROR%1,"
                    "C_Login:0x80000001@3+;"
                    "hang=C_Sign:@10,C_UnwrapKey:/5 for 30s;"
                    "invalidate=C_SignInit:@50;"
                    "outage=C_Sign:CKR_DEVICE_REMOVED@100 for 5s,"
                    "C_GetTokenInfo:CKR_TOKEN_NOT_PRESENT@2s for 500ms;"
                    "seed=42;counts=/tmp/shim counts");
  const auto& sign_fail = s.fail[index_of("C_Sign")];
  ASSERT_TRUE(sign_fail);
  EXPECT_EQ(sign_fail->codes,
            (std::vector<rv_code>{CKR_DEVICE_ERROR, CKR_GENERAL_ERROR}));
  EXPECT_EQ(sign_fail->when.how, selector::mode::chance);
  EXPECT_EQ(sign_fail->when.millionths, 1'000'000u);
  const auto& login_fail = s.fail[index_of("C_Login")];
  ASSERT_TRUE(login_fail);
  EXPECT_EQ(login_fail->codes, std::vector<rv_code>{CKR_VENDOR_DEFINED + 1});
  EXPECT_EQ(login_fail->when.how, selector::mode::from_nth);
  EXPECT_EQ(login_fail->when.n, 3u);
  EXPECT_FALSE(s.fail[index_of("C_SignInit")]);
  const auto& sign_hang = s.hang[index_of("C_Sign")];
  ASSERT_TRUE(sign_hang);
  EXPECT_EQ(sign_hang->when.how, selector::mode::nth);
  EXPECT_EQ(sign_hang->bound, std::nullopt);
  const auto& unwrap_hang = s.hang[index_of("C_UnwrapKey")];
  ASSERT_TRUE(unwrap_hang);
  EXPECT_EQ(unwrap_hang->when.how, selector::mode::every_nth);
  EXPECT_EQ(unwrap_hang->bound, 30s);
  ASSERT_TRUE(s.invalidate[index_of("C_SignInit")]);
  EXPECT_EQ(s.invalidate[index_of("C_SignInit")]->when.n, 50u);
  EXPECT_FALSE(s.invalidate[index_of("C_Sign")]);
  const auto& sign_outage = s.outage[index_of("C_Sign")];
  ASSERT_TRUE(sign_outage);
  EXPECT_EQ(sign_outage->code, CKR_DEVICE_REMOVED);
  EXPECT_EQ(sign_outage->when.n, 100u);
  EXPECT_EQ(sign_outage->length, 5s);
  const auto& timed = s.outage[index_of("C_GetTokenInfo")];
  ASSERT_TRUE(timed);
  EXPECT_EQ(timed->when.how, selector::mode::at_time);
  EXPECT_EQ(timed->when.at, 2s);
  EXPECT_EQ(timed->length, 500ms);
  EXPECT_EQ(s.seed, 42u);
  EXPECT_EQ(s.counts, "/tmp/shim counts");
  EXPECT_TRUE(s.injects_faults());
  EXPECT_FALSE(s.forwards_at_once());
}

TEST(ShimSpecTest, StarGivesEveryOtherFunctionItsOwnRule) {
  auto s = parse_ok("fail=*:CKR_DEVICE_ERROR%1,C_Initialize:none,"
                    "C_Finalize:none,C_Login:CKR_PIN_LOCKED");
  EXPECT_FALSE(s.fail[index_of("C_Initialize")]);
  EXPECT_FALSE(s.fail[index_of("C_Finalize")]);
  EXPECT_EQ(s.fail[index_of("C_Login")]->codes,
            std::vector<rv_code>{CKR_PIN_LOCKED});
  for (auto name : {"C_Sign", "C_OpenSession", "C_WaitForSlotEvent"}) {
    ASSERT_TRUE(s.fail[index_of(name)]) << name;
    EXPECT_EQ(s.fail[index_of(name)]->when.millionths, 1'000'000u) << name;
  }
}

TEST(ShimSpecTest, SettingsAloneInjectNothing) {
  auto seeded = parse_ok("seed=7");
  EXPECT_EQ(seeded.seed, 7u);
  EXPECT_FALSE(seeded.injects_faults());
  EXPECT_TRUE(seeded.forwards_at_once());
  auto counted = parse_ok("counts=/tmp/c");
  EXPECT_FALSE(counted.injects_faults());
  EXPECT_FALSE(counted.forwards_at_once()); // it writes the file
  EXPECT_FALSE(parse_ok("fail=*:none").injects_faults());
}

TEST(ShimSpecTest, ASpecFileTakesLinesAndComments) {
  auto text = spec_text_from_file("# the signing path of a flaky HSM\n"
                                  "delay=C_Sign:1ms   # slow\n"
                                  "\n"
                                  "  fail=C_Sign:CKR_DEVICE_ERROR@3\r\n"
                                  "seed=5;counts=/tmp/c\n"
                                  "#fail=C_Login:CKR_PIN_LOCKED\n");
  EXPECT_EQ(parse_ok(text), parse_ok("delay=C_Sign:1ms;"
                                     "fail=C_Sign:CKR_DEVICE_ERROR@3;seed=5;"
                                     "counts=/tmp/c"));
  EXPECT_EQ(spec_text_from_file("# nothing\n\n"), "");
}

TEST(ShimSpecTest, TheReadmeExamplesParse) {
  std::ifstream in{HSM_SHIM_README};
  ASSERT_TRUE(in) << HSM_SHIM_README;
  std::stringstream all;
  all << in.rdbuf();
  auto text = all.str();
  // Every HSM_SHIM_SPEC='...' on a line of its own.
  size_t examples = 0;
  for (size_t pos = text.find("\nHSM_SHIM_SPEC='"); pos != std::string::npos;
       pos = text.find("\nHSM_SHIM_SPEC='", pos + 1)) {
    auto start = pos + std::string_view{"\nHSM_SHIM_SPEC='"}.size();
    auto spec = text.substr(start, text.find('\'', start) - start);
    auto parsed = parse_spec(spec);
    EXPECT_TRUE(parsed) << spec << ": " << parsed.error;
    ++examples;
  }
  EXPECT_GE(examples, 9u);
  // The spec file example.
  auto file = text.find("# staging: a flaky network HSM");
  ASSERT_NE(file, std::string::npos);
  auto body = text.substr(file, text.find("```", file) - file);
  auto parsed = parse_spec(spec_text_from_file(body));
  ASSERT_TRUE(parsed) << body << ": " << parsed.error;
  EXPECT_EQ(parsed.value->seed, 7u);
  EXPECT_TRUE(parsed.value->outage[index_of("C_Sign")]);
}

// -- set-up errors, each in a fresh process
// ------------------------------------

std::string softhsm_module() {
  if (const char* m = std::getenv("SOFTHSM2_MODULE"))
    return m;
  return "/usr/lib/softhsm/libsofthsm2.so";
}

/// Points SOFTHSM2_CONF at a new configuration keeping tokens in `dir`.
void use_softhsm_dir(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir / "tokens");
  auto conf = dir / "softhsm2.conf";
  std::ofstream{conf} << "directories.tokendir = " << (dir / "tokens").string()
                      << "\nobjectstore.backend = file\nlog.level = ERROR\n"
                      << "slots.removable = false\n";
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
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
[[noreturn]] void initialize_and_exit(const char* module, const char* spec,
                                      const char* spec_file = nullptr) {
  set_or_unset("HSM_SHIM_MODULE", module);
  set_or_unset("HSM_SHIM_SPEC", spec);
  set_or_unset("HSM_SHIM_SPEC_FILE", spec_file);
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

TEST_F(ShimSetUpDeathTest, ASpecInBothPlacesFailsInitialize) {
  auto module = softhsm_module();
  EXPECT_EXIT(initialize_and_exit(module.c_str(), "delay=C_Sign:1ms",
                                  "/nonexistent/spec"),
              ::testing::ExitedWithCode(arguments_bad),
              "HSM_SHIM_SPEC and HSM_SHIM_SPEC_FILE are both set");
}

TEST_F(ShimSetUpDeathTest, AnUnreadableSpecFileFailsInitialize) {
  auto module = softhsm_module();
  EXPECT_EXIT(initialize_and_exit(module.c_str(), nullptr,
                                  "/nonexistent/shim-spec"),
              ::testing::ExitedWithCode(arguments_bad),
              "cannot read HSM_SHIM_SPEC_FILE=/nonexistent/shim-spec: No such");
}

/// Writes `text` to a fresh file; returns its path.
std::string temp_file(std::string_view text) {
  char path[] = "/tmp/hsm-shim-spec-XXXXXX";
  int fd = ::mkstemp(path);
  if (fd < 0)
    return "/nonexistent/mkstemp-failed";
  ::close(fd);
  std::ofstream{path} << text;
  return path;
}

TEST_F(ShimSetUpDeathTest, ABadSpecFileFailsInitializeNamingTheFile) {
  auto module = softhsm_module();
  EXPECT_EXIT(
    {
      auto file = temp_file("# comment\nfail=C_Sign:CKR_DEVICE_EROR\n");
      ::setenv("HSM_SHIM_MODULE", module.c_str(), 1);
      ::unsetenv("HSM_SHIM_SPEC");
      ::setenv("HSM_SHIM_SPEC_FILE", file.c_str(), 1);
      auto* list = shim_function_list(); // reads the file, once
      std::filesystem::remove(file);
      CK_C_INITIALIZE_ARGS args{};
      args.flags = CKF_OS_LOCKING_OK;
      std::_Exit(list == nullptr ? 100
                                 : static_cast<int>(list->C_Initialize(&args)));
    },
    ::testing::ExitedWithCode(arguments_bad),
    "bad HSM_SHIM_SPEC_FILE=/tmp/hsm-shim-spec-.*unknown CK_RV "
    "\"CKR_DEVICE_EROR\"");
}

TEST_F(ShimSetUpDeathTest, AnUnwritableCountsFileFailsInitialize) {
  auto module = softhsm_module();
  EXPECT_EXIT(initialize_and_exit(module.c_str(),
                                  "counts=/nonexistent/dir/counts"),
              ::testing::ExitedWithCode(arguments_bad),
              "cannot write the counts file /nonexistent/dir/counts");
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
    use_softhsm_dir(*dir_);
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

// -- faults over SoftHSMv2, each scenario in a fresh process
// -------------------

constexpr std::string_view fault_label = "shim-fault";

/// A fault scenario's token and the shim loaded over it.
struct fault_rig {
  /// The scenario's folder: SoftHSMv2's configuration and tokens, the spec
  /// file, the counts file.
  std::filesystem::path dir;
  /// The shim's function list.
  CK_FUNCTION_LIST* p11 = nullptr;
  /// SoftHSMv2's own list, to look behind the shim.
  CK_FUNCTION_LIST* real = nullptr;
  /// Taken just before the shim loaded (the origin of `@T` is later).
  std::chrono::steady_clock::time_point before_load;
  CK_SLOT_ID slot = 0;
  /// A session logged in as the user.
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  /// A session HMAC-SHA256 key (signs in microseconds).
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;

  std::filesystem::path counts_path() const {
    return dir / "counts";
  }
};

CK_FUNCTION_LIST* softhsm_function_list() {
  void* handle = ::dlopen(softhsm_module().c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr)
    return nullptr;
  void* sym = ::dlsym(handle, "C_GetFunctionList");
  if (sym == nullptr)
    return nullptr;
  CK_C_GetFunctionList get_list = nullptr;
  std::memcpy(&get_list, &sym, sizeof(sym));
  CK_FUNCTION_LIST* list = nullptr;
  if (get_list(&list) != CKR_OK)
    return nullptr;
  return list;
}

CK_RV login(const fault_rig& rig, CK_SESSION_HANDLE session) {
  std::vector<CK_UTF8CHAR> pin(user_pin.begin(), user_pin.end());
  return rig.p11->C_Login(session, CKU_USER, pin.data(),
                          static_cast<CK_ULONG>(pin.size()));
}

CK_RV open_session(const fault_rig& rig, CK_SESSION_HANDLE* session) {
  return rig.p11->C_OpenSession(rig.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                nullptr, nullptr, session);
}

/// C_SignInit then C_Sign (HMAC-SHA256 of 32 bytes): the first CK_RV that
/// is not CKR_OK, else CKR_OK.
CK_RV sign(const fault_rig& rig, CK_SESSION_HANDLE session) {
  CK_MECHANISM mech{CKM_SHA256_HMAC, nullptr, 0};
  if (auto rv = rig.p11->C_SignInit(session, &mech, rig.key); rv != CKR_OK)
    return rv;
  std::array<CK_BYTE, 32> data{};
  std::array<CK_BYTE, 64> mac{};
  CK_ULONG len = mac.size();
  return rig.p11->C_Sign(session, data.data(), data.size(), mac.data(), &len);
}

CK_RV random_bytes(const fault_rig& rig, CK_SESSION_HANDLE session) {
  std::array<CK_BYTE, 16> out{};
  return rig.p11->C_GenerateRandom(session, out.data(), out.size());
}

CK_RV token_info(const fault_rig& rig) {
  CK_TOKEN_INFO info{};
  return rig.p11->C_GetTokenInfo(rig.slot, &info);
}

/// The counts file as "<kind> <function>" -> count; "seed" -> the seed.
std::map<std::string, uint64_t> read_counts(const fault_rig& rig) {
  std::map<std::string, uint64_t> out;
  std::ifstream in{rig.counts_path()};
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line.front() == '#')
      continue;
    std::istringstream words{line};
    std::string kind;
    std::string function;
    uint64_t n = 0;
    if (words >> kind && kind == "seed" && words >> n)
      out["seed"] = n;
    else if (words >> function >> n)
      out[kind + " " + function] = n;
    else
      ADD_FAILURE() << "bad counts line: " << line;
  }
  return out;
}

/// `read_counts` without the seed.
std::map<std::string, uint64_t> faults_of(const fault_rig& rig) {
  auto out = read_counts(rig);
  out.erase("seed");
  return out;
}

/// Makes the token through SoftHSMv2 itself, so that the shim sees only
/// the scenario's calls; finalises it again.
void make_fault_token(const std::filesystem::path& dir) {
  use_softhsm_dir(dir);
  auto direct = pkcs11::module::load(softhsm_module());
  ASSERT_TRUE(direct) << describe(direct.error());
  pkcs11::secret_pin so{so_pin};
  pkcs11::secret_pin user{user_pin};
  auto err = pkcs11::init_token(*direct, fault_label, so, user);
  ASSERT_FALSE(err) << describe(err);
}

/// Loads the shim over a fresh token with `spec_text` plus a counts file
/// (in HSM_SHIM_SPEC, or a spec file), logs in, makes the key.
void open_rig(fault_rig& rig, std::string_view spec_text, bool in_file) {
  char dir_template[] = "/tmp/hsm-shim-fault-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  rig.dir = dir_template;
  ASSERT_NO_FATAL_FAILURE(make_fault_token(rig.dir));
  ::setenv("HSM_SHIM_MODULE", softhsm_module().c_str(), 1);
  if (in_file) {
    auto file = rig.dir / "spec";
    std::ofstream{file} << spec_text
                        << "\ncounts=" << rig.counts_path().string() << "\n";
    ::unsetenv("HSM_SHIM_SPEC");
    ::setenv("HSM_SHIM_SPEC_FILE", file.c_str(), 1);
  } else {
    auto text = std::string{spec_text}
                + ";counts=" + rig.counts_path().string();
    ::setenv("HSM_SHIM_SPEC", text.c_str(), 1);
    ::unsetenv("HSM_SHIM_SPEC_FILE");
  }
  rig.before_load = std::chrono::steady_clock::now();
  rig.p11 = shim_function_list();
  ASSERT_NE(rig.p11, nullptr);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  ASSERT_EQ(rig.p11->C_Initialize(&args), CKR_OK);
  rig.real = softhsm_function_list();
  ASSERT_NE(rig.real, nullptr);
  CK_ULONG count = 0;
  ASSERT_EQ(rig.p11->C_GetSlotList(CK_TRUE, nullptr, &count), CKR_OK);
  std::vector<CK_SLOT_ID> slots(count);
  ASSERT_EQ(rig.p11->C_GetSlotList(CK_TRUE, slots.data(), &count), CKR_OK);
  bool found = false;
  for (auto slot : slots) {
    CK_TOKEN_INFO info{};
    ASSERT_EQ(rig.p11->C_GetTokenInfo(slot, &info), CKR_OK);
    if (pkcs11::trim_padded(info.label, sizeof(info.label)) == fault_label) {
      rig.slot = slot;
      found = true;
    }
  }
  ASSERT_TRUE(found) << "no token " << fault_label;
  ASSERT_EQ(open_session(rig, &rig.session), CKR_OK);
  ASSERT_EQ(login(rig, rig.session), CKR_OK);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_ULONG size = 32;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  std::array<CK_ATTRIBUTE, 5> tmpl{{
    {CKA_CLASS, &cls, sizeof(cls)},
    {CKA_KEY_TYPE, &type, sizeof(type)},
    {CKA_VALUE_LEN, &size, sizeof(size)},
    {CKA_SIGN, &yes, sizeof(yes)},
    {CKA_TOKEN, &no, sizeof(no)},
  }};
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  ASSERT_EQ(rig.p11->C_GenerateKey(rig.session, &gen, tmpl.data(),
                                   static_cast<CK_ULONG>(tmpl.size()),
                                   &rig.key),
            CKR_OK);
}

bool any_failed(const ::testing::TestPartResultArray& results) {
  for (int i = 0; i < results.size(); ++i)
    if (results.GetTestPartResult(i).failed())
      return true;
  return false;
}

/// Runs `body` over a fresh token and the shim with `spec_text` and a counts
/// file, in this process (a death-test child: the shim reads its spec once
/// per process). Exits 0 if every expectation held; else prints each
/// failure on stderr (the parent shows it) and exits 1.
template <class Body>
[[noreturn]] void run_scenario(std::string_view spec_text, Body body,
                               bool spec_in_file = false) {
  ::testing::TestPartResultArray results;
  std::filesystem::path dir;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter{
      ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ALL_THREADS,
      &results};
    fault_rig rig;
    open_rig(rig, spec_text, spec_in_file);
    dir = rig.dir;
    if (!any_failed(results))
      body(rig);
  }
  for (int i = 0; i < results.size(); ++i) {
    const auto& r = results.GetTestPartResult(i);
    if (r.failed())
      std::fprintf(stderr, "%s:%d: %s\n",
                   r.file_name() != nullptr ? r.file_name() : "?",
                   r.line_number(), r.message());
  }
  std::error_code ec;
  if (!dir.empty())
    std::filesystem::remove_all(dir, ec);
  std::_Exit(any_failed(results) ? 1 : 0);
}

/// Each test runs its scenario in a fresh process (a death test in the
/// threadsafe style: the test binary re-executed) and expects exit code 0.
class ShimFaultDeathTest : public ::testing::Test {
protected:
  void SetUp() override {
    if (!std::filesystem::exists(softhsm_module()))
      GTEST_SKIP() << "SoftHSMv2 not found at " << softhsm_module();
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
};

using counts_map = std::map<std::string, uint64_t>;

TEST_F(ShimFaultDeathTest, ACertainFailIsReturnedAndEndsTheOperation) {
  auto body = [](fault_rig& rig) {
    for (int i = 0; i < 20; ++i)
      // sign() returns C_SignInit's CKR_OPERATION_ACTIVE if the real module
      // still had the previous operation open.
      EXPECT_EQ(sign(rig, rig.session), CKR_DEVICE_ERROR) << "sign " << i;
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    EXPECT_EQ(token_info(rig), CKR_OK);
    auto counts = read_counts(rig);
    EXPECT_EQ(counts.count("seed"), 1u); // drawn at load, written down
    counts.erase("seed");
    EXPECT_EQ(counts, (counts_map{{"fail C_Sign", 20}}));
  };
  EXPECT_EXIT(run_scenario("fail=C_Sign:CKR_DEVICE_ERROR%100", body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, CallCountsSelectExactlyTheNamedCalls) {
  auto body = [](fault_rig& rig) {
    std::vector<uint64_t> failed;
    for (uint64_t n = 1; n <= 100; ++n)
      if (auto rv = sign(rig, rig.session); rv != CKR_OK) {
        EXPECT_EQ(rv, CKR_GENERAL_ERROR) << "sign " << n;
        failed.push_back(n);
      }
    std::vector<uint64_t> sevenths;
    for (uint64_t n = 7; n <= 100; n += 7)
      sevenths.push_back(n);
    EXPECT_EQ(failed, sevenths);
    for (uint64_t n = 1; n <= 10; ++n)
      EXPECT_EQ(random_bytes(rig, rig.session),
                n >= 5 ? CKR_DEVICE_MEMORY : CKR_OK)
        << "call " << n;
    for (uint64_t n = 1; n <= 5; ++n) {
      CK_SESSION_INFO info{};
      EXPECT_EQ(rig.p11->C_GetSessionInfo(rig.session, &info),
                n == 3 ? CKR_FUNCTION_FAILED : CKR_OK)
        << "call " << n;
    }
    EXPECT_EQ(faults_of(rig), (counts_map{{"fail C_Sign", 14},
                                          {"fail C_GenerateRandom", 6},
                                          {"fail C_GetSessionInfo", 1}}));
  };
  EXPECT_EXIT(run_scenario("fail=C_Sign:CKR_GENERAL_ERROR/7,"
                           "C_GenerateRandom:CKR_DEVICE_MEMORY@5+,"
                           "C_GetSessionInfo:CKR_FUNCTION_FAILED@3",
                           body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, OnePercentIsSeededAndNearItsRate) {
  auto body = [](fault_rig& rig) {
    constexpr uint64_t calls = 2000;
    const std::vector<rv_code> codes{CKR_DEVICE_ERROR,
                                     CKR_SESSION_HANDLE_INVALID};
    auto sign_index = index_of("C_Sign");
    std::vector<uint64_t> failed;
    std::map<CK_RV, uint64_t> by_code;
    for (uint64_t n = 1; n <= calls; ++n)
      if (auto rv = sign(rig, rig.session); rv != CKR_OK) {
        EXPECT_EQ(rv, pick_code(codes, 42, sign_index, n)) << "sign " << n;
        failed.push_back(n);
        ++by_code[rv];
      }
    // The seed decides: exactly the calls the spec's hash picks.
    std::vector<uint64_t> expected;
    for (uint64_t n = 1; n <= calls; ++n)
      if (chance_hit(42, fault_kind::fail, sign_index, n, 1'000'000))
        expected.push_back(n);
    EXPECT_EQ(failed, expected);
    // Binomial(2000, 1 %): mean 20, standard deviation 4.4.
    EXPECT_GE(failed.size(), 6u);
    EXPECT_LE(failed.size(), 34u);
    EXPECT_GT(by_code[CKR_DEVICE_ERROR], 0u);
    EXPECT_GT(by_code[CKR_SESSION_HANDLE_INVALID], 0u);
    auto counts = read_counts(rig);
    EXPECT_EQ(counts["seed"], 42u);
    EXPECT_EQ(counts["fail C_Sign"], failed.size());
  };
  EXPECT_EXIT(
    run_scenario(
      "seed=42;fail=C_Sign:CKR_DEVICE_ERROR|CKR_SESSION_HANDLE_INVALID%1",
      body),
    ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, ThreadsShareTheCallCountAndTheSeed) {
  auto body = [](fault_rig& rig) {
    constexpr int threads = 4;
    constexpr int per_thread = 500;
    std::vector<CK_SESSION_HANDLE> sessions(threads);
    for (auto& s : sessions)
      ASSERT_EQ(open_session(rig, &s), CKR_OK);
    std::atomic<uint64_t> failed{0};
    std::atomic<uint64_t> unexpected{0};
    std::vector<std::thread> workers;
    for (auto s : sessions)
      workers.emplace_back([&, s] {
        for (int i = 0; i < per_thread; ++i) {
          auto rv = sign(rig, s);
          if (rv == CKR_DEVICE_ERROR)
            ++failed;
          else if (rv != CKR_OK)
            ++unexpected;
        }
      });
    for (auto& w : workers)
      w.join();
    // Whichever thread makes call n, the seed decides whether it fails:
    // the number of failures is that of one thread making all calls.
    uint64_t expected = 0;
    for (uint64_t n = 1; n <= threads * per_thread; ++n)
      if (chance_hit(7, fault_kind::fail, index_of("C_Sign"), n, 2'000'000))
        ++expected;
    EXPECT_EQ(unexpected.load(), 0u);
    EXPECT_EQ(failed.load(), expected);
    EXPECT_EQ(faults_of(rig), (counts_map{{"fail C_Sign", expected}}));
  };
  EXPECT_EXIT(run_scenario("seed=7;fail=C_Sign:CKR_DEVICE_ERROR%2", body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, InvalidationLosesEverySessionOpenedBefore) {
  auto body = [](fault_rig& rig) {
    CK_SESSION_HANDLE other = CK_INVALID_HANDLE;
    ASSERT_EQ(open_session(rig, &other), CKR_OK);
    EXPECT_EQ(sign(rig, rig.session), CKR_OK);
    EXPECT_EQ(sign(rig, other), CKR_OK);
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    // The 3rd C_GenerateRandom loses every session, its own included.
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_SESSION_HANDLE_INVALID);
    EXPECT_EQ(sign(rig, other), CKR_SESSION_HANDLE_INVALID);
    CK_SESSION_INFO info{};
    EXPECT_EQ(rig.p11->C_GetSessionInfo(rig.session, &info),
              CKR_SESSION_HANDLE_INVALID);
    // Behind the shim the session stays open until its owner closes it.
    EXPECT_EQ(rig.real->C_GetSessionInfo(rig.session, &info), CKR_OK);
    // A session opened afterwards works (SoftHSMv2 keeps the login while
    // the lost sessions are open behind the shim).
    CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
    ASSERT_EQ(open_session(rig, &fresh), CKR_OK);
    auto rv = login(rig, fresh);
    EXPECT_TRUE(rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN)
      << pkcs11::rv_name(rv);
    EXPECT_EQ(sign(rig, fresh), CKR_OK);
    EXPECT_EQ(random_bytes(rig, fresh), CKR_OK); // the 4th: no invalidation
    // Closing a lost session closes the real one.
    EXPECT_EQ(rig.p11->C_CloseSession(rig.session), CKR_SESSION_HANDLE_INVALID);
    EXPECT_EQ(rig.real->C_GetSessionInfo(rig.session, &info),
              CKR_SESSION_HANDLE_INVALID);
    EXPECT_EQ(rig.p11->C_CloseSession(other), CKR_SESSION_HANDLE_INVALID);
    EXPECT_EQ(rig.p11->C_CloseSession(fresh), CKR_OK);
    EXPECT_EQ(faults_of(rig), (counts_map{
                                {"invalidate C_GenerateRandom", 1},
                                {"session_invalid C_CloseSession", 2},
                                {"session_invalid C_GetSessionInfo", 1},
                                {"session_invalid C_SignInit", 1},
                                {"session_invalid C_GenerateRandom", 1},
                              }));
  };
  EXPECT_EXIT(run_scenario("invalidate=C_GenerateRandom:@3", body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, AnOutageFailsEveryCallUntilItEnds) {
  auto body = [](fault_rig& rig) {
    using clock = std::chrono::steady_clock;
    for (int i = 1; i <= 4; ++i)
      ASSERT_EQ(sign(rig, rig.session), CKR_OK) << "sign " << i;
    auto start = clock::now();
    EXPECT_EQ(sign(rig, rig.session), CKR_DEVICE_REMOVED); // starts it
    // Every function, on any session or slot (2 s: a slow machine still
    // makes these calls inside the window).
    uint64_t token_info_failures = 0;
    EXPECT_EQ(token_info(rig), CKR_DEVICE_REMOVED);
    ++token_info_failures;
    CK_SESSION_HANDLE other = CK_INVALID_HANDLE;
    EXPECT_EQ(open_session(rig, &other), CKR_DEVICE_REMOVED);
    EXPECT_EQ(sign(rig, rig.session), CKR_DEVICE_REMOVED); // C_SignInit
    CK_RV rv = CKR_OK;
    while ((rv = token_info(rig)) != CKR_OK) {
      EXPECT_EQ(rv, CKR_DEVICE_REMOVED);
      ++token_info_failures;
      ASSERT_LT(clock::now() - start, 30s) << "the outage does not end";
      std::this_thread::sleep_for(20ms);
    }
    EXPECT_GE(clock::now() - start, 2s);
    // The session outlived the outage; the 5th C_Sign ended its operation.
    EXPECT_EQ(sign(rig, rig.session), CKR_OK);
    EXPECT_EQ(faults_of(rig),
              (counts_map{{"outage C_Sign", 1},
                          {"outage C_SignInit", 1},
                          {"outage C_OpenSession", 1},
                          {"outage C_GetTokenInfo", token_info_failures}}));
  };
  EXPECT_EXIT(run_scenario("outage=C_Sign:CKR_DEVICE_REMOVED@5 for 2s", body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, AnOutageAndAnInvalidationOnOneCallBothHappen) {
  auto body = [](fault_rig& rig) {
    using clock = std::chrono::steady_clock;
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    auto start = clock::now();
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_DEVICE_REMOVED);
    uint64_t token_info_failures = 0;
    while (token_info(rig) != CKR_OK) {
      ++token_info_failures;
      ASSERT_LT(clock::now() - start, 30s) << "the outage does not end";
      std::this_thread::sleep_for(20ms);
    }
    EXPECT_GE(clock::now() - start, 300ms);
    // After the reboot the old session is gone, a new one works.
    EXPECT_EQ(sign(rig, rig.session), CKR_SESSION_HANDLE_INVALID);
    CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
    ASSERT_EQ(open_session(rig, &fresh), CKR_OK);
    EXPECT_EQ(sign(rig, fresh), CKR_OK);
    EXPECT_EQ(faults_of(rig),
              (counts_map{{"invalidate C_GenerateRandom", 1},
                          {"outage C_GenerateRandom", 1},
                          {"outage C_GetTokenInfo", token_info_failures},
                          {"session_invalid C_SignInit", 1}}));
  };
  EXPECT_EXIT(run_scenario("outage=C_GenerateRandom:CKR_DEVICE_REMOVED@2 for "
                           "300ms;invalidate=C_GenerateRandom:@2",
                           body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, ATimedOutageStartsAndEndsOnTheClock) {
  auto body = [](fault_rig& rig) {
    using clock = std::chrono::steady_clock;
    auto since_load = [&] { return clock::now() - rig.before_load; };
    ASSERT_LT(since_load(), 1500ms) << "set-up too slow for this test";
    EXPECT_EQ(token_info(rig), CKR_OK);
    std::optional<clock::duration> first_failure;
    std::optional<clock::duration> recovery;
    uint64_t failures = 0;
    while (!recovery && since_load() < 30s) {
      auto rv = token_info(rig);
      auto at = since_load();
      if (rv != CKR_OK) {
        EXPECT_EQ(rv, CKR_TOKEN_NOT_PRESENT);
        ++failures;
        if (!first_failure)
          first_failure = at;
      } else if (first_failure) {
        recovery = at;
      }
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_TRUE(first_failure) << "no outage";
    ASSERT_TRUE(recovery) << "the outage does not end";
    EXPECT_GE(*first_failure, 2s);
    EXPECT_GE(*recovery, 2500ms);
    EXPECT_EQ(sign(rig, rig.session), CKR_OK);
    EXPECT_EQ(faults_of(rig),
              (counts_map{{"outage C_GetTokenInfo", failures}}));
  };
  EXPECT_EXIT(run_scenario("outage=*:CKR_TOKEN_NOT_PRESENT@2s for 500ms", body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, AHangBlocksForItsBoundOrUntilExit) {
  auto body = [](fault_rig& rig) {
    using clock = std::chrono::steady_clock;
    auto start = clock::now();
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK); // held 300 ms
    EXPECT_GE(clock::now() - start, 300ms);
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK); // the 2nd: no hang
    EXPECT_EQ(sign(rig, rig.session), CKR_OK);         // C_Sign #1
    CK_SESSION_HANDLE other = CK_INVALID_HANDLE;
    ASSERT_EQ(open_session(rig, &other), CKR_OK);
    // C_Sign #2 never returns; the thread is left behind at exit.
    auto returned = std::make_shared<std::atomic<bool>>(false);
    std::thread{[rig, other, returned] {
      (void) sign(rig, other);
      returned->store(true);
    }}.detach();
    auto waited = clock::now();
    while (faults_of(rig)["hang C_Sign"] == 0 && clock::now() - waited < 30s)
      std::this_thread::sleep_for(10ms);
    EXPECT_EQ(faults_of(rig)["hang C_Sign"], 1u);
    std::this_thread::sleep_for(300ms);
    EXPECT_FALSE(returned->load());
    // No lock is held while a call hangs: other sessions go on.
    EXPECT_EQ(sign(rig, rig.session), CKR_OK); // C_Sign #3
    EXPECT_FALSE(returned->load());
    EXPECT_EQ(faults_of(rig),
              (counts_map{{"hang C_GenerateRandom", 1}, {"hang C_Sign", 1}}));
  };
  EXPECT_EXIT(run_scenario("hang=C_Sign:@2,C_GenerateRandom:@1 for 300ms",
                           body),
              ::testing::ExitedWithCode(0), "");
}

TEST_F(ShimFaultDeathTest, ASpecFileIsReadLikeTheVariable) {
  auto body = [](fault_rig& rig) {
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_DEVICE_ERROR);
    EXPECT_EQ(random_bytes(rig, rig.session), CKR_OK);
    auto counts = read_counts(rig);
    EXPECT_EQ(counts["seed"], 9u);
    counts.erase("seed");
    EXPECT_EQ(counts, (counts_map{{"fail C_GenerateRandom", 1}}));
  };
  EXPECT_EXIT(run_scenario("# a flaky random number generator\n"
                           "fail=C_GenerateRandom:CKR_DEVICE_ERROR@2  # 2nd\n"
                           "seed=9",
                           body, true),
              ::testing::ExitedWithCode(0), "");
}

} // namespace
} // namespace hsm::shim
