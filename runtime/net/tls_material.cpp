#include "runtime/net/tls_material.hpp"

#include "runtime/net/x509_util.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <utility>

namespace hsm::net {

namespace {

using crypto::x509_ptr;
using store_ptr
  = std::unique_ptr<X509_STORE, crypto::ossl_deleter<X509_STORE_free>>;
using store_ctx_ptr
  = std::unique_ptr<X509_STORE_CTX, crypto::ossl_deleter<X509_STORE_CTX_free>>;
struct stack_free {
  void operator()(STACK_OF(X509) * s) const {
    sk_X509_pop_free(s, X509_free);
  }
};
using x509_stack_ptr = std::unique_ptr<STACK_OF(X509), stack_free>;

/// A chain is not followed past this many intermediates.
constexpr size_t max_chain_depth = 8;

constexpr std::string_view client_whose = "client certificate";

/// The certificate among `pool` that issued `cert`, if any (not `cert`
/// itself, not a self-signed root).
X509* issuer_in(X509* cert, const std::vector<x509_ptr>& pool) {
  for (const auto& c : pool)
    if (c.get() != cert && !self_signed(c.get())
        && X509_check_issued(c.get(), cert) == X509_V_OK)
      return c.get();
  return nullptr;
}

/// "the intermediate certificate 'CN=...'" for messages about depth > 0.
std::string which(X509* cert, int depth) {
  if (cert == nullptr)
    return "a certificate of the chain";
  auto subject = name_line(X509_get_subject_name(cert));
  return depth == 0 ? "the certificate '" + subject + "'"
                    : "the chain's certificate '" + subject + "' (depth "
                        + std::to_string(depth) + ")";
}

bool has_eku(const cert_info& info, std::string_view eku) {
  return std::find(info.ekus.begin(), info.ekus.end(), eku) != info.ekus.end();
}

} // namespace

// -- causes -------------------------------------------------------------------

const char* to_string(cert_cause x) {
  switch (x) {
    case cert_cause::ok:
      return "ok";
    case cert_cause::unreadable:
      return "unreadable";
    case cert_cause::wrong_ca:
      return "wrong_ca";
    case cert_cause::expired:
      return "expired";
    case cert_cause::not_yet_valid:
      return "not_yet_valid";
    case cert_cause::wrong_eku:
      return "wrong_eku";
    case cert_cause::key_mismatch:
      return "key_mismatch";
    case cert_cause::wrong_server_name:
      return "wrong_server_name";
    case cert_cause::other:
      return "other";
  }
  return "other";
}

caf::error cert_error(std::string_view whose, cert_cause cause,
                      std::string detail) {
  return caf::make_error(net_errc::tls_failed, std::string{whose},
                         std::string{to_string(cause)}, std::move(detail));
}

cert_cause cause_of(const caf::error& err) {
  if (err.category() != caf::atom("net")
      || err.code() != static_cast<uint8_t>(net_errc::tls_failed)
      || err.context().size() < 2
      || !err.context().match_element<std::string>(1))
    return cert_cause::other;
  const auto& name = err.context().get_as<std::string>(1);
  for (auto c :
       {cert_cause::ok, cert_cause::unreadable, cert_cause::wrong_ca,
        cert_cause::expired, cert_cause::not_yet_valid, cert_cause::wrong_eku,
        cert_cause::key_mismatch, cert_cause::wrong_server_name})
    if (name == to_string(c))
      return c;
  return cert_cause::other;
}

cert_cause cause_of_verify_result(long code) {
  switch (code) {
    case X509_V_OK:
      return cert_cause::ok;
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CRL_HAS_EXPIRED:
      return cert_cause::expired;
    case X509_V_ERR_CERT_NOT_YET_VALID:
    case X509_V_ERR_CRL_NOT_YET_VALID:
      return cert_cause::not_yet_valid;
    case X509_V_ERR_INVALID_PURPOSE:
      return cert_cause::wrong_eku;
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
      return cert_cause::wrong_server_name;
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
    case X509_V_ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE:
    case X509_V_ERR_CERT_UNTRUSTED:
    case X509_V_ERR_CERT_REJECTED:
    case X509_V_ERR_INVALID_CA:
    case X509_V_ERR_PATH_LENGTH_EXCEEDED:
    case X509_V_ERR_PERMITTED_VIOLATION:
    case X509_V_ERR_EXCLUDED_VIOLATION:
      return cert_cause::wrong_ca;
    default:
      return cert_cause::other;
  }
}

// -- client_tls ---------------------------------------------------------------

client_tls::~client_tls() {
  if (!key_pem.empty())
    OPENSSL_cleanse(key_pem.data(), key_pem.size());
}

caf::expected<std::shared_ptr<const client_tls>>
load_client_tls(const tls_files& files, const client_tls_options& opts) {
  auto at = opts.at != 0 ? opts.at : std::time(nullptr);
  auto out = std::make_shared<client_tls>();
  out->files = files;
  // -- read -------------------------------------------------------------------
  auto ca_text = read_small_file(files.ca_cert, "--ca-cert");
  if (!ca_text)
    return ca_text.error();
  auto cert_text = read_small_file(files.cert, "--client-cert");
  if (!cert_text)
    return cert_text.error();
  auto key_text = read_key_file(files.key, "--client-key",
                                key_sharing::group_read);
  if (!key_text)
    return key_text.error();
  out->key_pem = std::move(*key_text);
  OPENSSL_cleanse(key_text->data(), key_text->size());
  auto ca = read_certs(*ca_text);
  if (ca.empty())
    return cert_error("--ca-cert", cert_cause::unreadable,
                      "'" + files.ca_cert.string() + "' holds no certificate");
  auto own = read_certs(*cert_text);
  if (own.empty())
    return cert_error("--client-cert", cert_cause::unreadable,
                      "'" + files.cert.string() + "' holds no certificate");
  auto key = read_key(out->key_pem);
  if (!key)
    return cert_error("--client-key", cert_cause::unreadable,
                      "'" + files.key.string()
                        + "' holds no unencrypted private key in PEM");
  // Only the roots anchor the proxy's chain: a customer's intermediate in
  // the same file (the runbook's layout) is there to complete the driver's
  // own chain, and must not let whoever holds its key pose as the proxy.
  for (const auto& c : ca)
    if (self_signed(c.get()))
      out->ca_pem += to_pem(c.get());
  if (out->ca_pem.empty()) // refused below when checked
    out->ca_pem = std::move(*ca_text);
  // -- the chain to send: the leaf, then each issuer found ------------------
  std::vector<x509_ptr> pool;
  for (size_t i = 1; i < own.size(); ++i)
    pool.emplace_back(X509_dup(own[i].get()));
  for (const auto& c : ca)
    pool.emplace_back(X509_dup(c.get()));
  X509* leaf = own.front().get();
  std::vector<X509*> sent{leaf};
  while (sent.size() <= max_chain_depth) {
    auto* next = issuer_in(sent.back(), pool);
    if (next == nullptr
        || std::find(sent.begin(), sent.end(), next) != sent.end())
      break;
    sent.push_back(next);
  }
  for (auto* c : sent) {
    out->chain_pem += to_pem(c);
    out->chain.push_back(info_of(c, at));
  }
  out->leaf = out->chain.front();
  if (!opts.verify)
    return std::shared_ptr<const client_tls>{std::move(out)};
  // -- checks -----------------------------------------------------------------
  auto whose = client_whose;
  if (X509_check_private_key(leaf, key.get()) != 1) {
    ERR_clear_error();
    return cert_error(whose, cert_cause::key_mismatch,
                      "the key in '" + files.key.string()
                        + "' is not the key of the certificate '"
                        + out->leaf.subject + "' in '" + files.cert.string()
                        + "'");
  }
  if (!has_eku(out->leaf, "clientAuth"))
    return cert_error(whose, cert_cause::wrong_eku,
                      "the certificate '" + out->leaf.subject
                        + "' has no extendedKeyUsage clientAuth"
                        + (out->leaf.ekus.empty()
                             ? std::string{}
                             : " (it has " + out->leaf.ekus.front() + ")"));
  store_ptr store{X509_STORE_new()};
  store_ctx_ptr ctx{X509_STORE_CTX_new()};
  x509_stack_ptr untrusted{sk_X509_new_null()};
  if (!store || !ctx || !untrusted)
    return cert_error(whose, cert_cause::other, "out of memory");
  size_t roots = 0;
  for (const auto& c : ca) {
    if (self_signed(c.get())) {
      X509_STORE_add_cert(store.get(), c.get());
      ++roots;
    }
  }
  if (roots == 0)
    return cert_error(whose, cert_cause::wrong_ca,
                      "'" + files.ca_cert.string()
                        + "' holds no root (self-signed) certificate");
  for (const auto& c : pool)
    if (!self_signed(c.get()) && X509_up_ref(c.get()) == 1)
      sk_X509_push(untrusted.get(), c.get());
  if (X509_STORE_CTX_init(ctx.get(), store.get(), leaf, untrusted.get()) != 1)
    return cert_error(whose, cert_cause::other, "cannot set up the check");
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  X509_VERIFY_PARAM_set_time(X509_STORE_CTX_get0_param(ctx.get()), at);
  if (X509_verify_cert(ctx.get()) != 1) {
    auto code = X509_STORE_CTX_get_error(ctx.get());
    auto depth = X509_STORE_CTX_get_error_depth(ctx.get());
    auto* bad = X509_STORE_CTX_get_current_cert(ctx.get());
    auto cause = cause_of_verify_result(code);
    std::string detail = which(bad, depth) + ": "
                         + X509_verify_cert_error_string(code);
    if (bad != nullptr && cause == cert_cause::expired)
      detail += " (notAfter " + iso_time(X509_get0_notAfter(bad)) + ")";
    if (bad != nullptr && cause == cert_cause::not_yet_valid)
      detail += " (notBefore " + iso_time(X509_get0_notBefore(bad)) + ")";
    if (cause == cert_cause::wrong_ca)
      detail += "; the chain must reach a root in '" + files.ca_cert.string()
                + "'";
    ERR_clear_error();
    return cert_error(whose,
                      cause == cert_cause::other ? cert_cause::wrong_ca : cause,
                      std::move(detail));
  }
  // The verified chain, for the report: what was sent, then the root.
  x509_stack_ptr verified{X509_STORE_CTX_get1_chain(ctx.get())};
  if (verified && sk_X509_num(verified.get()) > 0) {
    auto* top = sk_X509_value(verified.get(), sk_X509_num(verified.get()) - 1);
    if (self_signed(top))
      out->chain.push_back(info_of(top, at));
  }
  return std::shared_ptr<const client_tls>{std::move(out)};
}

// -- tls_source ---------------------------------------------------------------

tls_source::tls_source(std::shared_ptr<const client_tls> first)
  : current_(std::move(first)) {
  // nop
}

std::pair<std::shared_ptr<const client_tls>, uint64_t>
tls_source::current() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return {current_, generation_};
}

void tls_source::replace(std::shared_ptr<const client_tls> next) {
  std::lock_guard<std::mutex> guard{mtx_};
  current_ = std::move(next);
  ++generation_;
}

} // namespace hsm::net
