// `hsm-driver pki csr | issue-leaf | verify` (README, "PKI"): the
// customer's intermediate CA key and its CSR from the vendor's template, a
// driver's leaf signed by that intermediate, and the check the daemon runs
// at start.

#include "runtime/app/client_tls.hpp"
#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/base/secret_file.hpp"
#include "runtime/net/pki_ops.hpp"
#include "runtime/net/proxy_client.hpp"
#include "runtime/net/tls_material.hpp"
#include "runtime/net/x509_util.hpp"

#include <openssl/crypto.h>

#include <filesystem>
#include <system_error>

namespace hsm {

namespace {

using json = nlohmann::ordered_json;

json to_json(const net::cert_info& c) {
  return json{{"subject", c.subject},     {"issuer", c.issuer},
              {"serial", c.serial},       {"not_before", c.not_before},
              {"not_after", c.not_after}, {"days_left", c.days_left},
              {"names", c.names},         {"ekus", c.ekus}};
}

/// The passphrase in `path` (a secret file), or empty for no path.
caf::expected<std::string> passphrase_from(const std::string& path,
                                           std::string_view flag) {
  if (path.empty())
    return std::string{};
  return read_secret_file(path, flag);
}

/// Refuses to replace an existing private key: a CA key is made once.
caf::error refuse_existing(const std::filesystem::path& path,
                           const char* flag) {
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::symlink_status(path, ec)))
    return caf::make_error(config_errc::bad_file, std::string{flag},
                           "'" + path.string()
                             + "' exists; move it away first (a key or "
                               "certificate is never overwritten)");
  return caf::none;
}

} // namespace

int cmd_pki_csr(const pki_csr_flags& f) {
  auto t = net::load_csr_template(f.template_file);
  if (!t)
    return fail(t.error());
  auto pass = passphrase_from(f.passphrase_file, "--passphrase-file");
  if (!pass)
    return fail(pass.error());
  std::filesystem::path key_out = f.key_out;
  std::filesystem::path csr_out = f.csr_out;
  if (auto err = refuse_existing(key_out, "--key-out"))
    return fail(err);
  if (auto err = refuse_existing(csr_out, "--csr-out"))
    return fail(err);
  auto made = net::make_csr(*t, *pass);
  OPENSSL_cleanse(pass->data(), pass->size());
  if (!made)
    return fail(made.error());
  if (auto err = net::write_pem_file(key_out, made->key_pem.str(), 0600,
                                     net::pem_write::create_new))
    return fail(err);
  if (auto err = net::write_pem_file(csr_out, made->csr_pem, 0644,
                                     net::pem_write::create_new))
    return fail(err);
  std::string subject;
  for (const auto& e : t->subject)
    subject += (subject.empty() ? "" : ", ") + e.type + "=" + e.value;
  print(json{{"ok", true},
             {"key", key_out.string()},
             {"key_encrypted", !f.passphrase_file.empty()},
             {"key_algorithm", t->key_algorithm == "ec" ? "ec " + t->curve
                               : t->key_algorithm == "rsa"
                                 ? "rsa " + std::to_string(t->rsa_bits)
                                 : t->key_algorithm},
             {"csr", csr_out.string()},
             {"subject", subject}});
  return exit_ok;
}

int cmd_pki_issue_leaf(const pki_issue_flags& f) {
  auto pass = passphrase_from(f.ca_passphrase_file,
                              "--intermediate-passphrase-file");
  if (!pass)
    return fail(pass.error());
  net::issuer_files ca{f.ca_cert, f.ca_key, std::move(*pass)};
  OPENSSL_cleanse(pass->data(), pass->size());
  net::leaf_spec spec;
  spec.common_name = f.name;
  spec.names = f.sans.empty() ? std::vector<std::string>{f.name} : f.sans;
  spec.days = f.days;
  auto leaf = net::issue_leaf(ca, spec);
  OPENSSL_cleanse(ca.passphrase.data(), ca.passphrase.size());
  if (!leaf)
    return fail(leaf.error());
  std::filesystem::path dir = f.out_dir;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  auto cert_path = dir / "leaf.pem";
  auto key_path = dir / "leaf-key.pem";
  auto chain_path = dir / "leaf-chain.pem";
  // Nothing is replaced: a second run, or one in the folder the driver
  // reads, must not swap the key in use from under its certificate. All
  // targets are checked first; each write then refuses an existing file.
  for (const auto& [path, flag] :
       {std::pair{key_path, "--out-dir"}, std::pair{cert_path, "--out-dir"},
        std::pair{chain_path, "--out-dir"},
        std::pair{dir / "chain.pem", "--out-dir"}}) {
    if (path.filename() == "chain.pem" && f.root.empty())
      continue;
    if (auto err = refuse_existing(path, flag))
      return fail(err);
  }
  // The key first: a certificate is never left without its key.
  if (auto err = net::write_pem_file(key_path, leaf->key_pem.str(), 0600,
                                     net::pem_write::create_new))
    return fail(err);
  if (auto err = net::write_pem_file(cert_path, leaf->cert_pem, 0644,
                                     net::pem_write::create_new))
    return fail(err);
  if (auto err = net::write_pem_file(chain_path, leaf->chain_pem, 0644,
                                     net::pem_write::create_new))
    return fail(err);
  json out{{"ok", true},
           {"cert", cert_path.string()},
           {"key", key_path.string()},
           {"chain", chain_path.string()},
           {"leaf", to_json(leaf->info)}};
  if (!f.root.empty()) {
    // The runbook's --ca-cert: the intermediate(s) and the vendor's root,
    // checked by loading the new files the way the daemon will.
    auto ca_text = net::read_small_file(f.ca_cert, "--intermediate-cert");
    auto root_text = net::read_small_file(f.root, "--root");
    if (!ca_text)
      return fail(ca_text.error());
    if (!root_text)
      return fail(root_text.error());
    auto ca_chain_path = dir / "chain.pem";
    if (auto err = net::write_pem_file(ca_chain_path, *ca_text + *root_text,
                                       0644, net::pem_write::create_new))
      return fail(err);
    auto check = net::load_client_tls({ca_chain_path, cert_path, key_path});
    if (!check)
      return fail(check.error());
    out["ca_chain"] = ca_chain_path.string();
  }
  print(out);
  return exit_ok;
}

int cmd_pki_verify(const pki_verify_flags& f) {
  auto env = process_env();
  auto pick = [&env](const std::string& flag, std::string_view var) {
    return !flag.empty() ? flag : env(var).value_or(std::string{});
  };
  net::tls_files files{pick(f.ca_cert, "CA_CERT"),
                       pick(f.client_cert, "CLIENT_CERT"),
                       pick(f.client_key, "CLIENT_KEY")};
  for (auto [flag, value] : {std::pair{"--ca-cert", files.ca_cert.string()},
                             std::pair{"--client-cert", files.cert.string()},
                             std::pair{"--client-key", files.key.string()}})
    if (value.empty())
      return fail(caf::make_error(config_errc::missing_option,
                                  std::string{flag},
                                  std::string{flag} + " is required"));
  auto refuse = [](const caf::error& err) {
    logger("runtime")->error("{}", describe(err));
    print(json{{"ok", false},
               {"cause", net::to_string(net::cause_of(err))},
               {"error", describe(err)}});
    return exit_failed;
  };
  auto tls = net::load_client_tls(files);
  if (!tls)
    return refuse(tls.error());
  const auto& leaf = (*tls)->leaf;
  auto chain = json::array();
  for (const auto& c : (*tls)->chain)
    chain.push_back(to_json(c));
  json out{{"ok", true},
           {"leaf", to_json(leaf)},
           {"days_left", leaf.days_left},
           {"expires_soon", leaf.days_left < f.warn_days},
           {"warn_days", f.warn_days},
           {"chain", chain}};
  auto proxy_addr = pick(f.proxy_addr, "PROXY_ADDR");
  if (!proxy_addr.empty()) {
    net::proxy_client_config pc;
    pc.proxy_addr = proxy_addr;
    pc.tls = files;
    pc.driver_id = "pki-verify";
    pc.material = std::make_shared<net::tls_source>(*tls);
    auto client = net::proxy_client::create(pc);
    if (!client)
      return refuse(client.error());
    if (auto err = (*client)->handshake())
      return refuse(err);
    out["proxy"] = json{{"addr", proxy_addr}, {"handshake", "ok"}};
  }
  print(out);
  return exit_ok;
}

} // namespace hsm
