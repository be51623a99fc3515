#include "messages/errors.hpp"

#include <gtest/gtest.h>

#include "caf/sec.hpp"

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

TEST(ErrorsTest, RetryableAndFatalPerClass) {
  struct row {
    caf::error err;
    bool retryable;
    bool fatal;
    const char* wire;
  };
  const row rows[] = {
    {caf::make_error(hsm_errc::retryable), true, false, "hsm_unavailable"},
    {caf::make_error(hsm_errc::reopen_session), true, false,
     "hsm_unavailable"},
    {caf::make_error(hsm_errc::reinit_module), true, false,
     "hsm_unavailable"},
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
