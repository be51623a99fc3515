#include "runtime/base/logging.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>

namespace hsm {
namespace {

using json = nlohmann::json;

json line(std::string_view msg) {
  auto text = json_log_line("2026-12-03T03:13:01.123Z", "info", "dispatch",
                            msg);
  auto j = json::parse(text, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << text;
  return j;
}

TEST(JsonLogTest, LeadingTagsBecomeFieldsOfTheirOwn) {
  auto j = line("[req=req-42 session=1] system: request_timeout; retrying");
  EXPECT_EQ(j["ts"], "2026-12-03T03:13:01.123Z");
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["logger"], "dispatch");
  EXPECT_EQ(j["req"], "req-42");
  EXPECT_EQ(j["session"], "1");
  EXPECT_EQ(j["msg"], "system: request_timeout; retrying");
  // Two groups in a row; a bracket that is not tags stays in the text.
  auto two = line("[session=0] [req=r7] up");
  EXPECT_EQ(two["session"], "0");
  EXPECT_EQ(two["req"], "r7");
  EXPECT_EQ(two["msg"], "up");
  auto plain = line("[not tags] text");
  EXPECT_FALSE(plain.contains("not"));
  EXPECT_EQ(plain["msg"], "[not tags] text");
  // A tag cannot overwrite the line's own fields.
  auto forged = line("[level=debug msg=x] real");
  EXPECT_EQ(forged["level"], "info");
  EXPECT_EQ(forged["msg"], "real");
}

TEST(JsonLogTest, EveryLineIsValidJsonWhateverTheMessageHolds) {
  std::string nasty = "quote \" backslash \\ newline \n tab \t esc \x1b[2J ";
  nasty += std::string{"\xff\xfe bad bytes, good UTF-8: \xc2\xb5s"};
  auto j = line(nasty);
  auto msg = j["msg"].get<std::string>();
  EXPECT_NE(msg.find("quote \" backslash \\ newline \n"), std::string::npos);
  EXPECT_NE(msg.find("\xef\xbf\xbd\xef\xbf\xbd bad bytes"), std::string::npos)
    << "invalid bytes become U+FFFD";
  EXPECT_NE(msg.find("\xc2\xb5s"), std::string::npos) << "UTF-8 kept";
  auto text = json_log_line("t", "info", "x", nasty);
  EXPECT_EQ(text.find('\n'), std::string::npos) << "one line per entry";
}

TEST(JsonLogTest, UnknownFormatIsRefusedNamingTheFlag) {
  auto err = set_log_format("yaml");
  ASSERT_TRUE(err);
  EXPECT_EQ(err, config_errc::invalid_option);
  EXPECT_NE(describe(err).find("--log-format"), std::string::npos);
  EXPECT_FALSE(set_log_format("text"));
}

} // namespace
} // namespace hsm
