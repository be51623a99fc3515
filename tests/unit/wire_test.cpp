#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/net/wire_codec.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace hsm {
namespace {

using json = nlohmann::json;

std::string poll_body(json requests) {
  return json{{"requests", std::move(requests)}}.dump();
}

TEST(WireTest, MalformedPollBodiesAreErrors) {
  for (auto body : {"", "{", "[]", "{\"requests\":5}", "{\"other\":[]}", "null",
                    "{\"requests\":[1,2"}) {
    auto parsed = keys::read_poll(body);
    ASSERT_FALSE(parsed) << body;
    EXPECT_EQ(parsed.error(), net_errc::bad_response) << body;
  }
  auto empty = keys::read_poll("{\"requests\":[]}");
  ASSERT_TRUE(empty);
  EXPECT_TRUE(empty->jobs.empty());
}

TEST(WireTest, ValidRequestsBecomeJobs) {
  auto parsed = keys::read_poll(
    poll_body({{{"id", "r1"},
                {"lease", "l1"},
                {"kind", "generate_key"},
                {"params", {{"key_id", "k1"}, {"scheme", "p256"}}}},
               {{"id", "r2"},
                {"lease", "l2"},
                {"kind", "sign"},
                {"params", {{"key_id", "k1"}, {"payload", "0x00ff"}}}}}));
  ASSERT_TRUE(parsed) << describe(parsed.error());
  ASSERT_EQ(parsed->jobs.size(), 2u);
  EXPECT_TRUE(parsed->rejected.empty());
  EXPECT_EQ(parsed->jobs[0].kind, job_kind::generate_key);
  EXPECT_EQ(parsed->jobs[0].scheme, scheme::p256);
  EXPECT_EQ(parsed->jobs[0].lease, "l1");
  EXPECT_EQ(parsed->jobs[1].kind, job_kind::sign);
  EXPECT_EQ(parsed->jobs[1].payload, (std::vector<uint8_t>{0x00, 0xff}));
}

TEST(WireTest, EachBadRequestIsAnsweredOnItsOwn) {
  struct row {
    json request;
    const char* code;
  };
  auto req = [](json kind, json params) {
    return json{{"id", "x"},
                {"lease", "l"},
                {"kind", kind},
                {"params", params}};
  };
  const row rows[] = {
    {req("explode", {{"key_id", "k"}}), "invalid_request"},
    {req(7, {{"key_id", "k"}}), "invalid_request"},
    {req("sign", "params as a string"), "invalid_request"},
    {req("sign", {{"payload", "00"}}), "invalid_request"},
    {req("sign", {{"key_id", "k"}, {"payload", "zz"}}), "invalid_request"},
    {req("sign", {{"key_id", "k"}, {"payload", 12}}), "invalid_request"},
    {req("sign", {{"key_id", "k"}, {"payload", std::string(200000, 'a')}}),
     "invalid_payload"},
    {req("generate_key", {{"key_id", "k"}, {"scheme", "schnorr"}}),
     "scheme_unsupported"},
    {req("generate_key", {{"key_id", "k"}}), "invalid_request"},
    {req("generate_key", {{"key_id", "a b"}, {"scheme", "p256"}}),
     "invalid_request"},
  };
  for (auto& r : rows) {
    auto parsed = keys::read_poll(poll_body({r.request}));
    ASSERT_TRUE(parsed);
    EXPECT_TRUE(parsed->jobs.empty()) << r.request.dump().substr(0, 80);
    ASSERT_EQ(parsed->rejected.size(), 1u);
    auto& res = parsed->rejected.front();
    ASSERT_FALSE(res.ok());
    auto& err = std::get<error_result>(res.outcome);
    EXPECT_EQ(err.code, r.code) << r.request.dump().substr(0, 80);
    EXPECT_EQ(res.id, "x");
    EXPECT_EQ(res.lease, "l");
    EXPECT_FALSE(err.retryable);
  }
}

TEST(WireTest, RequestsWithoutIdOrLeaseAreLeftForRedelivery) {
  auto parsed = keys::read_poll(poll_body({{{"lease", "l"}, {"kind", "sign"}},
                                           {{"id", "x"}, {"kind", "sign"}},
                                           {{"id", ""}, {"lease", "l"}},
                                           "not an object"}));
  ASSERT_TRUE(parsed);
  EXPECT_TRUE(parsed->jobs.empty());
  EXPECT_TRUE(parsed->rejected.empty());
  EXPECT_EQ(parsed->unanswerable, 4u);
}

TEST(WireTest, UnknownKindIsQuotedAndCutShortInTheMessage) {
  auto parsed = keys::read_poll(
    poll_body({{{"id", "x"},
                {"lease", "l"},
                {"kind", "evil\nline " + std::string(100, 'z')},
                {"params", {{"key_id", "k"}}}}}));
  ASSERT_TRUE(parsed);
  ASSERT_EQ(parsed->rejected.size(), 1u);
  auto& msg = std::get<error_result>(parsed->rejected.front().outcome).message;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
  EXPECT_EQ(msg.find(std::string(50, 'z')), std::string::npos);
}

TEST(WireTest, ResultsEncodeAsTheProtocolSays) {
  job j;
  j.id = "r1";
  j.lease = "l1";
  auto err = answer(j, caf::make_error(key_errc::unknown_key,
                                       std::string{"no such key"}));
  auto body = json::parse(net::encode_result(err, "d1"));
  EXPECT_EQ(body["id"], "r1");
  EXPECT_EQ(body["lease"], "l1");
  EXPECT_EQ(body["driver_id"], "d1");
  EXPECT_EQ(body["ok"], false);
  EXPECT_EQ(body["error"]["code"], "unknown_key");
  EXPECT_EQ(body["error"]["retryable"], false);
  auto busy = answer(j, caf::make_error(hsm_errc::retryable));
  EXPECT_EQ(json::parse(net::encode_result(busy, "d1"))["error"]["retryable"],
            true);
  key_result v;
  v.key_id = "k";
  v.scheme = scheme::ed25519;
  v.public_key = std::vector<uint8_t>(32, 0xAB);
  v.storage = "token-resident";
  auto ok = json::parse(net::encode_result(answer(j, v), "d1"));
  EXPECT_EQ(ok["ok"], true);
  std::string hex;
  for (int i = 0; i < 32; ++i)
    hex += "ab";
  EXPECT_EQ(ok["result"]["public_key"], hex);
  EXPECT_FALSE(ok["result"].contains("public_key_compressed"));
}

TEST(WireTest, LeaseTimeSetsTheJobsDeadline) {
  auto received = std::chrono::steady_clock::time_point{}
                  + std::chrono::hours{1};
  auto parsed = keys::read_poll(
    poll_body({{{"id", "r1"},
                {"lease", "l1"},
                {"lease_ms", 30000},
                {"kind", "generate_key"},
                {"params", {{"key_id", "k1"}, {"scheme", "p256"}}}},
               {{"id", "r2"},
                {"lease", "l2"},
                {"kind", "generate_key"},
                {"params", {{"key_id", "k2"}, {"scheme", "p256"}}}}}),
    received);
  ASSERT_TRUE(parsed);
  ASSERT_EQ(parsed->jobs.size(), 2u);
  EXPECT_EQ(parsed->jobs[0].lease_deadline,
            received + std::chrono::milliseconds{30000});
  // No lease time: no deadline.
  EXPECT_EQ(parsed->jobs[1].lease_deadline,
            std::chrono::steady_clock::time_point{});
}

TEST(WireTest, BatchOfResultsEncodesAndItsStatusesDecode) {
  job a;
  a.id = "a";
  a.lease = "la";
  job b;
  b.id = "b";
  b.lease = "lb";
  std::vector<job_result> sent{answer(a, caf::make_error(key_errc::unknown_key,
                                                         std::string{"x"})),
                               answer(b, caf::make_error(hsm_errc::retryable))};
  auto body = json::parse(net::encode_results(sent, "d1"));
  EXPECT_EQ(body["driver_id"], "d1");
  ASSERT_EQ(body["results"].size(), 2u);
  EXPECT_EQ(body["results"][0]["id"], "a");
  EXPECT_EQ(body["results"][1]["lease"], "lb");
  EXPECT_EQ(body["results"][1]["error"]["retryable"], true);
  // Statuses are matched by id, whatever their order; a missing one is a
  // refusal.
  auto st = net::decode_result_statuses(
    R"({"results":[{"id":"b","status":"lease_not_current"},)"
    R"({"id":"a","status":"accepted"}]})",
    sent);
  ASSERT_TRUE(st);
  EXPECT_EQ((*st)[0], net::result_status::accepted);
  EXPECT_EQ((*st)[1], net::result_status::lease_not_current);
  auto partial = net::decode_result_statuses(
    R"({"results":[{"id":"a","status":"accepted"}]})", sent);
  ASSERT_TRUE(partial);
  EXPECT_EQ((*partial)[1], net::result_status::refused);
  EXPECT_FALSE(net::decode_result_statuses("[]", sent));
}

/// RFC 8032, section 7.1, TEST 1: the public key, and its signature of the
/// empty message. The key's fingerprint was computed with `openssl dgst
/// -sha256` (see crypto_test).
constexpr std::string_view rfc8032_public_key
  = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
constexpr std::string_view rfc8032_signature
  = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb882"
    "1590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";
constexpr std::string_view rfc8032_fingerprint
  = "sha256:21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9";

TEST(WireTest, KeyAndSignResultsCarryThePublicKeyFingerprint) {
  job j;
  j.id = "r1";
  j.lease = "l1";
  key_record rec;
  rec.key_id = "fp";
  rec.scheme = scheme::ed25519;
  rec.public_key = *crypto::from_hex(rfc8032_public_key);
  rec.wrap_mechanism = std::string{resident_mechanism};
  // The key result, as the key path makes it from a stored row.
  auto key = keys::make_key_result(rec, true);
  ASSERT_TRUE(key) << describe(key.error());
  auto k = json::parse(net::encode_result(answer(j, *key), "d1"));
  ASSERT_TRUE(k["result"].contains("public_key_fingerprint")) << k.dump();
  EXPECT_EQ(k["result"]["public_key_fingerprint"], rfc8032_fingerprint);
  // The sign result, as the key path makes it: verified against the stored
  // public key, which it names.
  auto sig = crypto::finish_signature(scheme::ed25519, rec.public_key, {},
                                      *crypto::from_hex(rfc8032_signature));
  ASSERT_TRUE(sig) << describe(sig.error());
  signature_result signed_result{rec.key_id, rec.scheme, *sig};
  auto s = json::parse(net::encode_result(answer(j, signed_result), "d1"));
  ASSERT_TRUE(s["result"].contains("public_key_fingerprint")) << s.dump();
  EXPECT_EQ(s["result"]["public_key_fingerprint"], rfc8032_fingerprint);
  EXPECT_EQ(s["result"]["signature"], rfc8032_signature);
  // The same in a batch; another key has another fingerprint.
  auto other = signed_result;
  other.sig.public_key_fingerprint = "sha256:00";
  auto batch = json::parse(
    net::encode_results({answer(j, signed_result), answer(j, other)}, "d1"));
  EXPECT_EQ(batch["results"][0]["result"]["public_key_fingerprint"],
            rfc8032_fingerprint);
  EXPECT_EQ(batch["results"][1]["result"]["public_key_fingerprint"],
            "sha256:00");
}

} // namespace
} // namespace hsm
