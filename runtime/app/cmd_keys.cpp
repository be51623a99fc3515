// `hsm-driver keys generate | sign | show`: the key path on the command
// line, after the master-key guard and the capability probe; and
// `keys reconcile`: token-resident key objects against the store.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/run_options.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/keys/key_service.hpp"
#include "runtime/keys/reconcile.hpp"
#include "runtime/net/wire_codec.hpp"

#include <unistd.h>

#include <chrono>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

/// Sets up the token and the store, then calls `f` with a key service on
/// them and the store; returns `f`'s exit code, or the set-up's failure.
template <class F>
int with_key_service(const driver_config& cfg, F&& f) {
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto setup = set_up_keys(tok->sess, cfg);
  if (!setup)
    return fail(setup.error());
  keys::key_service svc{tok->sess, setup->keys, *setup->store, setup->caps};
  return f(svc, *setup->store);
}

/// The audit chain of key commands run on this host: `cli@<host name>`.
std::string cli_audit_chain() {
  return "cli@" + host_name();
}

/// Appends the audit entry of one key command (request id
/// `cli-<pid>-<ms>`) before its answer is printed; the error if the entry
/// could not be written.
caf::error audit_cli(store::key_store& st, job_kind kind,
                     const std::string& key_id, std::string fingerprint,
                     std::vector<uint8_t> payload_sha256, std::string outcome) {
  auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
               .count();
  audit_entry e;
  e.request_id = "cli-" + std::to_string(::getpid()) + "-"
                 + std::to_string(now);
  e.kind = kind;
  e.key_id = key_id;
  e.public_key_fingerprint = std::move(fingerprint);
  e.payload_sha256 = std::move(payload_sha256);
  e.outcome = std::move(outcome);
  e.at_ms = now;
  auto rows = st.append_audit(cli_audit_chain(), {e});
  if (!rows)
    return std::move(rows.error());
  logger("audit")->info("[req={}] {} key={} outcome={} driver={} seq={}",
                        e.request_id, audit_kind_name(kind), key_id, e.outcome,
                        rows->front().driver_id, rows->front().seq);
  return caf::none;
}

/// One class of a reconciliation report: its count, its key ids, and how
/// many of them this run destroyed.
json report_class(const keys::reconcile_report& rep, keys::resident_class x) {
  json j;
  j["count"] = rep.count(x);
  j["key_ids"] = rep.key_ids(x);
  if (x != keys::resident_class::kept)
    j["destroyed"] = rep.destroyed(x);
  return j;
}

} // namespace

int cmd_keys_generate(const driver_config& cfg, const std::string& key_id,
                      const std::string& scheme_name) {
  return with_key_service(cfg, [&](keys::key_service& svc,
                                   store::key_store& st) {
    auto key = svc.generate(key_id, scheme_name);
    if (!key) {
      static_cast<void>(audit_cli(st, job_kind::generate_key, key_id, {}, {},
                                  wire_code(key.error())));
      return fail(key.error());
    }
    if (auto err = audit_cli(st, job_kind::generate_key, key_id,
                             key->public_key_fingerprint, {}, "ok"))
      return fail(err);
    logger("runtime")->info("key {} ({}): {}", key->key_id,
                            to_string(key->scheme),
                            key->created ? "generated" : "exists already");
    auto j = key_json(*key);
    j["created"] = key->created;
    print(json{{"ok", true}, {"key", j}});
    return exit_ok;
  });
}

int cmd_keys_sign(const driver_config& cfg, const std::string& key_id,
                  const std::string& payload_hex) {
  auto payload = crypto::from_hex(payload_hex);
  if (!payload)
    return fail(caf::make_error(key_errc::invalid_request,
                                "--payload: " + describe(payload.error())));
  return with_key_service(cfg, [&](keys::key_service& svc,
                                   store::key_store& st) {
    auto digest = crypto::sha256(*payload);
    auto sig = svc.sign(key_id, *payload);
    if (!sig) {
      static_cast<void>(audit_cli(st, job_kind::sign, key_id, {}, digest,
                                  wire_code(sig.error())));
      return fail(sig.error());
    }
    // No signature is printed before its audit entry is durable.
    if (auto err = audit_cli(st, job_kind::sign, key_id,
                             sig->sig.public_key_fingerprint, digest, "ok"))
      return fail(err);
    auto key = svc.show(key_id);
    if (!key)
      return fail(key.error());
    logger("runtime")->info("signed {} bytes with key {} ({}), verified",
                            payload->size(), key_id, to_string(sig->scheme));
    print(json{{"ok", true},
               {"key", key_json(*key)},
               {"signature", net::to_json(*sig)}});
    return exit_ok;
  });
}

int cmd_keys_show(const driver_config& cfg, const std::string& key_id) {
  return with_key_service(cfg, [&](keys::key_service& svc, store::key_store&) {
    auto key = svc.show(key_id);
    if (!key)
      return fail(key.error());
    print(json{{"ok", true}, {"key", key_json(*key)}});
    return exit_ok;
  });
}

int cmd_keys_reconcile(const driver_config& cfg, bool apply,
                       bool include_orphans) {
  if (include_orphans && !apply)
    return fail(caf::make_error(config_errc::invalid_option,
                                std::string{"--include-orphans"},
                                std::string{"destroys orphans only with "
                                            "--apply"}));
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  // The store must be the one this master key protects (the canary), so
  // that no key is judged against another database; no probe: it makes
  // objects of its own and is not needed here.
  auto setup = set_up_keys(
    tok->sess, cfg, key_steps{.may_create_canary = false, .probe = false});
  if (!setup)
    return fail(setup.error());
  using keys::resident_class;
  auto rep = keys::reconcile_resident_keys(tok->sess, *setup->store,
                                           {apply, include_orphans});
  if (!rep)
    return fail(rep.error());
  auto losers = rep->count(resident_class::loser);
  auto orphans = rep->count(resident_class::orphan);
  auto log = logger("runtime");
  if (!apply && losers + orphans > 0)
    log->info("dry run: {} loser(s) and {} orphan(s) are left; '--apply' "
              "destroys the losers, '--apply --include-orphans' the orphans "
              "too (only with every driver on this token stopped)",
              losers, orphans);
  else if (apply)
    log->info("destroyed {} loser(s) and {} orphan(s) of {} resident key "
              "object(s)",
              rep->destroyed(resident_class::loser),
              rep->destroyed(resident_class::orphan), rep->objects.size());
  json out;
  out["ok"] = rep->failures.empty();
  out["dry_run"] = !apply;
  out["include_orphans"] = include_orphans;
  out["kept"] = report_class(*rep, resident_class::kept);
  out["losers"] = report_class(*rep, resident_class::loser);
  out["orphans"] = report_class(*rep, resident_class::orphan);
  out["ignored"] = rep->ignored;
  out["failures"] = rep->failures;
  for (const auto& f : rep->failures)
    log->error("could not destroy {}", f);
  print(out);
  return rep->failures.empty() ? exit_ok : exit_failed;
}

} // namespace hsm
