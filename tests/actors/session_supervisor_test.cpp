// The session supervisor on CAF's deterministic scheduler, with scripted
// sessions from an injected factory and a recording dispatcher: sessions
// reported up and down, capped exponential restart backoff (checked on the
// test clock), resets, fatal errors, the reinit limit, abandoning a hung
// session, and closing. No HSM: pure actor logic.
//
// A "stuck" session (one whose call hangs in the HSM) is modelled by never
// running its mailbox: the tests run every scheduler job except the ones of
// stuck sessions, so the supervisor's kill reaches such a session only when
// the test lets it "return from its call".

#include "actors/session_supervisor.hpp"

#include "tests/support/actor_fixture.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace hsm {
namespace {

using std::chrono::milliseconds;

/// One session the factory made.
struct spawned_session {
  size_t index = 0;
  uint64_t generation = 0;
  hsm_session_actor handle;
};

/// What the fakes saw.
struct supervisor_world {
  /// How the session (index, generation) starts: `caf::none` means it logs
  /// in and sends `ready_atom`; an error means it quits with that error.
  std::function<caf::error(size_t, uint64_t)> plan = [](size_t, uint64_t) {
    return caf::error{};
  };
  std::vector<spawned_session> spawned;
  /// What the dispatcher was told: "up <index>#<generation>", "down <index>".
  std::vector<std::string> events;
  /// Exit reasons of the sessions, by (index, generation).
  std::map<std::pair<size_t, uint64_t>, caf::error> exits;
  /// Calls of `on_fatal`.
  std::vector<std::string> fatal;

  std::string name_of(const hsm_session_actor& h) const {
    for (auto& s : spawned)
      if (s.handle == h)
        return std::to_string(s.index) + "#" + std::to_string(s.generation);
    return "?";
  }

  size_t spawned_at(size_t index) const {
    size_t n = 0;
    for (auto& s : spawned)
      if (s.index == index)
        ++n;
    return n;
  }

  hsm_session_actor handle_of(size_t index, uint64_t generation) const {
    for (auto& s : spawned)
      if (s.index == index && s.generation == generation)
        return s.handle;
    return {};
  }

  bool exited(size_t index, uint64_t generation) const {
    return exits.count({index, generation}) > 0;
  }
};

/// A session that reports `ready` at once, or quits at once with `fail`.
/// Its calls are never made in these tests.
hsm_session_actor::behavior_type
fake_session(hsm_session_actor::pointer self,
             std::shared_ptr<supervisor_world> w, size_t index,
             uint64_t generation, session_supervisor_actor supervisor,
             caf::error fail) {
  self->attach_functor([w, index, generation](const caf::error& reason) {
    w->exits[{index, generation}] = reason;
  });
  if (fail)
    self->quit(fail);
  else
    self->send(supervisor, ready_atom::value, index, generation);
  return {
    [](generate_atom, const std::string&, scheme) -> caf::result<key_record> {
      return caf::make_error(hsm_errc::fatal);
    },
    [](sign_atom, const key_record&,
       const std::vector<uint8_t>&) -> caf::result<signature_result> {
      return caf::make_error(hsm_errc::fatal);
    },
    [](destroy_atom, const key_record&) {},
  };
}

dispatcher_actor::behavior_type
recording_dispatcher(dispatcher_actor::pointer,
                     std::shared_ptr<supervisor_world> w) {
  return {
    [](job_atom, const job&) {},
    [](result_atom, const job_result&) {},
    [](credit_atom) { return int64_t{0}; },
    [=](session_up_atom, size_t index, const hsm_session_actor& s) {
      auto name = w->name_of(s);
      EXPECT_EQ(name.substr(0, name.find('#')), std::to_string(index));
      w->events.push_back("up " + name);
    },
    [=](session_down_atom, size_t index) {
      w->events.push_back("down " + std::to_string(index));
    },
    [](deadline_atom, uint64_t) {},
    [](drain_atom) { return true; },
    [](stop_atom) {},
    [](close_atom) { return size_t{0}; },
    [](stuck_atom) { return size_t{0}; },
    [](stats_atom) { return dispatcher_stats{}; },
  };
}

caf::error reopen() {
  return caf::make_error(hsm_errc::reopen_session, std::string{"C_Sign"},
                         std::string{"CKR_SESSION_CLOSED"});
}

caf::error reinit() {
  return caf::make_error(hsm_errc::reinit_module, std::string{"C_OpenSession"},
                         std::string{"CKR_TOKEN_NOT_PRESENT"});
}

class SessionSupervisorTest : public testing::actor_fixture {
protected:
  void SetUp() override {
    dispatcher = sys.spawn(recording_dispatcher, world);
  }

  void TearDown() override {
    stuck.clear();
    end_supervisor();
    self->send_exit(dispatcher, caf::exit_reason::kill);
    sched.run();
    world->spawned.clear();
  }

  /// A config with test-sized backoff; the factory makes fake sessions.
  supervisor_config config(size_t sessions) {
    supervisor_config c;
    c.sessions = sessions;
    c.backoff_min = milliseconds{100};
    c.backoff_max = milliseconds{500};
    c.reinit_limit = 3;
    auto w = world;
    c.on_fatal = [w](const std::string& why) { w->fatal.push_back(why); };
    c.spawn_session = [w](caf::actor_system& s, size_t index,
                          uint64_t generation, session_supervisor_actor sup) {
      auto h = s.spawn(fake_session, w, index, generation, std::move(sup),
                       w->plan(index, generation));
      w->spawned.push_back(spawned_session{index, generation, h});
      return h;
    };
    return c;
  }

  void start(supervisor_config c) {
    supervisor = spawn_session_supervisor(sys, std::move(c), dispatcher);
    run();
  }

  /// Kills the supervisor and every session it made (stuck ones too).
  void end_supervisor() {
    if (supervisor)
      self->send_exit(supervisor, caf::exit_reason::kill);
    for (auto& s : world->spawned)
      self->send_exit(s.handle, caf::exit_reason::kill);
    sched.run();
    supervisor = nullptr;
  }

  static caf::resumable* job_of(const hsm_session_actor& h) {
    return dynamic_cast<caf::resumable*>(
      caf::actor_cast<caf::abstract_actor*>(h));
  }

  /// Runs every job except those of stuck sessions.
  size_t run() {
    return sched.run_jobs_filtered(
      [this](caf::resumable* r) { return stuck.count(r) == 0; });
  }

  /// Advances the test clock by `d` and runs what became due.
  void wait(milliseconds d) {
    sched.advance_time(d);
    run();
  }

  /// The session's call hangs: its mailbox is not run until `release`.
  void hang(const hsm_session_actor& h) {
    stuck.insert(job_of(h));
  }

  /// The session's hung call returns.
  void release(const hsm_session_actor& h) {
    stuck.erase(job_of(h));
    run();
  }

  /// Delays of the pending timers from now, in ms.
  std::vector<long long> pending_delays() {
    std::vector<long long> out;
    auto& clk = sched.clock();
    for (auto& kv : clk.schedule())
      out.push_back(
        std::chrono::duration_cast<milliseconds>(kv.first - clk.current_time)
          .count());
    return out;
  }

  template <class T, class... Ts>
  std::optional<T> ask_supervisor(Ts&&... xs) {
    auto h = self->request(supervisor, caf::infinite, std::forward<Ts>(xs)...);
    run();
    if (self->mailbox().empty()) {
      ADD_FAILURE() << "the supervisor did not answer";
      return std::nullopt;
    }
    std::optional<T> out;
    h.receive([&](T& x) { out = std::move(x); },
              [&](caf::error& err) { ADD_FAILURE() << describe(err); });
    return out;
  }

  size_t stuck_count() {
    return ask_supervisor<size_t>(stuck_atom::value).value_or(999);
  }

  std::shared_ptr<supervisor_world> world
    = std::make_shared<supervisor_world>();
  dispatcher_actor dispatcher;
  session_supervisor_actor supervisor;
  std::set<caf::resumable*> stuck;
};

using strings = std::vector<std::string>;
using delays = std::vector<long long>;

TEST(SupervisorRestartBackoffTest, DoublesFromTheMinimumUpToTheCap) {
  supervisor_config c;
  c.backoff_min = milliseconds{100};
  c.backoff_max = milliseconds{10000};
  constexpr std::pair<uint32_t, long long> table[] = {
    {0, 100},
    {1, 200},
    {2, 400},
    {3, 800},
    {6, 6400},
    {7, 10000},
    {8, 10000},
    {16, 10000},
    {17, 10000},
    {63, 10000},
    {64, 10000},
    {1000, 10000},
    {UINT32_MAX, 10000},
  };
  for (auto [failures, expected] : table)
    EXPECT_EQ(restart_backoff(c, failures).count(), expected)
      << "failures=" << failures;
}

TEST(SupervisorRestartBackoffTest, MinimumEqualToCapNeverGrows) {
  supervisor_config c;
  c.backoff_min = milliseconds{250};
  c.backoff_max = milliseconds{250};
  for (uint32_t failures : {0u, 1u, 5u, 40u})
    EXPECT_EQ(restart_backoff(c, failures).count(), 250);
}

TEST_F(SessionSupervisorTest, SessionsComeUpAndAreReported) {
  start(config(2));
  ASSERT_EQ(world->spawned.size(), 2u);
  EXPECT_EQ(world->spawned[0].index, 0u);
  EXPECT_EQ(world->spawned[1].index, 1u);
  EXPECT_EQ(world->spawned[0].generation, 1u);
  EXPECT_EQ(world->spawned[1].generation, 1u);
  EXPECT_EQ(world->events, (strings{"up 0#1", "up 1#1"}));
  // Nothing failed: no restart is pending, nothing is stuck.
  EXPECT_TRUE(pending_delays().empty());
  EXPECT_EQ(stuck_count(), 0u);
  // A late `ready` of a generation that is not the current one is ignored.
  self->send(supervisor, ready_atom::value, size_t{0}, uint64_t{7});
  run();
  EXPECT_EQ(world->events, (strings{"up 0#1", "up 1#1"}));
}

TEST_F(SessionSupervisorTest, ReopenFailuresRestartWithDoublingBackoffCapped) {
  // Generations 1..6 of session 0 fail at once; the 7th logs in.
  world->plan = [](size_t, uint64_t gen) {
    return gen <= 6 ? reopen() : caf::error{};
  };
  start(config(1));
  ASSERT_EQ(world->spawned.size(), 1u);
  EXPECT_EQ(world->events, strings{"down 0"});
  EXPECT_EQ(world->exits.at({0, 1}), hsm_errc::reopen_session);
  const long long expected[] = {100, 200, 400, 500, 500, 500};
  for (size_t i = 0; i < std::size(expected); ++i) {
    SCOPED_TRACE("restart " + std::to_string(i + 1));
    EXPECT_EQ(pending_delays(), delays{expected[i]});
    wait(milliseconds{expected[i] - 1});
    EXPECT_EQ(world->spawned.size(), i + 1) << "restarted too early";
    wait(milliseconds{1});
    EXPECT_EQ(world->spawned.size(), i + 2) << "not restarted on time";
  }
  EXPECT_EQ(world->spawned.back().generation, 7u);
  EXPECT_EQ(world->events.size(), 7u);
  EXPECT_EQ(world->events.back(), "up 0#7");
  EXPECT_TRUE(pending_delays().empty());
}

TEST_F(SessionSupervisorTest, ReadyAloneKeepsTheBackoffSessionOkResetsIt) {
  // Generations 1 and 2 fail at start; the others log in.
  world->plan = [](size_t, uint64_t gen) {
    return gen <= 2 ? reopen() : caf::error{};
  };
  start(config(1));
  wait(milliseconds{100});
  wait(milliseconds{200});
  ASSERT_EQ(world->events.back(), "up 0#3");
  // Generation 3 logged in but served nothing: its failure continues the
  // series (100, 200, then 400).
  self->send_exit(world->handle_of(0, 3), reopen());
  run();
  EXPECT_EQ(world->events.back(), "down 0");
  EXPECT_EQ(pending_delays(), delays{400});
  wait(milliseconds{400});
  ASSERT_EQ(world->events.back(), "up 0#4");
  // A request succeeded on generation 4: its next failure starts again at
  // the minimum.
  self->send(supervisor, session_ok_atom::value, size_t{0});
  run();
  self->send_exit(world->handle_of(0, 4), reopen());
  run();
  EXPECT_EQ(pending_delays(), delays{100});
  wait(milliseconds{100});
  EXPECT_EQ(world->events.back(), "up 0#5");
}

TEST_F(SessionSupervisorTest, FatalErrorStopsTheIndexForGood) {
  const std::pair<const char*, caf::error> fatal_errors[] = {
    {"wrong PIN", caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                                  std::string{"CKR_PIN_INCORRECT"})},
    {"master key missing", caf::make_error(key_errc::master_key_missing)},
    {"configuration",
     caf::make_error(config_errc::bad_file, std::string{"--module"})},
  };
  for (auto& [name, err] : fatal_errors) {
    SCOPED_TRACE(name);
    world->events.clear();
    world->spawned.clear();
    world->exits.clear();
    auto fatal_err = err;
    world->plan = [fatal_err](size_t index, uint64_t) {
      return index == 0 ? fatal_err : caf::error{};
    };
    start(config(2));
    EXPECT_EQ(world->exits.at({0, 1}), fatal_err);
    EXPECT_EQ(world->events, (strings{"down 0", "up 1#1"}));
    // No restart is scheduled, and none happens however long we wait.
    EXPECT_TRUE(pending_delays().empty());
    wait(std::chrono::hours{1});
    sched.trigger_timeouts();
    run();
    EXPECT_EQ(world->spawned_at(0), 1u);
    EXPECT_EQ(world->spawned_at(1), 1u);
    EXPECT_EQ(world->events, (strings{"down 0", "up 1#1"}));
    // Not a module loss: the daemon is not told to exit.
    EXPECT_TRUE(world->fatal.empty());
    end_supervisor();
  }
}

TEST_F(SessionSupervisorTest, ReinitLimitInARowCallsOnFatalOnce) {
  world->plan = [](size_t, uint64_t gen) {
    return gen <= 5 ? reinit() : caf::error{};
  };
  auto c = config(1);
  c.backoff_max = milliseconds{100}; // one step per restart
  start(std::move(c));
  for (uint64_t gen = 2; gen <= 6; ++gen) {
    // reinit_limit is 3: the 3rd failure in a row reports, once.
    EXPECT_EQ(world->fatal.size(), gen - 1 >= 3 ? 1u : 0u)
      << "after " << gen - 1 << " failures";
    wait(milliseconds{100});
    ASSERT_EQ(world->spawned.size(), gen);
  }
  ASSERT_EQ(world->fatal.size(), 1u);
  EXPECT_NE(world->fatal.front().find("3 times in a row"), std::string::npos)
    << world->fatal.front();
  // The index keeps being restarted (the daemon decides to exit).
  EXPECT_EQ(world->events.back(), "up 0#6");
}

TEST_F(SessionSupervisorTest, ReinitStreakIsBrokenByAnotherFailure) {
  // reinit, reinit, reopen, reinit, reinit, reinit
  world->plan = [](size_t, uint64_t gen) {
    if (gen == 3)
      return reopen();
    return gen <= 6 ? reinit() : caf::error{};
  };
  auto c = config(1);
  c.backoff_max = milliseconds{100};
  start(std::move(c));
  for (int i = 0; i < 4; ++i)
    wait(milliseconds{100});
  ASSERT_EQ(world->spawned.size(), 5u);
  EXPECT_TRUE(world->fatal.empty()) << "only two reinit failures in a row";
  wait(milliseconds{100});
  ASSERT_EQ(world->spawned.size(), 6u);
  EXPECT_EQ(world->fatal.size(), 1u);
}

TEST_F(SessionSupervisorTest, SessionOkBreaksTheReinitStreak) {
  world->plan = [](size_t, uint64_t gen) {
    return gen <= 2 ? reinit() : caf::error{};
  };
  auto c = config(1);
  c.backoff_max = milliseconds{100};
  start(std::move(c));
  wait(milliseconds{100});
  wait(milliseconds{100});
  ASSERT_EQ(world->events.back(), "up 0#3");
  self->send(supervisor, session_ok_atom::value, size_t{0});
  run();
  // Two more module losses: 2 in a row since the success, below the limit.
  self->send_exit(world->handle_of(0, 3), reinit());
  run();
  wait(milliseconds{100});
  self->send_exit(world->handle_of(0, 4), reinit());
  run();
  EXPECT_TRUE(world->fatal.empty());
}

TEST_F(SessionSupervisorTest, ReplaceAbandonsTheCurrentSessionOnly) {
  start(config(1));
  auto first = world->handle_of(0, 1);
  ASSERT_EQ(world->events, strings{"up 0#1"});
  hang(first);
  self->send(supervisor, replace_atom::value, size_t{0}, first);
  run();
  // The dispatcher is told at once; the session is abandoned, not waited
  // for: it is still in its call, and counted as stuck.
  EXPECT_EQ(world->events, (strings{"up 0#1", "down 0"}));
  EXPECT_FALSE(world->exited(0, 1));
  EXPECT_EQ(stuck_count(), 1u);
  // A new session after the backoff.
  EXPECT_EQ(pending_delays(), delays{100});
  wait(milliseconds{99});
  EXPECT_EQ(world->spawned.size(), 1u);
  wait(milliseconds{1});
  ASSERT_EQ(world->spawned.size(), 2u);
  EXPECT_EQ(world->events, (strings{"up 0#1", "down 0", "up 0#2"}));
  // A late report about the abandoned session changes nothing.
  self->send(supervisor, replace_atom::value, size_t{0}, first);
  run();
  EXPECT_EQ(world->events, (strings{"up 0#1", "down 0", "up 0#2"}));
  EXPECT_TRUE(pending_delays().empty());
  EXPECT_EQ(stuck_count(), 1u);
  // The hung call returns: the abandoned session exits and is no longer
  // counted; its exit is not a failure of the index.
  release(first);
  EXPECT_EQ(world->exits.at({0, 1}), caf::exit_reason::kill);
  EXPECT_EQ(stuck_count(), 0u);
  EXPECT_EQ(world->events, (strings{"up 0#1", "down 0", "up 0#2"}));
  EXPECT_TRUE(pending_delays().empty());
  EXPECT_FALSE(world->exited(0, 2));
}

TEST_F(SessionSupervisorTest, ReplaceOfAnotherIndexSessionIsIgnored) {
  start(config(2));
  // Session 1's handle reported under index 0: not index 0's session.
  self->send(supervisor, replace_atom::value, size_t{0},
             world->handle_of(1, 1));
  run();
  EXPECT_EQ(world->events, (strings{"up 0#1", "up 1#1"}));
  EXPECT_EQ(stuck_count(), 0u);
  EXPECT_FALSE(world->exited(0, 1));
  EXPECT_FALSE(world->exited(1, 1));
}

TEST_F(SessionSupervisorTest, TwoStuckPredecessorsHoldBackANewSession) {
  start(config(1));
  auto first = world->handle_of(0, 1);
  hang(first);
  self->send(supervisor, replace_atom::value, size_t{0}, first);
  run();
  wait(milliseconds{100});
  ASSERT_EQ(world->events.back(), "up 0#2");
  auto second = world->handle_of(0, 2);
  hang(second);
  self->send(supervisor, replace_atom::value, size_t{0}, second);
  run();
  EXPECT_EQ(stuck_count(), 2u);
  EXPECT_EQ(pending_delays(), delays{200});
  // The restart is due, but two abandoned sessions of this index still
  // hold HSM sessions: no third one, try again later.
  wait(milliseconds{200});
  EXPECT_EQ(world->spawned.size(), 2u);
  EXPECT_EQ(world->events.back(), "down 0");
  auto later = pending_delays();
  ASSERT_EQ(later.size(), 1u);
  // Once one of them exits, the next attempt starts a session.
  release(first);
  EXPECT_EQ(stuck_count(), 1u);
  wait(milliseconds{later.front()});
  ASSERT_EQ(world->spawned.size(), 3u);
  EXPECT_EQ(world->events.back(), "up 0#3");
  release(second);
  EXPECT_EQ(stuck_count(), 0u);
}

TEST_F(SessionSupervisorTest, CloseEndsAllSessionsAndAnswersTheStuckCount) {
  start(config(2));
  auto hung = world->handle_of(0, 1);
  hang(hung);
  self->send(supervisor, replace_atom::value, size_t{0}, hung);
  run();
  // A restart of index 0 is pending when the supervisor is closed.
  ASSERT_EQ(pending_delays().size(), 1u);
  EXPECT_EQ(ask_supervisor<size_t>(close_atom::value), size_t{1});
  EXPECT_EQ(world->exits.at({1, 1}), caf::exit_reason::user_shutdown);
  EXPECT_EQ(world->events, (strings{"up 0#1", "up 1#1", "down 0", "down 1"}));
  // Nothing is restarted after a close.
  wait(std::chrono::hours{1});
  EXPECT_EQ(world->spawned.size(), 2u);
  EXPECT_EQ(world->events.size(), 4u);
  // The abandoned session is still counted until its call returns.
  EXPECT_EQ(stuck_count(), 1u);
  release(hung);
  EXPECT_EQ(stuck_count(), 0u);
  EXPECT_EQ(world->spawned.size(), 2u);
}

} // namespace
} // namespace hsm
