#pragma once

// A PIN in memory: zeroed on destruction, never printable. Comes from the
// environment (`USER_PIN`, scrubbed from the process environment once read)
// or a file (`USER_PIN_FILE`, which must not be readable by group or others).
// Never from argv, never logged: it has no operator<< and no formatter. The
// characters live in one heap buffer of their exact size (a vector, never a
// string's inline buffer), so that a move hands the buffer over instead of
// copying the bytes, and the one copy is wiped when the PIN dies.

#include "messages/errors.hpp"

#include <cstddef>
#include <string_view>
#include <vector>

namespace hsm::pkcs11 {

/// A PIN. Move-only; the buffer is wiped when it dies.
class secret_pin {
public:
  secret_pin() = default;
  /// Takes the characters of `value`; the caller wipes its own copy.
  explicit secret_pin(std::string_view value);
  secret_pin(secret_pin&& other) noexcept;
  secret_pin& operator=(secret_pin&& other) noexcept;
  secret_pin(const secret_pin&) = delete;
  secret_pin& operator=(const secret_pin&) = delete;
  ~secret_pin();

  /// Reads `USER_PIN_FILE` if set (trailing newline stripped), else
  /// `USER_PIN`; wipes and unsets `USER_PIN` afterwards so that it does not
  /// linger in /proc/<pid>/environ. Both set is an error: which one wins
  /// would surprise someone. Neither set is `config_errc::missing_option`.
  [[nodiscard]] static caf::expected<secret_pin>
  from_environment(std::string_view var = "USER_PIN",
                   std::string_view file_var = "USER_PIN_FILE");

  /// Reads a PIN file (`read_secret_file`: not a symbolic link, a regular
  /// file owned by this user or root, not readable or writable by group or
  /// others, not empty).
  [[nodiscard]] static caf::expected<secret_pin>
  from_file(const std::string& path);

  /// The characters, for passing to C_Login. Do not copy them.
  const char* data() const noexcept {
    return value_.data();
  }

  /// Number of characters.
  size_t size() const noexcept {
    return value_.size();
  }

  /// True if no PIN is held.
  bool empty() const noexcept {
    return value_.empty();
  }

private:
  void wipe() noexcept;

  std::vector<char> value_;
};

} // namespace hsm::pkcs11
