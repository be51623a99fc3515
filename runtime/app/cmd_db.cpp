// `hsm-driver db verify | export | import`: the backup drill (README,
// "Backup and restore"). `verify` checks every row of a database (the live
// one or a restored copy) against this HSM without writing anything;
// `export` and `import` move wrapped rows with their MACs between
// databases, never unwrapping one.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/store_open.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/keys/db_check.hpp"
#include "runtime/keys/key_export.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/pkcs11/rv.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

/// Rows read per store query (each query is short; no transaction stays
/// open between batches, so drivers keep writing meanwhile).
constexpr size_t row_batch = 200;

/// Rows written per transaction by `db import`.
constexpr size_t import_batch = 100;

/// Bad rows listed in a report (all are counted and logged).
constexpr size_t max_listed = 1000;

/// A target no row names: `pending_rows` lists every row.
constexpr std::string_view every_row = "\n";

/// Rows a `mac_broken` row's MAC is tried against for another key id.
constexpr size_t max_binding_candidates = 64;

std::string fingerprint(const std::vector<uint8_t>& public_key) {
  return crypto::public_key_fingerprint(public_key);
}

// -- verify -------------------------------------------------------------------

struct bad_row {
  std::string key_id;
  keys::row_verdict verdict;
};

json bad_row_json(const bad_row& b) {
  auto causes = json::array();
  for (auto f : b.verdict.faults)
    causes.push_back(std::string{keys::to_string(f)});
  return json{{"key_id", b.key_id},
              {"causes", causes},
              {"details", b.verdict.details}};
}

/// The canary against this token: "matches", "absent", "mismatch" or
/// "unknown_master_key", with a detail.
caf::expected<json> canary_report(pkcs11::session& sess,
                                  keys::key_handles& handles,
                                  store::key_store& st, bool& ok) {
  auto c = st.get_canary();
  if (!c)
    return c.error();
  if (!*c) {
    ok = false;
    return json{{"state", "absent"},
                {"detail", "the database holds no master-key canary: a "
                           "database that served keys has one"}};
  }
  json out{{"master_key_label", (*c)->master_key_label},
           {"public_key_fingerprint", fingerprint((*c)->public_key)}};
  auto set = keys::key_set_for(sess, handles, (*c)->master_key_label);
  if (!set) {
    if (pkcs11::session_gone(set.error()))
      return set.error();
    ok = false;
    out["state"] = "unknown_master_key";
    out["detail"] = describe(set.error());
    return out;
  }
  if (auto err = keys::check_canary(sess, set->master, set->label, **c)) {
    if (err != key_errc::master_key_mismatch)
      return err;
    ok = false;
    out["state"] = "mismatch";
    out["detail"] = describe(err);
    return out;
  }
  out["state"] = "matches";
  return out;
}

/// Which key ids share a public key, remembered compactly while every row
/// is scanned: a hash of each public key with the first key id seen, and
/// the key ids of hashes seen more than once. A hash collision only adds a
/// candidate, which the MAC then rules out.
class shared_keys {
public:
  /// Remembers that `key_id` holds `public_key`.
  void add(const std::vector<uint8_t>& public_key, const std::string& key_id) {
    auto h = hash_of(public_key);
    auto [it, fresh] = first_.try_emplace(h, key_id);
    if (fresh)
      return;
    auto& ids = shared_[h];
    if (ids.empty())
      ids.push_back(it->second);
    ids.push_back(key_id);
  }

  /// The key ids holding `public_key` (or one with the same hash), if more
  /// than one row does.
  std::vector<std::string> ids(const std::vector<uint8_t>& public_key) const {
    auto it = shared_.find(hash_of(public_key));
    return it == shared_.end() ? std::vector<std::string>{} : it->second;
  }

private:
  static size_t hash_of(const std::vector<uint8_t>& public_key) {
    return std::hash<std::string_view>{}(
      {reinterpret_cast<const char*>(public_key.data()), public_key.size()});
  }

  std::unordered_map<size_t, std::string> first_;
  std::unordered_map<size_t, std::vector<std::string>> shared_;
};

/// For each bad row whose key pair is intact but whose MAC fails: does its
/// MAC hold for another key id (a row with the same public key, or another
/// such row)? Then it is that key id's row under the wrong id.
void find_bindings(pkcs11::session& sess, keys::key_handles& handles,
                   std::vector<bad_row>& bad,
                   const std::vector<key_record>& intact,
                   const shared_keys& by_key) {
  std::vector<std::string> others;
  for (const auto& rec : intact)
    if (others.size() < max_binding_candidates)
      others.push_back(rec.key_id);
  for (const auto& rec : intact) {
    auto candidates = by_key.ids(rec.public_key);
    candidates.insert(candidates.end(), others.begin(), others.end());
    for (const auto& cand : candidates) {
      if (cand == rec.key_id || !keys::mac_holds_for(sess, handles, rec, cand))
        continue;
      for (auto& b : bad) {
        if (b.key_id != rec.key_id)
          continue;
        auto& v = b.verdict;
        for (size_t i = 0; i < v.faults.size(); ++i)
          if (v.faults[i] == keys::row_fault::mac_broken) {
            v.faults[i] = keys::row_fault::key_id_binding;
            v.details[i] = "the row's MAC holds for key id '"
                           + keys::printable(cand) + "': this is the row of '"
                           + keys::printable(cand) + "' under the key id '"
                           + keys::printable(rec.key_id)
                           + "' (key ids swapped, renamed or the row copied)";
          }
      }
      break;
    }
  }
}

} // namespace

int cmd_db_verify(const driver_config& cfg) {
  auto log = logger("runtime");
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto& sess = tok->sess;
  auto st = open_store_read_only(cfg);
  if (!st)
    return fail(st.error());
  auto rotation = (*st)->get_rotation();
  if (!rotation)
    return fail(rotation.error());
  auto plan = plan_master_keys(cfg, *rotation);
  if (!plan)
    return fail(plan.error());
  auto handles = keys::find_key_handles(sess, *plan);
  if (!handles)
    return fail(handles.error());
  bool ok = true;
  auto canary = canary_report(sess, *handles, **st, ok);
  if (!canary)
    return fail(canary.error());
  uint64_t checked = 0;
  uint64_t wrapped = 0;
  uint64_t resident = 0;
  std::vector<bad_row> bad;
  uint64_t bad_count = 0;
  std::vector<key_record> intact_unbound;
  shared_keys by_key;
  std::string after;
  for (;;) {
    auto rows = (*st)->pending_rows(every_row, after, row_batch);
    if (!rows)
      return fail(rows.error());
    if (rows->empty())
      break;
    after = rows->back().key_id;
    for (const auto& rec : *rows) {
      ++checked;
      ++(rec.resident() ? resident : wrapped);
      by_key.add(rec.public_key, rec.key_id);
      auto verdict = keys::verify_row(sess, *handles, rec);
      if (!verdict)
        return fail(verdict.error());
      if (verdict->ok())
        continue;
      ++bad_count;
      std::string causes;
      for (auto f : verdict->faults)
        causes += (causes.empty() ? "" : ",") + std::string{to_string(f)};
      log->error("db verify: key '{}': {}", keys::printable(rec.key_id),
                 causes);
      // A row whose MAC fails may be another key id's row: its MAC is
      // tried under the other key ids below (never unwrapped).
      bool unbound = std::find(verdict->faults.begin(), verdict->faults.end(),
                               keys::row_fault::mac_broken)
                     != verdict->faults.end();
      if (bad.size() < max_listed)
        bad.push_back(bad_row{rec.key_id, std::move(*verdict)});
      if (unbound && intact_unbound.size() < max_listed)
        intact_unbound.push_back(rec);
    }
  }
  find_bindings(sess, *handles, bad, intact_unbound, by_key);
  auto listed = json::array();
  for (const auto& b : bad)
    listed.push_back(bad_row_json(b));
  ok = ok && bad_count == 0;
  print(json{
    {"ok", ok},
    {"store", store_name(cfg)},
    {"read_only", true},
    {"master_key_label", cfg.master_key_label},
    {"canary", *canary},
    {"rows", json{{"checked", checked},
                  {"good", checked - bad_count},
                  {"bad", bad_count},
                  {"wrapped", wrapped},
                  {"resident", resident}}},
    {"bad_rows", listed},
    {"not_checked",
     json::array({"the audit trail (hsm-driver audit verify)",
                  "token-resident keys on any HSM but this one (each lives "
                  "in one HSM)",
                  "rows written after the scan passed their key id"})}});
  return ok ? exit_ok : exit_failed;
}

// -- export -------------------------------------------------------------------

namespace {

/// Writes all of `text` to `fd`.
caf::error write_all(int fd, std::string_view text, const std::string& file) {
  while (!text.empty()) {
    auto n = ::write(fd, text.data(), text.size());
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return caf::make_error(config_errc::bad_file, std::string{"--out"},
                             file + ": " + std::strerror(errno));
    }
    text.remove_prefix(static_cast<size_t>(n));
  }
  return caf::none;
}

struct export_summary {
  uint64_t rows = 0;
  uint64_t resident = 0;
  std::vector<uint8_t> digest;
};

caf::expected<export_summary> write_export(store::key_store& st, int fd,
                                           const std::string& file,
                                           const keys::export_header& h) {
  export_summary out;
  keys::line_digest digest;
  auto put = [&](const std::string& line) -> caf::error {
    digest.add(line);
    return write_all(fd, line, file);
  };
  if (auto err = put(keys::header_line(h)))
    return err;
  std::string after;
  for (;;) {
    auto rows = st.pending_rows(every_row, after, row_batch);
    if (!rows)
      return rows.error();
    if (rows->empty())
      break;
    after = rows->back().key_id;
    for (const auto& rec : *rows) {
      if (auto err = put(keys::row_line(rec)))
        return err;
      ++out.rows;
      if (rec.resident())
        ++out.resident;
    }
  }
  out.digest = digest.finish();
  if (auto err = write_all(fd, keys::trailer_line(out.rows, out.digest), file))
    return err;
  if (::fsync(fd) != 0)
    return caf::make_error(config_errc::bad_file, std::string{"--out"},
                           file + ": fsync: " + std::strerror(errno));
  return out;
}

} // namespace

int cmd_db_export(const driver_config& cfg, const std::string& out_file) {
  auto st = open_store_read_only(cfg);
  if (!st)
    return fail(st.error());
  keys::export_header h;
  h.exported_at_ms = now_ms();
  h.source = store_name(cfg);
  auto version = (*st)->schema_version();
  if (!version)
    return fail(version.error());
  h.schema_version = *version;
  auto canary = (*st)->get_canary();
  if (!canary)
    return fail(canary.error());
  h.canary = *canary;
  auto rotation = (*st)->get_rotation();
  if (!rotation)
    return fail(rotation.error());
  h.rotation = *rotation;
  // 0600 from the start, never over an existing file, never through a
  // symbolic link.
  auto fd = ::open(out_file.c_str(),
                   O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                   S_IRUSR | S_IWUSR);
  if (fd < 0)
    return fail(caf::make_error(
      config_errc::bad_file, std::string{"--out"},
      out_file + ": " + std::strerror(errno)
        + (errno == EEXIST ? " (an export never overwrites a file)" : "")));
  auto summary = ::fchmod(fd, S_IRUSR | S_IWUSR) == 0
                   ? write_export(**st, fd, out_file, h)
                   : caf::expected<export_summary>{caf::make_error(
                     config_errc::bad_file, std::string{"--out"},
                     out_file + ": chmod: " + std::strerror(errno))};
  ::close(fd);
  if (!summary) {
    ::unlink(out_file.c_str());
    return fail(summary.error());
  }
  if (!h.canary)
    logger("runtime")->warn("the database holds no master-key canary; the "
                            "export carries none");
  if (summary->resident > 0)
    logger("runtime")->warn(
      "{} row(s) are token-resident keys: the file holds their references "
      "only; they sign only on the HSM that holds their objects",
      summary->resident);
  print(json{{"ok", true},
             {"file", out_file},
             {"store", store_name(cfg)},
             {"format", keys::export_format_name},
             {"version", keys::export_format_version},
             {"rows", summary->rows},
             {"resident_rows", summary->resident},
             {"canary_master_key_label",
              h.canary ? json(h.canary->master_key_label) : json(nullptr)},
             {"sha256", crypto::to_hex(summary->digest)}});
  return exit_ok;
}

// -- import -------------------------------------------------------------------

namespace {

/// Opens the export `file` for reading (a regular file; a warning if
/// others may read it).
caf::expected<std::unique_ptr<std::ifstream>>
open_import_file(const std::string& file) {
  struct stat sb {};
  if (::stat(file.c_str(), &sb) != 0)
    return caf::make_error(config_errc::bad_file, std::string{"--in"},
                           file + ": " + std::strerror(errno));
  if (!S_ISREG(sb.st_mode))
    return caf::make_error(config_errc::bad_file, std::string{"--in"},
                           file + ": not a regular file");
  if ((sb.st_mode & (S_IRWXG | S_IRWXO)) != 0)
    logger("runtime")->warn("{} is open to group or others (mode {:o}); it "
                            "holds wrapped keys: chmod 600 it",
                            file, sb.st_mode & 0777);
  auto in = std::make_unique<std::ifstream>(file, std::ios::binary);
  if (!*in)
    return caf::make_error(config_errc::bad_file, std::string{"--in"},
                           file + ": cannot open");
  return in;
}

/// Rows read per step when checking a whole file.
constexpr size_t check_step = 1000;

/// Reads the whole of `in` once, checking every line, the count and the
/// digest; returns its header and row count, and leaves `in` at its start
/// again for the import's pass.
caf::expected<std::pair<keys::export_header, uint64_t>>
check_import_file(std::istream& in) {
  std::pair<keys::export_header, uint64_t> out;
  {
    keys::export_reader r{in};
    auto h = r.header();
    if (!h)
      return h.error();
    while (!r.done())
      if (auto rows = r.next(check_step); !rows)
        return rows.error();
    out = {std::move(*h), r.rows()};
  }
  in.clear();
  in.seekg(0);
  if (!in)
    return caf::make_error(config_errc::bad_file, std::string{"--in"},
                           std::string{"cannot read the file a second time"});
  return out;
}

struct refused_row {
  std::string key_id;
  std::string cause;
  std::string detail;
};

/// Why `rec` may not be imported, or nullopt if its MAC holds under this
/// HSM's row-MAC key; a session failure as an error.
caf::expected<std::optional<refused_row>>
check_import_row(pkcs11::session& sess, keys::key_handles& handles,
                 const key_record& rec) {
  auto refuse = [&](std::string cause, std::string detail) {
    return std::optional<refused_row>{
      refused_row{rec.key_id, std::move(cause), std::move(detail)}};
  };
  if (rec.format_version != current_row_format)
    return refuse("unsupported_format",
                  "row format " + std::to_string(rec.format_version)
                    + " (unsealed rows are sealed by 'master-key rotate' "
                      "in the source first)");
  if (!rec.resident() && rec.wrap_mechanism != aes_key_wrap_pad)
    return refuse("unsupported_format", "unknown wrap mechanism '"
                                          + keys::printable(rec.wrap_mechanism)
                                          + "'");
  auto set = keys::key_set_for(sess, handles, rec.master_key_id);
  if (!set) {
    if (pkcs11::session_gone(set.error()))
      return set.error();
    return refuse("unknown_master_key", describe(set.error()));
  }
  if (set->row_mac == CK_INVALID_HANDLE)
    return refuse("unknown_master_key",
                  "master key '" + set->label
                    + "' has no row-MAC key on this token");
  // The guard every signature passes: the row MAC under that key.
  auto checked = keys::check_row(sess, handles, rec);
  if (!checked) {
    if (pkcs11::session_gone(checked.error()))
      return checked.error();
    return refuse("mac_broken", describe(checked.error()));
  }
  return std::optional<refused_row>{};
}

json refused_json(const std::vector<refused_row>& rows) {
  auto out = json::array();
  for (const auto& r : rows)
    if (out.size() < max_listed)
      out.push_back(
        json{{"key_id", r.key_id}, {"cause", r.cause}, {"detail", r.detail}});
  return out;
}

} // namespace

int cmd_db_import(const driver_config& cfg, const std::string& in_file) {
  auto log = logger("runtime");
  // The whole file is checked before anything is touched; it is read
  // again, in batches, to import it: the same open file (a file put in
  // its place meanwhile is not read), whose header must not have changed.
  auto in = open_import_file(in_file);
  if (!in)
    return fail(in.error());
  auto checked = check_import_file(**in);
  if (!checked)
    return fail(checked.error());
  const auto& h = checked->first;
  auto rows_in_file = checked->second;
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto& sess = tok->sess;
  // Opened read-write: brings the target's schema up to date.
  auto st = open_store(cfg);
  if (!st)
    return fail(st.error());
  auto target_rotation = (*st)->get_rotation();
  if (!target_rotation)
    return fail(target_rotation.error());
  const auto& effective = *target_rotation ? *target_rotation : h.rotation;
  auto plan = plan_master_keys(cfg, effective);
  if (!plan)
    return fail(plan.error());
  auto handles = keys::find_key_handles(sess, *plan);
  if (!handles)
    return fail(handles.error());
  if (auto err = check_master_key_policy(sess, handles->current(), cfg))
    return fail(err);

  // The master key's identity: the file's canary must open on this HSM,
  // and so must the target's.
  if (h.canary) {
    auto set = keys::key_set_for(sess, *handles, h.canary->master_key_label);
    if (!set)
      return fail(set.error());
    if (auto err = keys::check_canary(sess, set->master, set->label,
                                      *h.canary)) {
      if (err != key_errc::master_key_mismatch)
        return fail(err);
      return fail(caf::make_error(
        key_errc::master_key_mismatch,
        "the export's canary (from " + h.source
          + ") does not open on this token, so neither do its rows; nothing "
            "was imported: "
          + describe(err)));
    }
  }
  std::string canary_action;
  auto target_canary = (*st)->get_canary();
  if (!target_canary)
    return fail(target_canary.error());
  if (!*target_canary && h.canary) {
    auto put = (*st)->put_canary(*h.canary);
    if (!put)
      return fail(put.error());
    canary_action = put->public_key == h.canary->public_key ? "copied" : "kept";
  } else if (!*target_canary) {
    auto made = keys::check_master_key(sess, handles->master,
                                       handles->master_key_id, **st, true);
    if (!made)
      return fail(made.error());
    canary_action = *made == keys::canary_state::created ? "created" : "kept";
  } else {
    canary_action = "kept";
  }
  {
    // What the target holds now (another importer may have won the race).
    auto now = (*st)->get_canary();
    if (!now)
      return fail(now.error());
    if (!*now)
      return fail(caf::make_error(store_errc::query_failed,
                                  std::string{"the target lost its canary"}));
    auto set = keys::key_set_for(sess, *handles, (*now)->master_key_label);
    if (!set)
      return fail(set.error());
    if (auto err = keys::check_canary(sess, set->master, set->label, **now))
      return fail(err);
  }
  // The rotation record: copied into a target that has none.
  std::string rotation_action = "none";
  if (!*target_rotation && h.rotation) {
    auto set = (*st)->set_rotation(std::nullopt, *h.rotation);
    if (!set)
      return fail(set.error());
    if (!*set)
      return fail(caf::make_error(store_errc::query_failed,
                                  std::string{"a rotation was recorded in the "
                                              "target meanwhile; run the "
                                              "import again"}));
    rotation_action = "copied";
  } else if (*target_rotation && h.rotation
             && **target_rotation != *h.rotation) {
    rotation_action = "kept_target";
    log->warn("the target records another master-key rotation ('{}' to "
              "'{}') than the file ('{}' to '{}'); the target's is kept",
              (*target_rotation)->from_label, (*target_rotation)->to_label,
              h.rotation->from_label, h.rotation->to_label);
  } else if (*target_rotation) {
    rotation_action = "kept";
  }

  uint64_t imported = 0;
  uint64_t identical = 0;
  uint64_t same_key = 0;
  uint64_t resident = 0;
  std::vector<refused_row> refused;
  std::string committed_through;
  auto report = [&](bool ok) {
    return json{{"ok", ok},
                {"file", in_file},
                {"store", store_name(cfg)},
                {"rows_in_file", rows_in_file},
                {"imported", imported},
                {"already_present", identical},
                {"same_key_wrapped_otherwise", same_key},
                {"resident_rows_imported", resident},
                {"refused_count", refused.size()},
                {"refused", refused_json(refused)},
                {"canary", canary_action},
                {"rotation", rotation_action}};
  };
  auto stop_with = [&](const caf::error& err) {
    log->error("db import stopped: {}; {} row(s) imported before it (every "
               "batch through key '{}' is committed); run the import again: "
               "rows already imported are skipped",
               describe(err), imported, keys::printable(committed_through));
    auto out = report(false);
    out["error"] = json{{"code", wire_code(err)}, {"message", describe(err)}};
    out["committed_through"] = committed_through;
    print(out);
    return exit_failed;
  };
  keys::export_reader reader{**in};
  auto again = reader.header();
  if (!again)
    return stop_with(again.error());
  if (keys::header_line(*again) != keys::header_line(h))
    return stop_with(caf::make_error(
      config_errc::bad_file, std::string{"--in"},
      in_file
        + ": its header changed since it was checked; nothing was "
          "imported"));
  while (!reader.done()) {
    // A file changed since it was checked fails here, naming the line;
    // every row imported before passed its MAC.
    auto rows = reader.next(import_batch);
    if (!rows)
      return stop_with(rows.error());
    if (rows->empty())
      continue;
    auto last_key_id = rows->back().key_id;
    std::vector<key_record> good;
    for (auto& rec : *rows) {
      auto why = check_import_row(sess, *handles, rec);
      if (!why)
        return stop_with(why.error());
      if (*why) {
        log->error("db import: key '{}' refused: {}: {}",
                   keys::printable(rec.key_id), (*why)->cause, (*why)->detail);
        refused.push_back(std::move(**why));
        continue;
      }
      good.push_back(std::move(rec));
    }
    auto put = (*st)->put_many(good);
    if (!put)
      return stop_with(put.error());
    for (size_t i = 0; i < good.size(); ++i) {
      switch (keys::classify_import(good[i], (*put)[i])) {
        case keys::import_outcome::imported:
          ++imported;
          if (good[i].resident())
            ++resident;
          break;
        case keys::import_outcome::identical:
          ++identical;
          break;
        case keys::import_outcome::same_key:
          ++same_key;
          break;
        case keys::import_outcome::conflict: {
          refused_row r{good[i].key_id, "key_id_conflict",
                        "the target holds another key under this key id ("
                          + fingerprint((*put)[i].record.public_key)
                          + "; the file's is " + fingerprint(good[i].public_key)
                          + "); it is never overwritten"};
          log->error("db import: key '{}' refused: {}",
                     keys::printable(r.key_id), r.detail);
          refused.push_back(std::move(r));
          break;
        }
      }
    }
    committed_through = std::move(last_key_id);
  }
  if (resident > 0)
    log->warn("{} token-resident key row(s) imported: they sign only on the "
              "HSM that holds their objects; 'hsm-driver db verify' shows "
              "whether this one does",
              resident);
  print(report(refused.empty()));
  return refused.empty() ? exit_ok : exit_failed;
}

} // namespace hsm
