#include "store/pg_conninfo.hpp"

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

namespace hsm::store {
namespace {

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

/// The value of `keyword` in `text` (which must parse), or "<unset>".
std::string value(std::string_view text, std::string_view keyword) {
  auto info = parse_conninfo(text);
  if (!info)
    return "<error: " + describe(info.error()) + ">";
  const auto* x = info->find(keyword);
  return x != nullptr ? *x : std::string{"<unset>"};
}

// -- keyword form -------------------------------------------------------------

TEST(PgConninfoTest, ParsesTheKeywordForm) {
  auto info = parse_conninfo("host=db1 port=5433 dbname=keys user=app");
  ASSERT_TRUE(info) << describe(info.error());
  EXPECT_FALSE(info->uri);
  ASSERT_EQ(info->options.size(), 4u);
  EXPECT_EQ(info->options[0].keyword, "host");
  EXPECT_EQ(info->options[0].value, "db1");
  EXPECT_EQ(*info->find("port"), "5433");
  EXPECT_EQ(*info->find("dbname"), "keys");
  EXPECT_EQ(*info->find("user"), "app");
  EXPECT_EQ(info->find("password"), nullptr);
}

TEST(PgConninfoTest, AllowsSpacesAroundTheEqualsSign) {
  auto text = "  host = db1\tport= 5433 dbname =keys\n";
  EXPECT_EQ(value(text, "host"), "db1");
  EXPECT_EQ(value(text, "port"), "5433");
  EXPECT_EQ(value(text, "dbname"), "keys");
  // libpq skips blanks after '=', even up to the next keyword.
  EXPECT_EQ(value("user= host=db", "user"), "host=db");
}

TEST(PgConninfoTest, UnquotesAndUnescapesValues) {
  auto text = R"(application_name='two words' user='it\'s' dir='a\\b' )"
              R"(empty='' plain=a\ b end=x\)";
  EXPECT_EQ(value(text, "application_name"), "two words");
  EXPECT_EQ(value(text, "user"), "it's");
  EXPECT_EQ(value(text, "dir"), R"(a\b)");
  EXPECT_EQ(value(text, "empty"), "");
  EXPECT_EQ(value(text, "plain"), "a b");
  EXPECT_EQ(value(text, "end"), "x"); // a backslash at the end is dropped
  // No blank needed after a closing quote.
  EXPECT_EQ(value("host='a'port=1", "port"), "1");
}

TEST(PgConninfoTest, LastSettingWins) {
  EXPECT_EQ(value("host=a host=b", "host"), "b");
  EXPECT_EQ(value("", "host"), "<unset>");
}

TEST(PgConninfoTest, RefusesMalformedKeywordFormWithoutQuotingIt) {
  for (auto text : {"host", "host=db s3cret", "host db", "=s3cret",
                    "host=db password='s3cret", "password='s3cret\\'"}) {
    auto info = parse_conninfo(text);
    ASSERT_FALSE(info) << text;
    EXPECT_EQ(info.error(), config_errc::invalid_option) << text;
    EXPECT_FALSE(contains(describe(info.error()), "s3cret")) << text;
  }
}

// -- URI form -----------------------------------------------------------------

TEST(PgConninfoTest, ParsesAUri) {
  auto text = "postgresql://app:s%40cret@db1:5432/keys"
              "?sslmode=require&application_name=hsm%20driver";
  auto info = parse_conninfo(text);
  ASSERT_TRUE(info) << describe(info.error());
  EXPECT_TRUE(info->uri);
  EXPECT_EQ(*info->find("user"), "app");
  EXPECT_EQ(*info->find("password"), "s@cret");
  EXPECT_EQ(*info->find("host"), "db1");
  EXPECT_EQ(*info->find("port"), "5432");
  EXPECT_EQ(*info->find("dbname"), "keys");
  EXPECT_EQ(*info->find("sslmode"), "require");
  EXPECT_EQ(*info->find("application_name"), "hsm driver");
}

TEST(PgConninfoTest, AcceptsBothPrefixesAndEmptyParts) {
  EXPECT_TRUE(is_conninfo_uri("postgresql://db"));
  EXPECT_TRUE(is_conninfo_uri("postgres://db"));
  EXPECT_FALSE(is_conninfo_uri("host=db"));
  EXPECT_FALSE(is_conninfo_uri("POSTGRESQL://db"));
  EXPECT_EQ(value("postgres://db/keys", "dbname"), "keys");
  EXPECT_EQ(value("postgresql://", "host"), "<unset>");
  EXPECT_EQ(value("postgresql://db/", "dbname"), "<unset>");
  EXPECT_EQ(value("postgresql://db?", "host"), "db");
  EXPECT_EQ(value("postgresql://app@db", "user"), "app");
  EXPECT_EQ(value("postgresql://app@db", "password"), "<unset>");
  EXPECT_EQ(value("postgresql://app:@db", "password"), "<unset>");
  EXPECT_EQ(value("postgresql://:5433/keys", "port"), "5433");
  EXPECT_EQ(value("postgresql://:5433/keys", "host"), "<unset>");
}

TEST(PgConninfoTest, ReadsHostListsAsLibpqStoresThem) {
  auto text = "postgresql://app@h1:5432,h2:5433,h3/keys";
  EXPECT_EQ(value(text, "host"), "h1,h2,h3");
  EXPECT_EQ(value(text, "port"), "5432,5433,");
  // No port at all: libpq stores one empty port per host.
  EXPECT_EQ(value("postgresql://h1,h2/keys", "port"), ",");
  EXPECT_EQ(value("postgresql://h1/keys", "port"), "<unset>");
  // The keyword form takes the lists as they are.
  EXPECT_EQ(value("host=h1,h2 port=5432,5433", "host"), "h1,h2");
}

TEST(PgConninfoTest, ReadsIpv6AddressesInBrackets) {
  auto text = "postgresql://[::1]:5433,[fe80::1%25eth0],db3:5435/keys";
  EXPECT_EQ(value(text, "host"), "::1,fe80::1%eth0,db3");
  EXPECT_EQ(value(text, "port"), "5433,,5435");
  EXPECT_EQ(value(text, "dbname"), "keys");
  EXPECT_EQ(value("postgresql://[2001:db8::7]?connect_timeout=3", "host"),
            "2001:db8::7");
}

TEST(PgConninfoTest, PercentDecodesEveryPart) {
  EXPECT_EQ(value("postgresql://%2Frun%2Fpostgresql/keys", "host"),
            "/run/postgresql");
  EXPECT_EQ(value("postgresql://a%3Ab@db", "user"), "a:b");
  EXPECT_EQ(value("postgresql://db/my%20keys", "dbname"), "my keys");
  EXPECT_EQ(value("postgresql://db/my%40keys", "dbname"), "my@keys");
  EXPECT_EQ(value("postgresql://db?pass%77ord=x%26y%3Dz", "password"), "x&y=z");
  EXPECT_EQ(value("postgresql:///keys?host=%2Frun%2Fpg", "host"), "/run/pg");
}

TEST(PgConninfoTest, TakesSslTrueAsSslmodeRequire) {
  EXPECT_EQ(value("postgresql://db?ssl=true", "sslmode"), "require");
}

TEST(PgConninfoTest, RefusesMalformedUrisWithoutQuotingThem) {
  for (auto text : {
         "postgresql://app:s3cret@db/k%zz",   // bad escape
         "postgresql://app:s3cret@db/k%2",    // short escape
         "postgresql://app:s3cret@db/k%00",   // NUL
         "postgresql://app:s3cret@[::1/keys", // unclosed bracket
         "postgresql://app:s3cret@[]/keys",   // empty address
         "postgresql://app:s3cret@[::1]x/keys",
         "postgresql://app:s3cret@db?sslmode",
         "postgresql://app:s3cret@db?sslmode=a=b",
         "postgresql://app:s3cret@db?&sslmode=require",
         "postgresql://app:s3cret@db?=x",
         // An unencoded '@' in the password: libpq reads host "cret@db".
         "postgresql://app:s3@cret@db/keys",
         // An '@' in the query before any '/': libpq reads it as a user.
         "postgresql://db?password=s3c@ret",
         // An unencoded '/' in the password: libpq reads port and dbname.
         "postgresql://app:s3/cret@db/keys",
         "postgresql://app:1234/5678@db/keys",
       }) {
    auto info = parse_conninfo(text);
    ASSERT_FALSE(info) << text;
    EXPECT_EQ(info.error(), config_errc::invalid_option) << text;
    auto msg = describe(info.error());
    for (auto secret : {"s3", "cret", "1234", "5678"})
      EXPECT_FALSE(contains(msg, secret)) << text << " -> " << msg;
  }
}

TEST(PgConninfoTest, RecordsWhereEachValueStands) {
  std::string_view text = "host=db password = 'a b' port=5432";
  auto info = parse_conninfo(text);
  ASSERT_TRUE(info) << describe(info.error());
  const auto& pw = info->options[1];
  EXPECT_EQ(text.substr(pw.value_begin, pw.value_end - pw.value_begin),
            "'a b'");
  std::string_view uri = "postgresql://app:p%20w@db/keys?password=x";
  info = parse_conninfo(uri);
  ASSERT_TRUE(info) << describe(info.error());
  std::vector<std::string_view> spans;
  for (const auto& opt : info->options)
    if (opt.keyword == "password")
      spans.push_back(
        uri.substr(opt.value_begin, opt.value_end - opt.value_begin));
  EXPECT_EQ(spans, (std::vector<std::string_view>{"p%20w", "x"}));
}

// -- pair_hosts ---------------------------------------------------------------

TEST(PgConninfoTest, PairsHostsWithPorts) {
  auto pairs = [](std::string_view hosts, std::string_view ports) {
    std::vector<std::string> out;
    for (const auto& [host, port] : pair_hosts(hosts, ports))
      out.push_back(host + "|" + port);
    return out;
  };
  using strings = std::vector<std::string>;
  EXPECT_EQ(pairs("a,b,c", "1,2,3"), (strings{"a|1", "b|2", "c|3"}));
  EXPECT_EQ(pairs("a,b", "5432"), (strings{"a|5432", "b|5432"}));
  EXPECT_EQ(pairs("a,b", ","), (strings{"a|", "b|"}));
  EXPECT_EQ(pairs("a,b", ""), (strings{"a|", "b|"}));
  EXPECT_EQ(pairs("a", ""), (strings{"a|"}));
  EXPECT_EQ(pairs("", ""), (strings{"|"}));
}

// -- redaction ----------------------------------------------------------------

TEST(PgConninfoTest, RedactsPasswordsKeepingTheForm) {
  struct example {
    const char* text;
    const char* redacted;
  };
  constexpr example examples[] = {
    {"postgresql://app:s3cret@db1:5432,db2/keys"
     "?target_session_attrs=read-write",
     "postgresql://app:***@db1:5432,db2/keys"
     "?target_session_attrs=read-write"},
    {"postgres://app:s%33cret@[::1]:5433/keys",
     "postgres://app:***@[::1]:5433/keys"},
    {"postgresql://db/keys?user=a&password=s3cret&sslmode=require",
     "postgresql://db/keys?user=a&password=***&sslmode=require"},
    {"postgresql://app:s3cret@db/keys?password=s3cret",
     "postgresql://app:***@db/keys?password=***"},
    {"host=db user=app password=s3cret dbname=keys",
     "host=db user=app password=*** dbname=keys"},
    {"host=db password = s3cret dbname=keys",
     "host=db password = *** dbname=keys"},
    {"host=db password='two s3cret words' dbname=keys",
     "host=db password=*** dbname=keys"},
    {R"(password='it\'s s3cret\\' host=db)", "password=*** host=db"},
    {"postgresql://app@db/keys", "postgresql://app@db/keys"},
    {"postgresql://db:5432/keys", "postgresql://db:5432/keys"},
    {"host=db passfile=/etc/hsm/pgpass", "host=db passfile=/etc/hsm/pgpass"},
    {"", ""},
  };
  for (const auto& x : examples)
    EXPECT_EQ(redact_conninfo(x.text), x.redacted) << x.text;
}

TEST(PgConninfoTest, RedactionNeverShowsASecret) {
  struct example {
    const char* text;
    /// Parts that must be shown.
    std::vector<const char*> shown;
  };
  const example examples[] = {
    // Every password form.
    {"postgresql://app:s3cret@db1:5432,db2:5433/keys", {"db1", "db2", "keys"}},
    {"postgresql://app:s%33cr%65t@db/keys", {"app", "db", "keys"}},
    {"postgresql://db/keys?password=s3cret", {"db", "keys"}},
    {"postgresql://db/keys?pass%77ord=s3cret", {"db", "keys"}},
    {"postgresql://db/keys?password=s3c%40ret", {"db", "keys"}},
    {"postgresql://db/keys?password=s3c@ret", {"db", "keys"}},
    {"postgresql://db/keys?password=a=s3cret", {}},
    {"postgresql://[::1]:5432/keys?sslpassword=s3cret", {"::1", "keys"}},
    {"host=db dbname=keys password=s3cret", {"host=db", "dbname=keys"}},
    {"host=db dbname=keys password =s3cret", {"host=db", "dbname=keys"}},
    {"host=db dbname=keys password= s3cret", {"host=db", "dbname=keys"}},
    {"host=db dbname=keys password\t=\t's3cret'", {"host=db", "dbname=keys"}},
    {"host=db dbname=keys password='two s3cret'", {"host=db", "dbname=keys"}},
    {R"(host=db dbname=keys password='x\'s3cret')", {"host=db"}},
    {R"(host=db dbname=keys password=x\ s3cret)", {"host=db"}},
    {"host=db dbname=keys sslpassword=s3cret", {"host=db", "dbname=keys"}},
    // Settings that may hide one.
    {"host=db options='-c x.key=s3cret'", {"host=db"}},
    {"host=db pasword=s3cret", {"host=db"}},
    {"host=db scram_client_key=s3cret", {"host=db"}},
    {"host=db dbname='user=app password=s3cret'", {"host=db"}},
    {"host=db dbname=postgresql://app:s3cret@db2/keys", {"host=db"}},
    // Strings that do not parse.
    {"host=db password='s3cret", {}},
    {"host=db password s3cret", {}},
    {"host=db s3cret", {}},
    {"postgresql://app:s3@cret@db/keys", {}},
    {"postgresql://db?password=s3c@ret", {}},
    {"postgresql://app:s3/cret@db/keys", {}},
    {"postgresql://app:s3cret@db/k%zz", {}},
  };
  for (const auto& x : examples) {
    auto out = redact_conninfo(x.text);
    for (auto secret : {"s3cret", "s3c", "cret", "%33cr"})
      EXPECT_FALSE(contains(out, secret)) << x.text << " -> " << out;
    for (const auto* part : x.shown)
      EXPECT_TRUE(contains(out, part)) << x.text << " -> " << out;
  }
  // The digits of a password cut at an unencoded '/' would pass for a port.
  auto out = redact_conninfo("postgresql://app:1234/5678@db/keys");
  EXPECT_EQ(out, unparsable_conninfo);
}

TEST(PgConninfoTest, UnparsableStringsBecomeAPlaceholder) {
  EXPECT_EQ(redact_conninfo("host=db password='s3cret"), unparsable_conninfo);
  EXPECT_EQ(redact_conninfo("postgresql://db?sslmode"), unparsable_conninfo);
}

} // namespace
} // namespace hsm::store
