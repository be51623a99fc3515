#include "store/pg_conninfo.hpp"

#include "runtime/crypto/hex.hpp"

#include <algorithm>
#include <utility>

namespace hsm::store {

namespace {

/// The prefixes of the URI form (libpq's `uri_designator` and
/// `short_uri_designator`; case matters).
constexpr std::string_view uri_prefixes[] = {"postgresql://", "postgres://"};

/// Keywords whose values are shown by `redact_conninfo`: libpq's settings
/// that name places, users, files and behaviour, never a secret. Anything
/// else (`password`, `sslpassword`, `options`, keywords added to libpq
/// later, typos such as `pasword`) is hidden.
constexpr std::string_view harmless_keywords[] = {
  "host",
  "hostaddr",
  "port",
  "dbname",
  "user",
  "passfile",
  "service",
  "connect_timeout",
  "client_encoding",
  "application_name",
  "fallback_application_name",
  "keepalives",
  "keepalives_idle",
  "keepalives_interval",
  "keepalives_count",
  "tcp_user_timeout",
  "channel_binding",
  "require_auth",
  "sslmode",
  "sslnegotiation",
  "sslcompression",
  "sslcert",
  "sslkey",
  "sslcertmode",
  "sslrootcert",
  "sslcrl",
  "sslcrldir",
  "sslsni",
  "requirepeer",
  "ssl_min_protocol_version",
  "ssl_max_protocol_version",
  "min_protocol_version",
  "max_protocol_version",
  "gssencmode",
  "krbsrvname",
  "gsslib",
  "gssdelegation",
  "replication",
  "target_session_attrs",
  "load_balance_hosts",
};

/// A parse error. `what` never quotes the text: it may hold a password.
caf::error parse_error(std::string_view what, size_t offset) {
  return caf::make_error(config_errc::invalid_option,
                         "PostgreSQL connection string: " + std::string{what}
                           + " (at offset " + std::to_string(offset) + ")");
}

/// `isspace` in the C locale, as libpq reads the keyword form.
bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f'
         || c == '\r';
}

/// True if `c` is one of `chars`.
bool is_any_of(char c, std::string_view chars) {
  return chars.find(c) != std::string_view::npos;
}

/// Decodes the %XX escapes of a URI part that starts at `offset` in the
/// text; like libpq, a malformed escape or %00 is an error.
caf::expected<std::string> percent_decode(std::string_view x, size_t offset) {
  std::string out;
  out.reserve(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] != '%') {
      out.push_back(x[i]);
      continue;
    }
    auto hi = i + 1 < x.size() ? crypto::hex_digit_value(x[i + 1]) : -1;
    auto lo = i + 2 < x.size() ? crypto::hex_digit_value(x[i + 2]) : -1;
    if (hi < 0 || lo < 0)
      return parse_error("invalid percent-encoded character", offset + i);
    auto c = hi * 16 + lo;
    if (c == 0)
      return parse_error("forbidden %00", offset + i);
    out.push_back(static_cast<char>(c));
    i += 2;
  }
  return out;
}

/// Splits `x` at every `sep`.
std::vector<std::string> split(std::string_view x, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    auto pos = x.find(sep, start);
    out.emplace_back(x.substr(start, pos - start));
    if (pos == std::string_view::npos)
      return out;
    start = pos + 1;
  }
}

/// Parses the keyword form: `key=value key = 'quoted \' value' ...`, as
/// libpq's `conninfo_parse` does.
caf::expected<pg_conninfo> parse_keywords(std::string_view s) {
  pg_conninfo out;
  size_t i = 0;
  auto skip_space = [&] {
    while (i < s.size() && is_space(s[i]))
      ++i;
  };
  for (;;) {
    skip_space();
    if (i >= s.size())
      return out;
    auto key_begin = i;
    while (i < s.size() && s[i] != '=' && !is_space(s[i]))
      ++i;
    auto key_end = i;
    skip_space();
    if (i >= s.size() || s[i] != '=')
      return parse_error("missing '=' after a keyword", key_begin);
    if (key_end == key_begin)
      return parse_error("empty keyword", key_begin);
    ++i;
    skip_space();
    conninfo_option opt;
    opt.keyword = std::string{s.substr(key_begin, key_end - key_begin)};
    opt.value_begin = i;
    if (i < s.size() && s[i] == '\'') {
      ++i;
      for (;;) {
        if (i >= s.size())
          return parse_error("unterminated quoted value", opt.value_begin);
        if (s[i] == '\\') {
          ++i;
          if (i < s.size())
            opt.value.push_back(s[i++]);
          continue;
        }
        if (s[i] == '\'') {
          ++i;
          break;
        }
        opt.value.push_back(s[i++]);
      }
    } else {
      // A backslash escapes the next character; one at the very end is
      // dropped.
      while (i < s.size() && !is_space(s[i])) {
        if (s[i] == '\\') {
          ++i;
          if (i < s.size())
            opt.value.push_back(s[i++]);
        } else {
          opt.value.push_back(s[i++]);
        }
      }
    }
    opt.value_end = i;
    out.options.push_back(std::move(opt));
  }
}

/// Parses the URI form,
/// `postgresql://[user[:password]@][host][:port][,...][/dbname][?k=v&...]`,
/// as libpq's `conninfo_uri_parse_options` does; `p` is the prefix length.
caf::expected<pg_conninfo> parse_uri(std::string_view s, size_t p) {
  pg_conninfo out;
  out.uri = true;
  const auto n = s.size();
  auto at = [&](size_t i) { return i < n ? s[i] : '\0'; };
  // Adds the setting whose percent-encoded value is s[begin, end).
  auto add = [&](std::string keyword, size_t begin, size_t end) -> caf::error {
    auto value = percent_decode(s.substr(begin, end - begin), begin);
    if (!value)
      return std::move(value.error());
    out.options.push_back(
      conninfo_option{std::move(keyword), std::move(*value), begin, end});
    return {};
  };
  // -- user and password: libpq takes the first '@' before any '/' ---------
  if (auto sep = s.find_first_of("@/", p);
      sep != std::string_view::npos && s[sep] == '@') {
    // libpq would take `postgresql://host?password=x@y` as user
    // "host?password=x" at host "y"; never what was meant.
    if (auto q = s.find('?', p); q < sep)
      return parse_error("'?' before the '@' that ends the user part "
                         "(percent-encode it as %3F)",
                         q);
    auto user_end = s.find_first_of(":@", p);
    if (user_end > p)
      if (auto err = add("user", p, user_end))
        return err;
    if (s[user_end] == ':' && sep > user_end + 1)
      if (auto err = add("password", user_end + 1, sep))
        return err;
    p = sep + 1;
  }
  // -- hosts and ports ------------------------------------------------------
  auto hosts_begin = p;
  std::string hosts;
  std::string ports;
  char term = '\0';
  for (;;) {
    size_t host_begin = p;
    size_t host_end = p;
    if (at(p) == '[') {
      // An IPv6 address: [::1]:5432.
      host_begin = p + 1;
      auto close = s.find(']', host_begin);
      if (close == std::string_view::npos)
        return parse_error("missing ']' after an IPv6 address", p);
      if (close == host_begin)
        return parse_error("empty IPv6 address", p);
      host_end = close;
      p = close + 1;
      if (at(p) != '\0' && !is_any_of(at(p), ":/?,"))
        return parse_error("unexpected character after ']' (expected ':', "
                           "'/', '?' or ',')",
                           p);
    } else {
      while (at(p) != '\0' && !is_any_of(at(p), ":/?,"))
        ++p;
      host_end = p;
    }
    auto host = s.substr(host_begin, host_end - host_begin);
    // A second '@': an unencoded '@' in the password, which libpq would
    // take as part of the host name.
    if (auto x = host.find('@'); x != std::string_view::npos)
      return parse_error("'@' in a host name (percent-encode an '@' of the "
                         "user name or password as %40)",
                         host_begin + x);
    hosts += host;
    term = at(p);
    if (term == ':') {
      auto port_begin = ++p;
      while (at(p) != '\0' && !is_any_of(at(p), "/?,"))
        ++p;
      auto port = s.substr(port_begin, p - port_begin);
      // libpq refuses such a port only when it gets to that host; it is
      // most likely the piece of a password before an unencoded '/'.
      if (!std::all_of(port.begin(), port.end(),
                       [](char c) { return c >= '0' && c <= '9'; }))
        return parse_error("port is not a number", port_begin);
      ports += port;
      term = at(p);
    }
    if (term != ',')
      break;
    ++p;
    hosts += ',';
    ports += ',';
  }
  if (!hosts.empty()) {
    auto value = percent_decode(hosts, hosts_begin);
    if (!value)
      return std::move(value.error());
    out.options.push_back(
      conninfo_option{"host", std::move(*value), hosts_begin, p});
  }
  if (!ports.empty()) {
    auto value = percent_decode(ports, hosts_begin);
    if (!value)
      return std::move(value.error());
    out.options.push_back(
      conninfo_option{"port", std::move(*value), hosts_begin, p});
  }
  // -- database -------------------------------------------------------------
  if (term == '/') {
    auto db_begin = ++p;
    while (at(p) != '\0' && at(p) != '?')
      ++p;
    auto db = s.substr(db_begin, p - db_begin);
    if (auto x = db.find('@'); x != std::string_view::npos)
      return parse_error("'@' in the database name (percent-encode it as "
                         "%40)",
                         db_begin + x);
    if (!db.empty())
      if (auto err = add("dbname", db_begin, p))
        return err;
    term = at(p);
  }
  // -- query parameters -----------------------------------------------------
  if (term == '?') {
    ++p;
    while (p < n) {
      auto key_begin = p;
      auto eq = std::string_view::npos;
      for (; p < n && s[p] != '&'; ++p) {
        if (s[p] != '=')
          continue;
        if (eq != std::string_view::npos)
          return parse_error("second '=' in a query parameter", p);
        eq = p;
      }
      auto end = p;
      if (p < n)
        ++p; // past '&'
      if (eq == std::string_view::npos)
        return parse_error("query parameter without '='", key_begin);
      auto keyword = percent_decode(s.substr(key_begin, eq - key_begin),
                                    key_begin);
      if (!keyword)
        return std::move(keyword.error());
      if (keyword->empty())
        return parse_error("empty keyword", key_begin);
      if (auto err = add(std::move(*keyword), eq + 1, end))
        return err;
      // libpq's JDBC compatibility: `ssl=true` means `sslmode=require`.
      auto& last = out.options.back();
      if (last.keyword == "ssl" && last.value == "true") {
        last.keyword = "sslmode";
        last.value = "require";
      }
    }
  }
  return out;
}

/// True if `opt` may be shown in logs.
bool is_harmless(const conninfo_option& opt) {
  if (std::find(std::begin(harmless_keywords), std::end(harmless_keywords),
                opt.keyword)
      == std::end(harmless_keywords))
    return false;
  // libpq expands such a `dbname` in some entry points (expand_dbname), so
  // it may carry a password of its own.
  if (opt.keyword == "dbname")
    return opt.value.find('=') == std::string::npos
           && !is_conninfo_uri(opt.value);
  return true;
}

} // namespace

// -- pg_conninfo --------------------------------------------------------------

const std::string* pg_conninfo::find(std::string_view keyword) const {
  for (auto i = options.rbegin(); i != options.rend(); ++i)
    if (i->keyword == keyword)
      return &i->value;
  return nullptr;
}

// -- free functions -----------------------------------------------------------

bool is_conninfo_uri(std::string_view text) {
  return std::any_of(std::begin(uri_prefixes), std::end(uri_prefixes),
                     [text](std::string_view x) {
                       return text.starts_with(x);
                     });
}

caf::expected<pg_conninfo> parse_conninfo(std::string_view text) {
  for (auto prefix : uri_prefixes)
    if (text.starts_with(prefix))
      return parse_uri(text, prefix.size());
  return parse_keywords(text);
}

std::vector<pg_host> pair_hosts(std::string_view hosts,
                                std::string_view ports) {
  auto host_list = split(hosts, ',');
  auto port_list = split(ports, ',');
  std::vector<pg_host> out;
  out.reserve(host_list.size());
  for (size_t i = 0; i < host_list.size(); ++i) {
    auto& port = port_list.size() == host_list.size() ? port_list[i]
                                                      : port_list.front();
    out.push_back(pg_host{std::move(host_list[i]), port});
  }
  return out;
}

std::string redact_conninfo(std::string_view text) {
  auto info = parse_conninfo(text);
  if (!info)
    return std::string{unparsable_conninfo};
  std::vector<std::pair<size_t, size_t>> hidden;
  for (const auto& opt : info->options)
    if (!is_harmless(opt))
      hidden.emplace_back(opt.value_begin, opt.value_end);
  std::sort(hidden.begin(), hidden.end());
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  for (auto [begin, end] : hidden) {
    if (begin < pos) {
      // Overlaps the previous span (not made by the parser; kept safe).
      if (end > pos)
        pos = end;
      continue;
    }
    out += text.substr(pos, begin - pos);
    out += "***";
    pos = end;
  }
  out += text.substr(pos);
  return out;
}

} // namespace hsm::store
