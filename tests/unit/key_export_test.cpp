// The export file of `db export` / `db import` (runtime/keys/key_export.hpp):
// what is written reads back the same, and a file that is cut off, edited
// outside its rows' MACs, of another version or with a key id twice is
// refused before anything is imported.

#include "runtime/keys/key_export.hpp"

#include "runtime/crypto/hex.hpp"

#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

namespace hsm::keys {
namespace {

key_record row(std::string id, uint8_t fill) {
  key_record r;
  r.key_id = std::move(id);
  r.scheme = scheme::p256;
  r.public_key = std::vector<uint8_t>(65, fill);
  r.public_key[0] = 0x04;
  r.key_blob = std::vector<uint8_t>(80, static_cast<uint8_t>(fill + 1));
  r.wrap_mechanism = std::string{aes_key_wrap_pad};
  r.created_at_ms = 1700000000000 + fill;
  r.format_version = current_row_format;
  r.master_key_id = "hsm-driver-master";
  r.row_mac = std::vector<uint8_t>(32, static_cast<uint8_t>(fill + 2));
  return r;
}

export_header header() {
  export_header h;
  h.exported_at_ms = 1700000000123;
  h.source = "SQLite /var/lib/hsm-driver/keys.db";
  h.schema_version = 4;
  store::canary_record c;
  c.public_key = std::vector<uint8_t>(65, 7);
  c.wrapped_key = std::vector<uint8_t>(80, 8);
  c.wrap_mechanism = std::string{aes_key_wrap_pad};
  c.master_key_label = "hsm-driver-master";
  c.created_at_ms = 1600000000000;
  h.canary = c;
  store::rotation_record r;
  r.from_label = "old";
  r.to_label = "hsm-driver-master";
  r.phase = store::rotation_phase::complete;
  r.started_at_ms = 1;
  r.completed_at_ms = 2;
  h.rotation = r;
  return h;
}

std::string file_of(const export_header& h, const std::vector<key_record>& rs) {
  line_digest d;
  std::string out = header_line(h);
  d.add(out);
  for (const auto& r : rs) {
    auto line = row_line(r);
    d.add(line);
    out += line;
  }
  return out + trailer_line(rs.size(), d.finish());
}

std::string bad_file_text(std::string_view text) {
  auto parsed = parse_export(text);
  EXPECT_FALSE(parsed);
  if (parsed)
    return {};
  EXPECT_EQ(parsed.error(), config_errc::bad_file) << describe(parsed.error());
  return describe(parsed.error());
}

TEST(KeyExport, WhatIsWrittenReadsBackTheSame) {
  std::vector<key_record> rows{row("a", 1), row("b", 2)};
  rows[1].wrap_mechanism = std::string{resident_mechanism};
  rows[1].scheme = scheme::ed25519;
  auto parsed = parse_export(file_of(header(), rows));
  ASSERT_TRUE(parsed) << describe(parsed.error());
  ASSERT_EQ(parsed->rows.size(), 2u);
  EXPECT_TRUE(same_row(parsed->rows[0], rows[0]));
  EXPECT_TRUE(same_row(parsed->rows[1], rows[1]));
  auto h = header();
  EXPECT_EQ(parsed->header.source, h.source);
  EXPECT_EQ(parsed->header.schema_version, 4);
  ASSERT_TRUE(parsed->header.canary);
  EXPECT_EQ(parsed->header.canary->wrapped_key, h.canary->wrapped_key);
  EXPECT_EQ(parsed->header.canary->master_key_label, "hsm-driver-master");
  EXPECT_EQ(parsed->header.rotation, h.rotation);
  // Without canary and rotation, and without rows.
  export_header bare;
  auto empty = parse_export(file_of(bare, {}));
  ASSERT_TRUE(empty) << describe(empty.error());
  EXPECT_FALSE(empty->header.canary);
  EXPECT_FALSE(empty->header.rotation);
  EXPECT_TRUE(empty->rows.empty());
}

TEST(KeyExport, ACutOffOrEditedFileIsRefusedWhole) {
  auto text = file_of(header(), {row("a", 1), row("b", 2), row("c", 3)});
  // Cut off: without the trailer, in the middle of a line, or empty.
  auto trailer = text.rfind("{\"end\"");
  EXPECT_NE(bad_file_text(text.substr(0, trailer)).find("no trailer"),
            std::string::npos);
  EXPECT_NE(bad_file_text(text.substr(0, trailer - 10)).find("cut off"),
            std::string::npos);
  EXPECT_NE(bad_file_text("").find("empty"), std::string::npos);
  // One hex digit of a blob changed: the digest no longer holds.
  auto edited = text;
  auto blob = edited.find("\"key_blob\":\"") + 12;
  edited[blob] = edited[blob] == '0' ? '1' : '0';
  EXPECT_NE(bad_file_text(edited).find("SHA-256"), std::string::npos);
  // A row dropped, with the digest made again: the count no longer holds.
  std::vector<key_record> two{row("a", 1), row("b", 2)};
  auto short_file = file_of(header(), two);
  auto lines_of_two = short_file.substr(0, short_file.rfind("{\"end\""));
  auto three_trailer = text.substr(trailer);
  EXPECT_NE(bad_file_text(lines_of_two + three_trailer).find("counts 3"),
            std::string::npos);
  // Lines after the trailer.
  EXPECT_NE(bad_file_text(text + row_line(row("d", 4))).find("after"),
            std::string::npos);
}

TEST(KeyExport, AnotherFormatVersionOrShapeIsRefused) {
  auto text = file_of(header(), {row("a", 1)});
  auto v2 = text;
  v2.replace(v2.find("\"version\":1"), 11, "\"version\":2");
  EXPECT_NE(bad_file_text(v2).find("version 2"), std::string::npos);
  EXPECT_NE(bad_file_text("{\"rows\":[]}\n").find("not an hsm-driver"),
            std::string::npos);
  // A row with a field too many, or one missing.
  auto extra = row_line(row("a", 1));
  extra.insert(1, "\"plaintext\":\"00\",");
  EXPECT_NE(bad_file_text(header_line(header()) + extra).find("unknown field"),
            std::string::npos);
  auto missing = row_line(row("a", 1));
  auto mac = missing.find(",\"row_mac\"");
  missing = missing.substr(0, mac) + "}\n";
  EXPECT_NE(bad_file_text(header_line(header()) + missing).find("row_mac"),
            std::string::npos);
  // A canary whose fingerprint is not its public key's.
  auto h = header_line(header());
  auto fp = h.find("sha256:") + 7;
  h[fp] = h[fp] == 'a' ? 'b' : 'a';
  EXPECT_NE(bad_file_text(h).find("fingerprint"), std::string::npos);
}

TEST(KeyExport, TheReaderGivesBatchesAndChecksTheTrailerAtTheEnd) {
  auto text = file_of(header(), {row("a", 1), row("b", 2), row("c", 3)});
  {
    std::istringstream in{text};
    export_reader r{in};
    ASSERT_TRUE(r.header());
    auto first = r.next(2);
    ASSERT_TRUE(first) << describe(first.error());
    ASSERT_EQ(first->size(), 2u);
    EXPECT_EQ((*first)[1].key_id, "b");
    EXPECT_FALSE(r.done());
    auto second = r.next(2);
    ASSERT_TRUE(second) << describe(second.error());
    ASSERT_EQ(second->size(), 1u);
    EXPECT_TRUE(r.done());
    EXPECT_EQ(r.rows(), 3u);
  }
  // An edited last row: the first batch reads, the end does not hold.
  auto edited = text;
  auto blob = edited.rfind("\"key_blob\":\"") + 12;
  edited[blob] = edited[blob] == '0' ? '1' : '0';
  std::istringstream in{edited};
  export_reader r{in};
  ASSERT_TRUE(r.header());
  EXPECT_TRUE(r.next(2));
  auto rest = r.next(2);
  ASSERT_FALSE(rest);
  EXPECT_NE(describe(rest.error()).find("SHA-256"), std::string::npos);
  EXPECT_FALSE(r.done());
}

TEST(KeyExport, AKeyIdTwiceIsRefused) {
  auto text = file_of(header(), {row("a", 1), row("a", 2)});
  EXPECT_NE(bad_file_text(text).find("appears twice"), std::string::npos);
}

TEST(KeyExport, ImportOutcomes) {
  auto mine = row("a", 1);
  EXPECT_EQ(classify_import(mine, put_result{mine, true}),
            import_outcome::imported);
  EXPECT_EQ(classify_import(mine, put_result{mine, false}),
            import_outcome::identical);
  auto rewrapped = mine;
  rewrapped.key_blob[0] ^= 1;
  rewrapped.master_key_id = "other";
  rewrapped.row_mac[0] ^= 1;
  EXPECT_EQ(classify_import(mine, put_result{rewrapped, false}),
            import_outcome::same_key);
  auto another = row("a", 9);
  EXPECT_EQ(classify_import(mine, put_result{another, false}),
            import_outcome::conflict);
  auto other_scheme = mine;
  other_scheme.scheme = scheme::secp256k1;
  EXPECT_EQ(classify_import(mine, put_result{other_scheme, false}),
            import_outcome::conflict);
}

} // namespace
} // namespace hsm::keys
