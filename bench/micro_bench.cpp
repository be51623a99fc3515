// Micro-benchmarks (Google Benchmark) of the host-side work around each
// request, where a regression would be invisible next to the HSM's time in
// an end-to-end run: the wire codec (reading a poll body, encoding a result)
// and signature finishing (parse, low-s, verify, recovery id, DER).
//
// Inputs are built once per benchmark in its set-up, with OpenSSL: an EC key
// and a signature over a random hash, as a token would return it (raw
// r||s). Every input is checked once before timing; a benchmark whose input
// is rejected stops with an error instead of timing the error path.

#include "messages/results.hpp"
#include "messages/scheme.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/ossl.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/net/wire_codec.hpp"

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

using bytes = std::vector<uint8_t>;

bytes random_bytes(size_t n) {
  bytes out(n);
  if (RAND_bytes(out.data(), static_cast<int>(n)) != 1)
    out.clear();
  return out;
}

// -- inputs -------------------------------------------------------------------

/// A poll response with `n` sign requests (32-byte payloads, distinct ids).
std::string poll_body(int n) {
  auto requests = nlohmann::json::array();
  for (int i = 0; i < n; ++i) {
    auto id = std::to_string(i);
    requests.push_back(
      {{"id", "req-" + id},
       {"lease", "lease-" + id},
       {"kind", "sign"},
       {"params",
        {{"key_id", "bench-key-" + id},
         {"payload", "0x" + hsm::crypto::to_hex(random_bytes(32))}}}});
  }
  return nlohmann::json{{"requests", std::move(requests)}}.dump();
}

/// What finish_signature gets: the stored public key, the hash, and the
/// token's raw r||s.
struct signing_input {
  bytes public_key;
  bytes hash;
  bytes from_token;
};

/// Makes a key on `s`'s curve and signs a random hash with OpenSSL. For
/// secp256k1 it keeps a signature with high s, so that the normalisation
/// runs (SoftHSMv2 returns high s about half the time: docs softhsm.md).
std::optional<signing_input> make_signing_input(hsm::scheme s) {
  using hsm::crypto::pkey_ctx_ptr;
  using hsm::crypto::pkey_ptr;
  const char* group = s == hsm::scheme::secp256k1 ? "secp256k1" : "prime256v1";
  pkey_ctx_ptr gen{EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr)};
  EVP_PKEY* raw_key = nullptr;
  if (!gen || EVP_PKEY_keygen_init(gen.get()) != 1
      || EVP_PKEY_CTX_set_group_name(gen.get(), group) != 1
      || EVP_PKEY_keygen(gen.get(), &raw_key) != 1)
    return std::nullopt;
  pkey_ptr key{raw_key};
  signing_input in;
  in.public_key.resize(65);
  size_t size = 0;
  if (EVP_PKEY_get_octet_string_param(key.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                      in.public_key.data(),
                                      in.public_key.size(), &size)
        != 1
      || size != 65)
    return std::nullopt;
  for (int attempt = 0; attempt < 64; ++attempt) {
    in.hash = random_bytes(32);
    pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr)};
    size_t der_size = 0;
    if (!ctx || EVP_PKEY_sign_init(ctx.get()) != 1
        || EVP_PKEY_sign(ctx.get(), nullptr, &der_size, in.hash.data(),
                         in.hash.size())
             != 1)
      return std::nullopt;
    bytes der(der_size);
    if (EVP_PKEY_sign(ctx.get(), der.data(), &der_size, in.hash.data(),
                      in.hash.size())
        != 1)
      return std::nullopt;
    der.resize(der_size);
    auto raw = hsm::crypto::parse_ecdsa(der);
    if (!raw)
      return std::nullopt;
    auto normalised = *raw;
    bool was_high = hsm::crypto::normalize_low_s(s, normalised);
    if (s != hsm::scheme::secp256k1 || was_high) {
      in.from_token.assign(raw->begin(), raw->end());
      return in;
    }
  }
  return std::nullopt;
}

// -- the wire codec
// ------------------------------------------------------------

/// hsm::keys::read_poll (JSON decode, hex decode, request checks) on a poll
/// body of range(0) sign requests.
void BM_ReadPoll(benchmark::State& state) {
  auto n = static_cast<int>(state.range(0));
  auto body = poll_body(n);
  auto check = hsm::keys::read_poll(body);
  if (!check || check->jobs.size() != static_cast<size_t>(n)) {
    state.SkipWithError("the poll body does not read as valid jobs");
    return;
  }
  for (auto _ : state) {
    auto polled = hsm::keys::read_poll(body);
    benchmark::DoNotOptimize(polled);
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations()
                          * static_cast<int64_t>(body.size()));
}
BENCHMARK(BM_ReadPoll)->Arg(1)->Arg(64);

/// hsm::net::encode_result of a finished secp256k1 signature (raw, recovery
/// id, DER): the body of one POST /v1/results.
void BM_EncodeSignatureResult(benchmark::State& state) {
  auto in = make_signing_input(hsm::scheme::secp256k1);
  std::optional<hsm::signature> sig;
  if (in)
    if (auto finished = hsm::crypto::finish_signature(
          hsm::scheme::secp256k1, in->public_key, in->hash, in->from_token))
      sig = std::move(*finished);
  if (!sig) {
    state.SkipWithError("cannot make a secp256k1 signature");
    return;
  }
  hsm::job_result result{"req-0123456789abcdef", "lease-0123456789abcdef",
                         hsm::signature_result{"bench-key-0",
                                               hsm::scheme::secp256k1, *sig}};
  for (auto _ : state) {
    auto body = hsm::net::encode_result(result, "hsm-driver-bench");
    benchmark::DoNotOptimize(body);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EncodeSignatureResult);

// -- signature finishing -----------------------------------------------------

/// hsm::crypto::finish_signature on a raw r||s from the token: parse,
/// low-s (secp256k1), verify against the public key, recovery id, DER.
void BM_FinishSignature(benchmark::State& state, hsm::scheme s) {
  auto in = make_signing_input(s);
  if (!in
      || !hsm::crypto::finish_signature(s, in->public_key, in->hash,
                                        in->from_token)) {
    state.SkipWithError("cannot make a signature that finishes");
    return;
  }
  for (auto _ : state) {
    auto sig = hsm::crypto::finish_signature(s, in->public_key, in->hash,
                                             in->from_token);
    benchmark::DoNotOptimize(sig);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK_CAPTURE(BM_FinishSignature, secp256k1, hsm::scheme::secp256k1);
BENCHMARK_CAPTURE(BM_FinishSignature, p256, hsm::scheme::p256);

} // namespace

BENCHMARK_MAIN();
