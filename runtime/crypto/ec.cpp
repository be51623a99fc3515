#include "runtime/crypto/ec.hpp"

#include "runtime/crypto/ossl.hpp"

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/obj_mac.h>
#include <sodium.h>

#include <memory>
#include <string>

namespace hsm::crypto {

namespace {

// -- helpers ------------------------------------------------------------------

constexpr size_t uncompressed_size = 65;
constexpr size_t compressed_size = 33;
constexpr size_t ed25519_size = 32;
constexpr uint8_t der_octet_string = 0x04;

caf::error corrupted(std::string what) {
  return caf::make_error(key_errc::key_corrupted, std::move(what));
}

group_ptr make_group(scheme s) {
  auto nid = s == scheme::secp256k1 ? NID_secp256k1 : NID_X9_62_prime256v1;
  return group_ptr{EC_GROUP_new_by_curve_name(nid)};
}

/// Decodes a SEC1 point (compressed or uncompressed) on `s`'s curve and
/// re-encodes it in `form`. Rejects points off the curve.
caf::expected<std::vector<uint8_t>> reencode(scheme s,
                                             std::span<const uint8_t> encoded,
                                             point_conversion_form_t form) {
  auto name = std::string{to_string(s)};
  auto group = make_group(s);
  bn_ctx_ptr ctx{BN_CTX_new()};
  if (!group || !ctx)
    return corrupted(name + ": OpenSSL cannot set up the curve");
  point_ptr point{EC_POINT_new(group.get())};
  if (!point)
    return corrupted(name + ": OpenSSL cannot allocate a point");
  if (EC_POINT_oct2point(group.get(), point.get(), encoded.data(),
                         encoded.size(), ctx.get())
        != 1
      || EC_POINT_is_on_curve(group.get(), point.get(), ctx.get()) != 1
      || EC_POINT_is_at_infinity(group.get(), point.get()) == 1) {
    // oct2point leaves the reason on the thread's queue; it is reported
    // through the error value, so do not leak it to the next OpenSSL user.
    ERR_clear_error();
    return corrupted(name + ": public key is not a point on the curve");
  }
  auto expected_size = form == POINT_CONVERSION_COMPRESSED ? compressed_size
                                                           : uncompressed_size;
  std::vector<uint8_t> out(expected_size);
  auto n = EC_POINT_point2oct(group.get(), point.get(), form, out.data(),
                              out.size(), ctx.get());
  if (n != expected_size) {
    ERR_clear_error();
    return corrupted(name + ": cannot encode the public key");
  }
  return out;
}

/// libsodium's check: a canonical encoding of a point on the curve, in the
/// prime-order subgroup, not of small order (32 zero bytes, the identity,
/// ... are refused).
bool valid_ed25519_point(std::span<const uint8_t> point) {
  static const bool ready = sodium_init() >= 0;
  return ready && point.size() == crypto_core_ed25519_BYTES
         && crypto_core_ed25519_is_valid_point(point.data()) == 1;
}

} // namespace

caf::expected<std::vector<uint8_t>>
parse_ec_point(scheme s, std::span<const uint8_t> ec_point) {
  auto name = std::string{to_string(s)};
  auto size = ec_point.size();
  if (s == scheme::ed25519) {
    // DER OCTET STRING of 32 bytes, or the 32 bytes themselves.
    if (size == ed25519_size + 2 && ec_point[0] == der_octet_string
        && ec_point[1] == ed25519_size)
      ec_point = ec_point.subspan(2);
    else if (size != ed25519_size)
      return corrupted(name + ": CKA_EC_POINT has " + std::to_string(size)
                       + " bytes, expected 32 or 34");
    if (!valid_ed25519_point(ec_point))
      return corrupted(name
                       + ": the public key is not a valid point (off "
                         "the curve, not canonical, or of small "
                         "order)");
    return std::vector<uint8_t>(ec_point.begin(), ec_point.end());
  }
  if (!is_ecdsa(s))
    return caf::make_error(key_errc::scheme_unsupported,
                           std::string{"parse_ec_point: unknown scheme"});
  // Strip a DER OCTET STRING around an uncompressed or compressed point. The
  // lengths tell the forms apart: a bare point is 65 or 33 bytes.
  if ((size == uncompressed_size + 2 && ec_point[0] == der_octet_string
       && ec_point[1] == uncompressed_size)
      || (size == compressed_size + 2 && ec_point[0] == der_octet_string
          && ec_point[1] == compressed_size))
    ec_point = ec_point.subspan(2);
  // Insist on the SEC1 tag: oct2point would also take hybrid (06/07) points,
  // which no token should produce.
  if (ec_point.size() == uncompressed_size) {
    if (ec_point[0] != 0x04)
      return corrupted(name + ": uncompressed point lacks the 04 tag");
  } else if (ec_point.size() == compressed_size) {
    if (ec_point[0] != 0x02 && ec_point[0] != 0x03)
      return corrupted(name + ": compressed point lacks the 02/03 tag");
  } else {
    return corrupted(name + ": CKA_EC_POINT has " + std::to_string(size)
                     + " bytes, expected 33, 35, 65 or 67");
  }
  return reencode(s, ec_point, POINT_CONVERSION_UNCOMPRESSED);
}

caf::expected<std::vector<uint8_t>>
compress_public_key(scheme s, std::span<const uint8_t> uncompressed) {
  if (!is_ecdsa(s))
    return caf::make_error(key_errc::scheme_unsupported,
                           std::string{to_string(s)}
                             + ": no compressed public key form");
  auto name = std::string{to_string(s)};
  if (uncompressed.size() != uncompressed_size || uncompressed[0] != 0x04)
    return corrupted(name + ": public key is not 65 bytes 04 X Y");
  // Through OpenSSL rather than by copying X and Y's parity, so that a
  // corrupted key is caught here too.
  return reencode(s, uncompressed, POINT_CONVERSION_COMPRESSED);
}

} // namespace hsm::crypto
