#include "runtime/pkcs11/secret_pin.hpp"

#include <openssl/crypto.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

namespace hsm::pkcs11 {

secret_pin::secret_pin(std::string_view value) : value_(value) {
  // nop
}

secret_pin::secret_pin(secret_pin&& other) noexcept {
  value_.swap(other.value_);
  other.wipe();
}

secret_pin& secret_pin::operator=(secret_pin&& other) noexcept {
  if (this != &other) {
    wipe();
    value_.swap(other.value_);
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
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return caf::make_error(config_errc::bad_file, std::string{"USER_PIN_FILE"},
                           path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return caf::make_error(config_errc::bad_file, std::string{"USER_PIN_FILE"},
                           path + ": not a regular file");
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
    return caf::make_error(config_errc::bad_file, std::string{"USER_PIN_FILE"},
                           path
                             + ": readable by group or others; chmod 600 it");
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return caf::make_error(config_errc::bad_file, std::string{"USER_PIN_FILE"},
                           path + ": cannot open");
  std::string buf{std::istreambuf_iterator<char>{in},
                  std::istreambuf_iterator<char>{}};
  while (!buf.empty() && (buf.back() == '\n' || buf.back() == '\r'))
    buf.pop_back();
  secret_pin pin{buf};
  OPENSSL_cleanse(buf.data(), buf.size());
  if (pin.empty())
    return caf::make_error(config_errc::bad_file, std::string{"USER_PIN_FILE"},
                           path + ": empty");
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
