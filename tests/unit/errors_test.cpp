#include "messages/errors.hpp"

#include "caf/sec.hpp"
#include <gtest/gtest.h>

namespace hsm {
namespace {

TEST(ErrorsTest, DescribeNamesClassFunctionAndCkr) {
  auto err = caf::make_error(hsm_errc::reopen_session, std::string{"C_Sign"},
                             std::string{"CKR_SESSION_CLOSED"});
  EXPECT_EQ(describe(err), "hsm: reopen_session (C_Sign: CKR_SESSION_CLOSED)");
  EXPECT_EQ(describe(caf::error{}), "ok");
  EXPECT_EQ(describe(caf::make_error(key_errc::unknown_key)),
            "key: unknown_key");
}

TEST(ErrorsTest, DescribeLeavesOutTheNumericCkr) {
  // The context rv_error makes: (function, CKR name, CK_RV as uint64_t).
  auto err = caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                             std::string{"CKR_PIN_INCORRECT"}, uint64_t{0xA0});
  EXPECT_EQ(describe(err), "hsm: fatal (C_Login: CKR_PIN_INCORRECT)");
  auto wrapped = caf::make_error(key_errc::key_corrupted,
                                 std::string{"the token cannot unwrap the key"},
                                 std::string{"C_UnwrapKey"},
                                 std::string{"CKR_WRAPPED_KEY_INVALID"},
                                 uint64_t{0x110});
  EXPECT_EQ(describe(wrapped),
            "key: key_corrupted (the token cannot unwrap the key: "
            "C_UnwrapKey: CKR_WRAPPED_KEY_INVALID)");
}

TEST(ErrorsTest, SessionFailurePerValue) {
  struct row {
    caf::error err;
    bool session_failure;
  };
  const row rows[] = {
    {caf::make_error(hsm_errc::retryable), true},
    {caf::make_error(hsm_errc::reopen_session), true},
    {caf::make_error(hsm_errc::reinit_module), true},
    {caf::make_error(hsm_errc::fatal), false},
    {caf::make_error(hsm_errc::reopen_session, std::string{"C_Sign"},
                     std::string{"CKR_SESSION_CLOSED"}, uint64_t{0xB0}),
     true},
    {caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                     std::string{"CKR_PIN_INCORRECT"}, uint64_t{0xA0}),
     false},
    {caf::make_error(caf::sec::request_timeout), true},
    {caf::make_error(caf::sec::request_receiver_down), true},
    {caf::make_error(caf::sec::runtime_error), false},
    {caf::make_error(caf::sec::unexpected_message), false},
    {caf::make_error(key_errc::unknown_key), false},
    {caf::make_error(key_errc::key_corrupted), false},
    {caf::make_error(store_errc::unavailable), false},
    {caf::make_error(store_errc::query_failed), false},
    {caf::make_error(config_errc::invalid_option), false},
    {caf::make_error(net_errc::unreachable), false},
    {caf::error{}, false},
  };
  for (auto& r : rows)
    EXPECT_EQ(is_session_failure(r.err), r.session_failure) << describe(r.err);
}

TEST(ErrorsTest, RetryableAndFatalPerClass) {
  struct row {
    caf::error err;
    bool retryable;
    bool fatal;
    const char* wire;
  };
  const row rows[] = {
    {caf::make_error(hsm_errc::retryable), true, false, "hsm_unavailable"},
    {caf::make_error(hsm_errc::reopen_session), true, false, "hsm_unavailable"},
    {caf::make_error(hsm_errc::reinit_module), true, false, "hsm_unavailable"},
    {caf::make_error(hsm_errc::fatal), false, true, "hsm_error"},
    {caf::make_error(key_errc::unknown_key), false, false, "unknown_key"},
    {caf::make_error(key_errc::invalid_payload), false, false,
     "invalid_payload"},
    {caf::make_error(key_errc::signature_mismatch), false, false,
     "signature_mismatch"},
    {caf::make_error(store_errc::unavailable), true, false,
     "store_unavailable"},
    {caf::make_error(store_errc::schema_too_new), false, false,
     "store_unavailable"},
    {caf::make_error(config_errc::invalid_option), false, false,
     "config_error"},
    {caf::make_error(caf::sec::request_timeout), false, false, "internal"},
  };
  for (auto& r : rows) {
    EXPECT_EQ(is_retryable(r.err), r.retryable) << describe(r.err);
    EXPECT_EQ(is_fatal(r.err), r.fatal) << describe(r.err);
    EXPECT_EQ(wire_code(r.err), r.wire) << describe(r.err);
  }
}

TEST(ErrorsTest, EveryCodeHasAName) {
  for (uint8_t i = 1; i <= 4; ++i)
    EXPECT_EQ(to_string(static_cast<hsm_errc>(i)).find("hsm_errc("),
              std::string::npos);
  for (uint8_t i = 1; i <= 8; ++i)
    EXPECT_EQ(to_string(static_cast<key_errc>(i)).find("key_errc("),
              std::string::npos);
  for (uint8_t i = 1; i <= 4; ++i)
    EXPECT_EQ(to_string(static_cast<store_errc>(i)).find("store_errc("),
              std::string::npos);
  for (uint8_t i = 1; i <= 3; ++i)
    EXPECT_EQ(to_string(static_cast<config_errc>(i)).find("config_errc("),
              std::string::npos);
}

} // namespace
} // namespace hsm
