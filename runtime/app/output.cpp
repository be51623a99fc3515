#include "runtime/app/output.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/net/wire_codec.hpp"
#include "runtime/pkcs11/rv.hpp"

#include <iostream>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

} // namespace

void print(const json& j) {
  std::cout << j.dump(2, ' ', false, json::error_handler_t::replace)
            << std::endl;
}

int fail(const caf::error& err) {
  logger("runtime")->error("{}", describe(err));
  print(json{{"ok", false}, {"error", net::to_json(to_error_result(err))}});
  // A PIN the token refused is configuration too: exit 2, which a service
  // manager must not restart on (systemd: RestartPreventExitStatus=2), or
  // every restart would log in again with it and lock the PIN.
  return err.category() == caf::atom("config") || pkcs11::pin_rejected(err)
           ? exit_usage
           : exit_failed;
}

json key_json(const key_result& key) {
  auto j = net::to_json(key);
  j["created_at_ms"] = key.created_at_ms;
  return j;
}

} // namespace hsm
