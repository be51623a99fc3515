#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/net/wire_codec.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <limits>
#include <string>
#include <vector>

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

// -- a hostile proxy ----------------------------------------------------------

/// A valid generate_key request with id `id` and lease `lease`.
json gen_request(const std::string& id, const std::string& lease = "l") {
  return json{{"id", id},
              {"lease", lease},
              {"kind", "generate_key"},
              {"params", {{"key_id", "k-" + id}, {"scheme", "p256"}}}};
}

TEST(WireTest, RequestsBeyondMaxAreNotReadButCounted) {
  auto body = json::array();
  for (int i = 0; i < 7; ++i)
    body.push_back(gen_request("r" + std::to_string(i)));
  // One entry within `max` that is not an object, one beyond it.
  body.insert(body.begin() + 1, "not an object");
  body.push_back(42);
  auto parsed = keys::read_poll(poll_body(body), 4);
  ASSERT_TRUE(parsed) << describe(parsed.error());
  // Four requests are taken: r0..r3 (the string takes no place).
  ASSERT_EQ(parsed->jobs.size(), 4u);
  EXPECT_EQ(parsed->jobs[0].id, "r0");
  EXPECT_EQ(parsed->jobs[3].id, "r3");
  EXPECT_TRUE(parsed->rejected.empty());
  EXPECT_EQ(parsed->unanswerable, 1u);
  // r4..r6 and the number: left for redelivery, not answered.
  EXPECT_EQ(parsed->excess, 4u);
  EXPECT_EQ(parsed->duplicates, 0u);
  // An entry with an unusable id takes a place all the same (the proxy
  // may have leased it to this driver).
  auto bad_id = body;
  bad_id[0]["id"] = "bad id";
  auto cut = keys::read_poll(poll_body(bad_id), 4);
  ASSERT_TRUE(cut);
  EXPECT_EQ(cut->jobs.size(), 3u);
  EXPECT_EQ(cut->unanswerable, 2u);
  EXPECT_EQ(cut->excess, 4u);
  // With room for all of them, all are read.
  auto all = keys::read_poll(poll_body(body), net::max_poll_requests);
  ASSERT_TRUE(all);
  EXPECT_EQ(all->jobs.size(), 7u);
  EXPECT_EQ(all->unanswerable, 2u);
  EXPECT_EQ(all->excess, 0u);
}

TEST(WireTest, IdsAndLeasesOutsideLengthAndAlphabetAreUnanswerable) {
  struct row {
    std::string id;
    std::string lease;
    bool usable;
  };
  const std::string b64 = "QUJD+/=" + std::string(249, 'x');
  const row rows[] = {
    {std::string(net::max_request_id_length, 'a'), "l", true},
    {"req-1.a_b:c", b64, true},
    {"550e8400-e29b-41d4-a716-446655440000", "eyJhbGciOi.eyJzdWIi.SflKx_w-",
     true},
    {std::string(net::max_request_id_length + 1, 'a'), "l", false},
    {"r", std::string(net::max_lease_length + 1, 'a'), false},
    {"", "l", false},
    {"r", "", false},
    {"a b", "l", false},
    {"r/1", "l", false},
    {"evil\nINFO forged line", "l", false},
    {"\x1b[2Jr", "l", false},
    {"r\xc3\xa9", "l", false},
    {"r", "lease with space", false},
    {"r", "l\x1b]0;title\x07", false},
    {"r", "l\xff", false},
  };
  for (const auto& r : rows) {
    auto req = gen_request("placeholder");
    req["id"] = r.id;
    req["lease"] = r.lease;
    auto body = json{{"requests", json::array({req})}}.dump(
      -1, ' ', false, json::error_handler_t::replace);
    auto parsed = keys::read_poll(body, 1);
    ASSERT_TRUE(parsed) << net::printable(r.id) << " "
                        << net::printable(r.lease);
    EXPECT_EQ(net::valid_request_id(r.id) && net::valid_lease(r.lease),
              r.usable);
    if (r.usable) {
      ASSERT_EQ(parsed->jobs.size(), 1u) << r.id;
      EXPECT_EQ(parsed->jobs[0].id, r.id);
      EXPECT_EQ(parsed->jobs[0].lease, r.lease);
      EXPECT_EQ(parsed->unanswerable, 0u);
    } else {
      // Not answered (an answer would echo it), not served: counted only.
      EXPECT_TRUE(parsed->jobs.empty()) << net::printable(r.id);
      EXPECT_TRUE(parsed->rejected.empty()) << net::printable(r.id);
      EXPECT_EQ(parsed->unanswerable, 1u) << net::printable(r.id);
    }
  }
  // A bad request with a good id is answered under that id; the id of the
  // answer is the one that passed the checks.
  auto bad = gen_request("ok-id");
  bad["kind"] = "explode";
  auto parsed = keys::read_poll(poll_body({bad}), 1);
  ASSERT_TRUE(parsed);
  ASSERT_EQ(parsed->rejected.size(), 1u);
  EXPECT_EQ(parsed->rejected[0].id, "ok-id");
}

TEST(WireTest, SecondCopyOfAnIdInOneAnswerIsDroppedAndTakesNoPlace) {
  auto parsed = keys::read_poll(
    poll_body({gen_request("r1", "l1"), gen_request("r1", "l1"),
               gen_request("r2", "l2"), gen_request("r1", "other-lease"),
               gen_request("r3", "l3")}),
    2);
  ASSERT_TRUE(parsed);
  ASSERT_EQ(parsed->jobs.size(), 2u);
  EXPECT_EQ(parsed->jobs[0].id, "r1");
  EXPECT_EQ(parsed->jobs[0].lease, "l1");
  EXPECT_EQ(parsed->jobs[1].id, "r2");
  EXPECT_EQ(parsed->duplicates, 1u);
  // After the second place is taken, copies and new requests alike are
  // excess.
  EXPECT_EQ(parsed->excess, 2u);
}

TEST(WireTest, BodiesTooLargeOrTooDeepAreBadResponses) {
  // Just over the cap, otherwise valid.
  auto head = std::string{R"({"requests":[],"padding":")"};
  auto big = head + std::string(net::max_response_bytes - head.size() - 1, 'x')
             + "\"}";
  ASSERT_EQ(big.size(), net::max_response_bytes + 1);
  auto parsed = keys::read_poll(big, 1);
  ASSERT_FALSE(parsed);
  EXPECT_EQ(parsed.error(), net_errc::bad_response);
  EXPECT_NE(describe(parsed.error()).find("larger than"), std::string::npos);
  big.erase(head.size(), 1); // at the cap: read
  ASSERT_EQ(big.size(), net::max_response_bytes);
  EXPECT_TRUE(keys::read_poll(big, 1));
  // Nesting: a body of brackets filling the cap, and one level too deep.
  for (auto body :
       {std::string(net::max_response_bytes, '['),
        R"({"requests":[)" + std::string(net::max_json_depth - 1, '[')
          + std::string(net::max_json_depth - 1, ']') + "]}"}) {
    auto deep = keys::read_poll(body, 1);
    ASSERT_FALSE(deep) << body.substr(0, 40);
    EXPECT_EQ(deep.error(), net_errc::bad_response);
    EXPECT_NE(describe(deep.error()).find("nested deeper"), std::string::npos);
  }
  // Brackets inside strings do not count.
  auto quoted = gen_request("r1");
  quoted["note"] = std::string(1000, '[');
  EXPECT_EQ(keys::read_poll(poll_body({quoted}), 1)->jobs.size(), 1u);
  // The same checks guard the answer to a batch of results.
  std::vector<job_result> sent(1);
  sent[0].id = "r1";
  auto st = net::decode_result_statuses(std::string(100, '{'), sent);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error(), net_errc::bad_response);
}

TEST(WireTest, FieldsTheProtocolDoesNotNameAreSkipped) {
  // Unknown fields at every level, some of them large or deep, do not
  // disturb what is read; a field of the wrong shape is an error as before.
  auto req = gen_request("r1");
  req["trace"] = {{"span", json::array({1, 2, 3})}, {"deep", {{"x", {1}}}}};
  req["params"]["extra"] = json::array({json::object()});
  req["lease_ms"] = 5000;
  auto odd = gen_request("r2");
  odd["kind"] = json::array({"generate_key"});
  odd["params"]["scheme"] = {{"name", "p256"}};
  json body{{"requests", {req, odd}},
            {"meta", {{"cursor", std::string(10000, 'c')}}},
            {"zzz", json::array({1, 2, 3})}};
  auto parsed = keys::read_poll(body.dump(), 2);
  ASSERT_TRUE(parsed) << describe(parsed.error());
  ASSERT_EQ(parsed->jobs.size(), 1u);
  EXPECT_EQ(parsed->jobs[0].id, "r1");
  EXPECT_EQ(parsed->jobs[0].scheme, scheme::p256);
  ASSERT_EQ(parsed->rejected.size(), 1u);
  EXPECT_EQ(parsed->rejected[0].id, "r2");
  // `requests` that is not an array is still no poll answer.
  EXPECT_FALSE(keys::read_poll(R"({"requests":{"a":[]}})", 1));
  EXPECT_FALSE(keys::read_poll(R"([{"requests":[]}])", 1));
}

TEST(WireTest, AbsurdLeaseTimeIsCapped) {
  auto received = std::chrono::steady_clock::time_point{}
                  + std::chrono::hours{1};
  auto req = gen_request("r1");
  req["lease_ms"] = std::numeric_limits<int64_t>::max();
  auto parsed = keys::read_poll(poll_body({req}), 1, received);
  ASSERT_TRUE(parsed);
  ASSERT_EQ(parsed->jobs.size(), 1u);
  EXPECT_EQ(parsed->jobs[0].lease_deadline,
            received + std::chrono::milliseconds{net::max_lease_ms});
}

TEST(WireTest, PrintableEscapesAndCutsProxyText) {
  EXPECT_EQ(net::printable("ok text 1.2:3", 100), "ok text 1.2:3");
  EXPECT_EQ(net::printable("a\x1b[2Jb\n\r\t\x7f\xc3\xa9", 100), "a?[2Jb??????");
  EXPECT_EQ(net::printable(std::string(500, 'z'), 200), std::string(200, 'z'));
  EXPECT_EQ(net::printable(std::string_view{"a\0b", 3}), "a?b");
  // The key path's helper is the same with a 40-character cut.
  EXPECT_EQ(keys::printable(std::string(50, 'q') + "\n"), std::string(40, 'q'));
  EXPECT_EQ(keys::printable("\x1b]0;x\x07"), "?]0;x?");
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
