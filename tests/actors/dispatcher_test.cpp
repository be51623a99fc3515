// The dispatcher on CAF's deterministic scheduler, with scripted sessions,
// store, poster and supervisor: credits, bounded queue, retries after a
// session failure, unserved schemes, replacement of a hung session. No HSM,
// no database: pure actor logic.

#include "actors/dispatcher.hpp"

#include "tests/support/actor_fixture.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <vector>

namespace hsm {
namespace {

/// What the fakes saw and answered.
struct fake_world {
  std::vector<job_result> posted;
  int session_calls = 0;
  /// What the supervisor was told.
  std::vector<size_t> replaced;
  std::vector<size_t> ok_after_failure;
  /// Resident keys a session was told to destroy.
  int destroyed = 0;
};

/// A store whose puts fail or lose a race, as `put_fails` says: a failure
/// looks like an answer lost after the commit (the row may be there).
store_actor::behavior_type racy_store(store_actor::pointer, bool put_fails) {
  auto put = [=](const key_record& r) -> caf::result<put_result> {
    if (put_fails)
      return caf::make_error(store_errc::unavailable,
                             std::string{"connection lost during COMMIT"});
    auto winner = r;
    winner.key_blob.assign({'o', 't', 'h', 'e', 'r'});
    return put_result{winner, false};
  };
  return {
    [](caf::get_atom, const std::string&) -> caf::result<key_lookup> {
      return key_lookup{};
    },
    [=](caf::put_atom, const key_record& r) -> caf::result<put_result> {
      return put(r);
    },
    // Lost the race: nothing inserted, nothing audited.
    [=](caf::put_atom, const key_record& r,
        const audit_entry&) -> caf::result<put_result> { return put(r); },
  };
}

/// A store whose lookups fail while `*failing` is true.
store_actor::behavior_type flaky_store(store_actor::pointer,
                                       std::shared_ptr<bool> failing) {
  return {
    [=](caf::get_atom, const std::string& id) -> caf::result<key_lookup> {
      if (*failing)
        return caf::make_error(store_errc::unavailable,
                               std::string{"server closed the connection"});
      key_lookup k;
      k.found = true;
      k.record.key_id = id;
      k.record.scheme = scheme::p256;
      k.record.public_key.assign(65, 4);
      k.record.key_blob.assign(40, 1);
      k.record.wrap_mechanism = "CKM_AES_KEY_WRAP_PAD";
      return k;
    },
    [](caf::put_atom, const key_record& r) -> caf::result<put_result> {
      return put_result{r, true};
    },
    [](caf::put_atom, const key_record& r,
       const audit_entry&) -> caf::result<put_result> {
      return put_result{r, true, true};
    },
  };
}

/// A session that makes token-resident keys and counts destroys.
hsm_session_actor::behavior_type
resident_session(hsm_session_actor::pointer, std::shared_ptr<fake_world> w) {
  return {
    [=](generate_atom, const std::string& id,
        scheme s) -> caf::result<key_record> {
      key_record rec;
      rec.key_id = id;
      rec.scheme = s;
      rec.public_key.assign(32, 9);
      rec.key_blob.assign({'g', 'e', 'n', '1'});
      rec.wrap_mechanism = std::string{resident_mechanism};
      return rec;
    },
    [=](sign_atom, const key_record&,
        const std::vector<uint8_t>&) -> caf::result<signature_result> {
      return caf::make_error(hsm_errc::fatal);
    },
    [=](destroy_atom, const key_record&) { ++w->destroyed; },
  };
}

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
    [](caf::put_atom, const key_record& r) -> caf::result<put_result> {
      return put_result{r, true};
    },
    [](caf::put_atom, const key_record& r,
       const audit_entry&) -> caf::result<put_result> {
      return put_result{r, true, true};
    },
  };
}

/// The P-256 generator, uncompressed: a public key the answer can compress.
std::vector<uint8_t> p256_generator() {
  auto hex = std::string{"046B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4"
                         "A13945D898C2964FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33"
                         "576B315ECECBB6406837BF51F5"};
  std::vector<uint8_t> out;
  for (size_t i = 0; i < hex.size(); i += 2)
    out.push_back(
      static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

/// What a `recording_store` was asked to put, and what it answers.
struct put_log {
  /// Puts without an audit entry.
  int plain = 0;
  /// The entries that came with puts.
  std::vector<audit_entry> entries;
  /// Answer every put as a lost race (the key id taken).
  bool taken = false;
};

/// A store that records its puts: inserted (and audited, with an entry)
/// unless `taken`.
store_actor::behavior_type recording_store(store_actor::pointer,
                                           std::shared_ptr<put_log> log) {
  return {
    [](caf::get_atom, const std::string&) -> caf::result<key_lookup> {
      return key_lookup{};
    },
    [=](caf::put_atom, const key_record& r) -> caf::result<put_result> {
      ++log->plain;
      return put_result{r, !log->taken};
    },
    [=](caf::put_atom, const key_record& r,
        const audit_entry& e) -> caf::result<put_result> {
      log->entries.push_back(e);
      return put_result{r, !log->taken, !log->taken};
    },
  };
}

/// A session that generates wrapped P-256 keys.
hsm_session_actor::behavior_type keygen_session(hsm_session_actor::pointer) {
  return {
    [=](generate_atom, const std::string& id,
        scheme s) -> caf::result<key_record> {
      key_record rec;
      rec.key_id = id;
      rec.scheme = s;
      rec.public_key = p256_generator();
      rec.key_blob.assign(40, 7);
      rec.wrap_mechanism = "CKM_AES_KEY_WRAP_PAD";
      return rec;
    },
    [=](sign_atom, const key_record&,
        const std::vector<uint8_t>&) -> caf::result<signature_result> {
      return caf::make_error(hsm_errc::fatal);
    },
    [=](destroy_atom, const key_record&) {},
  };
}

/// A session that signs (the signature itself does not matter here) or,
/// when `fail`, fails like a closed session and ends.
hsm_session_actor::behavior_type fake_session(hsm_session_actor::pointer self,
                                              std::shared_ptr<fake_world> w,
                                              bool fail) {
  return {
    [=](generate_atom, const std::string&, scheme) -> caf::result<key_record> {
      return caf::make_error(hsm_errc::fatal);
    },
    [=](sign_atom, const key_record&,
        const std::vector<uint8_t>&) -> caf::result<signature_result> {
      ++w->session_calls;
      if (fail) {
        auto err = caf::make_error(hsm_errc::reopen_session,
                                   std::string{"C_Sign"},
                                   std::string{"CKR_SESSION_CLOSED"});
        self->quit(err);
        return err;
      }
      return signature_result{"k", scheme::p256, signature{}};
    },
    [=](destroy_atom, const key_record&) {},
  };
}

/// A session whose calls never return in time (the request times out).
hsm_session_actor::behavior_type hung_session(hsm_session_actor::pointer,
                                              std::shared_ptr<fake_world> w) {
  return {
    [=](generate_atom, const std::string&, scheme) -> caf::result<key_record> {
      return caf::make_error(hsm_errc::fatal);
    },
    [=](sign_atom, const key_record&,
        const std::vector<uint8_t>&) -> caf::result<signature_result> {
      ++w->session_calls;
      return caf::delegated<signature_result>{}; // never answered
    },
    [=](destroy_atom, const key_record&) {},
  };
}

result_poster_actor::behavior_type fake_poster(result_poster_actor::pointer,
                                               std::shared_ptr<fake_world> w) {
  return {
    [=](result_atom, const job_result& r) {
      w->posted.push_back(r);
      return true;
    },
    [=](flush_atom) {},
  };
}

session_supervisor_actor::behavior_type
fake_supervisor(session_supervisor_actor::pointer,
                std::shared_ptr<fake_world> w) {
  return {
    [=](ready_atom, size_t, uint64_t) {},
    [=](replace_atom, size_t index, const hsm_session_actor&) {
      w->replaced.push_back(index);
    },
    [=](session_ok_atom, size_t index) {
      w->ok_after_failure.push_back(index);
    },
    [=](respawn_atom, size_t, uint64_t) {},
    [=](stuck_atom) { return size_t{0}; },
    [=](close_atom) { return size_t{0}; },
  };
}

const error_result& error_of(const job_result& r) {
  return std::get<error_result>(r.outcome);
}

class DispatcherTest : public testing::actor_fixture {
protected:
  void SetUp() override {
    store = sys.spawn(fake_store);
    poster = sys.spawn(fake_poster, world);
  }

  void TearDown() override {
    if (dispatcher)
      self->send_exit(dispatcher, caf::exit_reason::user_shutdown);
    self->send_exit(poster, caf::exit_reason::user_shutdown);
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
    dcfg.hsm_timeout = std::chrono::seconds{1};
    dcfg.metrics = metrics;
    dcfg.audit_with_put = audit_with_put;
    auto w = world;
    dispatcher = hsm::spawn_dispatcher(sys, dcfg, store, poster,
                                       [this, w](dispatcher_actor) {
                                         return sys.spawn(fake_supervisor, w);
                                       });
    sched.run();
  }

  hsm_session_actor session(bool fail = false) {
    return sys.spawn(fake_session, world, fail);
  }

  int64_t credits() {
    return ask<int64_t>(dispatcher, credit_atom::value).value_or(-1);
  }

  dispatcher_stats stats() {
    return ask<dispatcher_stats>(dispatcher, stats_atom::value)
      .value_or(dispatcher_stats{});
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

  store_actor racy_store_of(bool put_fails) {
    return sys.spawn(racy_store, put_fails);
  }

  /// Runs one generate_key (P-256) for `key_id` through a dispatcher on
  /// `with_store`, with one `session`.
  void generate_with(store_actor with_store, hsm_session_actor session,
                     const std::string& key_id) {
    self->send_exit(store, caf::exit_reason::user_shutdown);
    store = std::move(with_store);
    spawn_dispatcher_with(1);
    self->send(dispatcher, session_up_atom::value, size_t{0}, session);
    sched.run();
    job j;
    j.id = "gen-" + key_id;
    j.lease = "lease-" + key_id;
    j.kind = job_kind::generate_key;
    j.key_id = key_id;
    j.scheme = scheme::p256;
    self->send(dispatcher, job_atom::value, j);
    sched.run();
  }

  /// `generate_with` on `racy` and a session that makes resident keys.
  void generate_resident_with(store_actor racy, const std::string& key_id) {
    generate_with(std::move(racy), sys.spawn(resident_session, world), key_id);
  }

  /// `generate_with` on a store that records its puts in `log`.
  void generate_recorded(std::shared_ptr<put_log> log,
                         const std::string& key_id) {
    generate_with(sys.spawn(recording_store, std::move(log)),
                  sys.spawn(keygen_session), key_id);
  }

  std::shared_ptr<fake_world> world = std::make_shared<fake_world>();
  /// Given to the dispatcher when set before `spawn_dispatcher_with`.
  std::shared_ptr<driver_metrics> metrics;
  /// The dispatcher's `audit_with_put`, when set before
  /// `spawn_dispatcher_with`.
  bool audit_with_put = false;
  store_actor store;
  result_poster_actor poster;
  dispatcher_actor dispatcher;
};

TEST_F(DispatcherTest, NoHealthySessionMeansNoCreditUntilOneComesUp) {
  spawn_dispatcher_with(2);
  // Without a healthy session the credit question waits (no answer, no
  // timer: the poller polls for nothing).
  auto first = self->request(dispatcher, caf::infinite, credit_atom::value);
  sched.run();
  EXPECT_TRUE(self->mailbox().empty()) << "credit without a healthy session";
  EXPECT_FALSE(sched.has_pending_timeout());
  // It is answered the moment a session comes up: one healthy session
  // times the pipeline depth (2).
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  ASSERT_FALSE(self->mailbox().empty()) << "no credit after a session came up";
  first.receive([&](int64_t n) { EXPECT_EQ(n, 2); },
                [&](caf::error& err) { ADD_FAILURE() << describe(err); });
  self->send(dispatcher, session_down_atom::value, size_t{0});
  sched.run();
  auto second = self->request(dispatcher, caf::infinite, credit_atom::value);
  sched.run();
  EXPECT_TRUE(self->mailbox().empty()) << "credit after the session went down";
  // A stopping dispatcher answers 0, so that the poller sees the stop.
  self->send(dispatcher, stop_atom::value);
  sched.run();
  ASSERT_FALSE(self->mailbox().empty());
  second.receive([&](int64_t n) { EXPECT_EQ(n, 0); },
                 [&](caf::error& err) { ADD_FAILURE() << describe(err); });
}

TEST_F(DispatcherTest, WhileTheStoreFailsNoNewLeasesAreTaken) {
  auto failing = std::make_shared<bool>(true);
  self->send_exit(store, caf::exit_reason::user_shutdown);
  store = sys.spawn(flaky_store, failing);
  spawn_dispatcher_with(1);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  EXPECT_EQ(credits(), 2);
  self->send(dispatcher, job_atom::value, sign_job("s1"));
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_TRUE(error_of(world->posted[0]).retryable);
  EXPECT_EQ(stats().store_pauses, 1u);
  // Paused: the credit question waits.
  auto asked = self->request(dispatcher, caf::infinite, credit_atom::value);
  sched.run();
  EXPECT_TRUE(self->mailbox().empty()) << "credit while the store fails";
  // The first pause is 200 ms; then credit comes back.
  sched.advance_time(std::chrono::milliseconds{199});
  sched.run();
  EXPECT_TRUE(self->mailbox().empty()) << "the pause ended early";
  sched.advance_time(std::chrono::milliseconds{1});
  sched.run();
  ASSERT_FALSE(self->mailbox().empty()) << "no credit after the pause";
  asked.receive([&](int64_t n) { EXPECT_EQ(n, 2); },
                [&](caf::error& err) { ADD_FAILURE() << describe(err); });
  // Still failing: the next pause is twice as long (400 ms).
  self->send(dispatcher, job_atom::value, sign_job("s2"));
  sched.run();
  EXPECT_EQ(stats().store_pauses, 2u);
  auto again = self->request(dispatcher, caf::infinite, credit_atom::value);
  sched.advance_time(std::chrono::milliseconds{399});
  sched.run();
  EXPECT_TRUE(self->mailbox().empty()) << "the pause did not grow";
  sched.advance_time(std::chrono::milliseconds{1});
  sched.run();
  ASSERT_FALSE(self->mailbox().empty());
  again.receive([](int64_t) {}, [](caf::error&) {});
  // The store is back: the job is served, and the pause resets.
  *failing = false;
  self->send(dispatcher, job_atom::value, sign_job("s3"));
  sched.run();
  ASSERT_EQ(world->posted.size(), 3u);
  EXPECT_TRUE(world->posted[2].ok());
  EXPECT_EQ(credits(), 2);
}

TEST_F(DispatcherTest, ResidentKeyStaysWhenThePutOutcomeIsInDoubt) {
  generate_resident_with(racy_store_of(true), "res-1");
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_TRUE(error_of(world->posted[0]).retryable)
    << error_of(world->posted[0]).code;
  EXPECT_EQ(world->destroyed, 0) << "a key that may be stored was destroyed";
}

TEST_F(DispatcherTest, ResidentKeyThatLostTheRaceIsDestroyed) {
  generate_resident_with(racy_store_of(false), "res-2");
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->destroyed, 1);
}

TEST_F(DispatcherTest, AGeneratedKeyIsAuditedInItsPutsCommit) {
  audit_with_put = true;
  auto log = std::make_shared<put_log>();
  generate_recorded(log, "g1");
  ASSERT_EQ(world->posted.size(), 1u);
  const auto& r = world->posted[0];
  ASSERT_TRUE(r.ok()) << error_of(r).code;
  EXPECT_TRUE(r.audit_written) << "the poster would append it again";
  EXPECT_EQ(log->plain, 0);
  ASSERT_EQ(log->entries.size(), 1u);
  // The entry the poster would have made of this very answer.
  auto expected = audit_entry_of(r, log->entries[0].at_ms);
  ASSERT_TRUE(expected);
  EXPECT_EQ(log->entries[0], *expected);
  EXPECT_EQ(log->entries[0].request_id, "gen-g1");
  EXPECT_EQ(log->entries[0].kind, job_kind::generate_key);
  EXPECT_EQ(log->entries[0].key_id, "g1");
  EXPECT_EQ(log->entries[0].outcome, "ok");
  EXPECT_EQ(log->entries[0].public_key_fingerprint,
            std::get<key_result>(r.outcome).public_key_fingerprint);
  EXPECT_GT(log->entries[0].at_ms, 0);
}

TEST_F(DispatcherTest, AKeyIdAlreadyTakenIsAuditedAfterThePut) {
  audit_with_put = true;
  auto log = std::make_shared<put_log>();
  log->taken = true;
  generate_recorded(log, "g2");
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_FALSE(world->posted[0].audit_written)
    << "nothing was appended with the put";
}

TEST_F(DispatcherTest, WithoutAnAuditTrailAPutCarriesNoEntry) {
  auto log = std::make_shared<put_log>();
  generate_recorded(log, "g3");
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_TRUE(world->posted[0].ok());
  EXPECT_FALSE(world->posted[0].audit_written);
  EXPECT_EQ(log->plain, 1);
  EXPECT_TRUE(log->entries.empty());
}

TEST_F(DispatcherTest, PipelineLooksUpTheNextJobWhileTheSessionIsBusy) {
  spawn_dispatcher_with(1);
  auto hung = sys.spawn(hung_session, world);
  self->send(dispatcher, session_up_atom::value, size_t{0}, hung);
  sched.run();
  EXPECT_EQ(credits(), 2);
  self->send(dispatcher, job_atom::value, sign_job("p1"));
  self->send(dispatcher, job_atom::value, sign_job("p2"));
  sched.run();
  // p1 is in the HSM, p2 looked up and waiting for the session: both
  // leases held, no credit left, nothing answered yet.
  auto st = stats();
  EXPECT_EQ(world->session_calls, 1);
  EXPECT_EQ(st.busy_sessions, 1u);
  EXPECT_EQ(st.queued, 1u);
  EXPECT_EQ(st.held, 2u);
  EXPECT_TRUE(world->posted.empty());
  self->send_exit(hung, caf::exit_reason::kill);
}

TEST_F(DispatcherTest, EveryLeaseCountsUntilItsResultIsPosted) {
  spawn_dispatcher_with(2);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  self->send(dispatcher, session_up_atom::value, size_t{1}, session());
  sched.run();
  // Two healthy sessions times the pipeline depth (2).
  EXPECT_EQ(credits(), 4);
  self->send(dispatcher, job_atom::value, sign_job("a"));
  // Only the dispatcher's handler runs: the job holds a lease.
  sched.run_once();
  EXPECT_EQ(credits(), 3);
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->posted.front().id, "a");
  EXPECT_EQ(credits(), 4);
}

TEST_F(DispatcherTest, QueueIsBounded) {
  spawn_dispatcher_with(1, 2);
  for (auto id : {"q1", "q2", "q3"})
    self->send(dispatcher, job_atom::value, sign_job(id));
  sched.run();
  // No session is up: two wait, the third is answered as retryable at once.
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->posted.front().id, "q3");
  EXPECT_TRUE(error_of(world->posted.front()).retryable);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  EXPECT_EQ(world->posted.size(), 3u);
}

TEST_F(DispatcherTest, SessionFailureCostsOneAttemptAndWaitsForANewSession) {
  spawn_dispatcher_with(1);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session(true));
  sched.run();
  self->send(dispatcher, job_atom::value, sign_job("f"));
  sched.run();
  // The session failed and ended: the job waits, not answered yet, and
  // there is no healthy session, so no credit.
  EXPECT_TRUE(world->posted.empty());
  EXPECT_EQ(world->session_calls, 1);
  EXPECT_EQ(stats().healthy_sessions, 0u);
  EXPECT_EQ(stats().held, 1u);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->session_calls, 2);
  auto st = stats();
  EXPECT_EQ(st.session_failures, 1u);
  EXPECT_EQ(st.retried, 1u);
  // The first success after the failure resets the supervisor's backoff.
  EXPECT_EQ(world->ok_after_failure, std::vector<size_t>{0});
  EXPECT_TRUE(world->replaced.empty());
}

TEST_F(DispatcherTest, UnknownKeyAndUnservedSchemeNeverReachASession) {
  spawn_dispatcher_with(1);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
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
    ASSERT_FALSE(r.ok());
    code_of[r.id] = error_of(r).code;
  }
  EXPECT_EQ(code_of["u"], "unknown_key");
  EXPECT_EQ(code_of["ed"], "scheme_unsupported");
  EXPECT_EQ(world->session_calls, 0);
}

TEST_F(DispatcherTest, MetricsCountEveryAnswerAndFollowSessionsAndLeases) {
  metrics = std::make_shared<driver_metrics>(2);
  spawn_dispatcher_with(2);
  auto value = [&](const char* name,
                   std::vector<std::pair<std::string, std::string>> l = {}) {
    return metrics->value(name, l);
  };
  EXPECT_EQ(value("hsm_driver_sessions_healthy"), 0);
  EXPECT_EQ(value("hsm_driver_credits"), 0);
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  EXPECT_EQ(value("hsm_driver_sessions_healthy"), 1);
  EXPECT_EQ(value("hsm_driver_credits"), 2);
  self->send(dispatcher, job_atom::value, sign_job("s1"));
  self->send(dispatcher, job_atom::value, sign_job("u", "missing"));
  job_result invalid;
  invalid.id = "bad";
  invalid.lease = "l";
  invalid.outcome = error_result{"invalid_request", "no kind", false};
  self->send(dispatcher, result_atom::value, invalid);
  sched.run();
  ASSERT_EQ(world->posted.size(), 3u);
  auto requests = [&](const char* kind, const char* outcome) {
    return value("hsm_driver_requests_total",
                 {{"kind", kind}, {"outcome", outcome}});
  };
  EXPECT_EQ(requests("sign", "ok"), 1);
  EXPECT_EQ(requests("sign", "unknown_key"), 1);
  EXPECT_EQ(requests("invalid", "invalid_request"), 1);
  EXPECT_EQ(requests("generate_key", "ok"), 0);
  auto stage = [&](const char* name) {
    return value("hsm_driver_stage_duration_seconds", {{"stage", name}});
  };
  EXPECT_EQ(stage("hsm"), 1);
  EXPECT_EQ(stage("queue_wait"), 1);
  EXPECT_EQ(stage("store"), 2); // two lookups
  EXPECT_EQ(stage("post"), 3);
  EXPECT_EQ(value("hsm_driver_leases_held"), 0);
  EXPECT_EQ(value("hsm_driver_credits"), 2);
  self->send(dispatcher, session_down_atom::value, size_t{0});
  sched.run();
  EXPECT_EQ(value("hsm_driver_sessions_healthy"), 0);
  EXPECT_EQ(value("hsm_driver_credits"), 0);
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
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(error_of(r).retryable) << error_of(r).message;
  }
  EXPECT_EQ(credits(), 0);
}

TEST_F(DispatcherTest, HungCallReplacesTheSessionAndRetriesElsewhere) {
  spawn_dispatcher_with(2);
  auto hung = sys.spawn(hung_session, world);
  self->send(dispatcher, session_up_atom::value, size_t{0}, hung);
  sched.run();
  self->send(dispatcher, job_atom::value, sign_job("h"));
  sched.run();
  EXPECT_EQ(world->session_calls, 1);
  EXPECT_TRUE(world->posted.empty());
  // The HSM timeout fires: the supervisor is asked to replace session 0,
  // and the job waits for a healthy session.
  sched.trigger_timeouts();
  sched.run();
  EXPECT_EQ(world->replaced, std::vector<size_t>{0});
  EXPECT_EQ(stats().healthy_sessions, 0u);
  EXPECT_TRUE(world->posted.empty());
  self->send(dispatcher, session_up_atom::value, size_t{1}, session());
  sched.run();
  ASSERT_EQ(world->posted.size(), 1u);
  EXPECT_EQ(world->posted.front().id, "h");
  EXPECT_EQ(stats().retried, 1u);
  self->send_exit(hung, caf::exit_reason::kill);
}

TEST_F(DispatcherTest, DrainAnswersOnceEveryLeaseIsPosted) {
  spawn_dispatcher_with(1);
  self->send(dispatcher, job_atom::value, sign_job("d"));
  sched.run();
  // A queued job holds a lease: no answer to the drain yet.
  auto h = self->request(dispatcher, caf::infinite, drain_atom::value);
  sched.run();
  bool drained = false;
  self->send(dispatcher, session_up_atom::value, size_t{0}, session());
  sched.run();
  h.receive([&](bool) { drained = true; },
            [&](caf::error& err) { ADD_FAILURE() << describe(err); });
  EXPECT_TRUE(drained);
  EXPECT_EQ(world->posted.size(), 1u);
}

} // namespace
} // namespace hsm
