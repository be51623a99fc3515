#include "tests/support/softhsm_env.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <stdexcept>

#include <gtest/gtest.h>

#include "runtime/pkcs11/token_admin.hpp"

extern char** environ;

namespace hsm::test {

namespace {

/// Forwards to the real table, counting the calls tests assert on.
class counting_table final : public pkcs11::function_table {
public:
  explicit counting_table(std::unique_ptr<pkcs11::function_table> inner)
    : in_(std::move(inner)) {
    // nop
  }

  CK_RV initialize(CK_C_INITIALIZE_ARGS* a) override {
    return in_->initialize(a);
  }
  CK_RV finalize() override {
    return in_->finalize();
  }
  CK_RV get_slot_list(CK_BBOOL p, CK_SLOT_ID* l, CK_ULONG* n) override {
    return in_->get_slot_list(p, l, n);
  }
  CK_RV get_token_info(CK_SLOT_ID s, CK_TOKEN_INFO* i) override {
    return in_->get_token_info(s, i);
  }
  CK_RV init_token(CK_SLOT_ID s, CK_UTF8CHAR* p, CK_ULONG n,
                   CK_UTF8CHAR* l) override {
    return in_->init_token(s, p, n, l);
  }
  CK_RV open_session(CK_SLOT_ID s, CK_FLAGS f, CK_SESSION_HANDLE* h) override {
    return in_->open_session(s, f, h);
  }
  CK_RV close_session(CK_SESSION_HANDLE h) override {
    return in_->close_session(h);
  }
  CK_RV login(CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR* p,
              CK_ULONG n) override {
    ++counts().login;
    return in_->login(h, u, p, n);
  }
  CK_RV logout(CK_SESSION_HANDLE h) override {
    return in_->logout(h);
  }
  CK_RV init_pin(CK_SESSION_HANDLE h, CK_UTF8CHAR* p, CK_ULONG n) override {
    return in_->init_pin(h, p, n);
  }
  CK_RV find_objects_init(CK_SESSION_HANDLE h, CK_ATTRIBUTE* t,
                          CK_ULONG n) override {
    return in_->find_objects_init(h, t, n);
  }
  CK_RV find_objects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE* o, CK_ULONG m,
                     CK_ULONG* n) override {
    return in_->find_objects(h, o, m, n);
  }
  CK_RV find_objects_final(CK_SESSION_HANDLE h) override {
    return in_->find_objects_final(h);
  }
  CK_RV get_attribute_value(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o,
                            CK_ATTRIBUTE* t, CK_ULONG n) override {
    return in_->get_attribute_value(h, o, t, n);
  }
  CK_RV create_object(CK_SESSION_HANDLE h, CK_ATTRIBUTE* t, CK_ULONG n,
                      CK_OBJECT_HANDLE* o) override {
    return in_->create_object(h, t, n, o);
  }
  CK_RV destroy_object(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o) override {
    return in_->destroy_object(h, o);
  }
  CK_RV generate_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_ATTRIBUTE* t,
                     CK_ULONG n, CK_OBJECT_HANDLE* k) override {
    return in_->generate_key(h, m, t, n, k);
  }
  CK_RV generate_key_pair(CK_SESSION_HANDLE h, CK_MECHANISM* m,
                          CK_ATTRIBUTE* pub, CK_ULONG npub,
                          CK_ATTRIBUTE* priv, CK_ULONG npriv,
                          CK_OBJECT_HANDLE* hpub,
                          CK_OBJECT_HANDLE* hpriv) override {
    ++counts().generate_key_pair;
    return in_->generate_key_pair(h, m, pub, npub, priv, npriv, hpub, hpriv);
  }
  CK_RV wrap_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_OBJECT_HANDLE w,
                 CK_OBJECT_HANDLE k, CK_BYTE* o, CK_ULONG* n) override {
    return in_->wrap_key(h, m, w, k, o, n);
  }
  CK_RV unwrap_key(CK_SESSION_HANDLE h, CK_MECHANISM* m, CK_OBJECT_HANDLE u,
                   CK_BYTE* b, CK_ULONG n, CK_ATTRIBUTE* t, CK_ULONG c,
                   CK_OBJECT_HANDLE* k) override {
    ++counts().unwrap_key;
    return in_->unwrap_key(h, m, u, b, n, t, c, k);
  }
  CK_RV sign_init(CK_SESSION_HANDLE h, CK_MECHANISM* m,
                  CK_OBJECT_HANDLE k) override {
    return in_->sign_init(h, m, k);
  }
  CK_RV sign(CK_SESSION_HANDLE h, CK_BYTE* d, CK_ULONG n, CK_BYTE* s,
             CK_ULONG* sn) override {
    ++counts().sign;
    return in_->sign(h, d, n, s, sn);
  }

private:
  std::unique_ptr<pkcs11::function_table> in_;
};

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
    auto dir = base / ("hsm-driver-it-" + std::to_string(::getpid()) + "-"
                       + std::to_string(rd() % 100000));
    std::filesystem::create_directories(dir / "tokens");
    work_dir_storage() = dir;
    std::ofstream conf{dir / "softhsm2.conf"};
    conf << "directories.tokendir = " << (dir / "tokens").string() << "\n"
         << "objectstore.backend = file\n"
         << "log.level = ERROR\n"
         << "slots.removable = false\n";
    conf.close();
    ::setenv("SOFTHSM2_CONF", (dir / "softhsm2.conf").c_str(), 1);
  }

  void TearDown() override {
    module_storage().reset();
    std::error_code ec;
    if (std::getenv("HSM_DRIVER_KEEP_TEST_DIR") == nullptr)
      std::filesystem::remove_all(work_dir_storage(), ec);
  }
};

} // namespace

std::string softhsm_module() {
  if (const char* m = std::getenv("SOFTHSM2_MODULE"))
    return m;
  return "/usr/lib/softhsm/libsofthsm2.so";
}

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

call_counts& counts() {
  static call_counts c;
  return c;
}

pkcs11::module& shared_module() {
  auto& mod = module_storage();
  if (!mod) {
    auto loaded = pkcs11::module::load(
      softhsm_module(), [](std::unique_ptr<pkcs11::function_table> inner) {
        return std::make_unique<counting_table>(std::move(inner));
      });
    if (!loaded)
      throw std::runtime_error("cannot load SoftHSMv2: "
                               + describe(loaded.error()));
    mod = std::make_unique<pkcs11::module>(std::move(*loaded));
  }
  return *mod;
}

test_token make_token(const std::string& label,
                      std::string_view master_label) {
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

run_result run_driver(const std::vector<std::string>& args,
                      const std::map<std::string, std::string>& env) {
  int out_pipe[2];
  int err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0)
    throw std::runtime_error("pipe failed");
  pid_t pid = ::fork();
  if (pid < 0)
    throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::dup2(out_pipe[1], STDOUT_FILENO);
    ::dup2(err_pipe[1], STDERR_FILENO);
    for (auto& [k, v] : env) {
      if (v.empty())
        ::unsetenv(k.c_str());
      else
        ::setenv(k.c_str(), v.c_str(), 1);
    }
    std::vector<char*> argv;
    std::string bin = HSM_DRIVER_BINARY;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  run_result res;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0)
      break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0)
        continue;
      auto n = ::read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
        continue;
      }
      (i == 0 ? res.out : res.err).append(buf, static_cast<size_t>(n));
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  res.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return res;
}

} // namespace hsm::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new hsm::test::softhsm_environment);
  return RUN_ALL_TESTS();
}
