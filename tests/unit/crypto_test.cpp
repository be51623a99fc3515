#include "runtime/crypto/ec.hpp"
#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/ossl.hpp"
#include "runtime/crypto/signature.hpp"

#include <gtest/gtest.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/rand.h>
#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using hsm::key_errc;
using hsm::scheme;
using hsm::crypto::raw_ecdsa;

// -- ownership (OpenSSL's in runtime/crypto/ossl.hpp) ------------------------

using hsm::crypto::bn_ctx_ptr;
using hsm::crypto::bn_ptr;
using hsm::crypto::ecdsa_sig_ptr;
using hsm::crypto::group_ptr;
using hsm::crypto::md_ctx_ptr;
using hsm::crypto::pkey_ctx_ptr;
using hsm::crypto::pkey_ptr;
using hsm::crypto::point_ptr;
using secp_ctx_ptr = std::unique_ptr<
  secp256k1_context, hsm::crypto::ossl_deleter<secp256k1_context_destroy>>;

using bytes = std::vector<uint8_t>;

constexpr std::array<scheme, 2> ecdsa_schemes{scheme::secp256k1, scheme::p256};

constexpr int iterations = 50;

// -- helpers ------------------------------------------------------------------

bytes unhex(std::string_view text) {
  auto parsed = hsm::crypto::from_hex(text);
  EXPECT_TRUE(parsed) << text;
  return parsed ? *parsed : bytes{};
}

std::string describe(const caf::error& err) {
  return caf::to_string(err);
}

bytes random_bytes(size_t n) {
  bytes out(n);
  EXPECT_EQ(RAND_bytes(out.data(), static_cast<int>(n)), 1);
  return out;
}

group_ptr make_group(scheme s) {
  auto nid = s == scheme::secp256k1 ? NID_secp256k1 : NID_X9_62_prime256v1;
  return group_ptr{EC_GROUP_new_by_curve_name(nid)};
}

const char* group_name(scheme s) {
  return s == scheme::secp256k1 ? "secp256k1" : "prime256v1";
}

bn_ptr bn_from(std::span<const uint8_t> data) {
  return bn_ptr{BN_bin2bn(data.data(), static_cast<int>(data.size()), nullptr)};
}

bytes bn_to_32(const BIGNUM* x) {
  bytes out(32);
  EXPECT_EQ(BN_bn2binpad(x, out.data(), 32), 32);
  return out;
}

bn_ptr curve_order(scheme s) {
  auto group = make_group(s);
  return bn_ptr{BN_dup(EC_GROUP_get0_order(group.get()))};
}

raw_ecdsa make_raw(std::span<const uint8_t> r, std::span<const uint8_t> s) {
  raw_ecdsa out{};
  std::copy(r.begin(), r.end(), out.begin());
  std::copy(s.begin(), s.end(), out.begin() + 32);
  return out;
}

bytes r_of(std::span<const uint8_t> raw) {
  return {raw.begin(), raw.begin() + 32};
}

bytes s_of(std::span<const uint8_t> raw) {
  return {raw.begin() + 32, raw.begin() + 64};
}

/// Decodes a DER ECDSA-Sig-Value with OpenSSL directly, independent of
/// `parse_ecdsa`.
raw_ecdsa der_to_raw(const bytes& der) {
  const auto* pos = der.data();
  ecdsa_sig_ptr sig{
    d2i_ECDSA_SIG(nullptr, &pos, static_cast<long>(der.size()))};
  EXPECT_TRUE(sig);
  EXPECT_EQ(pos, der.data() + der.size());
  if (!sig)
    return {};
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(sig.get(), &r, &s);
  return make_raw(bn_to_32(r), bn_to_32(s));
}

/// Encodes a point on `s`'s curve in the given form.
bytes encode_point(scheme s, std::span<const uint8_t> point,
                   point_conversion_form_t form) {
  auto group = make_group(s);
  bn_ctx_ptr ctx{BN_CTX_new()};
  point_ptr p{EC_POINT_new(group.get())};
  EXPECT_EQ(EC_POINT_oct2point(group.get(), p.get(), point.data(), point.size(),
                               ctx.get()),
            1);
  bytes out(65);
  auto n = EC_POINT_point2oct(group.get(), p.get(), form, out.data(),
                              out.size(), ctx.get());
  out.resize(n);
  return out;
}

/// An EC key made by OpenSSL, with its SEC1 uncompressed public key.
struct ec_key {
  pkey_ptr pkey;
  bytes public_key;
};

ec_key generate_ec(scheme s) {
  ec_key out;
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr)};
  EVP_PKEY* key = nullptr;
  EXPECT_TRUE(ctx && EVP_PKEY_keygen_init(ctx.get()) == 1
              && EVP_PKEY_CTX_set_group_name(ctx.get(), group_name(s)) == 1
              && EVP_PKEY_keygen(ctx.get(), &key) == 1);
  out.pkey.reset(key);
  out.public_key.resize(65);
  size_t size = 0;
  EXPECT_EQ(EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY,
                                            out.public_key.data(),
                                            out.public_key.size(), &size),
            1);
  EXPECT_EQ(size, 65u);
  EXPECT_EQ(out.public_key[0], 0x04);
  return out;
}

/// ECDSA over a 32-byte hash with OpenSSL (no digest: the hash is the
/// digest); the DER signature.
bytes sign_der(EVP_PKEY* key, std::span<const uint8_t> hash) {
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr)};
  size_t size = 0;
  EXPECT_TRUE(
    ctx && EVP_PKEY_sign_init(ctx.get()) == 1
    && EVP_PKEY_sign(ctx.get(), nullptr, &size, hash.data(), hash.size()) == 1);
  bytes out(size);
  EXPECT_EQ(
    EVP_PKEY_sign(ctx.get(), out.data(), &size, hash.data(), hash.size()), 1);
  out.resize(size);
  return out;
}

/// Recovers the public key with libsecp256k1.
bytes recover_secp256k1(std::span<const uint8_t> hash, const bytes& raw,
                        int recid) {
  secp_ctx_ptr ctx{secp256k1_context_create(SECP256K1_CONTEXT_VERIFY)};
  secp256k1_ecdsa_recoverable_signature sig;
  secp256k1_pubkey key;
  if (secp256k1_ecdsa_recoverable_signature_parse_compact(ctx.get(), &sig,
                                                          raw.data(), recid)
        != 1
      || secp256k1_ecdsa_recover(ctx.get(), &key, &sig, hash.data()) != 1)
    return {};
  bytes out(65);
  size_t size = out.size();
  secp256k1_ec_pubkey_serialize(ctx.get(), out.data(), &size, &key,
                                SECP256K1_EC_UNCOMPRESSED);
  return out;
}

/// Recovers the public key on `s`'s curve with OpenSSL:
/// Q = r^-1 (s R - e G), R from x = r (+ n if bit 1) and y's parity (bit 0).
bytes recover_openssl(scheme curve, std::span<const uint8_t> hash,
                      const bytes& raw, int recid) {
  auto group = make_group(curve);
  bn_ctx_ptr ctx{BN_CTX_new()};
  const auto* n = EC_GROUP_get0_order(group.get());
  auto r = bn_from(r_of(raw));
  auto s = bn_from(s_of(raw));
  auto e = bn_from(hash);
  bn_ptr x{BN_dup(r.get())};
  if ((recid & 2) != 0)
    BN_add(x.get(), x.get(), n);
  point_ptr big_r{EC_POINT_new(group.get())};
  if (EC_POINT_set_compressed_coordinates(group.get(), big_r.get(), x.get(),
                                          recid & 1, ctx.get())
      != 1)
    return {};
  bn_ptr r_inv{BN_mod_inverse(nullptr, r.get(), n, ctx.get())};
  bn_ptr e_mod{BN_new()};
  bn_ptr neg_e{BN_new()};
  bn_ptr u1{BN_new()};
  bn_ptr u2{BN_new()};
  BN_nnmod(e_mod.get(), e.get(), n, ctx.get());
  BN_sub(neg_e.get(), n, e_mod.get());
  BN_mod_mul(u1.get(), neg_e.get(), r_inv.get(), n, ctx.get());
  BN_mod_mul(u2.get(), s.get(), r_inv.get(), n, ctx.get());
  point_ptr q{EC_POINT_new(group.get())};
  EXPECT_EQ(EC_POINT_mul(group.get(), q.get(), u1.get(), big_r.get(), u2.get(),
                         ctx.get()),
            1);
  bytes out(65);
  auto size = EC_POINT_point2oct(group.get(), q.get(),
                                 POINT_CONVERSION_UNCOMPRESSED, out.data(),
                                 out.size(), ctx.get());
  out.resize(size);
  return out;
}

/// An Ed25519 key made by OpenSSL, with its raw public key.
struct ed_key {
  pkey_ptr pkey;
  bytes public_key;
};

ed_key generate_ed25519() {
  ed_key out;
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, nullptr)};
  EVP_PKEY* key = nullptr;
  EXPECT_TRUE(ctx && EVP_PKEY_keygen_init(ctx.get()) == 1
              && EVP_PKEY_keygen(ctx.get(), &key) == 1);
  out.pkey.reset(key);
  out.public_key.resize(32);
  size_t size = out.public_key.size();
  EXPECT_EQ(EVP_PKEY_get_raw_public_key(key, out.public_key.data(), &size), 1);
  EXPECT_EQ(size, 32u);
  return out;
}

bytes sign_ed25519(EVP_PKEY* key, const bytes& message) {
  md_ctx_ptr ctx{EVP_MD_CTX_new()};
  static constexpr uint8_t no_data = 0;
  const auto* data = message.empty() ? &no_data : message.data();
  size_t size = 0;
  EXPECT_TRUE(
    ctx && EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, key) == 1
    && EVP_DigestSign(ctx.get(), nullptr, &size, data, message.size()) == 1);
  bytes out(size);
  EXPECT_EQ(EVP_DigestSign(ctx.get(), out.data(), &size, data, message.size()),
            1);
  out.resize(size);
  return out;
}

// -- the EIP-155 example (secp256k1) ------------------------------------------

/// EIP-155's worked example: the key 0x4646..46 signing a transaction hash on
/// chain 1 with v = 37, that is recovery id 0.
struct eip155_vector {
  bytes public_key;
  bytes hash;
  bytes r;
  bytes s;
  bn_ptr n;
  bytes high_s;

  eip155_vector() {
    auto group = make_group(scheme::secp256k1);
    bn_ctx_ptr ctx{BN_CTX_new()};
    auto priv = bn_from(unhex(
      "4646464646464646464646464646464646464646464646464646464646464646"));
    point_ptr pub{EC_POINT_new(group.get())};
    EXPECT_EQ(EC_POINT_mul(group.get(), pub.get(), priv.get(), nullptr, nullptr,
                           ctx.get()),
              1);
    public_key.resize(65);
    EXPECT_EQ(
      EC_POINT_point2oct(group.get(), pub.get(), POINT_CONVERSION_UNCOMPRESSED,
                         public_key.data(), public_key.size(), ctx.get()),
      65u);
    hash = unhex(
      "daf5a779ae972f972197303d7b574746c7ef83eadac0f2791ad23db92e4c8e53");
    BIGNUM* value = nullptr;
    BN_dec2bn(&value, "185154612643733513732000026658530286124510565785457"
                      "11640558177340181847433846");
    bn_ptr r_bn{value};
    value = nullptr;
    BN_dec2bn(&value, "469485073046389475099407636490303587599099025760259"
                      "00602547168820602576006531");
    bn_ptr s_bn{value};
    r = bn_to_32(r_bn.get());
    s = bn_to_32(s_bn.get());
    n = curve_order(scheme::secp256k1);
    bn_ptr flipped{BN_new()};
    BN_sub(flipped.get(), n.get(), s_bn.get());
    high_s = bn_to_32(flipped.get());
  }

  raw_ecdsa low() const {
    return make_raw(r, s);
  }

  raw_ecdsa high() const {
    return make_raw(r, high_s);
  }
};

TEST(Eip155VectorTest, VerifiesWithRecoveryIdZero) {
  eip155_vector v;
  auto sig = v.low();
  EXPECT_TRUE(
    hsm::crypto::verify(scheme::secp256k1, v.public_key, v.hash, sig));
  auto recid = hsm::crypto::recovery_id(scheme::secp256k1, v.public_key, v.hash,
                                        sig);
  ASSERT_TRUE(recid) << describe(recid.error());
  EXPECT_EQ(*recid, 0);
  // The independent OpenSSL recovery agrees.
  EXPECT_EQ(recover_openssl(scheme::secp256k1, v.hash,
                            bytes(sig.begin(), sig.end()), 0),
            v.public_key);
}

TEST(Eip155VectorTest, HighSFlipsParityAndFailsStrictVerify) {
  eip155_vector v;
  auto high = v.high();
  // libsecp256k1 rejects high s by design.
  EXPECT_FALSE(
    hsm::crypto::verify(scheme::secp256k1, v.public_key, v.hash, high));
  auto recid = hsm::crypto::recovery_id(scheme::secp256k1, v.public_key, v.hash,
                                        high);
  ASSERT_TRUE(recid) << describe(recid.error());
  EXPECT_EQ(*recid, 1);
  EXPECT_TRUE(hsm::crypto::normalize_low_s(scheme::secp256k1, high));
  EXPECT_EQ(high, v.low());
  EXPECT_FALSE(hsm::crypto::normalize_low_s(scheme::secp256k1, high));
  EXPECT_EQ(high, v.low());
}

TEST(Eip155VectorTest, FinishNormalisesHighS) {
  eip155_vector v;
  auto high = v.high();
  auto res = hsm::crypto::finish_signature(scheme::secp256k1, v.public_key,
                                           v.hash, high);
  ASSERT_TRUE(res) << describe(res.error());
  EXPECT_EQ(r_of(res->raw), v.r);
  EXPECT_EQ(s_of(res->raw), v.s);
  ASSERT_TRUE(res->recovery_id);
  EXPECT_EQ(*res->recovery_id, 0);
  auto decoded = der_to_raw(res->der);
  EXPECT_EQ(decoded, v.low());
  // The DER form from the token gives the same result.
  auto der_in = hsm::crypto::to_der(high);
  auto from_der = hsm::crypto::finish_signature(scheme::secp256k1, v.public_key,
                                                v.hash, der_in);
  ASSERT_TRUE(from_der) << describe(from_der.error());
  EXPECT_EQ(from_der->raw, res->raw);
  EXPECT_EQ(from_der->recovery_id, res->recovery_id);
  EXPECT_EQ(from_der->der, res->der);
  EXPECT_EQ(res->public_key_fingerprint,
            hsm::crypto::public_key_fingerprint(v.public_key));
}

TEST(Eip155VectorTest, ConcurrentVerificationAgrees) {
  eip155_vector v;
  auto sig = v.low();
  std::array<int, 4> results{};
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i)
    threads.emplace_back([&, i] {
      int ok = 0;
      for (int j = 0; j < 20; ++j)
        ok += hsm::crypto::verify(scheme::secp256k1, v.public_key, v.hash, sig)
                ? 1
                : 0;
      results[i] = ok;
    });
  for (auto& t : threads)
    t.join();
  for (auto ok : results)
    EXPECT_EQ(ok, 20);
}

/// Names parameterised tests after the scheme, e.g. `.../secp256k1`.
std::string scheme_name(const ::testing::TestParamInfo<scheme>& param) {
  return std::string{hsm::to_string(param.param)};
}

// -- randomised cross-checks with OpenSSL keys --------------------------------

class EcdsaCrossCheckTest : public ::testing::TestWithParam<scheme> {};

TEST_P(EcdsaCrossCheckTest, FinishesOpenSslSignatures) {
  auto curve = GetParam();
  auto n = curve_order(curve);
  bn_ptr half{BN_new()};
  BN_rshift1(half.get(), n.get());
  int flips = 0;
  for (int i = 0; i < iterations; ++i) {
    auto key = generate_ec(curve);
    auto hash = random_bytes(32);
    auto der = sign_der(key.pkey.get(), hash);
    auto raw = der_to_raw(der);
    auto s_orig = bn_from(s_of(raw));
    bool high = BN_cmp(s_orig.get(), half.get()) > 0;
    flips += high ? 1 : 0;
    for (const auto& input : {bytes(raw.begin(), raw.end()), der}) {
      auto res = hsm::crypto::finish_signature(curve, key.public_key, hash,
                                               input);
      ASSERT_TRUE(res) << describe(res.error()) << " iteration " << i;
      ASSERT_EQ(res->raw.size(), 64u);
      EXPECT_EQ(r_of(res->raw), r_of(raw));
      auto s_out = bn_from(s_of(res->raw));
      if (curve == scheme::secp256k1) {
        EXPECT_LE(BN_cmp(s_out.get(), half.get()), 0);
        if (high) {
          bn_ptr want{BN_new()};
          BN_sub(want.get(), n.get(), s_orig.get());
          EXPECT_EQ(BN_cmp(s_out.get(), want.get()), 0);
        } else {
          EXPECT_EQ(BN_cmp(s_out.get(), s_orig.get()), 0);
        }
      } else {
        EXPECT_EQ(res->raw, bytes(raw.begin(), raw.end()));
      }
      EXPECT_TRUE(hsm::crypto::verify(curve, key.public_key, hash, res->raw));
      auto decoded = der_to_raw(res->der);
      EXPECT_EQ(bytes(decoded.begin(), decoded.end()), res->raw);
      ASSERT_TRUE(res->recovery_id);
      auto recid = *res->recovery_id;
      EXPECT_GE(recid, 0);
      EXPECT_LE(recid, 3);
      if (curve == scheme::secp256k1) {
        EXPECT_EQ(recover_secp256k1(hash, res->raw, recid), key.public_key);
      }
      EXPECT_EQ(recover_openssl(curve, hash, res->raw, recid), key.public_key);
      // The other parity recovers some other key.
      EXPECT_NE(recover_openssl(curve, hash, res->raw, recid ^ 1),
                key.public_key);
    }
  }
  // OpenSSL picks s at random: about half of the signatures are high.
  EXPECT_GT(flips, 0);
  EXPECT_LT(flips, iterations);
}

TEST_P(EcdsaCrossCheckTest, RejectsTamperedSignatures) {
  auto curve = GetParam();
  for (int i = 0; i < 10; ++i) {
    auto key = generate_ec(curve);
    auto other = generate_ec(curve);
    auto hash = random_bytes(32);
    auto raw_sig = der_to_raw(sign_der(key.pkey.get(), hash));
    bytes raw(raw_sig.begin(), raw_sig.end());
    auto good = hsm::crypto::finish_signature(curve, key.public_key, hash, raw);
    ASSERT_TRUE(good) << describe(good.error());
    auto expect_mismatch = [&](const bytes& pub, const bytes& h,
                               const bytes& sig, const char* what) {
      auto res = hsm::crypto::finish_signature(curve, pub, h, sig);
      ASSERT_FALSE(res) << what;
      EXPECT_EQ(res.error(), key_errc::signature_mismatch)
        << what << ": " << describe(res.error());
    };
    auto bit = static_cast<size_t>(i) * 3;
    auto flip = [](bytes data, size_t index) {
      data[index / 8] ^= static_cast<uint8_t>(1u << (index % 8));
      return data;
    };
    expect_mismatch(key.public_key, hash, flip(raw, bit), "bit in r");
    expect_mismatch(key.public_key, hash, flip(raw, 256 + bit), "bit in s");
    expect_mismatch(key.public_key, flip(hash, bit), raw, "bit in hash");
    expect_mismatch(other.public_key, hash, raw, "other key");
    expect_mismatch(key.public_key, hash, bytes(raw.begin(), raw.end() - 1),
                    "63 bytes");
  }
}

TEST_P(EcdsaCrossCheckTest, RejectsWrongPayloadLength) {
  auto curve = GetParam();
  auto key = generate_ec(curve);
  auto hash = random_bytes(32);
  auto raw_sig = der_to_raw(sign_der(key.pkey.get(), hash));
  for (size_t size : {0u, 31u, 33u, 64u}) {
    auto payload = random_bytes(size);
    EXPECT_FALSE(hsm::crypto::verify(curve, key.public_key, payload, raw_sig));
    auto res = hsm::crypto::finish_signature(curve, key.public_key, payload,
                                             raw_sig);
    ASSERT_FALSE(res);
    EXPECT_EQ(res.error(), key_errc::invalid_payload);
  }
}

TEST_P(EcdsaCrossCheckTest, VerifyRejectsMalformedInput) {
  auto curve = GetParam();
  auto key = generate_ec(curve);
  auto hash = random_bytes(32);
  auto raw_sig = der_to_raw(sign_der(key.pkey.get(), hash));
  hsm::crypto::normalize_low_s(curve, raw_sig);
  ASSERT_TRUE(hsm::crypto::verify(curve, key.public_key, hash, raw_sig));
  auto off_curve = key.public_key;
  off_curve[64] ^= 0x01;
  for (const auto& pub : {bytes{}, bytes(65, 0), bytes(64, 4), off_curve})
    EXPECT_FALSE(hsm::crypto::verify(curve, pub, hash, raw_sig));
  bytes sig(raw_sig.begin(), raw_sig.end());
  EXPECT_FALSE(hsm::crypto::verify(curve, key.public_key, hash, bytes{}));
  EXPECT_FALSE(hsm::crypto::verify(curve, key.public_key, hash,
                                   bytes(sig.begin(), sig.end() - 1)));
  auto der = hsm::crypto::to_der(raw_sig);
  EXPECT_FALSE(hsm::crypto::verify(curve, key.public_key, hash, der));
  // r = 0, s = 0 and r, s >= n are never valid.
  EXPECT_FALSE(hsm::crypto::verify(curve, key.public_key, hash, bytes(64, 0)));
  EXPECT_FALSE(
    hsm::crypto::verify(curve, key.public_key, hash, bytes(64, 0xff)));
  auto recid = hsm::crypto::recovery_id(curve, key.public_key, hash,
                                        raw_ecdsa{});
  ASSERT_FALSE(recid);
  EXPECT_EQ(recid.error(), key_errc::signature_mismatch);
}

TEST_P(EcdsaCrossCheckTest, RecoveryIdMarksOverflowedX) {
  // R.x >= n happens with probability ~2^-128 in real signatures, so build
  // one: pick R with x = n + k on the curve, any r = x - n, s and e, and
  // take the key Q = r^-1 (s R - e G) that makes (r, s) valid.
  auto curve = GetParam();
  auto group = make_group(curve);
  bn_ctx_ptr ctx{BN_CTX_new()};
  auto n = curve_order(curve);
  for (int parity = 0; parity < 2; ++parity) {
    bn_ptr x{BN_dup(n.get())};
    point_ptr big_r{EC_POINT_new(group.get())};
    for (;;) {
      BN_add_word(x.get(), 1);
      if (EC_POINT_set_compressed_coordinates(group.get(), big_r.get(), x.get(),
                                              parity, ctx.get())
          == 1)
        break;
    }
    ERR_clear_error();
    bn_ptr r{BN_new()};
    BN_sub(r.get(), x.get(), n.get());
    // s < 2^248 < n/2: low, so secp256k1 accepts it unchanged.
    auto s = random_bytes(32);
    s[0] = 0;
    auto hash = random_bytes(32);
    auto raw = make_raw(bn_to_32(r.get()), s);
    bytes raw_bytes(raw.begin(), raw.end());
    auto want = 2 | parity;
    auto public_key = recover_openssl(curve, hash, raw_bytes, want);
    ASSERT_EQ(public_key.size(), 65u);
    EXPECT_TRUE(hsm::crypto::verify(curve, public_key, hash, raw));
    auto recid = hsm::crypto::recovery_id(curve, public_key, hash, raw);
    ASSERT_TRUE(recid) << describe(recid.error());
    EXPECT_EQ(*recid, want);
    auto res = hsm::crypto::finish_signature(curve, public_key, hash,
                                             raw_bytes);
    ASSERT_TRUE(res) << describe(res.error());
    EXPECT_EQ(res->recovery_id, want);
    if (curve == scheme::secp256k1) {
      EXPECT_EQ(recover_secp256k1(hash, raw_bytes, want), public_key);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Curves, EcdsaCrossCheckTest,
                         ::testing::ValuesIn(ecdsa_schemes), scheme_name);

// -- ECDSA encodings ----------------------------------------------------------

TEST(EcdsaEncodingTest, RawPassesThrough) {
  auto raw = random_bytes(64);
  auto parsed = hsm::crypto::parse_ecdsa(raw);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(bytes(parsed->begin(), parsed->end()), raw);
}

TEST(EcdsaEncodingTest, DerRoundTripsWithShortIntegers) {
  // Leading zero bytes shorten the DER integers; high bits need a 00 pad.
  for (auto [r_head, s_head] :
       {std::pair{0x00, 0x00}, std::pair{0x80, 0x01}, std::pair{0x00, 0xff}}) {
    auto raw_bytes = random_bytes(64);
    raw_bytes[0] = static_cast<uint8_t>(r_head);
    raw_bytes[1] = 0;
    raw_bytes[32] = static_cast<uint8_t>(s_head);
    auto raw = make_raw(r_of(raw_bytes), s_of(raw_bytes));
    auto der = hsm::crypto::to_der(raw);
    ASSERT_FALSE(der.empty());
    EXPECT_EQ(der[0], 0x30);
    EXPECT_EQ(der_to_raw(der), raw);
    auto parsed = hsm::crypto::parse_ecdsa(der);
    ASSERT_TRUE(parsed) << describe(parsed.error());
    EXPECT_EQ(*parsed, raw);
  }
}

TEST(EcdsaEncodingTest, RejectsMalformedInput) {
  auto raw = make_raw(random_bytes(32), random_bytes(32));
  auto der = hsm::crypto::to_der(raw);
  auto with_trailer = der;
  with_trailer.push_back(0);
  // r = 01 followed by 32 bytes does not fit 32 bytes.
  bytes big_r{0x30, 0x26, 0x02, 0x21, 0x01};
  for (int i = 0; i < 32; ++i)
    big_r.push_back(0x11);
  big_r.insert(big_r.end(), {0x02, 0x01, 0x01});
  for (const auto& input :
       {bytes{}, bytes(63, 1), bytes(65, 1), bytes(der.begin(), der.end() - 1),
        with_trailer, big_r, bytes{0x30, 0x00}}) {
    auto parsed = hsm::crypto::parse_ecdsa(input);
    ASSERT_FALSE(parsed) << hsm::crypto::to_hex(input);
    EXPECT_EQ(parsed.error(), key_errc::signature_mismatch);
  }
}

TEST(EcdsaEncodingTest, NormalizeLowSOnBothCurves) {
  for (auto curve : ecdsa_schemes) {
    auto n = curve_order(curve);
    bn_ptr half{BN_new()};
    BN_rshift1(half.get(), n.get());
    bn_ptr half_plus_one{BN_dup(half.get())};
    BN_add_word(half_plus_one.get(), 1);
    auto r = random_bytes(32);
    // n/2 stays, n/2 + 1 becomes n - (n/2 + 1) = n/2.
    auto at_half = make_raw(r, bn_to_32(half.get()));
    EXPECT_FALSE(hsm::crypto::normalize_low_s(curve, at_half));
    EXPECT_EQ(s_of(at_half), bn_to_32(half.get()));
    auto above = make_raw(r, bn_to_32(half_plus_one.get()));
    EXPECT_TRUE(hsm::crypto::normalize_low_s(curve, above));
    EXPECT_EQ(s_of(above), bn_to_32(half.get()));
    EXPECT_EQ(r_of(above), r);
    bn_ptr n_minus_one{BN_dup(n.get())};
    BN_sub_word(n_minus_one.get(), 1);
    auto top = make_raw(r, bn_to_32(n_minus_one.get()));
    EXPECT_TRUE(hsm::crypto::normalize_low_s(curve, top));
    bn_ptr one{BN_new()};
    BN_one(one.get());
    EXPECT_EQ(s_of(top), bn_to_32(one.get()));
  }
  // The curves differ: P-256's n/2 + 1 is below secp256k1's n/2.
  auto p256_half = curve_order(scheme::p256);
  BN_rshift1(p256_half.get(), p256_half.get());
  BN_add_word(p256_half.get(), 1);
  auto sig = make_raw(random_bytes(32), bn_to_32(p256_half.get()));
  auto copy = sig;
  EXPECT_TRUE(hsm::crypto::normalize_low_s(scheme::p256, sig));
  EXPECT_FALSE(hsm::crypto::normalize_low_s(scheme::secp256k1, copy));
  // ed25519 has no s to normalise.
  EXPECT_FALSE(hsm::crypto::normalize_low_s(scheme::ed25519, copy));
}

// -- public keys --------------------------------------------------------------

class EcPointTest : public ::testing::TestWithParam<scheme> {};

TEST_P(EcPointTest, AllFormsGiveTheUncompressedKey) {
  auto curve = GetParam();
  for (int i = 0; i < 10; ++i) {
    auto key = generate_ec(curve);
    auto compressed = encode_point(curve, key.public_key,
                                   POINT_CONVERSION_COMPRESSED);
    ASSERT_EQ(compressed.size(), 33u);
    bytes wrapped{0x04, 0x41};
    wrapped.insert(wrapped.end(), key.public_key.begin(), key.public_key.end());
    bytes wrapped_compressed{0x04, 0x21};
    wrapped_compressed.insert(wrapped_compressed.end(), compressed.begin(),
                              compressed.end());
    for (const auto& input :
         {wrapped, key.public_key, compressed, wrapped_compressed}) {
      auto parsed = hsm::crypto::parse_ec_point(curve, input);
      ASSERT_TRUE(parsed) << describe(parsed.error());
      EXPECT_EQ(*parsed, key.public_key) << hsm::crypto::to_hex(input);
    }
  }
}

TEST_P(EcPointTest, RejectsPointsOffTheCurve) {
  auto curve = GetParam();
  auto key = generate_ec(curve);
  for (size_t index : {64u, 40u, 33u}) {
    auto bad = key.public_key;
    bad[index] ^= 0x01;
    bytes wrapped{0x04, 0x41};
    wrapped.insert(wrapped.end(), bad.begin(), bad.end());
    for (const auto& input : {bad, wrapped}) {
      auto parsed = hsm::crypto::parse_ec_point(curve, input);
      ASSERT_FALSE(parsed) << hsm::crypto::to_hex(input);
      EXPECT_EQ(parsed.error(), key_errc::key_corrupted);
    }
    auto compressed = hsm::crypto::compress_public_key(curve, bad);
    ASSERT_FALSE(compressed);
    EXPECT_EQ(compressed.error(), key_errc::key_corrupted);
  }
}

TEST_P(EcPointTest, RejectsWrongLengthsAndTags) {
  auto curve = GetParam();
  auto key = generate_ec(curve);
  auto wrong_tag = key.public_key;
  wrong_tag[0] = 0x06;
  bytes wrong_header{0x04, 0x40};
  wrong_header.insert(wrong_header.end(), key.public_key.begin(),
                      key.public_key.end());
  for (const auto& input :
       {bytes{}, bytes{0x00}, bytes(32, 2), bytes(64, 4),
        bytes(key.public_key.begin(), key.public_key.end() - 1),
        bytes(key.public_key.begin() + 1, key.public_key.end()), wrong_tag,
        wrong_header, bytes(66, 4), bytes(68, 4)}) {
    auto parsed = hsm::crypto::parse_ec_point(curve, input);
    ASSERT_FALSE(parsed) << hsm::crypto::to_hex(input);
    EXPECT_EQ(parsed.error(), key_errc::key_corrupted);
  }
}

TEST_P(EcPointTest, CompressAgreesWithOpenSsl) {
  auto curve = GetParam();
  for (int i = 0; i < 20; ++i) {
    auto key = generate_ec(curve);
    auto compressed = hsm::crypto::compress_public_key(curve, key.public_key);
    ASSERT_TRUE(compressed) << describe(compressed.error());
    EXPECT_EQ(*compressed,
              encode_point(curve, key.public_key, POINT_CONVERSION_COMPRESSED));
  }
  auto key = generate_ec(curve);
  auto compressed = encode_point(curve, key.public_key,
                                 POINT_CONVERSION_COMPRESSED);
  auto again = hsm::crypto::compress_public_key(curve, compressed);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error(), key_errc::key_corrupted);
}

INSTANTIATE_TEST_SUITE_P(Curves, EcPointTest,
                         ::testing::ValuesIn(ecdsa_schemes), scheme_name);

TEST(Ed25519PointTest, AcceptsWrappedAndRawForms) {
  auto key = generate_ed25519();
  bytes wrapped{0x04, 0x20};
  wrapped.insert(wrapped.end(), key.public_key.begin(), key.public_key.end());
  for (const auto& input : {wrapped, key.public_key}) {
    auto parsed = hsm::crypto::parse_ec_point(scheme::ed25519, input);
    ASSERT_TRUE(parsed) << describe(parsed.error());
    EXPECT_EQ(*parsed, key.public_key);
  }
  auto wrong_header = wrapped;
  wrong_header[1] = 0x21;
  for (const auto& input : {bytes{}, bytes(31, 1), bytes(33, 1), wrong_header,
                            bytes(wrapped.begin(), wrapped.end() - 1)}) {
    auto parsed = hsm::crypto::parse_ec_point(scheme::ed25519, input);
    ASSERT_FALSE(parsed) << hsm::crypto::to_hex(input);
    EXPECT_EQ(parsed.error(), key_errc::key_corrupted);
  }
  EXPECT_FALSE(
    hsm::crypto::compress_public_key(scheme::ed25519, key.public_key));
}

TEST(Ed25519PointTest, RefusesPointsThatAreNotValidPublicKeys) {
  // 32 zero bytes (y = 0: a point of order 4), the identity (y = 1), y = -1
  // (order 2), y = p (not canonical), and y = 2 (no x on the curve): none
  // is the public key of any private key.
  bytes zero(32, 0);
  bytes identity(32, 0);
  identity[0] = 1;
  bytes minus_one(32, 0xff);
  minus_one[0] = 0xec;
  minus_one[31] = 0x7f;
  bytes p(32, 0xff);
  p[0] = 0xed;
  p[31] = 0x7f;
  bytes two(32, 0);
  two[0] = 2;
  for (const auto& input : {zero, identity, minus_one, p, two}) {
    auto parsed = hsm::crypto::parse_ec_point(scheme::ed25519, input);
    ASSERT_FALSE(parsed) << hsm::crypto::to_hex(input);
    EXPECT_EQ(parsed.error(), key_errc::key_corrupted);
    EXPECT_NE(describe(parsed.error()).find("not a valid point"),
              std::string::npos);
  }
  // A real key passes (RFC 8032, test 1).
  auto rfc = hsm::crypto::from_hex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  ASSERT_TRUE(rfc);
  EXPECT_TRUE(hsm::crypto::parse_ec_point(scheme::ed25519, *rfc));
}

// -- Ed25519 ------------------------------------------------------------------

TEST(Ed25519Test, FinishesOpenSslSignatures) {
  for (int i = 0; i < iterations; ++i) {
    auto key = generate_ed25519();
    auto message = random_bytes(static_cast<size_t>(i) * 7);
    auto sig = sign_ed25519(key.pkey.get(), message);
    ASSERT_EQ(sig.size(), 64u);
    auto res = hsm::crypto::finish_signature(scheme::ed25519, key.public_key,
                                             message, sig);
    ASSERT_TRUE(res) << describe(res.error());
    EXPECT_EQ(res->raw, sig);
    EXPECT_FALSE(res->recovery_id);
    EXPECT_TRUE(res->der.empty());
  }
}

TEST(Ed25519Test, Rfc8032TestVector1) {
  auto secret = unhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
  auto public_key = unhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  auto sig = unhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590"
    "a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b");
  bytes message;
  // Check the transcription: OpenSSL derives the same key and signature.
  pkey_ptr priv{EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                             secret.data(), secret.size())};
  ASSERT_TRUE(priv);
  bytes derived(32);
  size_t size = derived.size();
  ASSERT_EQ(EVP_PKEY_get_raw_public_key(priv.get(), derived.data(), &size), 1);
  EXPECT_EQ(derived, public_key);
  EXPECT_EQ(sign_ed25519(priv.get(), message), sig);
  EXPECT_TRUE(hsm::crypto::verify(scheme::ed25519, public_key, message, sig));
  auto res = hsm::crypto::finish_signature(scheme::ed25519, public_key, message,
                                           sig);
  ASSERT_TRUE(res) << describe(res.error());
  EXPECT_EQ(res->raw, sig);
  // The result names the key it was verified against (value from
  // `openssl dgst -sha256` over the public key, see FingerprintTest).
  EXPECT_EQ(res->public_key_fingerprint,
            "sha256:21fe31dfa154a261626bf854046fd227"
            "1b7bed4b6abe45aa58877ef47f9721b9");
  // A one-byte message is not the empty one.
  EXPECT_FALSE(
    hsm::crypto::verify(scheme::ed25519, public_key, bytes{0x00}, sig));
}

TEST(Ed25519Test, RejectsTamperedSignatures) {
  auto key = generate_ed25519();
  auto other = generate_ed25519();
  auto message = random_bytes(100);
  auto sig = sign_ed25519(key.pkey.get(), message);
  ASSERT_TRUE(hsm::crypto::finish_signature(scheme::ed25519, key.public_key,
                                            message, sig));
  auto flip = [](bytes data, size_t index) {
    data[index / 8] ^= static_cast<uint8_t>(1u << (index % 8));
    return data;
  };
  struct tampered {
    bytes public_key;
    bytes message;
    bytes sig;
    const char* what;
  };
  for (const auto& t :
       {tampered{key.public_key, message, flip(sig, 3), "bit in R"},
        tampered{key.public_key, message, flip(sig, 300), "bit in S"},
        tampered{key.public_key, flip(message, 17), sig, "bit in message"},
        tampered{other.public_key, message, sig, "other key"},
        tampered{key.public_key, message, bytes(sig.begin(), sig.end() - 1),
                 "63 bytes"},
        tampered{bytes(31, 1), message, sig, "short key"}}) {
    auto res = hsm::crypto::finish_signature(scheme::ed25519, t.public_key,
                                             t.message, t.sig);
    ASSERT_FALSE(res) << t.what;
    EXPECT_EQ(res.error(), key_errc::signature_mismatch)
      << t.what << ": " << describe(res.error());
  }
  auto recid = hsm::crypto::recovery_id(scheme::ed25519, key.public_key,
                                        message, raw_ecdsa{});
  EXPECT_FALSE(recid);
}

// -- public key fingerprints --------------------------------------------------

// Expected values computed outside the driver, with the openssl command line:
//   echo -n <hex> | xxd -r -p | openssl dgst -sha256

TEST(FingerprintTest, KnownAnswerForTheSecp256k1GeneratorUncompressed) {
  auto g = hsm::crypto::from_hex(
    "0479be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    "483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8");
  ASSERT_TRUE(g);
  ASSERT_EQ(g->size(), 65u);
  EXPECT_EQ(hsm::crypto::public_key_fingerprint(*g),
            "sha256:50929b74c1a04954b78b4b6035e97a5e"
            "078a5a0f28ec96d547bfee9ace803ac0");
}

TEST(FingerprintTest, KnownAnswerForAnEd25519Key) {
  // RFC 8032, section 7.1, TEST 1: the public key.
  auto pub = hsm::crypto::from_hex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  ASSERT_TRUE(pub);
  EXPECT_EQ(hsm::crypto::public_key_fingerprint(*pub),
            "sha256:21fe31dfa154a261626bf854046fd227"
            "1b7bed4b6abe45aa58877ef47f9721b9");
}

TEST(FingerprintTest, DependsOnEveryByteAndOnTheForm) {
  auto g = *hsm::crypto::from_hex(
    "0479be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    "483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8");
  auto fp = hsm::crypto::public_key_fingerprint(g);
  EXPECT_EQ(fp.size(), 7u + 64u);
  auto last = g;
  last.back() ^= 1;
  EXPECT_NE(hsm::crypto::public_key_fingerprint(last), fp);
  // The compressed form is another byte string: another fingerprint.
  auto compressed = hsm::crypto::compress_public_key(scheme::secp256k1, g);
  ASSERT_TRUE(compressed);
  EXPECT_NE(hsm::crypto::public_key_fingerprint(*compressed), fp);
}

} // namespace
