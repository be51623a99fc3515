// The dispatcher on CAF's deterministic scheduler, with scripted sessions,
// store and poster: credits, bounded queue, retries after a session failure,
// unserved schemes. No HSM, no database: pure actor logic.

#include "actors/dispatcher.hpp"

#include <map>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "caf/all.hpp"
#include "caf/scheduler/test_coordinator.hpp"

namespace hsm {
namespace {

/// What the fakes saw and answered.
struct fake_world {
  std::vector<job_result> posted;
  int session_calls = 0;
};

store_actor::behavior_type fake_store(store_actor::pointer) {
  return {
    [](caf::get_atom, const std::string& id) -> caf::result<key_lookup> {
      if (id == "missing")
        return key_lookup{};
      key_lookup k;
      k.found = true;
      k.record.key_id = id;
      k.record.scheme = scheme::p256;
      k.record.public_key.assign(65, 4);
      k.record.key_blob.assign(40, 1);
      k.record.wrap_mechanism = "CKM_AES_KEY_WRAP_PAD";
      return k;
    },
    [](caf::put_atom,
       const store::key_record& r) -> caf::result<store::put_result> {
      return store::put_result{r, true};
    },
  };
}

/// A session that signs (with a signature that will not verify: the
/// dispatcher then answers signature_mismatch, which is enough here) or,
/// when `fail`, fails like a closed session and ends.
hsm_session_actor::behavior_type
fake_session(hsm_session_actor::pointer self, std::shared_ptr<fake_world> w,
             bool fail) {
  return {
    [=](generate_atom, const std::string&,
        scheme) -> caf::result<store::key_record> {
      return caf::make_error(hsm_errc::fatal);
    },
    [=](sign_atom, const store::key_record&,
        const std::vector<uint8_t>&) -> caf::result<raw_signature> {
      ++w->session_calls;
      if (fail) {
        auto err = caf::make_error(hsm_errc::reopen_session,
                                   std::string{"C_Sign"},
                                   std::string{"CKR_SESSION_CLOSED"});
        self->quit(err);
        return err;
      }
      return raw_signature{std::vector<uint8_t>(64, 7)};
    },
    [=](destroy_atom, const store::key_record&) {},
  };
}

caf::behavior fake_poster(caf::event_based_actor*,
                          std::shared_ptr<fake_world> w) {
  return {
    [=](result_atom, const job_result& r) { w->posted.push_back(r); },
  };
}

class DispatcherTest : public ::testing::Test {
protected:
  static caf::actor_system_config& configure(caf::actor_system_config& c) {
    c.set("scheduler.policy", caf::atom("testing"));
    return c;
  }

  void SetUp() override {
    store = sys.spawn(fake_store);
    poster = sys.spawn(fake_poster, world);
  }

  void TearDown() override {
    for (auto& a : {dispatcher, poster})
      if (a)
        self->send_exit(a, caf::exit_reason::user_shutdown);
    self->send_exit(store, caf::exit_reason::user_shutdown);
    sched.run();
  }

  void spawn_dispatcher_with(size_t sessions, size_t max_queue = 64) {
    dispatcher_config dcfg;
    dcfg.sessions = sessions;
    dcfg.max_queue = max_queue;
    for (size_t i = 0; i < dcfg.caps.schemes.size(); ++i) {
      dcfg.caps.schemes[i].scheme = all_schemes[i];
      dcfg.caps.schemes[i].served = all_schemes[i] != scheme::ed25519;
      dcfg.caps.schemes[i].detail = "not wrappable";
    }
    dispatcher = hsm::spawn_dispatcher(sys, dcfg, store, poster);
    sched.run();
  }

  hsm_session_actor session(bool fail = false) {
    return sys.spawn(fake_session, world, fail);
  }

  int64_t credits() {
    int64_t out = -1;
    auto h = self->request(dispatcher, caf::infinite, credit_atom::value);
    sched.run();
    h.receive([&](int64_t n) { out = n; },
              [&](caf::error& err) { ADD_FAILURE() << describe(err); });
    return out;
  }

  job sign_job(const std::string& id, const std::string& key = "k") {
    job j;
    j.id = id;
    j.lease = "lease-" + id;
    j.kind = job_kind::sign;
    j.key_id = key;
    j.payload.assign(32, 1);
    return j;
  }

  caf::actor_system_config cfg;
  caf::actor_system sys{configure(cfg)};
  caf::scoped_actor self{sys, true};
  caf::scheduler::test_coordinator& sched
    = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  std::shared_ptr<fake_world> world = std::make_shared<fake_world>();
  store_actor store;
  caf::actor poster;
  caf::actor dispatcher;
};

TEST_F(DispatcherTest, NoHealthySlotMeansNoCredit) {
  spawn_dispatcher_with(2);
  EXPECT_EQ(credits(), 0);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session());
  sched.run();
  EXPECT_EQ(credits(), 1);
  self->send(dispatcher, slot_down_atom::value, size_t{0});
  sched.run();
  EXPECT_EQ(credits(), 0);
}

TEST_F(DispatcherTest, EveryLeaseCountsUntilItsResultIsPosted) {
  spawn_dispatcher_with(2);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session());
  self->send(dispatcher, slot_up_atom::value, size_t{1}, session());
  sched.run();
  EXPECT_EQ(credits(), 2);
  self->send(dispatcher, job_atom::value, sign_job("a"));
  // Only the dispatcher's handler runs: the job holds a slot.
  sched.run_once();
  EXPECT_EQ(credits(), 1);
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->posted.front().id, "a");
  EXPECT_EQ(credits(), 2);
}

TEST_F(DispatcherTest, QueueIsBounded) {
  spawn_dispatcher_with(1, 2);
  for (auto id : {"q1", "q2", "q3"})
    self->send(dispatcher, job_atom::value, sign_job(id));
  sched.run();
  // No slot is up: two wait, the third is answered as retryable at once.
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->posted.front().id, "q3");
  EXPECT_TRUE(world->posted.front().retryable);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session());
  sched.run();
  EXPECT_EQ(world->posted.size(), 3u);
}

TEST_F(DispatcherTest, SessionFailureCostsOneAttemptAndWaitsForANewSession) {
  spawn_dispatcher_with(1);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session(true));
  sched.run();
  self->send(dispatcher, job_atom::value, sign_job("f"));
  sched.run();
  // The session failed and ended: the job waits, not answered yet.
  EXPECT_TRUE(world->posted.empty());
  EXPECT_EQ(world->session_calls, 1);
  EXPECT_EQ(credits(), 0);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session());
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->session_calls, 2);
  dispatcher_stats st;
  auto h = self->request(dispatcher, caf::infinite, stats_atom::value);
  sched.run();
  h.receive([&](dispatcher_stats& s) { st = s; },
            [&](caf::error& err) { ADD_FAILURE() << describe(err); });
  EXPECT_EQ(st.slot_failures, 1u);
  EXPECT_EQ(st.retried, 1u);
}

TEST_F(DispatcherTest, UnknownKeyAndUnservedSchemeNeverReachASession) {
  spawn_dispatcher_with(1);
  self->send(dispatcher, slot_up_atom::value, size_t{0}, session());
  sched.run();
  self->send(dispatcher, job_atom::value, sign_job("u", "missing"));
  job ed;
  ed.id = "ed";
  ed.lease = "l";
  ed.kind = job_kind::generate_key;
  ed.key_id = "e";
  ed.scheme = scheme::ed25519;
  self->send(dispatcher, job_atom::value, ed);
  sched.run();
  ASSERT_EQ(world->posted.size(), 2u);
  std::map<std::string, std::string> code_of;
  for (auto& r : world->posted) {
    EXPECT_FALSE(r.ok);
    code_of[r.id] = r.error_code;
  }
  EXPECT_EQ(code_of["u"], "unknown_key");
  EXPECT_EQ(code_of["ed"], "scheme_unsupported");
  EXPECT_EQ(world->session_calls, 0);
}

TEST_F(DispatcherTest, StopHandsBackQueuedJobs) {
  spawn_dispatcher_with(1);
  for (auto id : {"s1", "s2"})
    self->send(dispatcher, job_atom::value, sign_job(id));
  sched.run();
  self->send(dispatcher, stop_atom::value);
  sched.run();
  ASSERT_EQ(world->posted.size(), 2u);
  for (auto& r : world->posted) {
    EXPECT_FALSE(r.ok);
    EXPECT_TRUE(r.retryable) << r.error_message;
  }
  EXPECT_EQ(credits(), 0);
}

} // namespace
} // namespace hsm
