#pragma once

// Owning pointers for OpenSSL objects: one `unique_ptr` alias per type, so
// that every object is freed on every path. Header-only; any thread.

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

namespace hsm::crypto {

/// Calls `Free` on the pointer (OpenSSL's `*_free` functions accept null).
template <auto Free>
struct ossl_deleter {
  template <class T>
  void operator()(T* ptr) const {
    Free(ptr);
  }
};

using bn_ptr = std::unique_ptr<BIGNUM, ossl_deleter<BN_free>>;
using bn_ctx_ptr = std::unique_ptr<BN_CTX, ossl_deleter<BN_CTX_free>>;
using group_ptr = std::unique_ptr<EC_GROUP, ossl_deleter<EC_GROUP_free>>;
using point_ptr = std::unique_ptr<EC_POINT, ossl_deleter<EC_POINT_free>>;
using ecdsa_sig_ptr = std::unique_ptr<ECDSA_SIG, ossl_deleter<ECDSA_SIG_free>>;
using pkey_ptr = std::unique_ptr<EVP_PKEY, ossl_deleter<EVP_PKEY_free>>;
using pkey_ctx_ptr
  = std::unique_ptr<EVP_PKEY_CTX, ossl_deleter<EVP_PKEY_CTX_free>>;
using md_ctx_ptr = std::unique_ptr<EVP_MD_CTX, ossl_deleter<EVP_MD_CTX_free>>;
using param_bld_ptr
  = std::unique_ptr<OSSL_PARAM_BLD, ossl_deleter<OSSL_PARAM_BLD_free>>;
using x509_ptr = std::unique_ptr<X509, ossl_deleter<X509_free>>;
using bio_ptr = std::unique_ptr<BIO, ossl_deleter<BIO_free_all>>;
using asn1_int_ptr
  = std::unique_ptr<ASN1_INTEGER, ossl_deleter<ASN1_INTEGER_free>>;
using ext_ptr
  = std::unique_ptr<X509_EXTENSION, ossl_deleter<X509_EXTENSION_free>>;
using names_ptr
  = std::unique_ptr<GENERAL_NAMES, ossl_deleter<GENERAL_NAMES_free>>;

} // namespace hsm::crypto
