#include "runtime/app/bench_raw.hpp"

#include "messages/key_record.hpp"
#include "runtime/keys/hsm_step.hpp"

#include <latch>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace hsm::bench {

namespace {

using steady = std::chrono::steady_clock;

/// What the threads share.
struct shared_state {
  const raw_target* target = nullptr;
  const raw_plan* plan = nullptr;
  const std::atomic<bool>* stop = nullptr;
  /// The key of a sign loop.
  const key_record* sign_key = nullptr;
  /// The master key and the row-MAC key.
  keys::key_handles keys;
  std::vector<uint8_t> payload;
  /// Opens the window; set before `go` is counted down.
  steady::time_point deadline;
  /// Operations claimed (count mode) and done.
  std::atomic<size_t> claimed{0};
  std::atomic<size_t> done{0};
  /// Set by the first failure; ends every thread's loop.
  std::atomic<bool> failed{false};
  std::mutex mtx;
  std::string first_error;

  void fail(std::string what) {
    std::lock_guard<std::mutex> guard{mtx};
    if (first_error.empty())
      first_error = std::move(what);
    failed = true;
  }
};

/// One operation on `sess`; `made` collects resident keys to remove.
caf::error one_op(shared_state& st, pkcs11::session& sess, size_t thread,
                  size_t n, std::vector<key_record>& made) {
  auto& plan = *st.plan;
  if (plan.kind == op_kind::generate) {
    auto id = plan.key_id_prefix + "-" + std::to_string(thread) + "-"
              + std::to_string(n);
    auto rec = keys::make_key(sess, st.keys, plan.s, id, plan.resident);
    if (!rec)
      return rec.error();
    if (rec->resident())
      made.push_back(std::move(*rec));
    return caf::none;
  }
  auto sig = keys::sign_with(sess, st.keys, *st.sign_key, st.payload);
  return sig ? caf::none : sig.error();
}

void thread_main(shared_state& st, size_t index, std::latch& ready,
                 std::latch& go, std::latch& finished,
                 std::vector<double>& samples_us) {
  auto& plan = *st.plan;
  std::optional<pkcs11::session> sess;
  std::vector<key_record> made;
  size_t n = 0;
  auto opened = pkcs11::session::open(*st.target->mod, st.target->slot);
  if (!opened) {
    st.fail("C_OpenSession: " + describe(opened.error()));
  } else {
    sess.emplace(std::move(*opened));
    if (auto err = sess->login(*st.target->pin))
      st.fail(describe(err));
  }
  for (size_t i = 0; i < plan.warmup_per_session && !st.failed; ++i)
    if (auto err = one_op(st, *sess, index, n++, made))
      st.fail(describe(err));
  ready.count_down();
  go.wait();
  auto counted = plan.ops > 0;
  while (!st.failed && !*st.stop) {
    if (counted) {
      if (st.claimed.fetch_add(1) >= plan.ops)
        break;
    } else if (steady::now() >= st.deadline && st.done >= plan.min_ops) {
      break;
    }
    auto t0 = steady::now();
    if (auto err = one_op(st, *sess, index, n++, made)) {
      st.fail(describe(err));
      break;
    }
    auto us = std::chrono::duration<double, std::micro>(steady::now() - t0);
    samples_us.push_back(us.count());
    ++st.done;
  }
  finished.count_down();
  // Outside the window: remove what the loop left on the token.
  if (sess)
    for (auto& rec : made)
      static_cast<void>(keys::destroy_resident_key(*sess, rec));
}

} // namespace

raw_result run_raw(const raw_target& target, const raw_plan& plan,
                   const std::atomic<bool>& stop) {
  raw_result out;
  out.sessions = plan.sessions;
  shared_state st;
  st.target = &target;
  st.plan = &plan;
  st.stop = &stop;
  st.payload = keys::fixed_payload(plan.s, "hsm-driver bench");
  auto handles = keys::find_key_handles(*target.setup, target.master_label);
  if (!handles) {
    out.error = describe(handles.error());
    return out;
  }
  st.keys = std::move(*handles);
  std::optional<key_record> sign_key;
  if (plan.kind == op_kind::sign) {
    auto rec = keys::make_key(*target.setup, st.keys, plan.s,
                              plan.key_id_prefix + "-sign", plan.resident);
    if (!rec) {
      out.error = "making the key to sign with: " + describe(rec.error());
      return out;
    }
    sign_key = std::move(*rec);
    st.sign_key = &*sign_key;
  }
  std::latch ready{static_cast<std::ptrdiff_t>(plan.sessions)};
  std::latch go{1};
  std::latch finished{static_cast<std::ptrdiff_t>(plan.sessions)};
  std::vector<std::vector<double>> samples(plan.sessions);
  std::vector<std::thread> threads;
  threads.reserve(plan.sessions);
  for (size_t i = 0; i < plan.sessions; ++i)
    threads.emplace_back(
      [&, i] { thread_main(st, i, ready, go, finished, samples[i]); });
  ready.wait();
  auto cpu0 = self_cpu_us();
  auto t0 = steady::now();
  st.deadline = t0 + plan.duration;
  go.count_down();
  finished.wait();
  auto t1 = steady::now();
  auto cpu1 = self_cpu_us();
  for (auto& t : threads)
    t.join();
  if (sign_key)
    static_cast<void>(keys::destroy_resident_key(*target.setup, *sign_key));
  if (st.failed) {
    out.error = st.first_error;
    return out;
  }
  if (stop) {
    out.error = "interrupted";
    return out;
  }
  std::vector<double> all;
  for (auto& s : samples)
    all.insert(all.end(), s.begin(), s.end());
  out.ops = all.size();
  out.seconds = std::chrono::duration<double>(t1 - t0).count();
  if (out.ops == 0 || out.seconds <= 0) {
    out.error = "no operation completed";
    return out;
  }
  out.ops_per_s = static_cast<double>(out.ops) / out.seconds;
  out.cpu_us_per_op = (cpu1 - cpu0) / static_cast<double>(out.ops);
  out.latency = percentiles(all);
  return out;
}

} // namespace hsm::bench
