// `hsm-driver probe`: which schemes this token serves, and why not.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/keys/capabilities.hpp"

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

json capabilities_json(const keys::capabilities& caps) {
  json arr = json::array();
  for (auto& c : caps.schemes)
    arr.push_back({{"scheme", std::string{to_string(c.scheme)}},
                   {"served", c.served},
                   {"mode", c.resident ? "token-resident" : "wrapped"},
                   {"detail", c.detail}});
  return arr;
}

} // namespace

int cmd_probe(const driver_config& cfg) {
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto setup = set_up_keys(tok->sess, cfg, key_steps{.guard = false});
  if (!setup)
    return fail(setup.error());
  print(json{{"ok", true},
             {"token",
              {{"label", tok->info.label},
               {"manufacturer", tok->info.manufacturer},
               {"model", tok->info.model},
               {"serial", tok->info.serial}}},
             {"schemes", capabilities_json(setup->caps)}});
  return exit_ok;
}

} // namespace hsm
