#pragma once

// The one reader of libpq connection strings in the driver: the URI form
// (`postgresql://user:pw@h1:5432,[::1]:5433/db?k=v`) and the keyword form
// (`host=h1 password = 'two words'`), parsed as libpq parses them (libpqxx
// 6.4 does not expose PQconninfoParse), and the redaction that makes one fit
// for logs. The PostgreSQL store reads hosts and options from it; the
// application logs connection strings only through `redact_conninfo`.
// Pure functions of their arguments (no environment, no I/O): any thread.

#include "messages/errors.hpp"

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::store {

/// What `redact_conninfo` returns for a string that does not parse.
inline constexpr std::string_view unparsable_conninfo
  = "<unparsable connection string>";

/// One setting of a connection string: a libpq keyword and its value.
struct conninfo_option {
  /// The keyword (percent-decoded in a URI query), e.g. `host`.
  std::string keyword;
  /// The value, unquoted, unescaped and percent-decoded.
  std::string value;
  /// Start of the value in the parsed text as typed (quotes included).
  size_t value_begin = 0;
  /// End (exclusive) of the value in the parsed text as typed. In a URI,
  /// `host` and `port` both span the whole host list.
  size_t value_end = 0;
};

/// A parsed libpq connection string.
struct pg_conninfo {
  /// True for the `postgresql://` / `postgres://` form.
  bool uri = false;
  /// The settings in the order given. A URI contributes `user`,
  /// `password`, `host`, `port` (both comma-separated lists, as libpq keeps
  /// them) and `dbname` from before its query, then the query parameters.
  /// A keyword given twice counts with its last value, as in libpq.
  std::vector<conninfo_option> options;

  /// The value of the last setting of `keyword`, or null.
  [[nodiscard]] const std::string* find(std::string_view keyword) const;
};

/// One server of a host list and its port; empty means libpq's default.
struct pg_host {
  /// Host name, address, or socket directory.
  std::string host;
  /// Port, as given.
  std::string port;
};

/// True if `text` starts with `postgresql://` or `postgres://`, the
/// prefixes that make libpq read it as a URI.
[[nodiscard]] bool is_conninfo_uri(std::string_view text);

/// Parses `text` as libpq does. Fails with `config_errc::invalid_option`
/// where libpq fails to parse (a keyword without `=`, an unterminated quoted
/// value, a bad `%XX`, an unclosed `[`, a query parameter without `=`), and
/// also on URIs that libpq would read against their evident intent, moving
/// a password into a field that is shown: an `@` in a host or the database
/// name, a `?` before the `@` of the user part, a port that is not a number.
/// Keywords are not checked against libpq's list: libpq reports an unknown
/// one by name. The error never quotes `text`.
[[nodiscard]] caf::expected<pg_conninfo> parse_conninfo(std::string_view text);

/// Pairs a comma-separated host list with a port list, as libpq does: one
/// port for every host, or one port per host. With another number of ports,
/// every host gets the first (libpq refuses to connect then).
[[nodiscard]] std::vector<pg_host> pair_hosts(std::string_view hosts,
                                              std::string_view ports);

/// `text` fit for logs, in the form it was given: the value of every
/// setting that may hold a secret (`password`, `sslpassword`, `options`,
/// any keyword not known to be harmless, a `dbname` that is itself a
/// connection string) becomes `***`; hosts, ports, user, database and
/// harmless options stay as typed. A string that does not parse becomes
/// `unparsable_conninfo`.
[[nodiscard]] std::string redact_conninfo(std::string_view text);

} // namespace hsm::store
