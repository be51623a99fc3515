#include "runtime/pkcs11/secret_pin.hpp"

#include "runtime/base/secret_file.hpp"

#include <openssl/crypto.h>

#include <cstdlib>
#include <cstring>

namespace hsm::pkcs11 {

secret_pin::secret_pin(std::string_view value)
  : value_(value.begin(), value.end()) {
  // nop
}

secret_pin::secret_pin(secret_pin&& other) noexcept
  : value_(std::move(other.value_)) {
  // A vector's move hands over its buffer: no byte is copied or left.
  other.value_.clear();
}

secret_pin& secret_pin::operator=(secret_pin&& other) noexcept {
  if (this != &other) {
    wipe();
    value_ = std::move(other.value_);
    other.value_.clear();
  }
  return *this;
}

secret_pin::~secret_pin() {
  wipe();
}

void secret_pin::wipe() noexcept {
  if (!value_.empty())
    OPENSSL_cleanse(value_.data(), value_.size());
  value_.clear();
}

caf::expected<secret_pin> secret_pin::from_file(const std::string& path) {
  auto text = read_secret_file(path, "USER_PIN_FILE");
  if (!text)
    return std::move(text.error());
  secret_pin pin{*text};
  OPENSSL_cleanse(text->data(), text->size());
  return pin;
}

caf::expected<secret_pin>
secret_pin::from_environment(std::string_view var, std::string_view file_var) {
  std::string var_name{var};
  std::string file_var_name{file_var};
  char* value = std::getenv(var_name.c_str());
  const char* file = std::getenv(file_var_name.c_str());
  if (value != nullptr && file != nullptr)
    return caf::make_error(config_errc::invalid_option, var_name,
                           "both " + var_name + " and " + file_var_name
                             + " are set; set one");
  if (file != nullptr)
    return from_file(file);
  if (value == nullptr || *value == '\0')
    return caf::make_error(config_errc::missing_option, var_name,
                           "set " + var_name + " or " + file_var_name);
  secret_pin pin{value};
  // Wipe the environment's copy in place, then drop the variable.
  OPENSSL_cleanse(value, std::strlen(value));
  ::unsetenv(var_name.c_str());
  return pin;
}

} // namespace hsm::pkcs11
