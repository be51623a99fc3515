#include "runtime/pkcs11/rv.hpp"

#include <gtest/gtest.h>

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
    {CKR_GENERAL_ERROR, hsm_errc::fatal},
    {CKR_MECHANISM_INVALID, hsm_errc::fatal},
    {CKR_TEMPLATE_INCOMPLETE, hsm_errc::fatal},
    {CKR_KEY_NOT_WRAPPABLE, hsm_errc::fatal},
    {CKR_SESSION_HANDLE_INVALID, hsm_errc::reopen_session},
    {CKR_SESSION_CLOSED, hsm_errc::reopen_session},
    {CKR_DEVICE_ERROR, hsm_errc::reopen_session},
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

TEST(RvTest, ErrorCarriesFunctionAndName) {
  auto err = rv_error("C_Login", CKR_PIN_INCORRECT);
  EXPECT_EQ(err, hsm_errc::fatal);
  EXPECT_EQ(describe(err), "hsm: fatal (C_Login: CKR_PIN_INCORRECT)");
  EXPECT_FALSE(is_retryable(err));
}

} // namespace
} // namespace hsm::pkcs11
