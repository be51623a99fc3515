#include "runtime/pkcs11/secret_pin.hpp"

#include <acl/libacl.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/acl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace hsm::pkcs11 {
namespace {

class SecretPinTest : public ::testing::Test {
protected:
  void SetUp() override {
    dir = std::filesystem::path{::testing::TempDir()}
          / ("pin-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    ::unsetenv("TEST_PIN");
    ::unsetenv("TEST_PIN_FILE");
  }
  void TearDown() override {
    std::filesystem::remove_all(dir);
  }
  std::filesystem::path write_pin(const std::string& text, mode_t mode) {
    auto path = dir / "pin";
    std::ofstream{path} << text;
    ::chmod(path.c_str(), mode);
    return path;
  }
  /// Sets the access ACL of `path` from its text form ("u::r,g::-,...").
  static void set_acl(const std::filesystem::path& path, std::string text) {
    acl_t acl = acl_from_text(text.c_str());
    ASSERT_NE(acl, nullptr) << text;
    int rc = acl_set_file(path.c_str(), ACL_TYPE_ACCESS, acl);
    acl_free(acl);
    ASSERT_EQ(rc, 0) << text << ": " << std::strerror(errno);
  }
  std::filesystem::path dir;
};

TEST_F(SecretPinTest, EnvironmentPinIsReadThenScrubbed) {
  ::setenv("TEST_PIN", "1234", 1);
  auto pin = secret_pin::from_environment("TEST_PIN", "TEST_PIN_FILE");
  ASSERT_TRUE(pin) << describe(pin.error());
  EXPECT_EQ(std::string(pin->data(), pin->size()), "1234");
  EXPECT_EQ(std::getenv("TEST_PIN"), nullptr);
}

TEST_F(SecretPinTest, MissingPinNamesBothVariables) {
  auto pin = secret_pin::from_environment("TEST_PIN", "TEST_PIN_FILE");
  ASSERT_FALSE(pin);
  EXPECT_EQ(pin.error(), config_errc::missing_option);
  EXPECT_NE(describe(pin.error()).find("TEST_PIN_FILE"), std::string::npos);
}

TEST_F(SecretPinTest, BothSourcesIsAnError) {
  ::setenv("TEST_PIN", "1", 1);
  ::setenv("TEST_PIN_FILE", write_pin("2", 0600).c_str(), 1);
  auto pin = secret_pin::from_environment("TEST_PIN", "TEST_PIN_FILE");
  ASSERT_FALSE(pin);
  EXPECT_EQ(pin.error(), config_errc::invalid_option);
}

TEST_F(SecretPinTest, FileMustBePrivateAndNotEmpty) {
  auto loose = secret_pin::from_file(write_pin("5678\n", 0640));
  ASSERT_FALSE(loose);
  EXPECT_EQ(loose.error(), config_errc::bad_file);
  auto good = secret_pin::from_file(write_pin("5678\n", 0600));
  ASSERT_TRUE(good) << describe(good.error());
  EXPECT_EQ(std::string(good->data(), good->size()), "5678");
  auto empty = secret_pin::from_file(write_pin("\n", 0600));
  ASSERT_FALSE(empty);
  auto missing = secret_pin::from_file((dir / "nope").string());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error(), config_errc::bad_file);
}

TEST_F(SecretPinTest, MovedFromPinIsEmpty) {
  secret_pin a{"9999"};
  secret_pin b{std::move(a)};
  EXPECT_TRUE(a.empty()); // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b.size(), 4u);
}

TEST_F(SecretPinTest, FileIsNotFollowedThroughASymbolicLink) {
  auto real = write_pin("4321\n", 0600);
  auto link = dir / "pin-link";
  std::filesystem::create_symlink(real, link);
  auto pin = secret_pin::from_file(link.string());
  ASSERT_FALSE(pin);
  EXPECT_EQ(pin.error(), config_errc::bad_file);
  EXPECT_NE(describe(pin.error()).find("symbolic link"), std::string::npos)
    << describe(pin.error());
}

TEST_F(SecretPinTest, FileOfAnotherUserIsRefused) {
  if (::geteuid() != 0)
    GTEST_SKIP() << "only root can give a file to another user";
  auto path = write_pin("4321\n", 0600);
  ASSERT_EQ(::chown(path.c_str(), 65534, 65534), 0); // nobody
  auto pin = secret_pin::from_file(path.string());
  ASSERT_FALSE(pin);
  EXPECT_NE(describe(pin.error()).find("owned by uid 65534"), std::string::npos)
    << describe(pin.error());
}

// systemd's LoadCredential= hands a service its credential as a 0400 file
// with an ACL entry granting the service's user read access; the mode then
// shows the ACL's mask as group bits (0440).
TEST_F(SecretPinTest, AFileWhoseAclGrantsOnlyThisUserIsAccepted) {
  auto path = write_pin("2468\n", 0400);
  set_acl(path, "u::r,u:" + std::to_string(::geteuid()) + ":r,g::-,m::r,o::-");
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  ASSERT_NE(st.st_mode & S_IRGRP, 0u) << "the mask shows as group bits";
  auto pin = secret_pin::from_file(path.string());
  ASSERT_TRUE(pin) << describe(pin.error());
  EXPECT_EQ(std::string(pin->data(), pin->size()), "2468");
}

TEST_F(SecretPinTest, AnAclEntryGrantingAnotherUserOrGroupIsRefused) {
  struct acl_case {
    std::string acl;
    std::string named;
  };
  for (const auto& [acl, named] :
       {acl_case{"u::r,u:65534:r,g::-,m::r,o::-", "uid 65534 through its ACL"},
        acl_case{"u::r,g::-,g:65534:r,m::r,o::-", "gid 65534 through its ACL"},
        acl_case{"u::r,g::r,m::r,o::-", "group"},
        acl_case{"u::r,u:65534:-,g::-,m::r,o::r", "others"}}) {
    std::filesystem::remove(dir / "pin");
    auto path = write_pin("1357\n", 0600);
    set_acl(path, acl);
    auto pin = secret_pin::from_file(path.string());
    ASSERT_FALSE(pin) << acl;
    EXPECT_EQ(pin.error(), config_errc::bad_file);
    EXPECT_NE(describe(pin.error()).find(named), std::string::npos)
      << acl << ": " << describe(pin.error());
  }
}

TEST_F(SecretPinTest, AnAclEntryTheMaskTakesEverythingFromGrantsNothing) {
  auto path = write_pin("1111\n", 0600);
  set_acl(path, "u::rw,u:65534:r,g::r,m::-,o::-");
  auto pin = secret_pin::from_file(path.string());
  ASSERT_TRUE(pin) << describe(pin.error());
}

TEST_F(SecretPinTest, AMoveHandsTheBufferOverWithoutCopyingTheBytes) {
  // A short PIN in a string would sit in its inline buffer, and a move
  // would copy it and leave the bytes behind; here the buffer moves.
  secret_pin a{"12"};
  const char* at = a.data();
  secret_pin b{std::move(a)};
  EXPECT_EQ(b.data(), at);
  secret_pin c;
  c = std::move(b);
  EXPECT_EQ(c.data(), at);
  EXPECT_EQ(std::string(c.data(), c.size()), "12");
}

} // namespace
} // namespace hsm::pkcs11
