#include "tests/support/pg_cluster.hpp"

#include <gtest/gtest.h>
#include <pqxx/pqxx>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>
#include <thread>

#ifndef HSM_DRIVER_SOURCE_DIR
#  error "the build defines HSM_DRIVER_SOURCE_DIR"
#endif

namespace hsm::test {

namespace {

/// How long `fresh_database` and `drop_database` wait for a server that is
/// restarting (a test may just have restarted or killed it).
constexpr auto reconnect_window = std::chrono::seconds{10};

std::string script() {
  return std::string{HSM_DRIVER_SOURCE_DIR} + "/deploy/pg-test-cluster.sh";
}

/// `x` in single quotes for /bin/sh.
std::string shell_quote(const std::string& x) {
  std::string out = "'";
  for (char c : x) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

/// Output and exit code of a shell command.
struct command_result {
  int exit_code = -1;
  std::string out;
};

/// Runs `cmd` with stderr folded into stdout.
command_result run_command(const std::string& cmd) {
  command_result res;
  auto* pipe = ::popen((cmd + " 2>&1").c_str(), "r");
  if (pipe == nullptr) {
    res.out = "popen failed";
    return res;
  }
  std::array<char, 512> buf{};
  size_t n = 0;
  while ((n = ::fread(buf.data(), 1, buf.size(), pipe)) > 0)
    res.out.append(buf.data(), n);
  auto status = ::pclose(pipe);
  if (status != -1 && WIFEXITED(status))
    res.exit_code = WEXITSTATUS(status);
  return res;
}

/// Runs the cluster script's `cmd` on `dir`.
command_result run_script(const std::string& cmd, const std::string& dir) {
  return run_command(shell_quote(script()) + " " + cmd + " "
                     + shell_quote(dir));
}

/// The last lines of the server log in `dir`, for failure messages.
std::string log_tail(const std::string& dir) {
  std::ifstream in{dir + "/server.log"};
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  std::string out;
  auto first = lines.size() > 15 ? lines.size() - 15 : 0;
  for (auto i = first; i < lines.size(); ++i)
    out += "\n  " + lines[i];
  return out;
}

std::string trim(std::string x) {
  while (!x.empty() && (x.back() == '\n' || x.back() == ' '))
    x.pop_back();
  return x;
}

/// The cluster of this process: the shared one, or a private one that it
/// started and stops at exit (a function-local static, so its destructor
/// runs at exit).
class cluster {
public:
  cluster() {
    if (const char* url = std::getenv("HSM_TEST_POSTGRES_URL");
        url != nullptr && *url != '\0') {
      url_ = url;
      if (const char* dir = std::getenv("HSM_TEST_PG_DIR"))
        dir_ = dir;
      return;
    }
    start_private();
  }

  cluster(const cluster&) = delete;
  cluster& operator=(const cluster&) = delete;

  ~cluster() {
    if (!owned_)
      return;
    run_script("stop", dir_);
    std::error_code ec;
    if (std::getenv("HSM_DRIVER_KEEP_TEST_DIR") == nullptr)
      std::filesystem::remove_all(dir_, ec);
  }

  /// The URL, or "" (then `error()` says why).
  const std::string& url() const {
    return url_;
  }

  /// The cluster folder, or "" if unknown.
  const std::string& dir() const {
    return dir_;
  }

  /// Why there is no URL.
  const std::string& error() const {
    return error_;
  }

private:
  void start_private() {
    auto pattern = (std::filesystem::temp_directory_path()
                    / "hsm-pg-test.XXXXXX")
                     .string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      error_ = "cannot create a folder for the PostgreSQL test cluster "
               "under "
               + std::filesystem::temp_directory_path().string();
      return;
    }
    dir_ = pattern;
    owned_ = true;
    auto res = run_script("start", dir_);
    if (res.exit_code != 0) {
      error_ = "cannot start a PostgreSQL test cluster: " + script() + " start "
               + dir_ + " exited with " + std::to_string(res.exit_code) + ":\n"
               + res.out + "server log:" + log_tail(dir_)
               + "\n(set HSM_TEST_POSTGRES_URL to use a running server)";
      return;
    }
    // The script prints the URL on its last line.
    auto out = trim(res.out);
    auto nl = out.rfind('\n');
    url_ = nl == std::string::npos ? out : out.substr(nl + 1);
  }

  std::string url_;
  std::string dir_;
  std::string error_;
  bool owned_ = false;
};

cluster& the_cluster() {
  static cluster instance;
  return instance;
}

/// `url` pointing at database `name` instead.
std::string with_database(const std::string& url, const std::string& name) {
  auto scheme_end = url.find("://");
  if (scheme_end == std::string::npos) // key=value form: later keys win
    return url + " dbname=" + name;
  auto auth_start = scheme_end + 3;
  auto auth_end = url.find_first_of("/?", auth_start);
  if (auth_end == std::string::npos)
    return url + "/" + name;
  auto path_end = url.find('?', auth_end);
  if (path_end == std::string::npos)
    path_end = url.size();
  return url.substr(0, auth_end) + "/" + name + url.substr(path_end);
}

/// A database name no other test (of any process) uses.
std::string unique_name() {
  static std::atomic<int> counter{0};
  static const auto salt = std::random_device{}() % 1000000;
  return "hsm_test_" + std::to_string(::getpid()) + "_" + std::to_string(salt)
         + "_" + std::to_string(++counter);
}

/// Runs `sql` on `url` in autocommit mode, retrying a lost or refused
/// connection for `reconnect_window`. Returns "" or the error.
std::string exec_autocommit(const std::string& url, const std::string& sql) {
  auto deadline = std::chrono::steady_clock::now() + reconnect_window;
  for (;;) {
    try {
      pqxx::connection conn{url};
      pqxx::nontransaction tx{conn};
      tx.exec0(sql);
      return {};
    } catch (const pqxx::broken_connection& e) {
      if (std::chrono::steady_clock::now() >= deadline)
        return e.what();
    } catch (const pqxx::sql_error& e) {
      // 57P03: the server is starting up or shutting down.
      if (e.sqlstate() != "57P03" && e.sqlstate().substr(0, 2) != "08")
        return e.what();
      if (std::chrono::steady_clock::now() >= deadline)
        return e.what();
    } catch (const std::exception& e) {
      return e.what();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds{100});
  }
}

/// Runs the script's `cmd` on the cluster folder; adds a failure on error.
void cluster_command(const char* fn, const std::string& cmd) {
  auto& c = the_cluster();
  if (c.dir().empty()) {
    ADD_FAILURE() << "hsm::test::" << fn << ": no PostgreSQL cluster folder: "
                  << (c.url().empty() ? c.error()
                                      : "HSM_TEST_POSTGRES_URL is set without "
                                        "HSM_TEST_PG_DIR");
    return;
  }
  auto res = run_script(cmd, c.dir());
  if (res.exit_code != 0)
    ADD_FAILURE() << "hsm::test::" << fn << ": " << script() << " " << cmd
                  << " " << c.dir() << " exited with " << res.exit_code << ":\n"
                  << res.out << "server log:" << log_tail(c.dir());
}

} // namespace

std::string postgres_url() {
  auto& c = the_cluster();
  if (c.url().empty())
    ADD_FAILURE() << "no PostgreSQL server for the tests: " << c.error();
  return c.url();
}

std::string fresh_database() {
  // A server that never answered in this process will not answer the next
  // test either: fail at once instead of waiting again for every test.
  static std::atomic<bool> reached{false};
  static std::atomic<bool> never_reached{false};
  auto url = postgres_url();
  if (url.empty())
    return {};
  if (never_reached) {
    ADD_FAILURE() << "the PostgreSQL test cluster at " << url
                  << " did not answer before (see the first failure)";
    return {};
  }
  auto name = unique_name();
  auto err = exec_autocommit(url, "CREATE DATABASE " + name);
  if (!err.empty()) {
    if (!reached)
      never_reached = true;
    ADD_FAILURE() << "cannot create test database " << name
                  << " on the PostgreSQL test cluster at " << url << ": "
                  << err;
    return {};
  }
  reached = true;
  return with_database(url, name);
}

void drop_database(const std::string& url) {
  auto admin = postgres_url();
  if (admin.empty() || url.empty())
    return;
  std::string name;
  auto slash = url.rfind('/');
  if (auto kw = url.rfind(" dbname="); kw != std::string::npos)
    name = url.substr(kw + 8);
  else if (slash != std::string::npos)
    name = url.substr(slash + 1, url.find('?', slash) - slash - 1);
  if (!name.starts_with("hsm_test_"))
    return; // never drop anything this file did not create
  exec_autocommit(admin, "DROP DATABASE IF EXISTS " + name + " WITH (FORCE)");
}

void restart_postgres() {
  cluster_command("restart_postgres", "restart");
}

void kill_postgres() {
  cluster_command("kill_postgres", "kill");
}

void start_postgres_again() {
  cluster_command("start_postgres_again", "restart");
}

} // namespace hsm::test
