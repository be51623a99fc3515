#include "runtime/app/bench_system.hpp"

#include "runtime/crypto/hex.hpp"

#include <caf/sec.hpp>
#include <fcntl.h>
#include <openssl/sha.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <thread>

namespace hsm::bench {

namespace {

using steady = std::chrono::steady_clock;
using json = nlohmann::json;

/// How often the proxy's request states are read while waiting: a
/// twentieth of the latency seen so far (so that the reading costs little
/// CPU and still resolves the latency to about 5 %), within these bounds.
constexpr auto min_watch_interval = std::chrono::microseconds{100};
constexpr auto first_watch_interval = std::chrono::microseconds{200};
constexpr auto max_watch_interval = std::chrono::microseconds{5000};

caf::error spawn_error(std::string what) {
  return caf::make_error(caf::sec::runtime_error, std::move(what));
}

/// `status` from waitpid as one number: the exit code, or 128 + signal.
int decode_status(int status) {
  if (WIFEXITED(status))
    return WEXITSTATUS(status);
  if (WIFSIGNALED(status))
    return 128 + WTERMSIG(status);
  return -1;
}

} // namespace

// -- child_process
// -------------------------------------------------------------

caf::expected<child_process>
child_process::spawn(const std::vector<std::string>& args,
                     const std::vector<std::string>& env,
                     const std::filesystem::path& log) {
  // Everything the child touches is made before fork: after it, only
  // async-signal-safe calls.
  std::vector<char*> argv;
  static char self_name[] = "hsm-driver";
  argv.push_back(self_name);
  for (auto& a : args)
    argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (auto& e : env)
    envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                      0600);
  if (log_fd < 0)
    return spawn_error("cannot open " + log.string() + ": "
                       + std::strerror(errno));
  int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  auto parent = ::getpid();
  auto pid = ::fork();
  if (pid < 0) {
    auto err = errno;
    ::close(log_fd);
    ::close(null_fd);
    return spawn_error(std::string{"fork: "} + std::strerror(err));
  }
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent)
      ::_exit(127);
    ::setpgid(0, 0);
    if (null_fd >= 0)
      ::dup2(null_fd, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::close_range(3, ~0U, 0);
    ::execve("/proc/self/exe", argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(log_fd);
  if (null_fd >= 0)
    ::close(null_fd);
  child_process out;
  out.pid_ = pid;
  return out;
}

child_process::child_process(child_process&& other) noexcept
  : pid_(other.pid_), status_(other.status_) {
  other.pid_ = -1;
}

child_process& child_process::operator=(child_process&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0 && !status_)
      stop(std::chrono::milliseconds{40000});
    pid_ = other.pid_;
    status_ = other.status_;
    other.pid_ = -1;
  }
  return *this;
}

child_process::~child_process() {
  if (pid_ > 0 && !status_)
    stop(std::chrono::milliseconds{40000});
}

bool child_process::running() {
  if (pid_ <= 0 || status_)
    return false;
  int status = 0;
  auto r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    status_ = decode_status(status);
    return false;
  }
  return r == 0;
}

int child_process::stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0)
    return -1;
  if (!running())
    return status_.value_or(-1);
  ::kill(pid_, SIGTERM);
  auto deadline = steady::now() + grace;
  while (running() && steady::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds{10});
  if (!status_) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    if (::waitpid(pid_, &status, 0) == pid_)
      status_ = decode_status(status);
  }
  return status_.value_or(-1);
}

std::string log_tail(const std::filesystem::path& log, size_t lines) {
  std::ifstream in{log};
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    last.push_back(line);
    if (last.size() > lines)
      last.pop_front();
  }
  std::string out;
  for (auto& l : last)
    out += "    " + l + "\n";
  return out;
}

// -- the full-system run
// -------------------------------------------------------

namespace {

/// One request watched through the proxy.
struct watched {
  std::string id;
  /// The last time it was seen queued (first: when it was enqueued).
  steady::time_point unleased;
  /// When it was first seen leased.
  std::optional<steady::time_point> leased;
  /// When it was first seen done.
  std::optional<steady::time_point> done;
  bool ok = false;
  std::string error;
};

/// Enqueues one request per `params` entry and returns them as watched.
std::vector<watched> enqueue_all(net::reference_proxy& proxy,
                                 const std::string& kind,
                                 const std::vector<json>& params) {
  std::vector<watched> out;
  out.reserve(params.size());
  for (auto& p : params) {
    watched w;
    w.unleased = steady::now();
    w.id = proxy.enqueue(kind, p);
    out.push_back(std::move(w));
  }
  return out;
}

/// Waits until every request of `reqs` is done, reading their states every
/// few hundred microseconds (see `min_watch_interval`). Requests leave the
/// queue front first, so a scan stops at the first one still queued. Returns an
/// empty string, or why it gave up.
std::string await_all(net::reference_proxy& proxy, std::vector<watched>& reqs,
                      child_process& driver, const std::atomic<bool>& stop,
                      std::chrono::milliseconds stall_timeout) {
  size_t front = 0;
  auto last_progress = steady::now();
  std::chrono::microseconds interval = first_watch_interval;
  while (front < reqs.size()) {
    if (stop)
      return "interrupted";
    if (!driver.running())
      return "the driver exited (status "
             + std::to_string(driver.exit_status().value_or(-1)) + ")";
    for (size_t i = front; i < reqs.size(); ++i) {
      auto& r = reqs[i];
      if (r.done)
        continue;
      auto st = proxy.request_state(r.id);
      auto now = steady::now();
      if (!st)
        return "the proxy lost request " + r.id;
      auto state = (*st)["state"].get<std::string>();
      if (state == "queued") {
        r.unleased = now;
        break;
      }
      if (state == "leased") {
        if (!r.leased)
          r.leased = now;
        continue;
      }
      r.done = now;
      if (!r.leased)
        r.leased = r.unleased; // leased and done between two reads
      auto latency = std::chrono::duration_cast<std::chrono::microseconds>(
        *r.done - *r.leased);
      interval = std::clamp(latency / 20, min_watch_interval,
                            max_watch_interval);
      r.ok = st->value("ok", false);
      if (!r.ok)
        r.error = st->contains("error") ? (*st)["error"].dump() : "error";
      last_progress = now;
    }
    while (front < reqs.size() && reqs[front].done)
      ++front;
    if (front == reqs.size())
      break;
    if (steady::now() - last_progress > stall_timeout)
      return "no request finished for "
             + std::to_string(stall_timeout.count() / 1000) + " s ("
             + std::to_string(reqs.size() - front) + " of "
             + std::to_string(reqs.size()) + " open)";
    std::this_thread::sleep_for(interval);
  }
  return {};
}

/// The first error among `reqs`, or empty.
std::string first_error(const std::vector<watched>& reqs, size_t* count) {
  std::string out;
  size_t n = 0;
  for (auto& r : reqs)
    if (!r.ok) {
      ++n;
      if (out.empty())
        out = r.error;
    }
  if (count != nullptr)
    *count = n;
  return out;
}

/// A 32-byte payload, different per `n`: SHA-256 of a counter (the hash an
/// ECDSA request carries; for Ed25519, the message itself).
std::string payload_hex(size_t n) {
  auto text = "hsm-driver bench " + std::to_string(n);
  std::vector<uint8_t> digest(SHA256_DIGEST_LENGTH);
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(),
         digest.data());
  return crypto::to_hex(digest);
}

/// The wire name of a request kind.
const char* wire_kind(op_kind k) {
  return k == op_kind::generate ? "generate_key" : "sign";
}

/// Waits until no long-poll is parked at the proxy (a stopped driver's
/// last poll ends within its poll wait): a parked poll from a dead driver
/// would lease the next run's requests and hold them a whole lease.
void await_no_polls(net::reference_proxy& proxy,
                    std::chrono::milliseconds limit) {
  auto deadline = steady::now() + limit;
  while (proxy.waiting_polls() > 0 && steady::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds{10});
}

} // namespace

// -- e2e_driver ---------------------------------------------------------------

e2e_driver::e2e_driver(net::reference_proxy& proxy, const driver_launch& launch,
                       const e2e_plan& plan, const std::atomic<bool>& stop,
                       std::vector<std::string>& key_ids)
  : proxy_(proxy),
    launch_(launch),
    plan_(plan),
    stop_(stop),
    key_ids_(key_ids) {
  // nop
}

pid_t e2e_driver::pid() const {
  return child_ ? child_->pid() : -1;
}

std::string e2e_driver::failed(std::string why) {
  if (child_ && child_->running())
    child_->stop(plan_.stop_timeout);
  return why + "; the driver's log (" + launch_.log.string() + ") ends:\n"
         + log_tail(launch_.log);
}

std::vector<json> e2e_driver::gen_params(size_t from, size_t count,
                                         const std::string& tag) {
  auto scheme_name = std::string{to_string(plan_.s)};
  std::vector<json> params;
  params.reserve(count);
  for (size_t i = from; i < from + count; ++i) {
    auto id = plan_.key_prefix + "-" + tag + std::to_string(i);
    key_ids_.push_back(id);
    params.push_back(json{{"key_id", id}, {"scheme", scheme_name}});
  }
  return params;
}

std::vector<json> e2e_driver::kind_params(size_t count) {
  if (plan_.kind == op_kind::generate) {
    auto p = gen_params(next_gen_, count, "g");
    next_gen_ += count;
    return p;
  }
  std::vector<json> params;
  params.reserve(count);
  for (size_t i = 0; i < count; ++i, ++next_sign_)
    params.push_back(
      json{{"key_id", sign_keys_[next_sign_ % sign_keys_.size()]},
           {"payload", payload_hex(next_sign_)}});
  return params;
}

std::string e2e_driver::start() {
  await_no_polls(proxy_, std::chrono::seconds{5});
  auto args = launch_.args;
  args.push_back("--sessions");
  args.push_back(std::to_string(plan_.sessions));
  auto child = child_process::spawn(args, launch_.env, launch_.log);
  if (!child)
    return describe(child.error());
  child_.emplace(std::move(*child));
  // Ready when its first long-poll is parked (it polls once a session is
  // healthy).
  auto ready_by = steady::now() + plan_.start_timeout;
  while (proxy_.waiting_polls() == 0) {
    if (stop_)
      return failed("interrupted");
    if (!child_->running())
      return failed("the driver exited at start (status "
                    + std::to_string(child_->exit_status().value_or(-1)) + ")");
    if (steady::now() > ready_by)
      return failed("the driver did not poll within "
                    + std::to_string(plan_.start_timeout.count() / 1000)
                    + " s");
    std::this_thread::sleep_for(std::chrono::milliseconds{5});
  }
  // Untimed: the keys a sign run uses, then a warm-up of the run's kind.
  if (plan_.kind == op_kind::sign) {
    auto params = gen_params(0, std::max<size_t>(1, plan_.sign_keys), "k");
    for (auto& p : params)
      sign_keys_.push_back(p["key_id"].get<std::string>());
    auto reqs = enqueue_all(proxy_, "generate_key", params);
    if (auto why = await_all(proxy_, reqs, *child_, stop_, plan_.stall_timeout);
        !why.empty())
      return failed("making the keys to sign with: " + why);
    if (auto err = first_error(reqs, nullptr); !err.empty())
      return failed("making the keys to sign with: " + err);
  }
  if (plan_.warmup > 0) {
    auto reqs = enqueue_all(proxy_, wire_kind(plan_.kind),
                            kind_params(plan_.warmup));
    if (auto why = await_all(proxy_, reqs, *child_, stop_, plan_.stall_timeout);
        !why.empty())
      return failed("warm-up: " + why);
    if (auto err = first_error(reqs, nullptr); !err.empty())
      return failed("warm-up: " + err);
  }
  return {};
}

e2e_result e2e_driver::window(size_t count) {
  e2e_result out;
  out.sessions = plan_.sessions;
  if (!child_) {
    out.error = "the driver was not started";
    return out;
  }
  // Every request enqueued at once, watched until done.
  auto params = kind_params(count);
  auto redelivered0 = proxy_.stats().redelivered;
  auto cpu0 = proc_cpu_us(child_->pid());
  auto self0 = self_cpu_us();
  auto t0 = steady::now();
  auto reqs = enqueue_all(proxy_, wire_kind(plan_.kind), params);
  params.clear();
  params.shrink_to_fit();
  if (auto why = await_all(proxy_, reqs, *child_, stop_, plan_.stall_timeout);
      !why.empty()) {
    out.error = failed(why);
    return out;
  }
  auto cpu1 = proc_cpu_us(child_->pid());
  auto self1 = self_cpu_us();
  auto t_end = t0;
  std::vector<double> samples;
  samples.reserve(reqs.size());
  for (auto& r : reqs) {
    t_end = std::max(t_end, *r.done);
    samples.push_back(
      std::chrono::duration<double, std::micro>(*r.done - *r.leased).count());
  }
  auto hwm = proc_peak_rss_kib(child_->pid());
  auto rss = proc_rss_kib(child_->pid());
  out.redelivered = proxy_.stats().redelivered - redelivered0;
  out.first_error = first_error(reqs, &out.errors);
  out.requests = reqs.size();
  out.seconds = std::chrono::duration<double>(t_end - t0).count();
  if (out.seconds <= 0) {
    out.error = failed("the window has no length");
    return out;
  }
  out.ops_per_s = static_cast<double>(out.requests) / out.seconds;
  out.latency = percentiles(samples);
  auto n = static_cast<double>(out.requests);
  if (cpu0 && cpu1)
    out.driver_cpu_us_per_request = (*cpu1 - *cpu0) / n;
  out.proxy_cpu_us_per_request = (self1 - self0) / n;
  if (cpu0 && cpu1)
    out.host_cpu_pct = 100.0 * ((*cpu1 - *cpu0) + (self1 - self0))
                       / (out.seconds * 1e6 * cpu_count());
  out.peak_rss_mib = hwm ? static_cast<double>(*hwm) / 1024.0 : 0.0;
  out.rss_mib = rss ? static_cast<double>(*rss) / 1024.0 : 0.0;
  return out;
}

int e2e_driver::finish() {
  if (!child_)
    return -1;
  return child_->stop(plan_.stop_timeout);
}

// -- run_e2e, run_soak --------------------------------------------------------

e2e_result run_e2e(net::reference_proxy& proxy, const driver_launch& launch,
                   const e2e_plan& plan, const std::atomic<bool>& stop,
                   std::vector<std::string>& key_ids) {
  e2e_driver driver{proxy, launch, plan, stop, key_ids};
  if (auto why = driver.start(); !why.empty()) {
    e2e_result out;
    out.sessions = plan.sessions;
    out.error = std::move(why);
    return out;
  }
  auto out = driver.window(plan.requests);
  if (!out.error.empty())
    return out;
  auto status = driver.finish();
  if (status != 0)
    out.first_error += (out.first_error.empty() ? "" : "; ")
                       + std::string{"the driver exited with status "}
                       + std::to_string(status) + " after SIGTERM";
  return out;
}

soak_result run_soak(net::reference_proxy& proxy, const driver_launch& launch,
                     const soak_plan& plan, const std::string& store,
                     const std::atomic<bool>& stop,
                     std::vector<std::string>& key_ids,
                     const std::function<void(const soak_result&)>& on_sample) {
  soak_result out;
  out.store = store;
  out.scheme = plan.base.s;
  out.kind = plan.base.kind;
  out.sessions = plan.base.sessions;
  out.requests = plan.requests;
  out.chunk = std::min(plan.chunk, plan.requests);
  e2e_driver driver{proxy, launch, plan.base, stop, key_ids};
  if (auto why = driver.start(); !why.empty()) {
    out.error = std::move(why);
    return out;
  }
  auto mib = [](std::optional<uint64_t> kib) {
    return kib ? static_cast<double>(*kib) / 1024.0 : 0.0;
  };
  auto t0 = steady::now();
  auto sample = [&](size_t done, std::optional<e2e_result> chunk) {
    soak_sample s;
    s.requests_done = done;
    s.elapsed_s = std::chrono::duration<double>(steady::now() - t0).count();
    s.rss_mib = mib(proc_rss_kib(driver.pid()));
    s.hwm_mib = mib(proc_peak_rss_kib(driver.pid()));
    s.bench_rss_mib = mib(proc_rss_kib(::getpid()));
    s.chunk = std::move(chunk);
    out.samples.push_back(std::move(s));
    if (on_sample)
      on_sample(out);
  };
  sample(0, std::nullopt);
  size_t done = 0;
  while (done < plan.requests) {
    if (stop) {
      out.error = "interrupted";
      driver.finish();
      return out;
    }
    auto n = std::min(out.chunk, plan.requests - done);
    auto w = driver.window(n);
    if (!w.error.empty()) {
      out.error = "after " + std::to_string(done) + " requests: " + w.error;
      return out;
    }
    done += w.requests;
    if (w.errors > 0 && out.first_error.empty())
      out.first_error = w.first_error;
    out.errors += w.errors;
    sample(done, std::move(w));
  }
  auto status = driver.finish();
  if (status != 0)
    out.first_error += (out.first_error.empty() ? "" : "; ")
                       + std::string{"the driver exited with status "}
                       + std::to_string(status) + " after SIGTERM";
  return out;
}

} // namespace hsm::bench
