#pragma once

// Runs the real `hsm-driver` binary from a test: to completion with its
// output captured, or in the background (for the daemon) with a handle to
// signal and reap it.

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

namespace hsm::test {

/// The fault module's (HSM_SHIM_SPEC) counts file, written by a driver it is
/// loaded in: the sum of the counts of `kind` ("fail", "hang", ...) for the
/// PKCS#11 function `fn`, or for every function when `fn` is empty; 0 if
/// the file does not exist yet.
int shim_count(const std::string& counts_file, const std::string& kind,
               const std::string& fn = {});

/// Output of a finished child process.
struct run_result {
  int exit_code = -1;
  std::string out;
  std::string err;
};

/// Runs the hsm-driver binary with `args` to completion; the environment is
/// this process's plus `env` (an empty value unsets the variable). A
/// sanitizer report on its stderr fails the calling test.
run_result run_driver(const std::vector<std::string>& args,
                      const std::map<std::string, std::string>& env);

/// A background hsm-driver process; stdout and stderr go to `log_path`.
struct background_process {
  pid_t pid = -1;
  std::string log_path;
};

/// Starts hsm-driver with `args` in the background.
background_process start_driver(const std::vector<std::string>& args,
                                const std::map<std::string, std::string>& env,
                                const std::string& log_path);

/// Waits up to `timeout_ms` for the process to exit; returns its exit code,
/// or -1 if it did not exit in time (it is then killed). A sanitizer report
/// in its log fails the calling test.
int wait_exit(background_process& p, int timeout_ms);

/// Kills (SIGKILL) and reaps a background process when it goes out of
/// scope, unless it was reaped already: a test that fails half-way (a
/// failed ASSERT returns at once) leaves no driver running.
class kill_on_exit {
public:
  explicit kill_on_exit(background_process& p) : p_(p) {
    // nop
  }
  ~kill_on_exit();
  kill_on_exit(const kill_on_exit&) = delete;
  kill_on_exit& operator=(const kill_on_exit&) = delete;

private:
  background_process& p_;
};

} // namespace hsm::test
