// Micro-benchmark (Google Benchmark) of the dispatcher's own cost per job:
// the real dispatcher (actors/dispatcher.cpp) on a real, threaded actor
// system (the daemon's scheduler: two workers, work sharing), with fakes in
// place of everything slow around it, so that a regression in the engine
// shows up (end to end it hides behind the HSM's time). No HSM, no
// database, no network.
//
// The fakes:
// - a poller that does what actors/poller.cpp does with a poll's jobs:
//   asks for credit (`credit_atom`, answered once there is credit), sends
//   that many `(job_atom, job)` to the dispatcher, asks again;
// - N sessions that answer at once with a well-formed result: a finished
//   secp256k1 signature (sign), a key record (generate);
// - a store that answers lookups from a prebuilt map (sign: every key is
//   there; generate: none is, so every job goes to a session) and
//   acknowledges puts at once (nothing is written, so every iteration does
//   the same work);
// - a poster that counts the results and acknowledges them;
// - a supervisor (scheduled, as in the daemon) that only listens.
// `BM_Dispatch/sign|generate` spawns the fakes as scheduled actors: they
// share the two workers with the dispatcher, and no thread is woken per
// message. `BM_Dispatch/sign_detached|generate_detached` spawns them
// detached, as the daemon spawns sessions, store, poster and poller: then
// the dispatcher (and the idle supervisor) is all that runs on CAF's
// workers, so `sched_us_per_job` is the dispatcher's own CPU, thread
// wake-ups included.
//
// One iteration = K jobs from the poller's first credit question to the
// K-th result at the poster; every iteration checks that all K arrived and
// succeeded, and at the end the dispatcher's counters must agree, else the
// benchmark stops with an error. Time is wall time (the work runs on CAF's
// threads); the CPU column and `cpu_us_per_job` are the whole process's
// CPU; `sched_us_per_job` and `clock_us_per_job` that of CAF's workers and
// of its timer thread (from /proc/self/task/*/schedstat);
// `jobs_per_credit` is how many jobs one credit answer let in.

#include "actors/dispatcher.hpp"
#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
#include "messages/results.hpp"
#include "runtime/crypto/ossl.hpp"
#include "runtime/crypto/signature.hpp"

#include "caf/all.hpp"
#include <benchmark/benchmark.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using bytes = std::vector<uint8_t>;
using hsm::job_kind;

/// Jobs per iteration.
constexpr size_t jobs_per_iteration = 1000;

/// Distinct keys a sign run signs with in turn.
constexpr size_t sign_keys = 64;

/// How long an iteration may take before it counts as lost jobs.
constexpr auto iteration_deadline = std::chrono::seconds{30};

/// The scheme every job uses.
constexpr auto bench_scheme = hsm::scheme::secp256k1;

// -- inputs -------------------------------------------------------------------

/// A real key and a finished signature with it, made once with OpenSSL, so
/// that the fakes answer with what a session would (the dispatcher itself
/// checks neither; `generate` reports the public key compressed, which
/// needs a point on the curve).
struct key_material {
  bytes public_key;
  bytes hash;
  hsm::signature sig;
};

std::optional<key_material> make_key_material() {
  using hsm::crypto::pkey_ctx_ptr;
  using hsm::crypto::pkey_ptr;
  pkey_ctx_ptr gen{EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr)};
  EVP_PKEY* raw_key = nullptr;
  if (!gen || EVP_PKEY_keygen_init(gen.get()) != 1
      || EVP_PKEY_CTX_set_group_name(gen.get(), "secp256k1") != 1
      || EVP_PKEY_keygen(gen.get(), &raw_key) != 1)
    return std::nullopt;
  pkey_ptr key{raw_key};
  key_material out;
  out.public_key.resize(65);
  size_t size = 0;
  if (EVP_PKEY_get_octet_string_param(key.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                      out.public_key.data(),
                                      out.public_key.size(), &size)
        != 1
      || size != 65)
    return std::nullopt;
  out.hash.resize(32);
  if (RAND_bytes(out.hash.data(), static_cast<int>(out.hash.size())) != 1)
    return std::nullopt;
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr)};
  size_t der_size = 0;
  if (!ctx || EVP_PKEY_sign_init(ctx.get()) != 1
      || EVP_PKEY_sign(ctx.get(), nullptr, &der_size, out.hash.data(),
                       out.hash.size())
           != 1)
    return std::nullopt;
  bytes der(der_size);
  if (EVP_PKEY_sign(ctx.get(), der.data(), &der_size, out.hash.data(),
                    out.hash.size())
      != 1)
    return std::nullopt;
  der.resize(der_size);
  auto sig = hsm::crypto::finish_signature(bench_scheme, out.public_key,
                                           out.hash, der);
  if (!sig)
    return std::nullopt;
  out.sig = std::move(*sig);
  return out;
}

/// A stored key as the store would return it (a wrapped blob of the size
/// a wrapped secp256k1 PKCS#8 key has).
hsm::key_record make_record(const std::string& key_id, const key_material& km) {
  hsm::key_record r;
  r.key_id = key_id;
  r.scheme = bench_scheme;
  r.public_key = km.public_key;
  r.key_blob.assign(144, 0x5a);
  r.wrap_mechanism = std::string{hsm::aes_key_wrap_pad};
  r.created_at_ms = 1'700'000'000'000;
  return r;
}

using key_map = std::unordered_map<std::string, hsm::key_record>;

/// What the poller hands over in one iteration: `n` jobs of `kind`, with a
/// lease far in the future (so the dispatcher checks it, as it does for
/// the proxy's leases, and always starts the job).
std::vector<hsm::job> make_jobs(job_kind kind, size_t n,
                                const key_material& km) {
  auto lease_end = std::chrono::steady_clock::now() + std::chrono::hours{1};
  std::vector<hsm::job> out(n);
  for (size_t i = 0; i < n; ++i) {
    auto& j = out[i];
    j.id = "req-" + std::to_string(i);
    j.lease = "lease-" + std::to_string(i);
    j.kind = kind;
    j.scheme = bench_scheme;
    if (kind == job_kind::sign) {
      j.key_id = "bench-key-" + std::to_string(i % sign_keys);
      j.payload = km.hash;
    } else {
      j.key_id = "new-key-" + std::to_string(i);
    }
    j.lease_deadline = lease_end;
    j.start_by = lease_end - std::chrono::seconds{1};
  }
  return out;
}

// -- what the poster saw ------------------------------------------------------

/// The results of the current iteration, shared by the poster (a CAF
/// thread) and the benchmark thread.
class tally {
public:
  void start(size_t expected) {
    std::lock_guard guard{mx_};
    expected_ = expected;
    posted_ = 0;
    ok_ = 0;
    first_error_.clear();
  }

  void add(const hsm::job_result& r) {
    std::lock_guard guard{mx_};
    ++posted_;
    if (r.ok())
      ++ok_;
    else if (first_error_.empty())
      first_error_ = std::get<hsm::error_result>(r.outcome).code + ": "
                     + std::get<hsm::error_result>(r.outcome).message;
    if (posted_ == expected_)
      cv_.notify_one();
  }

  /// Waits until every expected result is in (or `timeout`); returns an
  /// empty string when all arrived and succeeded, else what went wrong.
  std::string wait(std::chrono::seconds timeout) {
    std::unique_lock guard{mx_};
    cv_.wait_for(guard, timeout, [this] { return posted_ >= expected_; });
    if (posted_ == expected_ && ok_ == expected_)
      return {};
    auto out = std::to_string(posted_) + " of " + std::to_string(expected_)
               + " results posted, " + std::to_string(ok_) + " ok";
    if (!first_error_.empty())
      out += "; first error: " + first_error_;
    return out;
  }

private:
  std::mutex mx_;
  std::condition_variable cv_;
  size_t expected_ = 0;
  size_t posted_ = 0;
  size_t ok_ = 0;
  std::string first_error_;
};

// -- the fakes ----------------------------------------------------------------

hsm::hsm_session_actor::behavior_type
fake_session(hsm::hsm_session_actor::pointer,
             std::shared_ptr<const key_material> km) {
  return {
    [=](hsm::generate_atom, const std::string& key_id,
        hsm::scheme s) -> caf::result<hsm::key_record> {
      auto r = make_record(key_id, *km);
      r.scheme = s;
      return r;
    },
    [=](hsm::sign_atom, const hsm::key_record& rec,
        const bytes&) -> caf::result<hsm::signature_result> {
      return hsm::signature_result{rec.key_id, rec.scheme, km->sig};
    },
    [=](hsm::destroy_atom, const hsm::key_record&) {},
  };
}

hsm::store_actor::behavior_type
fake_store(hsm::store_actor::pointer, std::shared_ptr<const key_map> keys) {
  return {
    [=](caf::get_atom, const std::string& id) -> caf::result<hsm::key_lookup> {
      auto i = keys->find(id);
      if (i == keys->end())
        return hsm::key_lookup{};
      return hsm::key_lookup{true, i->second};
    },
    [=](caf::put_atom,
        const hsm::key_record& r) -> caf::result<hsm::put_result> {
      return hsm::put_result{r, true};
    },
    [=](caf::put_atom, const hsm::key_record& r,
        const hsm::audit_entry&) -> caf::result<hsm::put_result> {
      return hsm::put_result{r, true, true};
    },
  };
}

hsm::result_poster_actor::behavior_type
fake_poster(hsm::result_poster_actor::pointer, std::shared_ptr<tally> t) {
  return {
    [=](hsm::result_atom, const hsm::job_result& r) {
      t->add(r);
      return true;
    },
    [=](hsm::flush_atom) {},
  };
}

hsm::session_supervisor_actor::behavior_type
fake_supervisor(hsm::session_supervisor_actor::pointer) {
  return {
    [](hsm::ready_atom, size_t, uint64_t) {},
    [](hsm::replace_atom, size_t, const hsm::hsm_session_actor&) {},
    [](hsm::session_ok_atom, size_t) {},
    [](hsm::respawn_atom, size_t, uint64_t) {},
    [](hsm::stuck_atom) { return size_t{0}; },
    [](hsm::close_atom) { return size_t{0}; },
  };
}

struct poller_state {
  hsm::dispatcher_actor dispatcher;
  std::shared_ptr<const std::vector<hsm::job>> jobs;
  size_t next = 0;
  size_t end = 0;
  /// Credit answers so far (read by the benchmark thread after a run).
  std::shared_ptr<std::atomic<uint64_t>> credit_answers;
};

using poller_ptr = caf::stateful_actor<poller_state>*;

/// Asks for credit and hands over that many jobs, like the real poller
/// after each poll, until `end`.
void ask_credit(poller_ptr self) {
  self->request(self->state.dispatcher, caf::infinite, hsm::credit_atom::value)
    .then([=](int64_t credit) {
      auto& st = self->state;
      st.credit_answers->fetch_add(1, std::memory_order_relaxed);
      for (int64_t i = 0; i < credit && st.next < st.end; ++i)
        self->send(st.dispatcher, hsm::job_atom::value, (*st.jobs)[st.next++]);
      if (st.next < st.end)
        ask_credit(self);
    });
}

/// `(poll_atom, n)`: hands over the first `n` prebuilt jobs.
caf::behavior fake_poller(poller_ptr self, hsm::dispatcher_actor dispatcher,
                          std::shared_ptr<const std::vector<hsm::job>> jobs,
                          std::shared_ptr<std::atomic<uint64_t>> answers) {
  self->state.dispatcher = std::move(dispatcher);
  self->state.jobs = std::move(jobs);
  self->state.credit_answers = std::move(answers);
  return {
    [=](hsm::poll_atom, size_t n) {
      self->state.next = 0;
      self->state.end = std::min(n, self->state.jobs->size());
      ask_credit(self);
    },
  };
}

// -- CPU per thread -----------------------------------------------------------

/// CPU time of the whole process, in nanoseconds.
double process_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

/// One thread's name and CPU time (ns).
struct thread_cpu {
  std::string name;
  double ns = 0;
};

/// CPU time (ns) of every thread of the process now, by thread id, with the
/// thread's name: CAF 0.17 names its scheduler workers `caf.multiplexer`,
/// its timer thread `caf.clock` and detached actors `caf.actor`. Read from
/// /proc/self/task/*/schedstat (first field: time on a CPU, in ns).
std::map<std::string, thread_cpu> cpu_by_thread() {
  std::map<std::string, thread_cpu> out;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    std::ifstream comm{e.path() / "comm"};
    std::ifstream stat{e.path() / "schedstat"};
    thread_cpu t;
    if (std::getline(comm, t.name) && (stat >> t.ns))
      out.emplace(e.path().filename().string(), std::move(t));
  }
  return out;
}

/// CPU (ns) between two snapshots of the threads named `name` that are in
/// both.
double cpu_of(const std::map<std::string, thread_cpu>& before,
              const std::map<std::string, thread_cpu>& after,
              const std::string& name) {
  double sum = 0;
  for (auto& [tid, t] : after)
    if (auto i = before.find(tid); t.name == name && i != before.end())
      sum += t.ns - i->second.ns;
  return sum;
}

// -- the benchmark ------------------------------------------------------------

/// The actors of one benchmark run; destroyed before the actor system.
struct rig {
  rig(caf::actor_system& sys, size_t sessions, job_kind kind,
      hsm::spawn_mode fakes, std::shared_ptr<const key_material> km)
    : self(sys) {
    auto keys = std::make_shared<key_map>();
    for (size_t i = 0; i < sign_keys; ++i) {
      auto id = "bench-key-" + std::to_string(i);
      keys->emplace(id, make_record(id, *km));
    }
    store = hsm::spawn_as(sys, fakes, fake_store,
                          std::shared_ptr<const key_map>(keys));
    poster = hsm::spawn_as(sys, fakes, fake_poster, results);
    hsm::dispatcher_config dcfg;
    dcfg.sessions = sessions;
    for (size_t i = 0; i < dcfg.caps.schemes.size(); ++i) {
      dcfg.caps.schemes[i].scheme = hsm::all_schemes[i];
      dcfg.caps.schemes[i].served = true;
      dcfg.caps.schemes[i].detail = "ok";
    }
    // The supervisor is scheduled, as in the daemon.
    dispatcher = hsm::spawn_dispatcher(sys, dcfg, store, poster,
                                       [&sys](hsm::dispatcher_actor) {
                                         return sys.spawn(fake_supervisor);
                                       });
    for (size_t i = 0; i < sessions; ++i) {
      session_handles.push_back(hsm::spawn_as(sys, fakes, fake_session, km));
      self->send(dispatcher, hsm::session_up_atom::value, i,
                 session_handles.back());
    }
    poller = hsm::spawn_as(sys, fakes, fake_poller, dispatcher,
                           std::make_shared<const std::vector<hsm::job>>(
                             make_jobs(kind, jobs_per_iteration, *km)),
                           credit_answers);
  }

  ~rig() {
    for (auto& s : session_handles)
      self->send_exit(s, caf::exit_reason::user_shutdown);
    self->send_exit(poller, caf::exit_reason::user_shutdown);
    // Takes its (linked) supervisor along.
    self->send_exit(dispatcher, caf::exit_reason::user_shutdown);
    self->send_exit(poster, caf::exit_reason::user_shutdown);
    self->send_exit(store, caf::exit_reason::user_shutdown);
  }

  /// Hands the poller one iteration's jobs and waits for their results;
  /// empty when all were posted and succeeded, else what went wrong.
  std::string run_iteration() {
    results->start(jobs_per_iteration);
    self->send(poller, hsm::poll_atom::value, jobs_per_iteration);
    return results->wait(iteration_deadline);
  }

  /// The dispatcher's counters; nullopt when it does not answer.
  std::optional<hsm::dispatcher_stats> stats() {
    std::optional<hsm::dispatcher_stats> out;
    self->request(dispatcher, std::chrono::seconds{10}, hsm::stats_atom::value)
      .receive([&](hsm::dispatcher_stats& s) { out = s; }, [](caf::error&) {});
    return out;
  }

  caf::scoped_actor self;
  std::shared_ptr<tally> results = std::make_shared<tally>();
  std::shared_ptr<std::atomic<uint64_t>> credit_answers
    = std::make_shared<std::atomic<uint64_t>>(0);
  hsm::store_actor store;
  hsm::result_poster_actor poster;
  hsm::dispatcher_actor dispatcher;
  std::vector<hsm::hsm_session_actor> session_handles;
  caf::actor poller;
};

/// The dispatcher with range(0) fake sessions, jobs of `kind`, the fakes
/// spawned as `fakes` says: jobs/s, and CPU per job of the process, of
/// CAF's scheduler threads and of CAF's timer thread.
void BM_Dispatch(benchmark::State& state, job_kind kind,
                 hsm::spawn_mode fakes) {
  auto sessions = static_cast<size_t>(state.range(0));
  auto km = make_key_material();
  if (!km) {
    state.SkipWithError("cannot make a secp256k1 key and signature");
    return;
  }
  // The daemon's scheduler (runtime/app/daemon.cpp): two workers, sharing.
  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  cfg.set("scheduler.policy", caf::atom("sharing"));
  caf::actor_system sys{cfg};
  {
    rig r{sys, sessions, kind, fakes,
          std::make_shared<const key_material>(std::move(*km))};
    // Every session is up: the credit is sessions x pipeline.
    int64_t credit = -1;
    r.self
      ->request(r.dispatcher, std::chrono::seconds{10}, hsm::credit_atom::value)
      .receive([&](int64_t c) { credit = c; }, [](caf::error&) {});
    if (credit != static_cast<int64_t>(sessions * hsm::default_pipeline)) {
      state.SkipWithError("the dispatcher did not see every session up");
      return;
    }
    // One untimed iteration: first-use allocations, caches warm.
    if (auto err = r.run_iteration(); !err.empty()) {
      state.SkipWithError(("warm-up: " + err).c_str());
      return;
    }
    uint64_t iterations = 0;
    auto threads_before = cpu_by_thread();
    auto credits_before = r.credit_answers->load();
    auto cpu_before = process_cpu_ns();
    for (auto _ : state) {
      if (auto err = r.run_iteration(); !err.empty()) {
        state.SkipWithError(err.c_str());
        break;
      }
      ++iterations;
    }
    auto cpu = process_cpu_ns() - cpu_before;
    auto threads_after = cpu_by_thread();
    auto credit_answers = r.credit_answers->load() - credits_before;
    if (state.error_occurred())
      return;
    // The dispatcher agrees: every job done once, none failed or retried.
    auto total = (iterations + 1) * jobs_per_iteration;
    auto st = r.stats();
    if (!st || st->done != total || st->failed != 0 || st->retried != 0) {
      state.SkipWithError("the dispatcher's counters disagree with the "
                          "results posted");
      return;
    }
    auto jobs = static_cast<double>(iterations * jobs_per_iteration);
    state.SetItemsProcessed(static_cast<int64_t>(iterations)
                            * static_cast<int64_t>(jobs_per_iteration));
    auto us_per_job = [&](double ns) { return ns / 1e3 / jobs; };
    state.counters["cpu_us_per_job"] = us_per_job(cpu);
    state.counters["sched_us_per_job"] = us_per_job(
      cpu_of(threads_before, threads_after, "caf.multiplexer"));
    state.counters["clock_us_per_job"] = us_per_job(
      cpu_of(threads_before, threads_after, "caf.clock"));
    // How many jobs one credit answer let in: what one poll would fetch.
    state.counters["jobs_per_credit"]
      = jobs / static_cast<double>(std::max<uint64_t>(credit_answers, 1));
  }
}

void dispatch_args(benchmark::internal::Benchmark* b) {
  b->ArgName("sessions")
    ->Arg(1)
    ->Arg(2)
    ->Arg(8)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
}

constexpr auto scheduled = hsm::spawn_mode::scheduled;
constexpr auto detached = hsm::spawn_mode::detached;

BENCHMARK_CAPTURE(BM_Dispatch, sign, job_kind::sign, scheduled)
  ->Apply(dispatch_args);
BENCHMARK_CAPTURE(BM_Dispatch, generate, job_kind::generate_key, scheduled)
  ->Apply(dispatch_args);
BENCHMARK_CAPTURE(BM_Dispatch, sign_detached, job_kind::sign, detached)
  ->Apply(dispatch_args);
BENCHMARK_CAPTURE(BM_Dispatch, generate_detached, job_kind::generate_key,
                  detached)
  ->Apply(dispatch_args);

} // namespace
