#pragma once

// Driver configuration: command-line flags and environment variables with
// the runbook's names (DESIGN.md, "Configuration"), resolved once into a
// plain struct and checked at start-up with messages that name the option.
// PINs are not configuration: they come from USER_PIN / USER_PIN_FILE
// (secret_pin.hpp) and are refused on the command line.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"

#include <array>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace hsm {

/// Default `--token-label`.
inline constexpr std::string_view default_token_label = "hsm-driver";
/// Default `--master-key-label`.
inline constexpr std::string_view default_master_key_label
  = "hsm-driver-master";
/// Default `--sqlite-path`.
inline constexpr std::string_view default_sqlite_path
  = "/var/lib/hsm-driver/keys.db";
/// Default `--log-level`.
inline constexpr std::string_view default_log_level = "info";

/// The environment variables that may name the PKCS#11 module, in the order
/// they are read (`--pkcs11-module` wins over all of them).
inline constexpr std::array<std::string_view, 3> pkcs11_module_vars{
  "PKCS11_MODULE", "PKCS11_THALES_MODULE", "PKCS11_IBM_MODULE"};

/// Reads an environment variable; injectable so that tests need no setenv.
using env_lookup
  = std::function<std::optional<std::string>(std::string_view name)>;

/// The process environment.
env_lookup process_env();

/// Options as given (flags and environment), before checking.
struct raw_options {
  std::string pkcs11_module;
  std::string token_label;
  std::string master_key_label;
  std::string sqlite_path;
  std::string postgres_url;
  std::string resident_schemes;
  std::string log_level;
  std::string log_format;
  /// `--allow-weak-master-key` was given.
  bool allow_weak_master_key = false;
};

/// Options after checking.
struct driver_config {
  /// The PKCS#11 module to load.
  std::filesystem::path pkcs11_module;
  /// Where `pkcs11_module` came from (`--pkcs11-module`, `PKCS11_MODULE`,
  /// `PKCS11_THALES_MODULE` or `PKCS11_IBM_MODULE`), for messages.
  std::string pkcs11_module_source;
  /// Label of the token to use.
  std::string token_label;
  /// Label of the master key on that token.
  std::string master_key_label;
  /// The SQLite key store (when `postgres_url` is empty).
  std::filesystem::path sqlite_path;
  /// The PostgreSQL key store; empty for SQLite. May hold a password: log
  /// it only through `redact_url`.
  std::string postgres_url;
  /// Where `postgres_url` came from (`--postgres-url`, `POSTGRES_URL` or
  /// `POSTGRES_URL_FILE`), for messages and the password warning.
  std::string postgres_url_source;
  /// Schemes whose keys are token-resident (opt-in).
  std::set<scheme> resident_schemes;
  /// spdlog level name.
  std::string log_level;
  /// Start with a master key whose attributes let a blob leave the HSM
  /// (`--allow-weak-master-key` or `HSM_ALLOW_WEAK_MASTER_KEY=1`): for a
  /// legacy key until its rows are re-wrapped; logged as an error at start.
  bool allow_weak_master_key = false;
};

/// Checks `raw` and fills in defaults and environment variables. Flags win
/// over the environment. The module comes from `--pkcs11-module`, else from
/// exactly one of `PKCS11_MODULE`, `PKCS11_THALES_MODULE`,
/// `PKCS11_IBM_MODULE` (two set to different paths is an error: one module
/// per process). Unknown scheme names are errors naming the option.
[[nodiscard]] caf::expected<driver_config> resolve(const raw_options& raw,
                                                   const env_lookup& env);

/// A connection string fit for logs (`store::redact_conninfo`): passwords
/// in every libpq form (`postgresql://user:secret@host/db`, `?password=`,
/// `password = 'two words'`) become `***`; a string that does not parse
/// becomes `<unparsable connection string>`.
std::string redact_url(std::string_view url);

/// True if the connection string carries a password (in any libpq form).
bool url_has_password(std::string_view url);

/// Wipes the value of environment variable `name` in place and unsets it,
/// so that a secret read from it does not linger in /proc/<pid>/environ.
void scrub_env(const char* name);

/// Splits `a,b , c` into trimmed, non-empty parts.
std::vector<std::string> split_list(std::string_view text);

} // namespace hsm
