#pragma once

// A loaded PKCS#11 module: dlopen + C_GetFunctionList + C_Initialize (with
// CKF_OS_LOCKING_OK) on load; C_Finalize + dlclose on destruction. One per
// process, owned by the top of the program (the CLI command or the daemon),
// above every session: it must outlive them all, and it is never finalised
// while a session is busy (softhsm.md).

#include "messages/errors.hpp"
#include "runtime/pkcs11/function_table.hpp"

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::pkcs11 {

/// What a token reports about itself.
struct token_description {
  CK_SLOT_ID slot = 0;
  std::string label;
  std::string manufacturer;
  std::string model;
  std::string serial;
  bool initialized = false;
};

/// Lets a test wrap the real function table (fault injection).
using table_decorator = std::function<std::unique_ptr<function_table>(
  std::unique_ptr<function_table>)>;

/// The loaded library. Move-only.
class module {
public:
  /// Loads the library at `path` and initialises it. A missing file is
  /// `config_errc::bad_file`; a library without C_GetFunctionList, or whose
  /// C_Initialize fails, is an `hsm_errc` naming the function.
  [[nodiscard]] static caf::expected<module>
  load(const std::filesystem::path& path, const table_decorator& wrap = {});

  module(module&& other) noexcept;
  module& operator=(module&& other) noexcept;
  module(const module&) = delete;
  module& operator=(const module&) = delete;
  ~module();

  /// The function table; valid while this module lives.
  function_table& fns() const noexcept {
    return *fns_;
  }

  /// The path it was loaded from.
  const std::filesystem::path& path() const noexcept {
    return path_;
  }

  /// Every slot with a token present.
  [[nodiscard]] caf::expected<std::vector<token_description>> tokens() const;

  /// The slot holding the initialised token labelled `label` (labels are
  /// compared after trimming the space padding). Never selects by slot
  /// number: those change when tokens are added. No such token, or two of
  /// them, is `config_errc::invalid_option` naming `--token-label`.
  [[nodiscard]] caf::expected<CK_SLOT_ID>
  find_token(std::string_view label) const;

private:
  module() = default;
  void release() noexcept;

  std::filesystem::path path_;
  void* handle_ = nullptr;
  std::unique_ptr<function_table> fns_;
  bool initialized_ = false;
};

/// Trims the blank padding PKCS#11 puts in fixed-size text fields.
std::string trim_padded(const CK_UTF8CHAR* text, size_t size);

} // namespace hsm::pkcs11
