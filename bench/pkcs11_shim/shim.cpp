// hsm_pkcs11_shim: a PKCS#11 module that forwards every call to a real
// module and, as HSM_SHIM_SPEC (or HSM_SHIM_SPEC_FILE) says per function,
// delays it, answers it with an injected CK_RV, blocks it, loses every open
// session, or answers every call with an error for an outage window
// (bench/pkcs11_shim/README.md). For benchmarks and fault tests; it sits in
// front of any module and knows nothing of SoftHSMv2.
//
// Exports one symbol, C_GetFunctionList. Its function list is built at
// compile time; every entry except C_GetFunctionList forwards to the same
// entry of the real module's list. The environment (HSM_SHIM_MODULE,
// HSM_SHIM_SPEC, HSM_SHIM_SPEC_FILE) is read and the real module dlopen'd
// once, on the first C_GetFunctionList; that state is immutable afterwards.
// What changes while calls run (call counts, fault counts, the outage
// window, the session table) is atomic or behind a mutex that is never held
// across a sleep or a call into the real module, so calls from any number of
// threads wait concurrently. Set-up problems are reported by C_Initialize:
// CKR_ARGUMENTS_BAD for a bad spec or counts file, CKR_GENERAL_ERROR for a
// missing or unloadable module, each with one line on stderr.

#include "bench/pkcs11_shim/shim_spec.hpp"
#include <dlfcn.h>
#include <p11-kit/pkcs11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using hsm::shim::fault_kind;
using hsm::shim::fault_kind_count;
using hsm::shim::function_count;
using hsm::shim::function_index;
using hsm::shim::function_names;
using hsm::shim::pick_code;
using hsm::shim::selects;
using steady = std::chrono::steady_clock;

static_assert(std::is_same_v<CK_RV, hsm::shim::rv_code>,
              "shim_spec.hpp's rv_code must be CK_RV");

constexpr size_t initialize_index = *function_index("C_Initialize");
constexpr size_t finalize_index = *function_index("C_Finalize");
constexpr size_t open_session_index = *function_index("C_OpenSession");
constexpr size_t close_session_index = *function_index("C_CloseSession");
constexpr size_t close_all_index = *function_index("C_CloseAllSessions");

/// An outage fixed in time (`@T for D`), as offsets from the shim's load.
struct time_window {
  hsm::shim::duration start;
  hsm::shim::duration end;
  CK_RV code;
};

/// What the shim knows after set-up. Never changes once built.
struct shim_state {
  /// The real module's function list; null when set-up failed.
  CK_FUNCTION_LIST* real = nullptr;
  /// The parsed spec.
  hsm::shim::spec behaviour;
  /// What C_Initialize returns when set-up failed.
  CK_RV setup_rv = CKR_OK;
  /// Why set-up failed, for stderr.
  std::string problem;
  /// True if a fault rule or a counts file is set: calls are counted.
  bool counting = false;
  /// True if an `invalidate` rule is set: sessions are tracked.
  bool tracks_sessions = false;
  /// The seed of every `%` choice: the spec's, else drawn at set-up.
  uint64_t seed = 0;
  /// When set-up ran: the origin of `@T` outage windows.
  steady::time_point loaded;
  /// The `@T for D` outages.
  std::vector<time_window> windows;
};

/// A session opened through the shim, while `invalidate` rules exist.
struct tracked_session {
  CK_SLOT_ID slot = 0;
  /// `shim_counters::generation` when it was opened.
  uint64_t generation = 0;
};

/// What changes while calls run.
struct shim_counters {
  /// Calls per function, every call counted (the `when` of every rule).
  std::array<std::atomic<uint64_t>, function_count> calls{};
  /// Injected faults per kind and function (the counts file).
  std::array<std::array<std::atomic<uint64_t>, function_count>,
             fault_kind_count>
    injected{};
  /// The end of the call-started outage, in steady-clock nanoseconds.
  std::atomic<int64_t> outage_end{std::numeric_limits<int64_t>::min()};
  /// What the call-started outage answers; stored before `outage_end`.
  std::atomic<CK_RV> outage_code{CKR_DEVICE_REMOVED};
  /// Bumped by every invalidation; sessions opened before are lost.
  std::atomic<uint64_t> generation{0};
  /// Guards `sessions`; never held across a call into the real module.
  std::mutex sessions_mutex;
  std::unordered_map<CK_SESSION_HANDLE, tracked_session> sessions;
  /// Serialises writes of the counts file; guards `counts_warned`.
  std::mutex counts_mutex;
  bool counts_warned = false;
};

/// The counters, built on first use and never destroyed: a thread blocked
/// by a `hang` may still be inside the shim when the process exits.
shim_counters& counters() {
  static auto* c = new shim_counters; // immortal on purpose, see above
  return *c;
}

/// Writes the counts file: a comment, `seed <n>`, then one line
/// `<kind> <function> <count>` per non-zero count, kinds in `fault_kind`
/// order, functions in list order. Written to `<path>.tmp` and renamed, so
/// a reader sees the old or the new file, never half of one. Returns
/// false, with errno set, if the file cannot be written.
bool write_counts(const std::string& path, uint64_t seed) {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.counts_mutex};
  std::string text = "# hsm_pkcs11_shim: injected faults "
                     "(bench/pkcs11_shim/README.md)\nseed "
                     + std::to_string(seed) + "\n";
  for (size_t k = 0; k < fault_kind_count; ++k)
    for (size_t i = 0; i < function_count; ++i)
      if (auto n = c.injected[k][i].load(); n != 0) {
        text += to_string(static_cast<fault_kind>(k));
        text += ' ';
        text += function_names[i];
        text += ' ';
        text += std::to_string(n);
        text += '\n';
      }
  auto tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr)
    return false;
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fclose(f) == 0 && ok;
  return ok && std::rename(tmp.c_str(), path.c_str()) == 0;
}

CK_RV shim_get_function_list(CK_FUNCTION_LIST** list);

shim_state failed(CK_RV rv, std::string problem) {
  shim_state st;
  st.setup_rv = rv;
  st.problem = std::move(problem);
  return st;
}

/// Reads a whole file; nullopt with errno set if it cannot.
std::optional<std::string> read_file(const char* path) {
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr)
    return std::nullopt;
  std::string out;
  char buf[4096];
  size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0)
    out.append(buf, got);
  bool ok = std::ferror(f) == 0;
  std::fclose(f);
  if (!ok)
    return std::nullopt;
  return out;
}

/// HSM_SHIM_SPEC or HSM_SHIM_SPEC_FILE, parsed; `problem` set on failure.
std::optional<hsm::shim::spec> read_spec(std::string& problem) {
  const char* text = std::getenv("HSM_SHIM_SPEC");
  const char* file = std::getenv("HSM_SHIM_SPEC_FILE");
  bool has_text = text != nullptr && *text != '\0';
  bool has_file = file != nullptr && *file != '\0';
  if (has_text && has_file) {
    problem = "HSM_SHIM_SPEC and HSM_SHIM_SPEC_FILE are both set (set one)";
    return std::nullopt;
  }
  std::string source = "HSM_SHIM_SPEC";
  std::string spec_text = has_text ? text : "";
  if (has_file) {
    source = std::string{"HSM_SHIM_SPEC_FILE="} + file;
    auto content = read_file(file);
    if (!content) {
      problem = "cannot read " + source + ": " + std::strerror(errno);
      return std::nullopt;
    }
    spec_text = hsm::shim::spec_text_from_file(*content);
  }
  auto sp = hsm::shim::parse_spec(spec_text);
  if (!sp) {
    problem = "bad " + source + ": " + sp.error;
    return std::nullopt;
  }
  return std::move(*sp.value);
}

shim_state set_up() {
  std::string problem;
  auto sp = read_spec(problem);
  if (!sp)
    return failed(CKR_ARGUMENTS_BAD, problem);
  const char* path = std::getenv("HSM_SHIM_MODULE");
  if (path == nullptr || *path == '\0')
    return failed(CKR_GENERAL_ERROR,
                  "HSM_SHIM_MODULE is not set (the path of the real "
                  "PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)");
  // Never dlclose'd: like the driver's own module (runtime/pkcs11/module.cpp)
  // the real module stays mapped until exit, so that no thread left inside
  // it, and no handler it registered, runs unmapped code.
  void* handle = ::dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (handle == nullptr) {
    const char* why = ::dlerror();
    return failed(CKR_GENERAL_ERROR,
                  std::string{"cannot load HSM_SHIM_MODULE="} + path + ": "
                    + (why != nullptr ? why : "dlopen failed"));
  }
  void* sym = ::dlsym(handle, "C_GetFunctionList");
  if (sym == nullptr)
    return failed(CKR_GENERAL_ERROR, std::string{"HSM_SHIM_MODULE="} + path
                                       + " has no C_GetFunctionList");
  CK_C_GetFunctionList get_list = nullptr;
  static_assert(sizeof(get_list) == sizeof(sym));
  std::memcpy(&get_list, &sym, sizeof(sym));
  // Calling our own C_GetFunctionList here would re-enter this set-up.
  // Compared by the object file holding it, not by address: inside the
  // shim, the address of its exported function need not be the one dlsym
  // returns.
  Dl_info real_info{};
  Dl_info own_info{};
  if (::dladdr(sym, &real_info) != 0
      && ::dladdr(reinterpret_cast<void*>(&shim_get_function_list), &own_info)
           != 0
      && real_info.dli_fbase == own_info.dli_fbase)
    return failed(CKR_GENERAL_ERROR, std::string{"HSM_SHIM_MODULE="} + path
                                       + " is the shim itself");
  shim_state st;
  if (auto rv = get_list(&st.real); rv != CKR_OK || st.real == nullptr)
    return failed(CKR_GENERAL_ERROR, std::string{"C_GetFunctionList of "} + path
                                       + " failed (CK_RV " + std::to_string(rv)
                                       + ")");
  st.behaviour = std::move(*sp);
  const auto& b = st.behaviour;
  st.counting = b.injects_faults() || !b.counts.empty();
  st.tracks_sessions = std::any_of(b.invalidate.begin(), b.invalidate.end(),
                                   [](const auto& r) { return r.has_value(); });
  if (b.seed) {
    st.seed = *b.seed;
  } else {
    std::random_device rd;
    st.seed = (uint64_t{rd()} << 32) ^ rd();
  }
  st.loaded = steady::now();
  for (const auto& r : b.outage)
    if (r && r->when.how == hsm::shim::selector::mode::at_time) {
      time_window w{r->when.at, r->when.at + r->length, r->code};
      auto same = [&](const time_window& x) {
        return x.start == w.start && x.end == w.end && x.code == w.code;
      };
      if (std::none_of(st.windows.begin(), st.windows.end(), same))
        st.windows.push_back(w);
    }
  if (!b.counts.empty() && !write_counts(b.counts, st.seed))
    return failed(CKR_ARGUMENTS_BAD, "cannot write the counts file " + b.counts
                                       + ": " + std::strerror(errno));
  return st;
}

/// The set-up, done on first use (thread-safe static initialisation) and
/// never destroyed (see `counters`).
const shim_state& state() {
  static const auto* st = new shim_state(set_up()); // immortal on purpose
  return *st;
}

/// Sleeps the delay the spec gives function `index`; holds no lock.
void delay(const shim_state& st, size_t index) {
  auto d = st.behaviour.delay[index];
  if (d > hsm::shim::duration::zero())
    std::this_thread::sleep_for(d);
}

// -- faults -------------------------------------------------------------------

/// Counts one injected fault and rewrites the counts file (if any) before
/// the call returns, so that a reader never sees fewer faults than the
/// application has seen.
void count(const shim_state& st, fault_kind kind, size_t index) {
  auto& c = counters();
  c.injected[static_cast<size_t>(kind)][index].fetch_add(1);
  const auto& path = st.behaviour.counts;
  if (path.empty() || write_counts(path, st.seed))
    return;
  int err = errno;
  std::lock_guard<std::mutex> guard{c.counts_mutex};
  if (!c.counts_warned) {
    c.counts_warned = true;
    std::fprintf(stderr,
                 "hsm_pkcs11_shim: cannot write the counts file %s: %s\n",
                 path.c_str(), std::strerror(err));
  }
}

int64_t steady_ns(steady::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
           t.time_since_epoch())
    .count();
}

/// The outage answer for call `n` of `index`, if an outage is on or this
/// call starts one.
std::optional<CK_RV> outage_now(const shim_state& st, size_t index,
                                uint64_t n) {
  auto& c = counters();
  auto now = steady::now();
  if (steady_ns(now) < c.outage_end.load())
    return c.outage_code.load();
  auto since = now - st.loaded;
  for (const auto& w : st.windows)
    if (since >= w.start && since < w.end)
      return w.code;
  const auto& rule = st.behaviour.outage[index];
  if (!rule || !selects(rule->when, n, st.seed, fault_kind::outage, index))
    return std::nullopt;
  c.outage_code.store(rule->code);
  c.outage_end.store(steady_ns(now) + rule->length.count());
  return rule->code;
}

/// Loses every session open now.
void invalidate_sessions() {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  c.generation.fetch_add(1);
}

/// True if `session` was opened through the shim before an invalidation.
bool is_lost(CK_SESSION_HANDLE session) {
  auto& c = counters();
  if (c.generation.load() == 0)
    return false;
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  auto i = c.sessions.find(session);
  return i != c.sessions.end() && i->second.generation < c.generation.load();
}

void track(CK_SLOT_ID slot, CK_SESSION_HANDLE session) {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  c.sessions[session] = tracked_session{slot, c.generation.load()};
}

void untrack(CK_SESSION_HANDLE session) {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  c.sessions.erase(session);
}

void untrack_slot(CK_SLOT_ID slot) {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  std::erase_if(c.sessions,
                [&](const auto& s) { return s.second.slot == slot; });
}

void untrack_all() {
  auto& c = counters();
  std::lock_guard<std::mutex> guard{c.sessions_mutex};
  c.sessions.clear();
}

/// Blocks the calling thread for `bound`, or until the process ends.
void hang(const std::optional<hsm::shim::duration>& bound) {
  if (bound) {
    std::this_thread::sleep_for(*bound);
    return;
  }
  for (;;)
    std::this_thread::sleep_for(std::chrono::hours{24});
}

/// What the shim decided before forwarding a call.
struct verdict {
  /// The answer, if the shim gives it; none: forward the call.
  std::optional<CK_RV> answer;
  /// True if a call that ends an operation is forwarded before `answer`
  /// (fail, outage), so that the real module ends its operation too.
  bool forward_first = false;
};

/// Runs the spec for call `index` (on `session`, if it takes one):
/// invalidation, outage, lost session, hang, delay, fail, in that order.
verdict before_forward(const shim_state& st, size_t index,
                       std::optional<CK_SESSION_HANDLE> session) {
  auto& c = counters();
  const auto& b = st.behaviour;
  uint64_t n = c.calls[index].fetch_add(1) + 1;
  // First, as it answers nothing itself: an outage and an invalidation on
  // the same call (an HSM reboot) both happen.
  if (const auto& r = b.invalidate[index];
      r && selects(r->when, n, st.seed, fault_kind::invalidate, index)) {
    invalidate_sessions();
    count(st, fault_kind::invalidate, index);
  }
  // C_Initialize and C_Finalize are the library's own: a network HSM's
  // client answers them without the HSM, and a failed C_Finalize would leave
  // the real module initialised.
  if (index != initialize_index && index != finalize_index)
    if (auto code = outage_now(st, index, n)) {
      count(st, fault_kind::outage, index);
      return {code, true};
    }
  if (session && is_lost(*session)) {
    count(st, fault_kind::session_invalid, index);
    if (index == close_session_index) {
      // The real session stayed open until now (README: "Lost sessions");
      // its owner is done with it.
      (void) st.real->C_CloseSession(*session);
      untrack(*session);
    }
    return {CKR_SESSION_HANDLE_INVALID, false};
  }
  if (const auto& r = b.hang[index];
      r && selects(r->when, n, st.seed, fault_kind::hang, index)) {
    count(st, fault_kind::hang, index);
    hang(r->bound);
  }
  delay(st, index);
  if (const auto& r = b.fail[index];
      r && selects(r->when, n, st.seed, fault_kind::fail, index)) {
    count(st, fault_kind::fail, index);
    return {pick_code(r->codes, st.seed, index, n), true};
  }
  return {};
}

// -- the forwarding entries ---------------------------------------------------

template <class Fn>
struct forwarder;

/// One entry per `CK_FUNCTION_LIST` member with signature CK_RV(Args...).
template <class... Args>
struct forwarder<CK_RV (*)(Args...)> {
  /// Runs the spec, then (unless the shim answers) calls the real
  /// module's `Member`.
  template <auto Member, size_t Index>
  static CK_RV call(Args... args) {
    const auto& st = state();
    if (st.real == nullptr)
      return CKR_CRYPTOKI_NOT_INITIALIZED;
    if (!st.counting) {
      delay(st, Index);
      return (st.real->*Member)(args...);
    }
    std::optional<CK_SESSION_HANDLE> session;
    if constexpr (hsm::shim::takes_session(Index))
      session = std::get<0>(std::forward_as_tuple(args...));
    auto v = before_forward(st, Index, session);
    if (v.answer) {
      if constexpr (hsm::shim::ends_operation(Index))
        if (v.forward_first)
          (void) (st.real->*Member)(args...);
      return *v.answer;
    }
    auto rv = (st.real->*Member)(args...);
    after_forward<Index>(st, rv, args...);
    return rv;
  }

  /// Keeps the session table and the counts file up to date.
  template <size_t Index>
  static void after_forward(const shim_state& st, CK_RV rv, Args... args) {
    if (rv != CKR_OK)
      return;
    auto tuple = std::forward_as_tuple(args...);
    if constexpr (Index == open_session_index) {
      if (st.tracks_sessions && std::get<4>(tuple) != nullptr)
        track(std::get<0>(tuple), *std::get<4>(tuple));
    } else if constexpr (Index == close_session_index) {
      if (st.tracks_sessions)
        untrack(std::get<0>(tuple));
    } else if constexpr (Index == close_all_index) {
      if (st.tracks_sessions)
        untrack_slot(std::get<0>(tuple));
    } else if constexpr (Index == finalize_index) {
      untrack_all();
      if (!st.behaviour.counts.empty())
        (void) write_counts(st.behaviour.counts, st.seed);
    }
  }
};

/// C_Initialize: reports a failed set-up, else runs like the others.
CK_RV shim_initialize(void* args) {
  const auto& st = state();
  if (st.setup_rv != CKR_OK) {
    std::fprintf(stderr, "hsm_pkcs11_shim: %s\n", st.problem.c_str());
    return st.setup_rv;
  }
  return forwarder<decltype(CK_FUNCTION_LIST::C_Initialize)>::call<
    &CK_FUNCTION_LIST::C_Initialize, initialize_index>(args);
}

/// The list and a proof that it is complete.
struct built_list {
  CK_FUNCTION_LIST list;
  /// seen[i]: function_names[i] has its entry.
  std::array<bool, function_count> seen;
};

#define HSM_SHIM_FORWARD(name)                                                 \
  out.list.name = &forwarder<decltype(CK_FUNCTION_LIST::name)>::call<          \
    &CK_FUNCTION_LIST::name, *function_index(#name)>;                          \
  out.seen[*function_index(#name)] = true

constexpr built_list build_list() {
  built_list out{};
  out.list.version = CK_VERSION{2, 40};
  out.list.C_Initialize = &shim_initialize;
  out.seen[*function_index("C_Initialize")] = true;
  out.list.C_GetFunctionList = &shim_get_function_list;
  HSM_SHIM_FORWARD(C_Finalize);
  HSM_SHIM_FORWARD(C_GetInfo);
  HSM_SHIM_FORWARD(C_GetSlotList);
  HSM_SHIM_FORWARD(C_GetSlotInfo);
  HSM_SHIM_FORWARD(C_GetTokenInfo);
  HSM_SHIM_FORWARD(C_GetMechanismList);
  HSM_SHIM_FORWARD(C_GetMechanismInfo);
  HSM_SHIM_FORWARD(C_InitToken);
  HSM_SHIM_FORWARD(C_InitPIN);
  HSM_SHIM_FORWARD(C_SetPIN);
  HSM_SHIM_FORWARD(C_OpenSession);
  HSM_SHIM_FORWARD(C_CloseSession);
  HSM_SHIM_FORWARD(C_CloseAllSessions);
  HSM_SHIM_FORWARD(C_GetSessionInfo);
  HSM_SHIM_FORWARD(C_GetOperationState);
  HSM_SHIM_FORWARD(C_SetOperationState);
  HSM_SHIM_FORWARD(C_Login);
  HSM_SHIM_FORWARD(C_Logout);
  HSM_SHIM_FORWARD(C_CreateObject);
  HSM_SHIM_FORWARD(C_CopyObject);
  HSM_SHIM_FORWARD(C_DestroyObject);
  HSM_SHIM_FORWARD(C_GetObjectSize);
  HSM_SHIM_FORWARD(C_GetAttributeValue);
  HSM_SHIM_FORWARD(C_SetAttributeValue);
  HSM_SHIM_FORWARD(C_FindObjectsInit);
  HSM_SHIM_FORWARD(C_FindObjects);
  HSM_SHIM_FORWARD(C_FindObjectsFinal);
  HSM_SHIM_FORWARD(C_EncryptInit);
  HSM_SHIM_FORWARD(C_Encrypt);
  HSM_SHIM_FORWARD(C_EncryptUpdate);
  HSM_SHIM_FORWARD(C_EncryptFinal);
  HSM_SHIM_FORWARD(C_DecryptInit);
  HSM_SHIM_FORWARD(C_Decrypt);
  HSM_SHIM_FORWARD(C_DecryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptFinal);
  HSM_SHIM_FORWARD(C_DigestInit);
  HSM_SHIM_FORWARD(C_Digest);
  HSM_SHIM_FORWARD(C_DigestUpdate);
  HSM_SHIM_FORWARD(C_DigestKey);
  HSM_SHIM_FORWARD(C_DigestFinal);
  HSM_SHIM_FORWARD(C_SignInit);
  HSM_SHIM_FORWARD(C_Sign);
  HSM_SHIM_FORWARD(C_SignUpdate);
  HSM_SHIM_FORWARD(C_SignFinal);
  HSM_SHIM_FORWARD(C_SignRecoverInit);
  HSM_SHIM_FORWARD(C_SignRecover);
  HSM_SHIM_FORWARD(C_VerifyInit);
  HSM_SHIM_FORWARD(C_Verify);
  HSM_SHIM_FORWARD(C_VerifyUpdate);
  HSM_SHIM_FORWARD(C_VerifyFinal);
  HSM_SHIM_FORWARD(C_VerifyRecoverInit);
  HSM_SHIM_FORWARD(C_VerifyRecover);
  HSM_SHIM_FORWARD(C_DigestEncryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptDigestUpdate);
  HSM_SHIM_FORWARD(C_SignEncryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptVerifyUpdate);
  HSM_SHIM_FORWARD(C_GenerateKey);
  HSM_SHIM_FORWARD(C_GenerateKeyPair);
  HSM_SHIM_FORWARD(C_WrapKey);
  HSM_SHIM_FORWARD(C_UnwrapKey);
  HSM_SHIM_FORWARD(C_DeriveKey);
  HSM_SHIM_FORWARD(C_SeedRandom);
  HSM_SHIM_FORWARD(C_GenerateRandom);
  HSM_SHIM_FORWARD(C_GetFunctionStatus);
  HSM_SHIM_FORWARD(C_CancelFunction);
  HSM_SHIM_FORWARD(C_WaitForSlotEvent);
  return out;
}

#undef HSM_SHIM_FORWARD

constexpr built_list shim_built = build_list();

constexpr bool every_function_forwarded() {
  for (bool b : shim_built.seen)
    if (!b)
      return false;
  return true;
}

static_assert(every_function_forwarded(),
              "an entry of CK_FUNCTION_LIST does not forward");

/// The list handed out; PKCS#11 wants a non-const pointer to it.
CK_FUNCTION_LIST shim_list = shim_built.list;

CK_RV shim_get_function_list(CK_FUNCTION_LIST** list) {
  if (list == nullptr)
    return CKR_ARGUMENTS_BAD;
  (void) state(); // reads the environment, loads the real module
  *list = &shim_list;
  return CKR_OK;
}

} // namespace

/// The module's only export: the shim's function list. Never fails for a
/// set-up problem; C_Initialize reports those.
extern "C" [[gnu::visibility("default")]] CK_RV
C_GetFunctionList(CK_FUNCTION_LIST** list) {
  return shim_get_function_list(list);
}
