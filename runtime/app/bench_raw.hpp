#pragma once

// `hsm-driver bench`, the raw loop: the driver's HSM operations straight on
// the module, no engine. S threads, each with its own logged-in session on
// the token, doing `generate` (generate key pair + wrap + destroy) or `sign`
// (unwrap + sign + destroy, with one wrapped key made beforehand; a 32-byte
// hash for ECDSA) through the same functions the driver's sessions call
// (keys::make_key, keys::sign_with). Token-resident schemes use the
// driver's resident path; what the loop creates on the token it removes.
// Called from the main thread; runs its own threads and joins them.

#include "messages/scheme.hpp"
#include "runtime/app/bench_stats.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <string>

namespace hsm::bench {

/// One raw loop.
struct raw_plan {
  /// The scheme of the keys.
  scheme s = scheme::secp256k1;
  /// What each operation is.
  op_kind kind = op_kind::sign;
  /// Keys of `s` are token-resident (the probe said so).
  bool resident = false;
  /// Threads, each with a session of its own.
  size_t sessions = 1;
  /// Operations in all; 0 runs for `duration` instead.
  size_t ops = 0;
  /// How long to run when `ops` is 0.
  std::chrono::milliseconds duration{2000};
  /// With `ops` 0: at least this many operations in all, even past
  /// `duration` (a slow token must give enough samples).
  size_t min_ops = 0;
  /// Untimed operations per thread before the window opens.
  size_t warmup_per_session = 2;
  /// A prefix for the key ids of resident keys the loop makes.
  std::string key_id_prefix = "bench-raw";
};

/// What the loop runs on: the module, the token's slot, the user PIN (to
/// log in each thread's session; a no-op once the application is logged
/// in), the master key, and a session of the caller's for the one-off key
/// of a sign loop.
struct raw_target {
  const pkcs11::module* mod = nullptr;
  CK_SLOT_ID slot = 0;
  const pkcs11::secret_pin* pin = nullptr;
  /// The master key's label (its row-MAC key is found beside it).
  std::string master_label;
  pkcs11::session* setup = nullptr;
};

/// Runs the loop; `stop` (set from another thread) ends it early with an
/// error. Latency is per operation (steady clock); CPU is this process's
/// (getrusage) over the timed window.
raw_result run_raw(const raw_target& target, const raw_plan& plan,
                   const std::atomic<bool>& stop);

} // namespace hsm::bench
