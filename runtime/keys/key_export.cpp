#include "runtime/keys/key_export.hpp"

#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include <algorithm>
#include <initializer_list>
#include <set>
#include <sstream>

namespace hsm::keys {

namespace {

using json = nlohmann::ordered_json;

std::string dump_line(const json& j) {
  // Key ids and labels were checked when written, but a stored row may
  // hold anything: invalid UTF-8 must not end the export.
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

const char* phase_text(store::rotation_phase p) {
  return p == store::rotation_phase::running ? "running" : "complete";
}

json canary_json(const store::canary_record& c) {
  return json{{"public_key", crypto::to_hex(c.public_key)},
              {"public_key_fingerprint",
               crypto::public_key_fingerprint(c.public_key)},
              {"wrapped_key", crypto::to_hex(c.wrapped_key)},
              {"wrap_mechanism", c.wrap_mechanism},
              {"master_key_label", c.master_key_label},
              {"created_at_ms", c.created_at_ms}};
}

json rotation_json(const store::rotation_record& r) {
  return json{{"from_label", r.from_label},
              {"to_label", r.to_label},
              {"phase", phase_text(r.phase)},
              {"started_at_ms", r.started_at_ms},
              {"completed_at_ms", r.completed_at_ms}};
}

// -- reading ------------------------------------------------------------------

/// Reads fields of one JSON object, remembering the first problem.
class reader {
public:
  reader(const json& j, std::string where) : j_(j), where_(std::move(where)) {
    if (!j_.is_object())
      fail("not a JSON object");
  }

  /// The object has exactly `names` (no field missing, none unknown).
  void fields(std::initializer_list<std::string_view> names) {
    if (!err_.empty())
      return;
    for (auto name : names)
      if (!j_.contains(std::string{name}))
        return fail("no field '" + std::string{name} + "'");
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (std::find(names.begin(), names.end(), it.key()) == names.end())
        return fail("unknown field '" + it.key() + "'");
  }

  std::string text(std::string_view name) {
    auto* v = get(name);
    if (v == nullptr || !v->is_string()) {
      fail("field '" + std::string{name} + "' is not a string");
      return {};
    }
    return v->get<std::string>();
  }

  int64_t integer(std::string_view name) {
    auto* v = get(name);
    if (v == nullptr || !v->is_number_integer()) {
      fail("field '" + std::string{name} + "' is not an integer");
      return 0;
    }
    return v->get<int64_t>();
  }

  std::vector<uint8_t> bytes(std::string_view name) {
    auto hex = text(name);
    if (!err_.empty())
      return {};
    auto v = crypto::from_hex(hex);
    if (!v) {
      fail("field '" + std::string{name} + "' is not hex");
      return {};
    }
    return std::move(*v);
  }

  /// The field `name` if it is an object, nullptr if null.
  const json* object_or_null(std::string_view name) {
    auto* v = get(name);
    if (v == nullptr || v->is_null())
      return nullptr;
    if (!v->is_object())
      fail("field '" + std::string{name} + "' is not an object or null");
    return v->is_object() ? v : nullptr;
  }

  void fail(std::string why) {
    if (err_.empty())
      err_ = where_ + ": " + std::move(why);
  }

  const std::string& error() const {
    return err_;
  }

private:
  const json* get(std::string_view name) {
    if (!err_.empty())
      return nullptr;
    auto it = j_.find(std::string{name});
    return it == j_.end() ? nullptr : &*it;
  }

  const json& j_;
  std::string where_;
  std::string err_;
};

caf::error bad_file(const std::string& why) {
  return caf::make_error(config_errc::bad_file, std::string{"--in"}, why);
}

caf::expected<store::canary_record> read_canary(const json& j,
                                                const std::string& where) {
  reader r{j, where + ": canary"};
  r.fields({"public_key", "public_key_fingerprint", "wrapped_key",
            "wrap_mechanism", "master_key_label", "created_at_ms"});
  store::canary_record c;
  c.public_key = r.bytes("public_key");
  c.wrapped_key = r.bytes("wrapped_key");
  c.wrap_mechanism = r.text("wrap_mechanism");
  c.master_key_label = r.text("master_key_label");
  c.created_at_ms = r.integer("created_at_ms");
  if (r.error().empty()
      && r.text("public_key_fingerprint")
           != crypto::public_key_fingerprint(c.public_key))
    r.fail("the fingerprint does not match the public key");
  if (!r.error().empty())
    return bad_file(r.error());
  return c;
}

caf::expected<store::rotation_record> read_rotation(const json& j,
                                                    const std::string& where) {
  reader r{j, where + ": rotation"};
  r.fields(
    {"from_label", "to_label", "phase", "started_at_ms", "completed_at_ms"});
  store::rotation_record rot;
  rot.from_label = r.text("from_label");
  rot.to_label = r.text("to_label");
  auto phase = r.text("phase");
  if (phase == "running")
    rot.phase = store::rotation_phase::running;
  else if (phase == "complete")
    rot.phase = store::rotation_phase::complete;
  else
    r.fail("unknown phase");
  rot.started_at_ms = r.integer("started_at_ms");
  rot.completed_at_ms = r.integer("completed_at_ms");
  if (!r.error().empty())
    return bad_file(r.error());
  return rot;
}

caf::expected<export_header> read_header(const json& j) {
  reader r{j, "line 1 (header)"};
  if (r.error().empty()
      && (!j.contains("format") || !j["format"].is_string()
          || j["format"].get<std::string>() != export_format_name))
    return bad_file("line 1: not an hsm-driver key export (no \"format\":\""
                    + std::string{export_format_name} + "\")");
  if (r.error().empty() && j.contains("version")
      && j["version"].is_number_integer()
      && j["version"].get<int64_t>() != export_format_version)
    return bad_file("line 1: export format version "
                    + std::to_string(j["version"].get<int64_t>())
                    + "; this build reads version "
                    + std::to_string(export_format_version));
  r.fields({"format", "version", "exported_at_ms", "source", "schema_version",
            "canary", "rotation"});
  export_header h;
  h.version = static_cast<int>(r.integer("version"));
  h.exported_at_ms = r.integer("exported_at_ms");
  h.source = r.text("source");
  h.schema_version = static_cast<int>(r.integer("schema_version"));
  const auto* canary = r.object_or_null("canary");
  const auto* rotation = r.object_or_null("rotation");
  if (!r.error().empty())
    return bad_file(r.error());
  if (canary != nullptr) {
    auto c = read_canary(*canary, "line 1");
    if (!c)
      return c.error();
    h.canary = std::move(*c);
  }
  if (rotation != nullptr) {
    auto rot = read_rotation(*rotation, "line 1");
    if (!rot)
      return rot.error();
    h.rotation = std::move(*rot);
  }
  return h;
}

caf::expected<key_record> read_row(const json& j, const std::string& where) {
  reader r{j, where};
  r.fields({"key_id", "scheme", "public_key", "key_blob", "wrap_mechanism",
            "created_at_ms", "format_version", "master_key_id", "row_mac"});
  key_record rec;
  rec.key_id = r.text("key_id");
  auto scheme_name = r.text("scheme");
  rec.public_key = r.bytes("public_key");
  rec.key_blob = r.bytes("key_blob");
  rec.wrap_mechanism = r.text("wrap_mechanism");
  rec.created_at_ms = r.integer("created_at_ms");
  rec.format_version = static_cast<int>(r.integer("format_version"));
  rec.master_key_id = r.text("master_key_id");
  rec.row_mac = r.bytes("row_mac");
  if (r.error().empty()) {
    if (auto s = parse_scheme(scheme_name))
      rec.scheme = *s;
    else
      r.fail("key '" + rec.key_id + "': unknown scheme");
  }
  if (r.error().empty() && rec.key_id.empty())
    r.fail("an empty key id");
  if (!r.error().empty())
    return bad_file(r.error());
  return rec;
}

} // namespace

// -- writing ------------------------------------------------------------------

std::string header_line(const export_header& h) {
  json j{{"format", export_format_name},
         {"version", h.version},
         {"exported_at_ms", h.exported_at_ms},
         {"source", h.source},
         {"schema_version", h.schema_version},
         {"canary", h.canary ? canary_json(*h.canary) : json(nullptr)},
         {"rotation", h.rotation ? rotation_json(*h.rotation) : json(nullptr)}};
  return dump_line(j);
}

std::string row_line(const key_record& rec) {
  return dump_line(json{{"key_id", rec.key_id},
                        {"scheme", to_string(rec.scheme)},
                        {"public_key", crypto::to_hex(rec.public_key)},
                        {"key_blob", crypto::to_hex(rec.key_blob)},
                        {"wrap_mechanism", rec.wrap_mechanism},
                        {"created_at_ms", rec.created_at_ms},
                        {"format_version", rec.format_version},
                        {"master_key_id", rec.master_key_id},
                        {"row_mac", crypto::to_hex(rec.row_mac)}});
}

std::string trailer_line(uint64_t rows, const std::vector<uint8_t>& digest) {
  return dump_line(json{{"end", export_format_name},
                        {"rows", rows},
                        {"sha256", crypto::to_hex(digest)}});
}

// -- the digest ---------------------------------------------------------------

struct line_digest::state {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  ~state() {
    EVP_MD_CTX_free(ctx);
  }
};

line_digest::line_digest() : state_(std::make_unique<state>()) {
  EVP_DigestInit_ex(state_->ctx, EVP_sha256(), nullptr);
}

line_digest::~line_digest() = default;

void line_digest::add(std::string_view bytes) {
  EVP_DigestUpdate(state_->ctx, bytes.data(), bytes.size());
}

std::vector<uint8_t> line_digest::finish() {
  std::vector<uint8_t> out(EVP_MAX_MD_SIZE);
  unsigned int n = 0;
  EVP_DigestFinal_ex(state_->ctx, out.data(), &n);
  out.resize(n);
  return out;
}

// -- parsing ------------------------------------------------------------------

struct export_reader::state {
  explicit state(std::istream& from) : in(from) {
    // nop
  }

  std::istream& in;
  line_digest digest;
  std::set<std::string> seen;
  size_t line_no = 0;
  uint64_t rows = 0;
  bool have_header = false;
  bool done = false;

  /// The next line (without its newline) into `line`; false at the end of
  /// the file.
  caf::expected<bool> read_line(std::string& line) {
    if (!std::getline(in, line)) {
      if (in.eof() && line.empty())
        return false;
      return bad_file("line " + std::to_string(line_no + 1) + ": cannot read");
    }
    ++line_no;
    if (in.eof())
      return bad_file("line " + std::to_string(line_no)
                      + ": no newline at its end (the file is cut off)");
    return true;
  }
};

export_reader::export_reader(std::istream& in)
  : state_(std::make_unique<state>(in)) {
  // nop
}

export_reader::~export_reader() = default;

caf::expected<export_header> export_reader::header() {
  auto& st = *state_;
  if (st.have_header)
    return bad_file("the header was read already");
  std::string line;
  auto got = st.read_line(line);
  if (!got)
    return got.error();
  if (!*got)
    return bad_file("the file is empty");
  auto j = json::parse(line, nullptr, false);
  if (j.is_discarded())
    return bad_file("line 1: not JSON");
  auto h = read_header(j);
  if (!h)
    return h.error();
  st.have_header = true;
  st.digest.add(line + "\n");
  return h;
}

caf::expected<std::vector<key_record>> export_reader::next(size_t n) {
  auto& st = *state_;
  std::vector<key_record> out;
  if (!st.have_header)
    return bad_file("the header is not read yet");
  std::string line;
  while (!st.done && out.size() < n) {
    auto got = st.read_line(line);
    if (!got)
      return got.error();
    if (!*got)
      return bad_file("no trailer: the file is cut off (export it again)");
    auto where = "line " + std::to_string(st.line_no);
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded())
      return bad_file(where + ": not JSON");
    if (j.is_object() && j.contains("end")) {
      reader r{j, where + " (trailer)"};
      r.fields({"end", "rows", "sha256"});
      auto end = r.text("end");
      auto rows = r.integer("rows");
      auto sha = r.bytes("sha256");
      if (r.error().empty() && end != export_format_name)
        r.fail("not this format's trailer");
      if (!r.error().empty())
        return bad_file(r.error());
      if (rows < 0 || static_cast<uint64_t>(rows) != st.rows)
        return bad_file(where + ": the trailer counts " + std::to_string(rows)
                        + " rows, the file holds " + std::to_string(st.rows));
      if (sha != st.digest.finish())
        return bad_file(where
                        + ": the file's SHA-256 does not match its "
                          "trailer: the file was damaged or edited");
      std::string more;
      auto after = st.read_line(more);
      if (!after)
        return after.error();
      if (*after)
        return bad_file(where + ": lines after the trailer");
      st.done = true;
      break;
    }
    auto rec = read_row(j, where);
    if (!rec)
      return rec.error();
    if (!st.seen.insert(rec->key_id).second)
      return bad_file(where + ": key '" + rec->key_id
                      + "' appears twice in the file");
    st.digest.add(line + "\n");
    ++st.rows;
    out.push_back(std::move(*rec));
  }
  return out;
}

uint64_t export_reader::rows() const noexcept {
  return state_->rows;
}

bool export_reader::done() const noexcept {
  return state_->done;
}

caf::expected<export_file> parse_export(std::string_view text) {
  std::istringstream in{std::string{text}};
  export_reader r{in};
  export_file out;
  auto h = r.header();
  if (!h)
    return h.error();
  out.header = std::move(*h);
  while (!r.done()) {
    auto rows = r.next(1000);
    if (!rows)
      return rows.error();
    for (auto& rec : *rows)
      out.rows.push_back(std::move(rec));
  }
  return out;
}

// -- import decisions ---------------------------------------------------------

bool same_row(const key_record& a, const key_record& b) {
  return a.key_id == b.key_id && a.scheme == b.scheme
         && a.public_key == b.public_key && a.key_blob == b.key_blob
         && a.wrap_mechanism == b.wrap_mechanism
         && a.created_at_ms == b.created_at_ms
         && a.format_version == b.format_version
         && a.master_key_id == b.master_key_id && a.row_mac == b.row_mac;
}

import_outcome classify_import(const key_record& file_row,
                               const put_result& res) {
  if (res.inserted)
    return import_outcome::imported;
  if (same_row(res.record, file_row))
    return import_outcome::identical;
  if (res.record.scheme == file_row.scheme
      && res.record.public_key == file_row.public_key)
    return import_outcome::same_key;
  return import_outcome::conflict;
}

} // namespace hsm::keys
