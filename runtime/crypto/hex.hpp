#pragma once

// Hex encoding for the wire and the command line. Any thread.

#include "messages/errors.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::crypto {

/// The value of one hex digit (either case), or -1.
int hex_digit_value(char c);

/// Lower-case hex, no prefix.
std::string to_hex(std::span<const uint8_t> bytes);

/// `n_bytes` random bytes from OpenSSL's generator, in lower-case hex: PINs
/// of dev tokens, lease tokens, admin tokens, request and run ids. A
/// generator that fails leaves no safe way on: aborts.
std::string random_hex(size_t n_bytes);

/// Parses hex (either case, optional `0x` prefix). An odd length or a
/// non-hex character is `key_errc::invalid_request` naming the position.
caf::expected<std::vector<uint8_t>> from_hex(std::string_view text);

} // namespace hsm::crypto
