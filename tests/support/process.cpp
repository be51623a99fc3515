#include "tests/support/process.hpp"

#include "tests/support/wait.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#include <chrono>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string_view>

namespace hsm::test {

namespace {

/// argv and envp for execve, built before fork: between fork and exec the
/// child of a multithreaded process may only make async-signal-safe calls
/// (no malloc, no setenv), or it can deadlock on a lock another thread held.
class exec_image {
public:
  exec_image(const std::vector<std::string>& args,
             const std::map<std::string, std::string>& env)
    : bin_(HSM_DRIVER_BINARY) {
    strings_.push_back(bin_);
    for (auto& a : args)
      strings_.push_back(a);
    auto argc = strings_.size();
    for (char** e = environ; *e != nullptr; ++e) {
      std::string entry{*e};
      auto name = entry.substr(0, entry.find('='));
      if (env.count(name) == 0)
        strings_.push_back(std::move(entry));
    }
    for (auto& [k, v] : env)
      if (!v.empty())
        strings_.push_back(k + "=" + v);
    for (size_t i = 0; i < strings_.size(); ++i) {
      if (i == argc)
        argv_.push_back(nullptr);
      argv_.push_back(strings_[i].data());
    }
    argv_.push_back(nullptr);
    envp_ = argv_.data() + argc + 1;
  }

  /// Replaces the process image; only async-signal-safe calls.
  [[noreturn]] void exec() const {
    ::execve(bin_.c_str(), argv_.data(), envp_);
    ::_exit(127);
  }

private:
  std::string bin_;
  std::vector<std::string> strings_;
  std::vector<char*> argv_; // argv, nullptr, envp, nullptr
  char* const* envp_ = nullptr;
};

/// Fails the current test if `output`, a driver process's stderr, holds a
/// sanitizer report, quoting it. Reports normally go to the files that
/// deploy/run-sanitizers.sh names (log_path), but GCC's UBSan runtime,
/// loaded next to ASan's, writes to stderr whatever log_path says, and a
/// plain `ctest` in a sanitizer build sets no log_path: without this, a
/// report in a driver whose exit status a test does not check is lost.
void expect_no_sanitizer_report(std::string_view output, std::string_view who) {
  constexpr std::string_view markers[] = {
    ": runtime error: ", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
    "WARNING: ThreadSanitizer"};
  for (auto marker : markers) {
    auto at = output.find(marker);
    if (at == std::string_view::npos)
      continue;
    auto line = output.rfind('\n', at);
    auto from = line == std::string_view::npos ? 0 : line + 1;
    ADD_FAILURE() << "sanitizer report from " << who << ":\n"
                  << output.substr(from, 4000);
    return;
  }
}

} // namespace

background_process start_driver(const std::vector<std::string>& args,
                                const std::map<std::string, std::string>& env,
                                const std::string& log_path) {
  exec_image image{args, env};
  pid_t pid = ::fork();
  if (pid < 0)
    throw std::runtime_error("fork failed");
  if (pid == 0) {
    int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
    image.exec();
  }
  return background_process{pid, log_path};
}

int wait_exit(background_process& p, int timeout_ms) {
  int status = 0;
  auto exited = wait_until(
    [&] { return ::waitpid(p.pid, &status, WNOHANG) == p.pid; },
    std::chrono::milliseconds{timeout_ms}, "the process to exit",
    std::chrono::milliseconds{20});
  if (!exited) {
    ::kill(p.pid, SIGKILL);
    ::waitpid(p.pid, &status, 0);
  }
  p.pid = -1;
  std::ifstream in{p.log_path};
  std::string log{std::istreambuf_iterator<char>{in}, {}};
  expect_no_sanitizer_report(log, "the driver logging to " + p.log_path);
  if (!exited)
    return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

kill_on_exit::~kill_on_exit() {
  if (p_.pid > 0) {
    ::kill(p_.pid, SIGKILL);
    wait_exit(p_, 5000);
  }
}

run_result run_driver(const std::vector<std::string>& args,
                      const std::map<std::string, std::string>& env) {
  exec_image image{args, env};
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
    image.exec();
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
  std::string cmd = "hsm-driver";
  for (auto& a : args)
    cmd += " " + a;
  expect_no_sanitizer_report(res.err, cmd);
  return res;
}
int shim_count(const std::string& counts_file, const std::string& kind,
               const std::string& fn) {
  std::ifstream in{counts_file};
  int total = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words{line};
    std::string k, f;
    int n = 0;
    if (words >> k >> f >> n && k == kind && (fn.empty() || f == fn))
      total += n;
  }
  return total;
}

} // namespace hsm::test
