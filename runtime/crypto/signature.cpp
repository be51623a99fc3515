#include "runtime/crypto/signature.hpp"

#include "runtime/crypto/fingerprint.hpp"
#include "runtime/crypto/ossl.hpp"

#include "caf/sec.hpp"
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/param_build.h>
#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include <algorithm>
#include <memory>
#include <string>

namespace hsm::crypto {

namespace {

// -- OpenSSL and libsecp256k1 ownership (common ones: ossl.hpp) --------------

using params_ptr = std::unique_ptr<OSSL_PARAM, ossl_deleter<OSSL_PARAM_free>>;
using secp_ctx_ptr
  = std::unique_ptr<secp256k1_context, ossl_deleter<secp256k1_context_destroy>>;

// -- constants ----------------------------------------------------------------

constexpr size_t scalar_size = 32;
constexpr size_t hash_size = 32;
constexpr size_t raw_size = 2 * scalar_size;
constexpr size_t ed25519_key_size = 32;
constexpr size_t ed25519_sig_size = 64;
constexpr size_t uncompressed_size = 65;
constexpr size_t compressed_size = 33;

/// Far above the 72 bytes a DER signature on a 256-bit curve can take; only
/// keeps the length cast to `long` trivially safe.
constexpr size_t max_der_size = 1024;

// -- helpers ------------------------------------------------------------------

caf::error mismatch(std::string what) {
  return caf::make_error(key_errc::signature_mismatch, std::move(what));
}

std::string name_of(scheme s) {
  return std::string{to_string(s)};
}

/// The shared libsecp256k1 context: created on first use (thread-safe static
/// initialisation) and only read afterwards, which libsecp256k1 allows from
/// any number of threads. Verification and recovery need no randomisation.
const secp256k1_context* secp_context() {
  static const secp_ctx_ptr ctx{secp256k1_context_create(
    SECP256K1_CONTEXT_SIGN | SECP256K1_CONTEXT_VERIFY)};
  return ctx.get();
}

group_ptr make_group(scheme s) {
  auto nid = s == scheme::secp256k1 ? NID_secp256k1 : NID_X9_62_prime256v1;
  return group_ptr{EC_GROUP_new_by_curve_name(nid)};
}

bn_ptr to_bn(std::span<const uint8_t> bytes) {
  return bn_ptr{
    BN_bin2bn(bytes.data(), static_cast<int>(bytes.size()), nullptr)};
}

/// Writes `x` big-endian, left-padded to `out.size()`; false if it is too
/// large.
bool to_bytes(const BIGNUM* x, std::span<uint8_t> out) {
  auto size = static_cast<int>(out.size());
  return BN_bn2binpad(x, out.data(), size) == size;
}

bool is_ec_key_size(size_t size) {
  return size == uncompressed_size || size == compressed_size;
}

// -- verification -------------------------------------------------------------

bool verify_secp256k1(std::span<const uint8_t> public_key,
                      std::span<const uint8_t> hash, const uint8_t* sig64) {
  // libsecp256k1 aborts on null arguments, so every span is checked non-empty
  // (by size) before its data() reaches the library.
  const auto* ctx = secp_context();
  if (ctx == nullptr || !is_ec_key_size(public_key.size()))
    return false;
  secp256k1_pubkey key;
  if (secp256k1_ec_pubkey_parse(ctx, &key, public_key.data(), public_key.size())
      != 1)
    return false;
  secp256k1_ecdsa_signature parsed;
  if (secp256k1_ecdsa_signature_parse_compact(ctx, &parsed, sig64) != 1)
    return false;
  return secp256k1_ecdsa_verify(ctx, &parsed, hash.data(), &key) == 1;
}

/// An EVP_PKEY for a P-256 public key (SEC1, either form); null if OpenSSL
/// does not accept the point.
pkey_ptr p256_public_key(std::span<const uint8_t> public_key) {
  if (!is_ec_key_size(public_key.size()))
    return nullptr;
  param_bld_ptr bld{OSSL_PARAM_BLD_new()};
  if (!bld
      || OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                         SN_X9_62_prime256v1, 0)
           != 1
      || OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                          public_key.data(), public_key.size())
           != 1)
    return nullptr;
  params_ptr params{OSSL_PARAM_BLD_to_param(bld.get())};
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr)};
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1
      || EVP_PKEY_fromdata(ctx.get(), &key, EVP_PKEY_PUBLIC_KEY, params.get())
           != 1)
    return nullptr;
  return pkey_ptr{key};
}

bool verify_p256(std::span<const uint8_t> public_key,
                 std::span<const uint8_t> hash, const raw_ecdsa& sig) {
  auto key = p256_public_key(public_key);
  if (!key)
    return false;
  auto der = to_der(sig);
  if (der.empty())
    return false;
  // No digest is set on the context: the 32 bytes are the digest already.
  pkey_ctx_ptr ctx{EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr)};
  return ctx && EVP_PKEY_verify_init(ctx.get()) == 1
         && EVP_PKEY_verify(ctx.get(), der.data(), der.size(), hash.data(),
                            hash.size())
              == 1;
}

bool verify_ed25519(std::span<const uint8_t> public_key,
                    std::span<const uint8_t> message,
                    std::span<const uint8_t> sig) {
  if (public_key.size() != ed25519_key_size || sig.size() != ed25519_sig_size)
    return false;
  pkey_ptr key{EVP_PKEY_new_raw_public_key(
    EVP_PKEY_ED25519, nullptr, public_key.data(), public_key.size())};
  md_ctx_ptr ctx{EVP_MD_CTX_new()};
  if (!key || !ctx
      || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key.get())
           != 1)
    return false;
  // An empty span may carry a null pointer; hand OpenSSL a valid one.
  static constexpr uint8_t no_data = 0;
  const auto* data = message.empty() ? &no_data : message.data();
  return EVP_DigestVerify(ctx.get(), sig.data(), sig.size(), data,
                          message.size())
         == 1;
}

// -- recovery id --------------------------------------------------------------

caf::expected<int> recovery_id_secp256k1(std::span<const uint8_t> public_key,
                                         std::span<const uint8_t> hash,
                                         const raw_ecdsa& sig) {
  const auto* ctx = secp_context();
  if (ctx == nullptr)
    return mismatch("secp256k1: cannot create a libsecp256k1 context");
  // Compare in the uncompressed encoding, whatever form the key came in.
  secp256k1_pubkey key;
  if (!is_ec_key_size(public_key.size())
      || secp256k1_ec_pubkey_parse(ctx, &key, public_key.data(),
                                   public_key.size())
           != 1)
    return caf::make_error(key_errc::key_corrupted,
                           std::string{"secp256k1: bad public key"});
  std::array<uint8_t, uncompressed_size> want{};
  auto want_size = want.size();
  secp256k1_ec_pubkey_serialize(ctx, want.data(), &want_size, &key,
                                SECP256K1_EC_UNCOMPRESSED);
  for (int recid = 0; recid < 4; ++recid) {
    secp256k1_ecdsa_recoverable_signature rsig;
    if (secp256k1_ecdsa_recoverable_signature_parse_compact(ctx, &rsig,
                                                            sig.data(), recid)
        != 1)
      return mismatch("secp256k1: r or s is out of range");
    secp256k1_pubkey got_key;
    if (secp256k1_ecdsa_recover(ctx, &got_key, &rsig, hash.data()) != 1)
      continue;
    std::array<uint8_t, uncompressed_size> got{};
    auto got_size = got.size();
    secp256k1_ec_pubkey_serialize(ctx, got.data(), &got_size, &got_key,
                                  SECP256K1_EC_UNCOMPRESSED);
    if (got == want)
      return recid;
  }
  return mismatch("secp256k1: no recovery id yields the public key");
}

caf::expected<int> recovery_id_p256(std::span<const uint8_t> public_key,
                                    std::span<const uint8_t> hash,
                                    const raw_ecdsa& sig) {
  auto group = make_group(scheme::p256);
  bn_ctx_ptr ctx{BN_CTX_new()};
  if (!group || !ctx)
    return mismatch("p256: OpenSSL cannot set up the curve");
  point_ptr q{EC_POINT_new(group.get())};
  if (!q || !is_ec_key_size(public_key.size())
      || EC_POINT_oct2point(group.get(), q.get(), public_key.data(),
                            public_key.size(), ctx.get())
           != 1) {
    ERR_clear_error();
    return caf::make_error(key_errc::key_corrupted,
                           std::string{"p256: bad public key"});
  }
  const auto* n = EC_GROUP_get0_order(group.get());
  auto sig_bytes = std::span<const uint8_t>{sig};
  auto r = to_bn(sig_bytes.first(scalar_size));
  auto s = to_bn(sig_bytes.last(scalar_size));
  auto e = to_bn(hash);
  bn_ptr s_inv{BN_new()};
  bn_ptr u1{BN_new()};
  bn_ptr u2{BN_new()};
  bn_ptr x{BN_new()};
  bn_ptr y{BN_new()};
  bn_ptr x_mod_n{BN_new()};
  point_ptr big_r{EC_POINT_new(group.get())};
  if (!r || !s || !e || !s_inv || !u1 || !u2 || !x || !y || !x_mod_n || !big_r)
    return mismatch("p256: out of memory");
  if (BN_is_zero(r.get()) || BN_is_zero(s.get()) || BN_cmp(r.get(), n) >= 0
      || BN_cmp(s.get(), n) >= 0)
    return mismatch("p256: r or s is out of range");
  // R = u1*G + u2*Q with u1 = e/s, u2 = r/s is the signer's k*G (or its
  // negation, for the other s), so R tells both bits of the recovery id.
  if (BN_mod_inverse(s_inv.get(), s.get(), n, ctx.get()) == nullptr
      || BN_mod_mul(u1.get(), e.get(), s_inv.get(), n, ctx.get()) != 1
      || BN_mod_mul(u2.get(), r.get(), s_inv.get(), n, ctx.get()) != 1
      || EC_POINT_mul(group.get(), big_r.get(), u1.get(), q.get(), u2.get(),
                      ctx.get())
           != 1) {
    ERR_clear_error();
    return mismatch("p256: cannot compute R");
  }
  if (EC_POINT_is_at_infinity(group.get(), big_r.get()) == 1
      || EC_POINT_get_affine_coordinates(group.get(), big_r.get(), x.get(),
                                         y.get(), ctx.get())
           != 1
      || BN_nnmod(x_mod_n.get(), x.get(), n, ctx.get()) != 1
      || BN_cmp(x_mod_n.get(), r.get()) != 0) {
    ERR_clear_error();
    return mismatch("p256: signature does not match the public key");
  }
  int recid = BN_is_odd(y.get()) ? 1 : 0;
  if (BN_cmp(x.get(), n) >= 0)
    recid |= 2;
  return recid;
}

} // namespace

caf::expected<raw_ecdsa> parse_ecdsa(std::span<const uint8_t> from_token) {
  raw_ecdsa out{};
  if (from_token.size() == raw_size) {
    std::copy(from_token.begin(), from_token.end(), out.begin());
    return out;
  }
  if (from_token.empty() || from_token.size() > max_der_size)
    return mismatch("ecdsa: token returned " + std::to_string(from_token.size())
                    + " bytes, neither raw r||s nor DER");
  const auto* begin = from_token.data();
  const auto* pos = begin;
  ecdsa_sig_ptr sig{
    d2i_ECDSA_SIG(nullptr, &pos, static_cast<long>(from_token.size()))};
  if (!sig) {
    ERR_clear_error();
    return mismatch("ecdsa: token signature is neither raw r||s nor DER");
  }
  if (pos != begin + from_token.size())
    return mismatch("ecdsa: trailing bytes after the DER signature");
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(sig.get(), &r, &s);
  auto out_span = std::span<uint8_t>{out};
  if (BN_is_negative(r) || BN_is_negative(s)
      || !to_bytes(r, out_span.first(scalar_size))
      || !to_bytes(s, out_span.last(scalar_size)))
    return mismatch("ecdsa: DER r or s does not fit 32 bytes");
  return out;
}

bool normalize_low_s(scheme s, raw_ecdsa& sig) {
  if (!is_ecdsa(s))
    return false;
  auto group = make_group(s);
  if (!group)
    return false;
  const auto* n = EC_GROUP_get0_order(group.get());
  auto s_part = std::span<uint8_t>{sig}.last(scalar_size);
  auto value = to_bn(s_part);
  bn_ptr half{BN_new()};
  bn_ptr flipped{BN_new()};
  if (!value || !half || !flipped || BN_rshift1(half.get(), n) != 1)
    return false;
  // s >= n is no signature at all; leave it for verification to reject.
  if (BN_cmp(value.get(), half.get()) <= 0 || BN_cmp(value.get(), n) >= 0)
    return false;
  if (BN_sub(flipped.get(), n, value.get()) != 1)
    return false;
  return to_bytes(flipped.get(), s_part);
}

std::vector<uint8_t> to_der(const raw_ecdsa& sig) {
  auto bytes = std::span<const uint8_t>{sig};
  ecdsa_sig_ptr obj{ECDSA_SIG_new()};
  auto r = to_bn(bytes.first(scalar_size));
  auto s = to_bn(bytes.last(scalar_size));
  if (!obj || !r || !s || ECDSA_SIG_set0(obj.get(), r.get(), s.get()) != 1)
    return {};
  // set0 took ownership of both.
  static_cast<void>(r.release());
  static_cast<void>(s.release());
  auto size = i2d_ECDSA_SIG(obj.get(), nullptr);
  if (size <= 0)
    return {};
  std::vector<uint8_t> out(static_cast<size_t>(size));
  auto* pos = out.data();
  if (i2d_ECDSA_SIG(obj.get(), &pos) != size)
    return {};
  return out;
}

bool verify(scheme s, std::span<const uint8_t> public_key,
            std::span<const uint8_t> payload, std::span<const uint8_t> sig) {
  bool ok = false;
  switch (s) {
    case scheme::secp256k1:
      ok = payload.size() == hash_size && sig.size() == raw_size
           && verify_secp256k1(public_key, payload, sig.data());
      break;
    case scheme::p256:
      if (payload.size() == hash_size && sig.size() == raw_size) {
        raw_ecdsa raw{};
        std::copy(sig.begin(), sig.end(), raw.begin());
        ok = verify_p256(public_key, payload, raw);
      }
      break;
    case scheme::ed25519:
      ok = verify_ed25519(public_key, payload, sig);
      break;
  }
  // A failed verification leaves reasons on the thread's OpenSSL error
  // queue; the answer is the bool, so do not leak them to the next caller.
  if (!ok)
    ERR_clear_error();
  return ok;
}

caf::expected<int> recovery_id(scheme s, std::span<const uint8_t> public_key,
                               std::span<const uint8_t> hash,
                               const raw_ecdsa& sig) {
  if (!is_ecdsa(s))
    return caf::make_error(key_errc::scheme_unsupported,
                           name_of(s) + ": no recovery id");
  if (hash.size() != hash_size)
    return caf::make_error(key_errc::invalid_payload,
                           name_of(s) + ": hash has "
                             + std::to_string(hash.size())
                             + " bytes, expected 32");
  if (s == scheme::secp256k1)
    return recovery_id_secp256k1(public_key, hash, sig);
  return recovery_id_p256(public_key, hash, sig);
}

caf::expected<signature> finish_signature(scheme s,
                                          std::span<const uint8_t> public_key,
                                          std::span<const uint8_t> payload,
                                          std::span<const uint8_t> from_token) {
  auto name = name_of(s);
  if (s == scheme::ed25519) {
    if (from_token.size() != ed25519_sig_size)
      return mismatch(name + ": token returned "
                      + std::to_string(from_token.size())
                      + " bytes, expected 64");
    if (!verify(s, public_key, payload, from_token))
      return mismatch(name
                      + ": signature does not verify against the stored"
                        " public key");
    return signature{{from_token.begin(), from_token.end()},
                     std::nullopt,
                     {},
                     public_key_fingerprint(public_key)};
  }
  if (!is_ecdsa(s))
    return caf::make_error(key_errc::scheme_unsupported,
                           std::string{"finish_signature: unknown scheme"});
  if (payload.size() != hash_size)
    return caf::make_error(key_errc::invalid_payload,
                           name + ": payload has "
                             + std::to_string(payload.size())
                             + " bytes, expected a 32-byte hash");
  auto sig = parse_ecdsa(from_token);
  if (!sig)
    return sig.error();
  // Strict verifiers (Bitcoin, Ethereum) reject high s; P-256 users do not
  // expect it changed.
  if (s == scheme::secp256k1)
    normalize_low_s(s, *sig);
  if (!verify(s, public_key, payload, *sig))
    return mismatch(name
                    + ": signature does not verify against the stored"
                      " public key");
  auto recid = recovery_id(s, public_key, payload, *sig);
  if (!recid)
    return recid.error();
  auto der = to_der(*sig);
  if (der.empty())
    return caf::make_error(caf::sec::runtime_error,
                           name + ": OpenSSL cannot DER-encode the signature");
  return signature{{sig->begin(), sig->end()},
                   *recid,
                   std::move(der),
                   public_key_fingerprint(public_key)};
}

} // namespace hsm::crypto
