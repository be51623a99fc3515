// The backup drill through the real `hsm-driver` binary: `db verify` on a
// copied SQLite file (intact, then with a tampered blob, swapped blobs and
// changed key ids), `db export` and `db import` between SQLite and a real
// PostgreSQL cluster (tests/support/pg_cluster.hpp), a tampered export and
// a key id that holds another key. A real SoftHSMv2 token throughout.

#include "runtime/crypto/hex.hpp"
#include "store/pg_store.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/pg_cluster.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <openssl/sha.h>
#include <pqxx/pqxx>
#include <sqlite3.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace hsm {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

std::string read_file(const fs::path& p) {
  std::ifstream in{p, std::ios::binary};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string sha256_hex(const std::string& bytes) {
  return crypto::to_hex(test::sha256(bytes));
}

/// Runs `sql` on the SQLite file at `path` behind the driver's back; "" or
/// the error.
std::string sqlite_exec(const fs::path& path, const std::string& sql) {
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) {
    sqlite3_close(db);
    return "cannot open";
  }
  char* msg = nullptr;
  std::string out;
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &msg) != SQLITE_OK)
    out = msg != nullptr ? msg : "error";
  sqlite3_free(msg);
  sqlite3_close(db);
  return out;
}

/// The causes `db verify` reports for `key_id`, or empty if not listed.
std::vector<std::string> causes_of(const json& report,
                                   const std::string& key_id) {
  for (const auto& b : report["bad_rows"])
    if (b["key_id"] == key_id)
      return b["causes"].get<std::vector<std::string>>();
  return {};
}

/// Flips the bits of byte `at` of `key_id`'s blob in the SQLite file.
void flip_blob_byte(const fs::path& path, const std::string& key_id,
                    size_t at) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* get = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db,
                               "SELECT key_blob FROM keys WHERE key_id = ?1",
                               -1, &get, nullptr),
            SQLITE_OK);
  sqlite3_bind_text(get, 1, key_id.c_str(), -1, SQLITE_TRANSIENT);
  ASSERT_EQ(sqlite3_step(get), SQLITE_ROW);
  auto data = static_cast<const uint8_t*>(sqlite3_column_blob(get, 0));
  std::vector<uint8_t> blob(data, data + sqlite3_column_bytes(get, 0));
  sqlite3_finalize(get);
  ASSERT_LT(at, blob.size());
  blob[at] ^= 0xff;
  sqlite3_stmt* put = nullptr;
  ASSERT_EQ(
    sqlite3_prepare_v2(db, "UPDATE keys SET key_blob = ?1 WHERE key_id = ?2",
                       -1, &put, nullptr),
    SQLITE_OK);
  sqlite3_bind_blob(put, 1, blob.data(), static_cast<int>(blob.size()),
                    SQLITE_TRANSIENT);
  sqlite3_bind_text(put, 2, key_id.c_str(), -1, SQLITE_TRANSIENT);
  EXPECT_EQ(sqlite3_step(put), SQLITE_DONE);
  sqlite3_finalize(put);
  sqlite3_close(db);
}

/// Every row of `keys` in a PostgreSQL database, as one string.
std::string pg_rows(const std::string& url) {
  pqxx::connection c{url};
  pqxx::nontransaction q{c};
  auto r = q.exec1("SELECT COALESCE(string_agg(key_id || ':' || "
                   "encode(key_blob, 'hex') || ':' || encode(row_mac, 'hex') "
                   "|| ':' || master_key_id, ',' ORDER BY key_id), '') || '|' "
                   "|| (SELECT COUNT(*) FROM master_key_canary) FROM keys");
  return r[0].as<std::string>();
}

/// Runs `sql` on a PostgreSQL database behind the driver's back.
void pg_exec(const std::string& url, const std::string& sql) {
  pqxx::connection c{url};
  pqxx::nontransaction q{c};
  q.exec0(sql);
}

/// Rewrites the trailer of an export so that its count and digest fit the
/// lines before it (what someone editing the file would do).
void reseal(const fs::path& file) {
  auto text = read_file(file);
  std::vector<std::string> lines;
  std::istringstream in{text};
  for (std::string l; std::getline(in, l);)
    lines.push_back(l);
  lines.pop_back();
  std::string body;
  for (const auto& l : lines)
    body += l + "\n";
  json trailer{{"end", "hsm-driver-key-export"},
               {"rows", lines.size() - 1},
               {"sha256", sha256_hex(body)}};
  std::ofstream out{file, std::ios::binary | std::ios::trunc};
  out << body << trailer.dump() << "\n";
}

class DbToolsTest : public ::testing::Test {
protected:
  void SetUp() override {
    label = test::unique_label("db");
    dir = test::fresh_dir("db");
    db = dir / "keys.db";
    env = {{"SOFTHSM2_CONF", test::softhsm_conf()},
           {"PKCS11_MODULE", test::softhsm_module()},
           {"PKCS11_THALES_MODULE", ""},
           {"PKCS11_IBM_MODULE", ""},
           {"USER_PIN_FILE", ""},
           {"USER_PIN", std::string{test::user_pin}},
           {"SO_PIN", std::string{test::so_pin}},
           {"HSM_TOKEN_LABEL", label},
           {"POSTGRES_URL", ""},
           {"SQLITE_PATH", db.string()}};
    auto init = run({"token", "init"});
    ASSERT_EQ(init.exit_code, 0) << init.out << init.err;
    auto mk = run({"master-key", "init"});
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
  }

  test::run_result run(const std::vector<std::string>& args,
                       std::map<std::string, std::string> extra = {}) {
    auto e = env;
    for (auto& [k, v] : extra)
      e[k] = v;
    return test::run_driver(args, e);
  }

  /// `run` against the SQLite file `path`.
  test::run_result on_sqlite(const fs::path& path,
                             const std::vector<std::string>& args) {
    return run(args, {{"SQLITE_PATH", path.string()}});
  }

  /// `run` against the PostgreSQL database `url`.
  test::run_result on_pg(const std::string& url,
                         const std::vector<std::string>& args) {
    return run(args, {{"SQLITE_PATH", ""}, {"POSTGRES_URL", url}});
  }

  /// Generates `key_id`; returns its public key.
  std::vector<uint8_t> generate(const std::string& key_id,
                                const std::string& scheme_name,
                                std::vector<std::string> flags = {}) {
    flags.insert(flags.end(), {"keys", "generate", "--scheme", scheme_name,
                               "--key-id", key_id});
    auto res = run(flags);
    EXPECT_EQ(res.exit_code, 0) << res.out << res.err;
    auto v = crypto::from_hex(
      json::parse(res.out)["key"]["public_key"].get<std::string>());
    return v ? *v : std::vector<uint8_t>{};
  }

  /// A copy of the database file, as a backup of a stopped driver is.
  fs::path backup(const std::string& name) {
    EXPECT_FALSE(fs::exists(fs::path{db.string() + "-wal"})
                 && fs::file_size(fs::path{db.string() + "-wal"}) > 0)
      << "the driver left a WAL behind: a file copy would miss rows";
    auto copy = dir / name;
    fs::copy_file(db, copy);
    return copy;
  }

  std::string label;
  fs::path dir;
  fs::path db;
  std::map<std::string, std::string> env;
};

TEST_F(DbToolsTest, VerifyPassesOnACopyAndLeavesItByteIdentical) {
  generate("v-k1", "secp256k1");
  generate("v-p1", "p256");
  generate("v-ed", "ed25519", {"--resident-schemes", "ed25519"});
  auto copy = backup("backup.db");
  auto before = sha256_hex(read_file(copy));
  auto res = on_sqlite(copy, {"db", "verify"});
  ASSERT_EQ(res.exit_code, 0) << res.out << res.err;
  auto report = json::parse(res.out);
  EXPECT_TRUE(report["ok"].get<bool>());
  EXPECT_TRUE(report["read_only"].get<bool>());
  EXPECT_EQ(report["canary"]["state"], "matches") << res.out;
  EXPECT_EQ(report["rows"]["checked"], 3);
  EXPECT_EQ(report["rows"]["good"], 3);
  EXPECT_EQ(report["rows"]["bad"], 0);
  EXPECT_EQ(report["rows"]["resident"], 1);
  EXPECT_TRUE(report["bad_rows"].empty());
  EXPECT_EQ(sha256_hex(read_file(copy)), before)
    << "db verify changed the database file";
  // The live database while a writer holds its write lock (as a driver
  // committing a key does): verify needs no lock and does not wait.
  {
    sqlite3* writer = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &writer), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(writer,
                           "BEGIN IMMEDIATE; INSERT INTO keys (key_id, "
                           "scheme, public_key, key_blob, wrap_mechanism, "
                           "created_at_ms) VALUES ('v-pending', 'p256', x'04', "
                           "x'00', 'CKM_AES_KEY_WRAP_PAD', 0)",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    auto live = run({"db", "verify"});
    EXPECT_EQ(live.exit_code, 0) << live.out << live.err;
    EXPECT_EQ(json::parse(live.out)["rows"]["checked"], 3)
      << "verify saw an uncommitted row";
    sqlite3_exec(writer, "ROLLBACK", nullptr, nullptr, nullptr);
    sqlite3_close(writer);
  }
  // A path that does not exist is an error, and no file is created there.
  auto missing = on_sqlite(dir / "nope.db", {"db", "verify"});
  EXPECT_EQ(missing.exit_code, 1) << missing.out << missing.err;
  EXPECT_FALSE(fs::exists(dir / "nope.db"));
  // A resident key whose token object is gone, as when a backup is
  // restored after the object was lost: the row is intact (its MAC holds),
  // the object missing. The object goes the way an operator's would: its
  // row leaves the live store and reconcile destroys the orphan.
  ASSERT_EQ(sqlite_exec(db, "DELETE FROM keys WHERE key_id = 'v-ed'"), "");
  auto rec = run({"keys", "reconcile", "--apply", "--include-orphans"});
  ASSERT_EQ(rec.exit_code, 0) << rec.out << rec.err;
  auto gone = on_sqlite(copy, {"db", "verify"});
  EXPECT_EQ(gone.exit_code, 1) << gone.out << gone.err;
  auto g = json::parse(gone.out);
  EXPECT_EQ(causes_of(g, "v-ed"), std::vector<std::string>{"resident_missing"})
    << gone.out;
  EXPECT_EQ(g["rows"]["bad"], 1) << gone.out;
  // A resident row whose label was changed fails its MAC and is not
  // looked up on the token at all.
  ASSERT_EQ(sqlite_exec(copy, "UPDATE keys SET key_blob = CAST('v-ed/00000000"
                              "00000000' AS BLOB) WHERE key_id = 'v-ed'"),
            "");
  auto changed = on_sqlite(copy, {"db", "verify"});
  EXPECT_EQ(causes_of(json::parse(changed.out), "v-ed"),
            std::vector<std::string>{"mac_broken"})
    << changed.out;
}

TEST_F(DbToolsTest, VerifyNamesTamperedSwappedAndRenamedRows) {
  for (std::string id : {"t-blob", "t-swap1", "t-swap2", "t-ren", "t-x", "t-y",
                         "t-copy", "t-good"})
    generate(id, "p256");
  auto copy = backup("tampered.db");
  // A flipped byte in a blob.
  flip_blob_byte(copy, "t-blob", 20);
  // Two rows' blobs swapped (through a copy: an UPDATE's subqueries see
  // the rows it already changed).
  ASSERT_EQ(sqlite_exec(copy,
                        "CREATE TEMP TABLE old AS SELECT key_id, key_blob "
                        "FROM keys WHERE key_id IN ('t-swap1', 't-swap2'); "
                        "UPDATE keys SET key_blob = (SELECT key_blob FROM old "
                        "WHERE old.key_id = CASE keys.key_id WHEN 't-swap1' "
                        "THEN 't-swap2' ELSE 't-swap1' END) "
                        "WHERE key_id IN ('t-swap1', 't-swap2')"),
            "");
  // A key id changed; two key ids swapped.
  ASSERT_EQ(sqlite_exec(copy,
                        "UPDATE keys SET key_id = 't-renamed' WHERE key_id = "
                        "'t-ren'; UPDATE keys SET key_id = 'tmp' WHERE key_id "
                        "= 't-x'; UPDATE keys SET key_id = 't-x' WHERE key_id "
                        "= 't-y'; UPDATE keys SET key_id = 't-y' WHERE key_id "
                        "= 'tmp'"),
            "");
  // Everything of one row but its key id copied over another: the copy
  // signs for its public key, and its MAC is the other key id's.
  ASSERT_EQ(sqlite_exec(copy,
                        "UPDATE keys SET (public_key, key_blob, "
                        "row_mac) = (SELECT public_key, key_blob, row_mac "
                        "FROM keys WHERE key_id = 't-good') "
                        "WHERE key_id = 't-copy'"),
            "");
  auto before = sha256_hex(read_file(copy));
  auto res = on_sqlite(copy, {"db", "verify"});
  EXPECT_EQ(res.exit_code, 1) << res.out << res.err;
  auto report = json::parse(res.out);
  EXPECT_FALSE(report["ok"].get<bool>());
  EXPECT_EQ(report["rows"]["checked"], 8);
  EXPECT_EQ(report["rows"]["bad"], 7) << res.out;
  EXPECT_EQ(report["canary"]["state"], "matches");
  // A row whose MAC fails is never unwrapped: the MAC is its only cause.
  EXPECT_EQ(causes_of(report, "t-blob"), std::vector<std::string>{"mac_broken"})
    << res.out;
  for (std::string id : {"t-swap1", "t-swap2"})
    EXPECT_EQ(causes_of(report, id), std::vector<std::string>{"mac_broken"})
      << id << res.out;
  // Renamed: only the binding is broken, to a key id no row has.
  auto ren = causes_of(report, "t-renamed");
  EXPECT_EQ(ren, std::vector<std::string>{"mac_broken"}) << res.out;
  // Swapped ids: each row's MAC holds for the other's id.
  for (std::string id : {"t-x", "t-y"})
    EXPECT_EQ(causes_of(report, id), std::vector<std::string>{"key_id_binding"})
      << id << res.out;
  EXPECT_EQ(causes_of(report, "t-copy"),
            std::vector<std::string>{"key_id_binding"})
    << res.out;
  EXPECT_NE(res.out.find("holds for key id 't-good'"), std::string::npos)
    << res.out;
  EXPECT_TRUE(causes_of(report, "t-good").empty());
  EXPECT_EQ(sha256_hex(read_file(copy)), before);
  // The live database is untouched and passes.
  auto live = run({"db", "verify"});
  EXPECT_EQ(live.exit_code, 0) << live.out << live.err;
  // Against another token (another master key), the canary and every row
  // fail.
  auto other = test::unique_label("db-other");
  ASSERT_EQ(run({"token", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code, 0);
  ASSERT_EQ(run({"master-key", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code,
            0);
  auto wrong = run({"db", "verify"}, {{"HSM_TOKEN_LABEL", other}});
  EXPECT_EQ(wrong.exit_code, 1) << wrong.out << wrong.err;
  auto w = json::parse(wrong.out);
  EXPECT_EQ(w["canary"]["state"], "mismatch") << wrong.out;
  EXPECT_EQ(w["rows"]["bad"], 8) << wrong.out;
}

TEST_F(DbToolsTest, ExportImportSqliteToSqliteIsIdempotentAndRefusesConflicts) {
  auto k1 = generate("e-k1", "secp256k1");
  generate("e-p1", "p256");
  auto file = dir / "keys.export";
  auto exp = run({"db", "export", "--out", file.string()});
  ASSERT_EQ(exp.exit_code, 0) << exp.out << exp.err;
  EXPECT_EQ(json::parse(exp.out)["rows"], 2);
  struct stat sb {};
  ASSERT_EQ(::stat(file.c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
  // Never over an existing file.
  auto again = run({"db", "export", "--out", file.string()});
  EXPECT_NE(again.exit_code, 0);
  // The rows in the file are the stored wrapped rows.
  {
    std::istringstream lines{read_file(file)};
    std::string header;
    std::getline(lines, header);
    auto h = json::parse(header);
    EXPECT_EQ(h["format"], "hsm-driver-key-export");
    EXPECT_EQ(h["version"], 1);
    EXPECT_EQ(h["canary"]["master_key_label"], "hsm-driver-master");
    std::string row;
    std::getline(lines, row);
    auto r = json::parse(row);
    EXPECT_EQ(r["key_id"], "e-k1");
    EXPECT_EQ(r["public_key"], crypto::to_hex(k1));
    EXPECT_EQ(r["key_blob"].get<std::string>().size(), 2u * 72)
      << "a secp256k1 blob wrapped with CKM_AES_KEY_WRAP_PAD is 72 bytes";
  }
  // Into a fresh SQLite file: schema, canary, rows.
  auto target = dir / "target.db";
  auto imp = on_sqlite(target, {"db", "import", "--in", file.string()});
  ASSERT_EQ(imp.exit_code, 0) << imp.out << imp.err;
  auto j = json::parse(imp.out);
  EXPECT_EQ(j["imported"], 2);
  EXPECT_EQ(j["canary"], "copied");
  auto hash = test::sha256("signed from the target");
  auto sign = on_sqlite(target, {"keys", "sign", "--key-id", "e-k1",
                                 "--payload", crypto::to_hex(hash)});
  ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
  auto der = crypto::from_hex(
    json::parse(sign.out)["signature"]["der"].get<std::string>());
  ASSERT_TRUE(der);
  EXPECT_TRUE(test::openssl_verify(scheme::secp256k1, k1, hash, *der));
  // Again: nothing new.
  auto before = sha256_hex(read_file(target));
  auto twice = on_sqlite(target, {"db", "import", "--in", file.string()});
  ASSERT_EQ(twice.exit_code, 0) << twice.out << twice.err;
  auto t = json::parse(twice.out);
  EXPECT_EQ(t["imported"], 0);
  EXPECT_EQ(t["already_present"], 2);
  // A key id that holds another key in the target is refused, not
  // overwritten; the other row still goes in.
  auto third = dir / "third.db";
  auto own = [&] {
    auto res = on_sqlite(third, {"keys", "generate", "--scheme", "secp256k1",
                                 "--key-id", "e-k1"});
    EXPECT_EQ(res.exit_code, 0) << res.out << res.err;
    return json::parse(res.out)["key"]["public_key"].get<std::string>();
  }();
  ASSERT_NE(own, crypto::to_hex(k1));
  auto conflict = on_sqlite(third, {"db", "import", "--in", file.string()});
  EXPECT_EQ(conflict.exit_code, 1) << conflict.out << conflict.err;
  auto c = json::parse(conflict.out);
  EXPECT_EQ(c["imported"], 1) << conflict.out;
  ASSERT_EQ(c["refused"].size(), 1u) << conflict.out;
  EXPECT_EQ(c["refused"][0]["key_id"], "e-k1");
  EXPECT_EQ(c["refused"][0]["cause"], "key_id_conflict");
  auto show = on_sqlite(third, {"keys", "show", "--key-id", "e-k1"});
  ASSERT_EQ(show.exit_code, 0) << show.out << show.err;
  EXPECT_EQ(json::parse(show.out)["key"]["public_key"], own)
    << "the import overwrote a key";
}

TEST_F(DbToolsTest, ImportRefusesATamperedRowByKeyIdAndADamagedFileWhole) {
  generate("m-a", "p256");
  generate("m-b", "p256");
  generate("m-c", "secp256k1");
  auto file = dir / "keys.export";
  ASSERT_EQ(run({"db", "export", "--out", file.string()}).exit_code, 0);
  // On a token with another master key: refused at the canary, nothing
  // written.
  {
    auto other = test::unique_label("db-other");
    ASSERT_EQ(run({"token", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code,
              0);
    ASSERT_EQ(
      run({"master-key", "init"}, {{"HSM_TOKEN_LABEL", other}}).exit_code, 0);
    auto elsewhere = dir / "elsewhere.db";
    auto res = run({"db", "import", "--in", file.string()},
                   {{"HSM_TOKEN_LABEL", other},
                    {"SQLITE_PATH", elsewhere.string()}});
    EXPECT_EQ(res.exit_code, 1) << res.out << res.err;
    EXPECT_NE(res.out.find("master_key_mismatch"), std::string::npos)
      << res.out;
    EXPECT_NE(res.out.find("nothing was imported"), std::string::npos)
      << res.out;
    EXPECT_EQ(sqlite_exec(elsewhere, "SELECT 1 FROM keys LIMIT 0"), "");
    sqlite3* db2 = nullptr;
    ASSERT_EQ(sqlite3_open(elsewhere.c_str(), &db2), SQLITE_OK);
    sqlite3_stmt* count = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db2,
                                 "SELECT (SELECT COUNT(*) FROM keys) + "
                                 "(SELECT COUNT(*) FROM master_key_canary)",
                                 -1, &count, nullptr),
              SQLITE_OK);
    ASSERT_EQ(sqlite3_step(count), SQLITE_ROW);
    EXPECT_EQ(sqlite3_column_int(count, 0), 0);
    sqlite3_finalize(count);
    sqlite3_close(db2);
  }
  // Damaged without a new trailer: refused whole, nothing written.
  auto text = read_file(file);
  auto pos = text.find("\"key_id\":\"m-b\"");
  ASSERT_NE(pos, std::string::npos);
  auto blob = text.find("\"key_blob\":\"", pos) + 12;
  text[blob] = text[blob] == '0' ? '1' : '0';
  {
    std::ofstream out{file, std::ios::binary | std::ios::trunc};
    out << text;
  }
  auto target = dir / "target.db";
  auto damaged = on_sqlite(target, {"db", "import", "--in", file.string()});
  EXPECT_EQ(damaged.exit_code, 2) << damaged.out << damaged.err;
  EXPECT_NE(damaged.out.find("SHA-256"), std::string::npos) << damaged.out;
  EXPECT_FALSE(fs::exists(target)) << "a damaged file touched the target";
  // Resealed, as someone editing the file would: the row's MAC refuses it.
  reseal(file);
  auto tampered = on_sqlite(target, {"db", "import", "--in", file.string()});
  EXPECT_EQ(tampered.exit_code, 1) << tampered.out << tampered.err;
  auto j = json::parse(tampered.out);
  EXPECT_EQ(j["imported"], 2) << tampered.out;
  ASSERT_EQ(j["refused"].size(), 1u) << tampered.out;
  EXPECT_EQ(j["refused"][0]["key_id"], "m-b");
  EXPECT_EQ(j["refused"][0]["cause"], "mac_broken");
  auto show = on_sqlite(target, {"keys", "show", "--key-id", "m-b"});
  EXPECT_NE(show.exit_code, 0) << "the tampered row was imported";
  auto verify = on_sqlite(target, {"db", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  EXPECT_EQ(json::parse(verify.out)["rows"]["checked"], 2);
}

TEST_F(DbToolsTest, SqliteToPostgresAndBackSignsOnBothSides) {
  auto url = test::fresh_database();
  ASSERT_FALSE(url.empty()) << "no PostgreSQL test database (see above)";
  auto k1 = generate("pg-k1", "secp256k1");
  auto p1 = generate("pg-p1", "p256");
  auto file = dir / "to-pg.export";
  ASSERT_EQ(run({"db", "export", "--out", file.string()}).exit_code, 0);
  // A target whose database fails the write of a batch: the import stops,
  // says what it committed (nothing), and leaves no row behind.
  {
    auto st = store::pg_store::open(url);
    ASSERT_TRUE(st) << describe(st.error());
  }
  pg_exec(url, "CREATE FUNCTION refuse_p1() RETURNS trigger AS $$ BEGIN "
               "IF NEW.key_id = 'pg-p1' THEN RAISE EXCEPTION 'refused by "
               "the test'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql; "
               "CREATE TRIGGER refuse_p1 BEFORE INSERT ON keys FOR EACH ROW "
               "EXECUTE FUNCTION refuse_p1()");
  auto stopped = on_pg(url, {"db", "import", "--in", file.string()});
  EXPECT_EQ(stopped.exit_code, 1) << stopped.out << stopped.err;
  auto s = json::parse(stopped.out);
  EXPECT_FALSE(s["ok"].get<bool>());
  EXPECT_EQ(s["imported"], 0) << stopped.out;
  EXPECT_EQ(s["committed_through"], "") << stopped.out;
  EXPECT_NE(s["error"]["message"].get<std::string>().find("refused by the "
                                                          "test"),
            std::string::npos)
    << stopped.out;
  EXPECT_EQ(s["canary"], "copied");
  EXPECT_EQ(pg_rows(url), "|1") << "rows of a failed batch stayed behind";
  pg_exec(url, "DROP TRIGGER refuse_p1 ON keys");
  auto imp = on_pg(url, {"db", "import", "--in", file.string()});
  ASSERT_EQ(imp.exit_code, 0) << imp.out << imp.err;
  auto j = json::parse(imp.out);
  EXPECT_EQ(j["imported"], 2);
  EXPECT_EQ(j["canary"], "kept");
  // A driver on PostgreSQL signs with the imported key.
  auto hash = test::sha256("signed through PostgreSQL");
  auto sign = on_pg(url, {"keys", "sign", "--key-id", "pg-k1", "--payload",
                          crypto::to_hex(hash)});
  ASSERT_EQ(sign.exit_code, 0) << sign.out << sign.err;
  auto der = crypto::from_hex(
    json::parse(sign.out)["signature"]["der"].get<std::string>());
  ASSERT_TRUE(der);
  EXPECT_TRUE(test::openssl_verify(scheme::secp256k1, k1, hash, *der));
  // Import again: a no-op, row for row.
  auto rows_before = pg_rows(url);
  auto twice = on_pg(url, {"db", "import", "--in", file.string()});
  ASSERT_EQ(twice.exit_code, 0) << twice.out << twice.err;
  EXPECT_EQ(json::parse(twice.out)["imported"], 0);
  EXPECT_EQ(json::parse(twice.out)["already_present"], 2);
  EXPECT_EQ(pg_rows(url), rows_before);
  // verify on PostgreSQL reads only.
  auto verify = on_pg(url, {"db", "verify"});
  ASSERT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  EXPECT_EQ(json::parse(verify.out)["rows"]["checked"], 2);
  EXPECT_EQ(pg_rows(url), rows_before);
  // A row tampered in PostgreSQL is named there.
  pg_exec(url, "UPDATE keys SET key_id = 'pg-p1-renamed' WHERE key_id = "
               "'pg-p1'");
  auto bad = on_pg(url, {"db", "verify"});
  EXPECT_EQ(bad.exit_code, 1) << bad.out << bad.err;
  EXPECT_EQ(causes_of(json::parse(bad.out), "pg-p1-renamed"),
            std::vector<std::string>{"mac_broken"})
    << bad.out;
  // And back: PostgreSQL to a new SQLite file (the renamed row is refused
  // by its MAC on the way).
  auto back_file = dir / "from-pg.export";
  auto exp = on_pg(url, {"db", "export", "--out", back_file.string()});
  ASSERT_EQ(exp.exit_code, 0) << exp.out << exp.err;
  auto back = dir / "back.db";
  auto imp2 = on_sqlite(back, {"db", "import", "--in", back_file.string()});
  EXPECT_EQ(imp2.exit_code, 1) << imp2.out << imp2.err;
  auto j2 = json::parse(imp2.out);
  EXPECT_EQ(j2["imported"], 1);
  ASSERT_EQ(j2["refused"].size(), 1u);
  EXPECT_EQ(j2["refused"][0]["key_id"], "pg-p1-renamed");
  auto sign2 = on_sqlite(back, {"keys", "sign", "--key-id", "pg-k1",
                                "--payload", crypto::to_hex(hash)});
  ASSERT_EQ(sign2.exit_code, 0) << sign2.out << sign2.err;
  auto der2 = crypto::from_hex(
    json::parse(sign2.out)["signature"]["der"].get<std::string>());
  ASSERT_TRUE(der2);
  EXPECT_TRUE(test::openssl_verify(scheme::secp256k1, k1, hash, *der2));
  (void) p1;
  test::drop_database(url);
}

} // namespace
} // namespace hsm
