#include "runtime/crypto/hex.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using hsm::crypto::from_hex;
using hsm::crypto::to_hex;

/// The context string of an error, for checking what it names.
std::string context_of(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.size() != 1 || !ctx.match_element<std::string>(0))
    return {};
  return ctx.get_as<std::string>(0);
}

TEST(HexTest, EncodesLowerCase) {
  std::vector<uint8_t> bytes{0x00, 0x01, 0x7f, 0x80, 0xab, 0xcd, 0xef, 0xff};
  EXPECT_EQ(to_hex(bytes), "00017f80abcdefff");
}

TEST(HexTest, EmptyRoundTrips) {
  EXPECT_EQ(to_hex({}), "");
  auto parsed = from_hex("");
  ASSERT_TRUE(parsed);
  EXPECT_TRUE(parsed->empty());
  auto prefixed = from_hex("0x");
  ASSERT_TRUE(prefixed);
  EXPECT_TRUE(prefixed->empty());
}

TEST(HexTest, EveryByteRoundTrips) {
  std::vector<uint8_t> bytes;
  for (int i = 0; i < 256; ++i)
    bytes.push_back(static_cast<uint8_t>(i));
  auto text = to_hex(bytes);
  EXPECT_EQ(text.size(), 512u);
  auto parsed = from_hex(text);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(*parsed, bytes);
}

TEST(HexTest, AcceptsPrefixAndUpperCase) {
  std::vector<uint8_t> want{0xde, 0xad, 0xbe, 0xef};
  for (const char* text :
       {"deadbeef", "DEADBEEF", "0xdeadbeef", "0XDeAdBeEf"}) {
    auto parsed = from_hex(text);
    ASSERT_TRUE(parsed) << text;
    EXPECT_EQ(*parsed, want) << text;
  }
}

TEST(HexTest, RejectsOddLength) {
  for (const char* text : {"abc", "0xabc", "a"}) {
    auto parsed = from_hex(text);
    ASSERT_FALSE(parsed) << text;
    EXPECT_EQ(parsed.error(), hsm::key_errc::invalid_request);
    EXPECT_NE(context_of(parsed.error()).find("odd"), std::string::npos)
      << context_of(parsed.error());
  }
}

TEST(HexTest, RejectsBadCharacterNamingPosition) {
  struct bad_case {
    const char* text;
    size_t position;
  };
  for (auto [text, position] :
       {bad_case{"zz", 0}, bad_case{"0g", 1}, bad_case{"00112g", 5},
        bad_case{"0x12 4", 4}, bad_case{"0x0x", 3}, bad_case{"-1", 0}}) {
    auto parsed = from_hex(text);
    ASSERT_FALSE(parsed) << text;
    EXPECT_EQ(parsed.error(), hsm::key_errc::invalid_request);
    auto ctx = context_of(parsed.error());
    EXPECT_NE(ctx.find("position " + std::to_string(position)),
              std::string::npos)
      << text << ": " << ctx;
  }
}

TEST(HexTest, RandomHexHasTheLengthAskedAndDiffersEachCall) {
  EXPECT_EQ(hsm::crypto::random_hex(0), "");
  auto a = hsm::crypto::random_hex(16);
  auto b = hsm::crypto::random_hex(16);
  ASSERT_EQ(a.size(), 32u);
  EXPECT_NE(a, b);
  auto bytes = from_hex(a);
  ASSERT_TRUE(bytes);
  EXPECT_EQ(bytes->size(), 16u);
  EXPECT_EQ(hsm::crypto::to_hex(*bytes), a); // lower case, no prefix
}

} // namespace
