#pragma once

// The file of `hsm-driver db export` and `db import` (README, "Backup and
// restore"): JSON lines, version 1.
//
//   line 1     header  {"format":"hsm-driver-key-export","version":1,
//                       "exported_at_ms","source","schema_version",
//                       "canary":{...}|null,"rotation":{...}|null}
//   lines 2..  rows    {"key_id","scheme","public_key","key_blob",
//                       "wrap_mechanism","created_at_ms","format_version",
//                       "master_key_id","row_mac"}   (bytes as lowercase hex)
//   last line  trailer {"end":"hsm-driver-key-export","rows":N,"sha256":hex}
//
// A row is the stored row as it is: a blob wrapped by the HSM's master key
// (or, for a token-resident key, the label of its token object), its public
// key and its row MAC. No plaintext key material is ever in the file. The
// trailer counts the rows and holds the SHA-256 of every byte before it, so
// that a truncated or damaged file is refused before anything is imported;
// an edited row is caught by its MAC. Pure functions; any thread.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "store/key_store.hpp"

#include <cstdint>
#include <istream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// The `format` of the header and the `end` of the trailer.
inline constexpr std::string_view export_format_name = "hsm-driver-key-export";

/// The version this build writes and reads.
inline constexpr int export_format_version = 1;

/// The header: where the rows come from and what the target needs besides
/// them to serve (the master-key canary, the rotation record).
struct export_header {
  /// The format version (`export_format_version`).
  int version = export_format_version;
  /// When the export began, milliseconds since the Unix epoch.
  int64_t exported_at_ms = 0;
  /// The source store, for the operator (a redacted URL or a path).
  std::string source;
  /// The source's schema version.
  int schema_version = 0;
  /// The source's master-key canary: the identity of the master key its
  /// rows are under.
  std::optional<store::canary_record> canary;
  /// The source's master-key rotation record.
  std::optional<store::rotation_record> rotation;
};

/// The header as one line (with its newline).
[[nodiscard]] std::string header_line(const export_header& h);

/// A row as one line (with its newline).
[[nodiscard]] std::string row_line(const key_record& rec);

/// The trailer for `rows` rows after the lines whose SHA-256 is `digest`.
[[nodiscard]] std::string trailer_line(uint64_t rows,
                                       const std::vector<uint8_t>& digest);

/// SHA-256 over the lines of a file, as they are written or read.
class line_digest {
public:
  /// An empty digest.
  line_digest();
  /// Frees the hash context.
  ~line_digest();
  /// Not copyable: owns a hash context.
  line_digest(const line_digest&) = delete;
  /// Not copyable: owns a hash context.
  line_digest& operator=(const line_digest&) = delete;

  /// Adds `bytes`.
  void add(std::string_view bytes);

  /// The digest of everything added.
  [[nodiscard]] std::vector<uint8_t> finish();

private:
  struct state;
  std::unique_ptr<state> state_;
};

/// Reads an export file line by line, checking each line as `parse_export`
/// does; the trailer's count and digest are checked when it is reached, so
/// a caller that acts on rows before then must be ready for a late error
/// (`db import` reads a file twice: once to check it, once to import).
class export_reader {
public:
  /// Reads from `in`, which must outlive the reader.
  explicit export_reader(std::istream& in);
  /// Frees the reader's state.
  ~export_reader();
  /// Not copyable: reads one stream.
  export_reader(const export_reader&) = delete;
  /// Not copyable: reads one stream.
  export_reader& operator=(const export_reader&) = delete;

  /// Reads and checks the header; call once, first.
  [[nodiscard]] caf::expected<export_header> header();

  /// Up to `n` next rows; fewer (possibly none) once the trailer is read
  /// and holds (`done`).
  [[nodiscard]] caf::expected<std::vector<key_record>> next(size_t n);

  /// Rows read so far.
  [[nodiscard]] uint64_t rows() const noexcept;

  /// The trailer was read and holds.
  [[nodiscard]] bool done() const noexcept;

private:
  struct state;
  std::unique_ptr<state> state_;
};

/// A parsed export file.
struct export_file {
  /// The header.
  export_header header;
  /// The rows, in file order.
  std::vector<key_record> rows;
};

/// Parses a whole file: the header (format and version), every row (each
/// field present with its type, bytes in hex, a known scheme, a key id
/// that appears once), the trailer (the row count and the digest). The
/// first problem is `config_errc::bad_file` naming the line.
[[nodiscard]] caf::expected<export_file> parse_export(std::string_view text);

/// What importing a file row found under its key id in the target.
enum class import_outcome {
  /// The row was written.
  imported,
  /// The very same row is stored (an import run again).
  identical,
  /// The same key (same scheme and public key) is stored, wrapped
  /// otherwise (e.g. re-wrapped by a rotation in the target): kept as is.
  same_key,
  /// Another key is stored under the key id: refused, never overwritten.
  conflict,
};

/// Decides from a put's result (`put_result`) for `file_row`.
[[nodiscard]] import_outcome classify_import(const key_record& file_row,
                                             const put_result& res);

/// True if the two rows are equal in every stored field.
[[nodiscard]] bool same_row(const key_record& a, const key_record& b);

} // namespace hsm::keys
