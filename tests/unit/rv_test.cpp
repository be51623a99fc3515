#include "runtime/pkcs11/rv.hpp"

#include "caf/sec.hpp"
#include <gtest/gtest.h>

#include <optional>
#include <string>

namespace hsm::pkcs11 {
namespace {

TEST(RvTest, NamesKnownAndUnknownValues) {
  EXPECT_EQ(rv_name(CKR_OK), "CKR_OK");
  EXPECT_EQ(rv_name(CKR_PIN_INCORRECT), "CKR_PIN_INCORRECT");
  EXPECT_EQ(rv_name(CKR_KEY_NOT_WRAPPABLE), "CKR_KEY_NOT_WRAPPABLE");
  EXPECT_EQ(rv_name(0x12345), "CKR_0x00012345");
  EXPECT_EQ(rv_name(CKR_VENDOR_DEFINED + 7), "CKR_VENDOR_DEFINED+0x7");
}

TEST(RvTest, ClassifiesPerFieldNotes) {
  struct row {
    CK_RV rv;
    hsm_errc cls;
  };
  const row rows[] = {
    {CKR_PIN_INCORRECT, hsm_errc::fatal},
    {CKR_PIN_LOCKED, hsm_errc::fatal},
    {CKR_PIN_EXPIRED, hsm_errc::fatal},
    {CKR_MECHANISM_INVALID, hsm_errc::fatal},
    {CKR_TEMPLATE_INCOMPLETE, hsm_errc::fatal},
    {CKR_KEY_NOT_WRAPPABLE, hsm_errc::fatal},
    {CKR_SESSION_HANDLE_INVALID, hsm_errc::reopen_session},
    {CKR_SESSION_CLOSED, hsm_errc::reopen_session},
    {CKR_DEVICE_ERROR, hsm_errc::reopen_session},
    // Device and module failures of one call: a new session retries.
    {CKR_GENERAL_ERROR, hsm_errc::reopen_session},
    {CKR_FUNCTION_FAILED, hsm_errc::reopen_session},
    // Stale handles after an HSM reconnect: a new session finds keys again.
    {CKR_OBJECT_HANDLE_INVALID, hsm_errc::reopen_session},
    {CKR_KEY_HANDLE_INVALID, hsm_errc::reopen_session},
    // What a request or a blob causes is not retried.
    {CKR_WRAPPED_KEY_INVALID, hsm_errc::fatal},
    {CKR_ENCRYPTED_DATA_INVALID, hsm_errc::fatal},
    {CKR_USER_NOT_LOGGED_IN, hsm_errc::reopen_session},
    {CKR_TOKEN_NOT_PRESENT, hsm_errc::reinit_module},
    {CKR_CRYPTOKI_NOT_INITIALIZED, hsm_errc::reinit_module},
    {CKR_DEVICE_REMOVED, hsm_errc::reinit_module},
    {CKR_DEVICE_MEMORY, hsm_errc::retryable},
    {CKR_FUNCTION_CANCELED, hsm_errc::retryable},
    {CKR_SESSION_COUNT, hsm_errc::retryable},
  };
  for (auto& r : rows)
    EXPECT_EQ(classify(r.rv), r.cls) << rv_name(r.rv);
}

TEST(RvTest, OnlyBlobRefusalsMakeAKeyCorrupted) {
  for (CK_RV rv : {CKR_WRAPPED_KEY_INVALID, CKR_WRAPPED_KEY_LEN_RANGE,
                   CKR_ENCRYPTED_DATA_INVALID, CKR_ENCRYPTED_DATA_LEN_RANGE,
                   CKR_TEMPLATE_INCONSISTENT})
    EXPECT_TRUE(blob_refused(rv)) << rv_name(rv);
  for (CK_RV rv :
       {CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED, CKR_DEVICE_ERROR,
        CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID,
        CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, CKR_HOST_MEMORY})
    EXPECT_FALSE(blob_refused(rv)) << rv_name(rv);
}

TEST(RvTest, SessionLostIsTheSessionOrTokenGoneNotACallFailing) {
  for (CK_RV rv :
       {CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED, CKR_DEVICE_REMOVED,
        CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED})
    EXPECT_TRUE(session_lost(rv)) << rv_name(rv);
  for (CK_RV rv : {CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED, CKR_DEVICE_ERROR,
                   CKR_WRAPPED_KEY_INVALID, CKR_KEY_HANDLE_INVALID})
    EXPECT_FALSE(session_lost(rv)) << rv_name(rv);
}

TEST(RvTest, ErrorCarriesFunctionAndName) {
  auto err = rv_error("C_Login", CKR_PIN_INCORRECT);
  EXPECT_EQ(err, hsm_errc::fatal);
  EXPECT_EQ(describe(err), "hsm: fatal (C_Login: CKR_PIN_INCORRECT)");
  EXPECT_FALSE(is_retryable(err));
}

TEST(RvTest, DescribeShowsNamesButNotTheNumber) {
  EXPECT_EQ(describe(rv_error("C_Sign", CKR_SESSION_CLOSED)),
            "hsm: reopen_session (C_Sign: CKR_SESSION_CLOSED)");
  EXPECT_EQ(describe(rv_error("C_WrapKey", CKR_KEY_NOT_WRAPPABLE)),
            "hsm: fatal (C_WrapKey: CKR_KEY_NOT_WRAPPABLE)");
  EXPECT_EQ(describe(rv_error("C_Sign", 0x12345)),
            "hsm: fatal (C_Sign: CKR_0x00012345)");
}

TEST(RvTest, ErrorKeepsTheNumericValue) {
  const CK_RV values[] = {
    CKR_OK,
    CKR_HOST_MEMORY,
    CKR_PIN_INCORRECT,
    CKR_PIN_LOCKED,
    CKR_SESSION_CLOSED,
    CKR_TOKEN_NOT_PRESENT,
    CKR_KEY_NOT_WRAPPABLE,
    CKR_WRAPPED_KEY_INVALID,
    CKR_FUNCTION_REJECTED,
    0x12345,
    CKR_VENDOR_DEFINED,
    CKR_VENDOR_DEFINED + 7,
  };
  for (auto rv : values) {
    auto err = rv_error("C_Sign", rv);
    EXPECT_EQ(rv_of(err), std::optional<CK_RV>{rv}) << rv_name(rv);
    EXPECT_EQ(function_of(err), std::optional<std::string>{"C_Sign"})
      << rv_name(rv);
    EXPECT_EQ(err.code(), static_cast<uint8_t>(classify(rv))) << rv_name(rv);
  }
}

TEST(RvTest, OtherErrorsCarryNoValue) {
  const caf::error errs[] = {
    caf::error{},
    caf::make_error(hsm_errc::fatal),
    // Made up by the driver without a return value (PIN latch, token admin).
    caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                    std::string{"PIN rejected earlier; not tried again"}),
    caf::make_error(key_errc::unknown_key, std::string{"no key"}),
    caf::make_error(config_errc::invalid_option, std::string{"--pin"},
                    std::string{"CKR_PIN_INCORRECT"}),
    caf::make_error(caf::sec::request_timeout),
  };
  for (auto& err : errs) {
    EXPECT_EQ(rv_of(err), std::nullopt) << describe(err);
    EXPECT_EQ(function_of(err), std::nullopt) << describe(err);
    EXPECT_FALSE(pin_rejected(err)) << describe(err);
  }
}

TEST(RvTest, PinRejectedReadsTheValue) {
  struct row {
    CK_RV rv;
    bool rejected;
  };
  const row rows[] = {
    {CKR_PIN_INCORRECT, true},
    {CKR_PIN_INVALID, true},
    {CKR_PIN_LEN_RANGE, true},
    {CKR_PIN_EXPIRED, true},
    {CKR_PIN_LOCKED, true},
    {CKR_OK, false},
    {CKR_USER_NOT_LOGGED_IN, false},
    {CKR_USER_PIN_NOT_INITIALIZED, false},
    {CKR_PIN_TOO_WEAK, false},
    {CKR_SESSION_CLOSED, false},
    {CKR_TOKEN_NOT_PRESENT, false},
    {CKR_GENERAL_ERROR, false},
    {CKR_DEVICE_ERROR, false},
    {CKR_VENDOR_DEFINED + CKR_PIN_INCORRECT, false},
  };
  for (auto& r : rows) {
    EXPECT_EQ(pin_rejected(rv_error("C_Login", r.rv)), r.rejected)
      << rv_name(r.rv);
    // The function does not matter; the value does.
    EXPECT_EQ(pin_rejected(rv_error("C_InitPIN", r.rv)), r.rejected)
      << rv_name(r.rv);
  }
}

TEST(RvTest, ErrorAsAnotherCodeKeepsTheValue) {
  auto err = rv_error_as(key_errc::key_corrupted,
                         "the token cannot unwrap the stored key",
                         rv_error("C_UnwrapKey", CKR_WRAPPED_KEY_INVALID));
  EXPECT_EQ(err, key_errc::key_corrupted);
  EXPECT_EQ(rv_of(err), std::optional<CK_RV>{CKR_WRAPPED_KEY_INVALID});
  EXPECT_EQ(function_of(err), std::optional<std::string>{"C_UnwrapKey"});
  EXPECT_EQ(describe(err),
            "key: key_corrupted (the token cannot unwrap the stored key: "
            "C_UnwrapKey: CKR_WRAPPED_KEY_INVALID)");
  auto plain = rv_error_as(key_errc::key_corrupted, "cannot unwrap",
                           caf::make_error(hsm_errc::fatal,
                                           std::string{"no value"}));
  EXPECT_EQ(plain, key_errc::key_corrupted);
  EXPECT_EQ(rv_of(plain), std::nullopt);
  EXPECT_EQ(describe(plain),
            "key: key_corrupted (cannot unwrap (hsm: fatal (no value)))");
}

} // namespace
} // namespace hsm::pkcs11
