// `hsm-driver master-key init | check | rotate`: the token's AES master
// key, the check of it and of every row against it, and the rotation of
// every row to another master key.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/store_open.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/keys/rotation.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/key_policy.hpp"
#include "runtime/pkcs11/rewrap.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <openssl/crypto.h>

#include <vector>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

/// Reads a test master-key value: 64 hex characters in a 0600 file.
caf::expected<std::vector<uint8_t>> read_test_value(const std::string& path) {
  // The same checks as a PIN file: private, regular, not empty.
  auto text = pkcs11::secret_pin::from_file(path);
  if (!text)
    return caf::make_error(config_errc::bad_file,
                           std::string{"--test-value-file"},
                           describe(text.error()));
  auto value = crypto::from_hex(std::string_view{text->data(), text->size()});
  if (!value || value->size() != 32)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--test-value-file"},
                           std::string{"the file must hold 64 hex "
                                       "characters (32 bytes)"});
  return std::move(*value);
}

} // namespace

int cmd_master_key_init(const driver_config& cfg,
                        const std::string& test_value_file) {
  std::vector<uint8_t> value;
  if (!test_value_file.empty()) {
    auto v = read_test_value(test_value_file);
    if (!v)
      return fail(v.error());
    value = std::move(*v);
  }
  auto tok = open_token(cfg);
  if (!tok) {
    OPENSSL_cleanse(value.data(), value.size());
    return fail(tok.error());
  }
  bool created = false;
  auto key = value.empty()
               ? pkcs11::create_master_key(tok->sess, cfg.master_key_label,
                                           &created)
               : pkcs11::import_master_key(tok->sess, cfg.master_key_label,
                                           value, &created);
  OPENSSL_cleanse(value.data(), value.size());
  if (!key)
    return fail(key.error());
  logger("hsm")->info("master key '{}' {}", cfg.master_key_label,
                      created ? "created" : "exists already");
  print(json{{"ok", true},
             {"master_key_label", cfg.master_key_label},
             {"created", created}});
  return exit_ok;
}

namespace {

const char* phase_name(store::rotation_phase p) {
  return p == store::rotation_phase::running ? "running" : "complete";
}

json rotation_json(const std::optional<store::rotation_record>& r) {
  if (!r)
    return nullptr;
  return json{{"from", r->from_label},
              {"to", r->to_label},
              {"phase", phase_name(r->phase)},
              {"started_at_ms", r->started_at_ms},
              {"completed_at_ms", r->completed_at_ms}};
}

json weakness_json(const std::vector<pkcs11::weakness>& weak) {
  auto out = json::array();
  for (auto& w : weak)
    out.push_back(json{{"attribute", w.attribute},
                       {"found", w.found},
                       {"wanted", w.wanted}});
  return out;
}

/// Rows checked per store read in `master-key check`.
constexpr size_t check_batch = 200;

/// Every row's MAC, checked in the HSM with the key the row names; the
/// key ids that fail (at most `max_listed`), and the count.
struct row_check {
  uint64_t checked = 0;
  uint64_t failed = 0;
  std::vector<std::string> failures;
};

caf::expected<row_check> check_every_row(pkcs11::session& sess,
                                         keys::key_handles& handles,
                                         store::key_store& st) {
  static constexpr size_t max_listed = 20;
  row_check out;
  std::string after;
  // A target no row can name lists every row.
  static constexpr std::string_view every_row = "\n";
  for (;;) {
    auto rows = st.pending_rows(every_row, after, check_batch);
    if (!rows)
      return rows.error();
    if (rows->empty())
      return out;
    after = rows->back().key_id;
    for (auto& rec : *rows) {
      ++out.checked;
      auto set = keys::check_row(sess, handles, rec);
      if (set)
        continue;
      if (is_session_failure(set.error()))
        return set.error();
      ++out.failed;
      if (out.failures.size() < max_listed)
        out.failures.push_back(describe(set.error()));
    }
  }
}

} // namespace

int cmd_master_key_check(const driver_config& cfg) {
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto checked = set_up_keys(
    tok->sess, cfg, key_steps{.may_create_canary = false, .probe = false});
  if (!checked)
    return fail(checked.error());
  auto& setup = *checked;
  auto& st = *setup.store;
  json keys_json = json::array();
  std::vector<keys::master_key_set> held{setup.keys.current()};
  held.insert(held.end(), setup.keys.others.begin(), setup.keys.others.end());
  for (auto& set : held) {
    auto weak = pkcs11::inspect_master_key(tok->sess, set.master);
    if (!weak)
      return fail(weak.error());
    keys_json.push_back(json{{"label", set.label},
                             {"sound", weak->empty()},
                             {"weaknesses", weakness_json(*weak)}});
  }
  json retired_json = json::array();
  for (auto& label : setup.plan.retired) {
    bool on_token = static_cast<bool>(
      pkcs11::find_master_key(tok->sess, label));
    if (on_token)
      logger("runtime")->warn(
        "this token still holds master key '{}', which a completed rotation "
        "retired: with the user PIN and an old database dump it still opens "
        "the keys it wrapped; destroy it with the HSM's tools once no backup "
        "needs it",
        label);
    retired_json.push_back(json{{"label", label}, {"on_token", on_token}});
  }
  auto rotation = st.get_rotation();
  if (!rotation)
    return fail(rotation.error());
  auto counts = st.count_rows();
  if (!counts)
    return fail(counts.error());
  json rows_json = json::array();
  for (auto& c : *counts)
    rows_json.push_back(json{{"master_key_id", c.master_key_id},
                             {"format_version", c.format_version},
                             {"resident", c.resident},
                             {"rows", c.rows}});
  auto macs = check_every_row(tok->sess, setup.keys, st);
  if (!macs)
    return fail(macs.error());
  json out{{"ok", macs->failed == 0},
           {"master_key_label", cfg.master_key_label},
           {"matches", true},
           {"master_keys", keys_json},
           {"retired_master_keys", retired_json},
           {"rotation", rotation_json(*rotation)},
           {"rows", rows_json}};
  if (*rotation && (*rotation)->phase == store::rotation_phase::running) {
    auto left = keys::rows_left(st, (*rotation)->to_label);
    if (!left)
      return fail(left.error());
    out["rotation"]["rows_left"] = *left;
  }
  out["row_macs"] = json{{"checked", macs->checked},
                         {"failed", macs->failed},
                         {"failures", macs->failures}};
  print(out);
  return macs->failed == 0 ? exit_ok : exit_failed;
}

int cmd_master_key_rotate(const driver_config& cfg,
                          const rotate_options& opts) {
  auto log = logger("runtime");
  if (opts.to.empty())
    return fail(caf::make_error(config_errc::invalid_option,
                                std::string{"--to"},
                                std::string{"name the new master key"}));
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto& sess = tok->sess;
  auto st = open_store(cfg);
  if (!st)
    return fail(st.error());
  auto recorded = (*st)->get_rotation();
  if (!recorded)
    return fail(recorded.error());
  const auto& before = *recorded;
  // Where rows come from: the source of the running rotation, or the key
  // the rows are under now.
  std::string from = cfg.master_key_label;
  if (before && before->phase == store::rotation_phase::running) {
    if (before->to_label != opts.to)
      return fail(caf::make_error(
        config_errc::invalid_option, std::string{"--to"},
        "a rotation from '" + before->from_label + "' to '" + before->to_label
          + "' is running; finish it first (--to " + before->to_label + ")"));
    from = before->from_label;
  } else if (before && before->to_label != from) {
    return fail(caf::make_error(
      config_errc::invalid_option, std::string{"--master-key-label"},
      "the last rotation moved every row to '" + before->to_label
        + "'; rotate from there (--master-key-label " + before->to_label
        + ")"));
  }
  if (opts.create) {
    bool created = false;
    auto made = pkcs11::create_master_key(sess, opts.to, &created);
    if (!made)
      return fail(made.error());
    if (created)
      log->info("created master key '{}' and its row-MAC key; put it on "
                "every driver's HSM (the vendor's cloning procedure) before "
                "rows move to it",
                opts.to);
  }
  // A legacy key may have no row-MAC key yet: its rows are all format 1,
  // which are proved by a signature, not a MAC.
  auto from_set = keys::find_key_set(sess, from);
  if (!from_set && from_set.error() == key_errc::master_key_missing) {
    auto master = pkcs11::find_master_key(sess, from);
    if (!master)
      return fail(master.error());
    from_set = keys::master_key_set{*master, CK_INVALID_HANDLE, from, false};
  }
  if (!from_set)
    return fail(from_set.error());
  auto to_set = keys::find_key_set(sess, opts.to);
  if (!to_set)
    return fail(to_set.error());
  // The target must be sound: moving rows to a weak key fixes nothing.
  if (auto err = check_master_key_policy(sess, *to_set, cfg))
    return fail(err);
  if (auto weak = pkcs11::inspect_master_key(sess, from_set->master);
      weak && !weak->empty())
    log->warn("rotating off master key '{}', which lets a wrapped key leave "
              "the HSM: {}",
              from, pkcs11::describe(*weak));
  // The database must be the one these keys protect.
  if (auto c = (*st)->get_canary(); !c)
    return fail(c.error());
  else if (*c) {
    auto& set = (*c)->master_key_label == to_set->label ? *to_set : *from_set;
    auto guard = keys::check_master_key(sess, set.master, set.label, **st,
                                        false);
    if (!guard)
      return fail(guard.error());
  }

  if (opts.complete) {
    if (!before || before->to_label != opts.to)
      return fail(
        caf::make_error(config_errc::invalid_option, std::string{"--complete"},
                        "no rotation to '" + opts.to + "' is recorded"));
    if (before->phase == store::rotation_phase::running) {
      auto left = keys::rows_left(**st, opts.to);
      if (!left)
        return fail(left.error());
      auto c = (*st)->get_canary();
      if (!c)
        return fail(c.error());
      bool canary_moved = !*c || (*c)->master_key_label == opts.to;
      if (*left > 0 || !canary_moved)
        return fail(caf::make_error(
          key_errc::key_corrupted,
          std::to_string(*left) + " row(s)"
            + (canary_moved ? "" : " and the canary") + " are not under '"
            + opts.to
            + "' yet: run the rotation again (without --complete); rows it "
              "cannot move are listed in its output"));
      auto next = *before;
      next.phase = store::rotation_phase::complete;
      next.completed_at_ms = now_ms();
      auto set = (*st)->set_rotation(before, next);
      if (!set)
        return fail(set.error());
      if (!*set)
        return fail(caf::make_error(
          store_errc::query_failed,
          std::string{"the rotation record changed while completing it; "
                      "run again"}));
      log->info("rotation from '{}' to '{}' complete: drivers refuse rows "
                "under '{}' from their next start; restart each with "
                "--master-key-label {}, then destroy '{}' on every HSM once "
                "no backup needs it",
                before->from_label, opts.to, before->from_label, opts.to,
                before->from_label);
    }
    auto now = (*st)->get_rotation();
    if (!now)
      return fail(now.error());
    print(json{{"ok", true}, {"rotation", rotation_json(*now)}});
    return exit_ok;
  }

  if (!before || before->phase != store::rotation_phase::running) {
    // Before anything is recorded: can the old key give a key to the new
    // one at all? A throwaway key shows it.
    if (from_set->label != to_set->label) {
      auto probe = pkcs11::generate_wrapped(sess, from_set->master,
                                            scheme::p256);
      if (!probe)
        return fail(probe.error());
      auto moved = pkcs11::rewrap(sess, from_set->master, to_set->master,
                                  scheme::p256, probe->wrapped_key);
      if (!moved)
        return fail(moved.error());
    }
    store::rotation_record next;
    next.from_label = from;
    next.to_label = opts.to;
    next.phase = store::rotation_phase::running;
    next.started_at_ms = now_ms();
    auto set = (*st)->set_rotation(before, next);
    if (!set)
      return fail(set.error());
    if (!*set)
      return fail(caf::make_error(
        store_errc::query_failed,
        std::string{"another rotation was recorded meanwhile; run again"}));
    log->info("rotation from '{}' to '{}' begun: drivers starting from now "
              "wrap new keys under '{}' and serve rows under both",
              from, opts.to, opts.to);
  } else {
    log->info("resuming the rotation from '{}' to '{}'", from, opts.to);
  }
  auto tally = keys::rotate_rows(
    sess, *from_set, *to_set, **st, opts.batch,
    [&](const keys::rotation_tally& t) {
      log->info("rotation: {} re-wrapped, {} re-sealed, {} raced, {} failed "
                "so far",
                t.rewrapped, t.resealed, t.raced, t.failures.size());
    });
  if (!tally)
    return fail(tally.error());
  for (auto& f : tally->failures)
    log->error("rotation: row left as it is: {}", f);
  auto now = (*st)->get_rotation();
  if (!now)
    return fail(now.error());
  print(json{{"ok", tally->remaining == 0},
             {"rotation", rotation_json(*now)},
             {"rewrapped", tally->rewrapped},
             {"resealed", tally->resealed},
             {"raced", tally->raced},
             {"canary_moved", tally->canary_moved},
             {"failures", tally->failures},
             {"rows_left", tally->remaining}});
  if (tally->remaining == 0)
    log->info("every row is under '{}'; when every driver runs with it, "
              "declare the rotation complete: hsm-driver master-key rotate "
              "--to {} --complete",
              opts.to, opts.to);
  return tally->remaining == 0 ? exit_ok : exit_failed;
}

} // namespace hsm
