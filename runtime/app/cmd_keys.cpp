// `hsm-driver keys generate | sign | show`: the key path on the command
// line, after the master-key guard and the capability probe.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"
#include "runtime/keys/key_service.hpp"
#include "runtime/net/wire_codec.hpp"

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

/// Sets up the token and the store, then calls `f` with a key service on
/// them; returns `f`'s exit code, or the set-up's failure.
template <class F>
int with_key_service(const driver_config& cfg, F&& f) {
  auto tok = open_token(cfg);
  if (!tok)
    return fail(tok.error());
  auto setup = set_up_keys(tok->sess, cfg);
  if (!setup)
    return fail(setup.error());
  keys::key_service svc{tok->sess, setup->keys, *setup->store, setup->caps};
  return f(svc);
}

} // namespace

int cmd_keys_generate(const driver_config& cfg, const std::string& key_id,
                      const std::string& scheme_name) {
  return with_key_service(cfg, [&](keys::key_service& svc) {
    auto key = svc.generate(key_id, scheme_name);
    if (!key)
      return fail(key.error());
    logger("runtime")->info("key {} ({}): {}", key->key_id,
                            to_string(key->scheme),
                            key->created ? "generated" : "exists already");
    auto j = key_json(*key);
    j["created"] = key->created;
    print(json{{"ok", true}, {"key", j}});
    return exit_ok;
  });
}

int cmd_keys_sign(const driver_config& cfg, const std::string& key_id,
                  const std::string& payload_hex) {
  auto payload = crypto::from_hex(payload_hex);
  if (!payload)
    return fail(caf::make_error(key_errc::invalid_request,
                                "--payload: " + describe(payload.error())));
  return with_key_service(cfg, [&](keys::key_service& svc) {
    auto sig = svc.sign(key_id, *payload);
    if (!sig)
      return fail(sig.error());
    auto key = svc.show(key_id);
    if (!key)
      return fail(key.error());
    logger("runtime")->info("signed {} bytes with key {} ({}), verified",
                            payload->size(), key_id, to_string(sig->scheme));
    print(json{{"ok", true},
               {"key", key_json(*key)},
               {"signature", net::to_json(*sig)}});
    return exit_ok;
  });
}

int cmd_keys_show(const driver_config& cfg, const std::string& key_id) {
  return with_key_service(cfg, [&](keys::key_service& svc) {
    auto key = svc.show(key_id);
    if (!key)
      return fail(key.error());
    print(json{{"ok", true}, {"key", key_json(*key)}});
    return exit_ok;
  });
}

} // namespace hsm
