#include "tests/support/softhsm_env.hpp"

#include "runtime/pkcs11/token_admin.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <stdexcept>

extern char** environ;

namespace hsm::test {

namespace {

std::filesystem::path& work_dir_storage() {
  static std::filesystem::path dir;
  return dir;
}

std::unique_ptr<pkcs11::module>& module_storage() {
  static std::unique_ptr<pkcs11::module> mod;
  return mod;
}

/// Sets up SoftHSM for the run; tears everything down at the end.
class softhsm_environment : public ::testing::Environment {
public:
  void SetUp() override {
    auto base = std::filesystem::temp_directory_path();
    std::random_device rd;
    auto dir = base
               / ("hsm-driver-it-" + std::to_string(::getpid()) + "-"
                  + std::to_string(rd() % 100000));
    work_dir_storage() = dir;
    ::setenv("SOFTHSM2_CONF", write_softhsm_conf(dir).c_str(), 1);
  }

  void TearDown() override {
    module_storage().reset();
    std::error_code ec;
    if (std::getenv("HSM_DRIVER_KEEP_TEST_DIR") == nullptr)
      std::filesystem::remove_all(work_dir_storage(), ec);
  }
};

} // namespace

const std::filesystem::path& work_dir() {
  return work_dir_storage();
}

std::string softhsm_conf() {
  return (work_dir() / "softhsm2.conf").string();
}

std::filesystem::path fresh_dir(std::string_view prefix) {
  static std::atomic<int> n{0};
  auto dir = work_dir() / (std::string{prefix} + "-" + std::to_string(++n));
  std::filesystem::create_directories(dir);
  return dir;
}

std::string unique_label(std::string_view prefix) {
  static std::atomic<int> n{0};
  auto label = std::string{prefix}.substr(0, 24) + "-" + std::to_string(++n);
  return label;
}

std::shared_ptr<fault_plan> shared_plan() {
  static auto plan = std::make_shared<fault_plan>();
  return plan;
}

call_counts& counts() {
  return shared_plan()->counts;
}

pkcs11::module& shared_module() {
  auto& mod = module_storage();
  if (!mod) {
    auto loaded = pkcs11::module::load(softhsm_module(),
                                       fault_decorator(shared_plan()));
    if (!loaded)
      throw std::runtime_error("cannot load SoftHSMv2: "
                               + describe(loaded.error()));
    mod = std::make_unique<pkcs11::module>(std::move(*loaded));
  }
  return *mod;
}

test_token make_token(const std::string& label, std::string_view master_label) {
  auto& mod = shared_module();
  pkcs11::secret_pin so{so_pin};
  pkcs11::secret_pin user{user_pin};
  if (auto err = pkcs11::init_token(mod, label, so, user))
    throw std::runtime_error("init_token: " + describe(err));
  auto slot = mod.find_token(label);
  if (!slot)
    throw std::runtime_error("find_token: " + describe(slot.error()));
  auto sess = pkcs11::session::open(mod, *slot);
  if (!sess)
    throw std::runtime_error("open: " + describe(sess.error()));
  if (auto err = sess->login(user))
    throw std::runtime_error("login: " + describe(err));
  bool created = false;
  auto master = pkcs11::create_master_key(*sess, master_label, &created);
  if (!master)
    throw std::runtime_error("master key: " + describe(master.error()));
  return test_token{label, std::move(*sess), *master};
}

CK_OBJECT_HANDLE make_legacy_master_key(pkcs11::session& sess,
                                        std::string_view label) {
  pkcs11::attributes t;
  t.add_ulong(CKA_CLASS, CKO_SECRET_KEY)
    .add_ulong(CKA_KEY_TYPE, CKK_AES)
    .add_text(CKA_LABEL, label)
    .add_bool(CKA_TOKEN, true)
    .add_bool(CKA_PRIVATE, true)
    .add_bool(CKA_SENSITIVE, true)
    .add_bool(CKA_EXTRACTABLE, false)
    .add_bool(CKA_WRAP, true)
    .add_bool(CKA_UNWRAP, true)
    .add_bool(CKA_ENCRYPT, false)
    .add_bool(CKA_DECRYPT, false)
    .add_ulong(CKA_VALUE_LEN, 32);
  auto key = sess.generate_key(CKM_AES_KEY_GEN, t);
  if (!key)
    throw std::runtime_error("legacy master key: " + describe(key.error()));
  return *key;
}

} // namespace hsm::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new hsm::test::softhsm_environment);
  return RUN_ALL_TESTS();
}
