// `hsm-driver proxy`: the reference proxy, until a stop signal.

#include "runtime/app/commands.hpp"
#include "runtime/app/daemon.hpp"
#include "runtime/app/output.hpp"
#include "runtime/net/host_port.hpp"
#include "runtime/net/reference_proxy.hpp"

namespace hsm {

int cmd_proxy(const proxy_flags& flags) {
  auto listen = net::parse_host_port(flags.listen, "--listen",
                                     net::port_zero::allowed);
  if (!listen)
    return fail(listen.error());
  auto admin = net::parse_host_port(flags.admin_listen, "--admin-listen",
                                    net::port_zero::allowed);
  if (!admin)
    return fail(admin.error());
  net::reference_proxy_config pc;
  pc.host = listen->host;
  pc.port = listen->port;
  pc.admin_host = admin->host;
  pc.admin_port = admin->port;
  pc.server_cert = flags.server_cert;
  pc.server_key = flags.server_key;
  pc.client_ca = flags.client_ca;
  pc.lease_duration = std::chrono::milliseconds{flags.lease_ms};
  pc.admin_remote = flags.admin_remote;
  pc.allow_tls12 = flags.tls_min == "1.2";
  auto token = net::load_or_create_admin_token(flags.admin_token_file);
  if (!token)
    return fail(token.error());
  pc.admin_token = std::move(*token);
  auto proxy = net::reference_proxy::start(pc);
  if (!proxy)
    return fail(proxy.error());
  print(nlohmann::ordered_json{
    {"ok", true},
    {"listen", pc.host + ":" + std::to_string((*proxy)->port())},
    {"admin", pc.admin_host + ":" + std::to_string((*proxy)->admin_port())},
    {"admin_token_file", flags.admin_token_file}});
  wait_for_stop_signal();
  (*proxy)->stop();
  return exit_ok;
}

} // namespace hsm
