#pragma once

// Secrets in files: a PIN, the admin API's token, a database URL with its
// password. Read without following a symbolic link and checked on the open
// descriptor (so that the file checked is the file read): a regular file,
// owned by this user or root, neither readable nor writable by group or
// others (a TLS key may be readable by its group) (with a POSIX ACL, no entry
// but this user's grants access: how systemd's LoadCredential= hands over a
// file), not empty, small. The bytes go straight from the descriptor into the
// one buffer returned (no stream buffers left holding copies); the caller wipes
// it (`OPENSSL_cleanse`) when done. Written files are created 0600 and never
// over an existing file.

#include "messages/errors.hpp"

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace hsm {

/// Largest secret file read, in bytes.
inline constexpr size_t max_secret_file_bytes = 64 * 1024;

/// How strict `read_secret_file` is beyond its fixed rules (no symbolic
/// link, a regular file, this user or root as owner, nothing for others).
struct secret_file_rules {
  /// The file's group may read it (not write): a TLS key shared with a
  /// group such as ssl-cert. A PIN or a token file: never.
  bool group_read = false;
  /// Largest file read.
  size_t max_bytes = max_secret_file_bytes;
  /// Strip trailing CR/LF (a one-line secret); off for a PEM key.
  bool strip_newlines = true;
};

/// Reads the secret in `path`; `what` names it in errors (e.g.
/// "USER_PIN_FILE"). Fails with `config_errc::bad_file`, naming the path
/// and the cause (a symbolic link, not a regular file, another owner,
/// group or other bits in its mode beyond `rules`, empty, too large).
[[nodiscard]] caf::expected<std::string>
read_secret_file(const std::filesystem::path& path, std::string_view what,
                 const secret_file_rules& rules = {});

/// Creates `path` with mode 0600 holding `data`; fails
/// (`config_errc::bad_file`) if it exists or cannot be written whole.
[[nodiscard]] caf::error write_secret_file(const std::filesystem::path& path,
                                           std::string_view data,
                                           std::string_view what);

} // namespace hsm
