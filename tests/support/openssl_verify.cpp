#include "tests/support/openssl_verify.hpp"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/sha.h>

#include <memory>

namespace hsm::test {

namespace {

struct pkey_free {
  void operator()(EVP_PKEY* p) const {
    EVP_PKEY_free(p);
  }
};
struct pctx_free {
  void operator()(EVP_PKEY_CTX* p) const {
    EVP_PKEY_CTX_free(p);
  }
};
struct mdctx_free {
  void operator()(EVP_MD_CTX* p) const {
    EVP_MD_CTX_free(p);
  }
};

std::unique_ptr<EVP_PKEY, pkey_free> ec_key(scheme s,
                                            std::span<const uint8_t> pub) {
  const char* group = s == scheme::secp256k1 ? "secp256k1" : "prime256v1";
  OSSL_PARAM params[] = {
    OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                     const_cast<char*>(group), 0),
    OSSL_PARAM_construct_octet_string(
      OSSL_PKEY_PARAM_PUB_KEY, const_cast<uint8_t*>(pub.data()), pub.size()),
    OSSL_PARAM_construct_end()};
  std::unique_ptr<EVP_PKEY_CTX, pctx_free> ctx{
    EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr)};
  EVP_PKEY* key = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) <= 0
      || EVP_PKEY_fromdata(ctx.get(), &key, EVP_PKEY_PUBLIC_KEY, params) <= 0)
    return nullptr;
  return std::unique_ptr<EVP_PKEY, pkey_free>{key};
}

} // namespace

bool openssl_verify(scheme s, std::span<const uint8_t> public_key,
                    std::span<const uint8_t> payload,
                    std::span<const uint8_t> sig) {
  if (s == scheme::ed25519) {
    std::unique_ptr<EVP_PKEY, pkey_free> key{EVP_PKEY_new_raw_public_key(
      EVP_PKEY_ED25519, nullptr, public_key.data(), public_key.size())};
    std::unique_ptr<EVP_MD_CTX, mdctx_free> md{EVP_MD_CTX_new()};
    if (!key || !md
        || EVP_DigestVerifyInit(md.get(), nullptr, nullptr, nullptr, key.get())
             != 1)
      return false;
    return EVP_DigestVerify(md.get(), sig.data(), sig.size(), payload.data(),
                            payload.size())
           == 1;
  }
  auto key = ec_key(s, public_key);
  if (!key)
    return false;
  std::unique_ptr<EVP_PKEY_CTX, pctx_free> ctx{
    EVP_PKEY_CTX_new(key.get(), nullptr)};
  if (!ctx || EVP_PKEY_verify_init(ctx.get()) != 1)
    return false;
  return EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(), payload.data(),
                         payload.size())
         == 1;
}

bool is_low_s_secp256k1(std::span<const uint8_t> rs) {
  // n/2 of secp256k1.
  static const char* half_n
    = "7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0";
  BIGNUM* half = nullptr;
  BN_hex2bn(&half, half_n);
  BIGNUM* s = BN_bin2bn(rs.data() + 32, 32, nullptr);
  bool low = BN_cmp(s, half) <= 0;
  BN_free(s);
  BN_free(half);
  return low;
}

std::vector<uint8_t> sha256(std::string_view text) {
  std::vector<uint8_t> out(SHA256_DIGEST_LENGTH);
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(),
         out.data());
  return out;
}

} // namespace hsm::test
