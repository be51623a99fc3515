#pragma once

// GoogleTest base for the network tests: one dev PKI per test suite, made in
// a temporary folder of its own and removed after the suite. `Derived` names
// the folder through `static constexpr const char* suite_dir`. CRTP gives
// each suite its own statics.

#include "runtime/net/pki.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>

namespace hsm::net {

template <class Derived>
class pki_suite : public ::testing::Test {
protected:
  static void SetUpTestSuite() {
    dir_ = new std::filesystem::path{
      std::filesystem::path{::testing::TempDir()}
      / (std::string{Derived::suite_dir} + "_" + std::to_string(::getpid()))};
    std::filesystem::remove_all(*dir_);
    auto pki = make_dev_pki(*dir_ / "pki");
    ASSERT_TRUE(pki) << describe(pki.error());
    pki_ = new dev_pki{*pki};
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    delete pki_;
    dir_ = nullptr;
    pki_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(pki_, nullptr);
  }

  /// The suite's folder.
  static inline std::filesystem::path* dir_ = nullptr;
  /// The suite's PKI, in `*dir_ / "pki"`.
  static inline dev_pki* pki_ = nullptr;
};

} // namespace hsm::net
