#pragma once

// Helpers shared by the end-to-end tests: a SoftHSMv2 configuration of their
// own, and waiting on the reference proxy for a request's answer.

#include "runtime/net/pki.hpp"
#include "runtime/net/reference_proxy.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace hsm::test {

/// The SoftHSMv2 module path (`SOFTHSM2_MODULE` overrides it).
std::string softhsm_module();

/// Writes `dir/softhsm2.conf` with tokens under `dir/tokens`; returns its
/// path.
std::filesystem::path write_softhsm_conf(const std::filesystem::path& dir);

/// Waits until request `id` is done and returns its admin state; adds a test
/// failure (and returns `{"ok": false}`) on timeout.
nlohmann::json
await_done(net::reference_proxy& proxy, const std::string& id,
           std::chrono::milliseconds timeout = std::chrono::seconds{60});

/// `hsm-driver run` against the proxy on 127.0.0.1:`proxy_port`, trusting
/// `pki`'s root, with its driver chain and key; then `extra`.
std::vector<std::string> run_args(uint16_t proxy_port, const net::dev_pki& pki,
                                  const std::vector<std::string>& extra);

/// Bytes of a hex JSON string (empty if it is not hex).
std::vector<uint8_t> unhex(const nlohmann::json& j);

} // namespace hsm::test
