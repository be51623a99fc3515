#include "runtime/base/hardening.hpp"

#include <sys/prctl.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace hsm {

caf::error harden_process() {
  rlimit none{0, 0};
  if (::setrlimit(RLIMIT_CORE, &none) != 0)
    return caf::make_error(
      config_errc::invalid_option, std::string{"RLIMIT_CORE"},
      std::string{"cannot turn core files off: "} + std::strerror(errno));
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"PR_SET_DUMPABLE"},
                           std::string{"cannot make the process not "
                                       "dumpable: "}
                             + std::strerror(errno));
  return caf::none;
}

} // namespace hsm
