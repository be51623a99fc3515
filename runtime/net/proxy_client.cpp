#include "runtime/net/proxy_client.hpp"

#include "runtime/net/host_port.hpp"
#include "runtime/net/wire_codec.hpp"

#include <curl/curl.h>
#include <nlohmann/json.hpp>
#include <openssl/x509_vfy.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string_view>
#include <system_error>
#include <utility>

namespace hsm::net {

namespace {

// -- libcurl global state -----------------------------------------------------

/// curl_global_init once per process, before the first handle, from any
/// thread. It is never cleaned up: other handles may outlive any client.
CURLcode global_init() {
  static std::once_flag flag;
  static CURLcode rc = CURLE_OK;
  std::call_once(flag, [] { rc = curl_global_init(CURL_GLOBAL_DEFAULT); });
  return rc;
}

// -- configuration checks -----------------------------------------------------

/// Checks that `path` names a readable regular file; the error names the
/// option (`--ca-cert`, ...) that gave the path.
caf::error check_file(const std::filesystem::path& path, const char* option) {
  if (path.empty())
    return caf::make_error(net_errc::bad_tls_material, std::string{option},
                           std::string{"no file given"});
  std::error_code ec;
  auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st))
    return caf::make_error(net_errc::bad_tls_material, std::string{option},
                           "'" + path.string() + "' does not exist");
  if (!std::filesystem::is_regular_file(st))
    return caf::make_error(net_errc::bad_tls_material, std::string{option},
                           "'" + path.string() + "' is not a regular file");
  if (::access(path.c_str(), R_OK) != 0)
    return caf::make_error(net_errc::bad_tls_material, std::string{option},
                           "'" + path.string()
                             + "' is not readable: " + std::strerror(errno));
  return caf::none;
}

/// Checks `--proxy-addr`: `host:port` or `[v6]:port`, a port other than 0.
caf::error check_address(const std::string& addr) {
  if (auto parsed = parse_host_port(addr, "--proxy-addr"); !parsed)
    return parsed.error();
  return caf::none;
}

// -- error mapping ------------------------------------------------------------

/// True for the curl codes that mean a certificate or handshake problem.
bool is_tls_error(CURLcode rc) {
  switch (rc) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CLIENTCERT:
    case CURLE_USE_SSL_FAILED:
      return true;
    default:
      return false;
  }
}

/// The cause a TLS alert from the proxy names, about the client
/// certificate it refused (OpenSSL's server sends `unknown ca` for a chain
/// it cannot follow to its CA, `certificate expired`, `unsupported
/// certificate` for a wrong extendedKeyUsage, `bad certificate` for the
/// rest, a certificate not yet valid among them).
cert_cause cause_of_alert(const char* errbuf) {
  if (std::strstr(errbuf, "unknown ca") != nullptr)
    return cert_cause::wrong_ca;
  if (std::strstr(errbuf, "certificate expired") != nullptr)
    return cert_cause::expired;
  if (std::strstr(errbuf, "unsupported certificate") != nullptr)
    return cert_cause::wrong_eku;
  return cert_cause::other;
}

/// A named cause for a failed handshake, where one is known: the proxy's
/// certificate failed the driver's check (`verify_result`, OpenSSL's
/// `X509_V_ERR_*`, or libcurl's own host name check), or the proxy refused
/// the driver's certificate with an alert.
caf::error named_tls_error(CURLcode rc, long verify_result, const char* errbuf,
                           const std::string& detail) {
  if (rc == CURLE_PEER_FAILED_VERIFICATION || verify_result != X509_V_OK) {
    // libcurl checks the name itself, after OpenSSL's verification passed
    // ("no alternative certificate subject name matches target host name",
    // "... does not match target host name").
    auto cause = std::strstr(errbuf, "host name") != nullptr
                   ? cert_cause::wrong_server_name
                   : cause_of_verify_result(verify_result);
    if (cause == cert_cause::ok)
      cause = cert_cause::other;
    return cert_error("proxy certificate", cause, detail);
  }
  if (std::strstr(errbuf, "alert") != nullptr)
    return cert_error("client certificate (refused by the proxy)",
                      cause_of_alert(errbuf), detail);
  return caf::none;
}

caf::error transport_error(CURLcode rc, const char* errbuf,
                           const std::string& what, bool fresh_connection,
                           long verify_result = X509_V_OK) {
  std::string detail = curl_easy_strerror(rc);
  // libcurl's message may quote the peer (a certificate's subject name):
  // escaped, it goes into logs.
  if (errbuf[0] != '\0')
    detail += ": " + printable(errbuf, CURL_ERROR_SIZE);
  if (is_tls_error(rc) || rc == CURLE_RECV_ERROR || rc == CURLE_SEND_ERROR)
    if (auto named = named_tls_error(rc, verify_result, errbuf,
                                     what + ": " + detail))
      return named;
  // With TLS 1.3 the server judges the client certificate after the client
  // considers the handshake done: its refusal (an alert such as "unknown
  // ca" or "certificate required") then surfaces on the first read or write.
  auto alert = (rc == CURLE_RECV_ERROR || rc == CURLE_SEND_ERROR)
               && std::strstr(errbuf, "alert") != nullptr;
  // Often the client does not even see the alert: the proxy has closed the
  // connection and sending fails. A proxy restarting looks the same, so the
  // code stays `unreachable`, but the operator gets a hint.
  if (!alert && fresh_connection
      && (rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR
          || rc == CURLE_GOT_NOTHING))
    detail += " (the proxy closed a new connection right after the TLS "
              "handshake: does it accept this client certificate?)";
  auto code = is_tls_error(rc) || alert ? net_errc::tls_failed
                                        : net_errc::unreachable;
  return caf::make_error(code, what, std::move(detail));
}

/// How a kept-alive connection that the peer closed while idle fails on
/// reuse.
bool dead_connection(CURLcode rc) {
  return rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR
         || rc == CURLE_GOT_NOTHING;
}

/// One call's response as it arrives.
struct transfer {
  /// The body so far.
  std::string* body = nullptr;
  /// Bytes of header lines and body that arrived.
  size_t received = 0;
  /// Set when the body would pass `max_response_bytes`.
  bool too_large = false;
};

/// Appends body bytes up to `max_response_bytes`; past that it returns 0,
/// which makes libcurl abort the transfer (CURLE_WRITE_ERROR) and close the
/// connection, so a proxy can never make the driver buffer more.
size_t on_data(char* ptr, size_t size, size_t nmemb, void* user) {
  auto* t = static_cast<transfer*>(user);
  auto n = size * nmemb;
  t->received += n;
  if (n > max_response_bytes - t->body->size()) {
    t->too_large = true;
    return 0;
  }
  t->body->append(ptr, n);
  return n;
}

/// Counts header bytes (the status line included); the headers themselves
/// are not kept.
size_t on_header(char*, size_t size, size_t nitems, void* user) {
  static_cast<transfer*>(user)->received += size * nitems;
  return size * nitems;
}

long to_ms(std::chrono::milliseconds d) {
  return d.count() > 0 ? static_cast<long>(d.count()) : 1L;
}

} // namespace

// -- impl ---------------------------------------------------------------------

struct proxy_client::impl {
  proxy_client_config cfg;
  CURL* curl = nullptr;
  curl_slist* headers = nullptr;
  std::string base_url;
  std::string body;
  char errbuf[CURL_ERROR_SIZE] = {};
  /// Calls sent again because their kept-alive connection had died.
  uint64_t reconnects = 0;
  /// The TLS files; `generation` is the set this handle was made with.
  std::shared_ptr<tls_source> source;
  uint64_t generation = 0;
  /// True once `setup` made the handle for `generation` whole.
  bool ready = false;

  ~impl() {
    if (curl != nullptr)
      curl_easy_cleanup(curl);
    curl_slist_free_all(headers);
  }

  /// Makes the handle anew when the TLS files were replaced: the old
  /// handle's connections close, and the next call connects with the new
  /// set. Calls on one client are sequential, so none is in flight here.
  caf::error refresh() {
    if (ready && source->current().second == generation)
      return caf::none;
    if (curl != nullptr) {
      curl_easy_cleanup(curl);
      curl = nullptr;
    }
    curl_slist_free_all(headers);
    headers = nullptr;
    return setup();
  }

  /// Sets the options that stay for the handle's life.
  caf::error setup() {
    auto [material, gen] = source->current();
    // `ready` only once the handle is made (the end of this function), so
    // that a failed set-up is tried again on the next call.
    ready = false;
    generation = gen;
    curl = curl_easy_init();
    if (curl == nullptr)
      return caf::make_error(net_errc::unreachable,
                             std::string{"curl_easy_init failed"});
    headers = curl_slist_append(headers, "Content-Type: application/json");
    if (headers != nullptr)
      headers = curl_slist_append(headers, "Accept: application/json");
    // No "Expect: 100-continue" round trip for larger results.
    if (headers != nullptr)
      headers = curl_slist_append(headers, "Expect:");
    if (headers == nullptr)
      return caf::make_error(net_errc::unreachable,
                             std::string{"curl_slist_append failed"});
    // The files as read at start-up or at the last reload, not as they
    // are on disk now: a file replaced but not yet reloaded (or refused)
    // changes nothing. libcurl copies blobs and strings.
    auto blob = [](const std::string& text) {
      return curl_blob{const_cast<char*>(text.data()), text.size(),
                       CURL_BLOB_COPY};
    };
    auto ca = blob(material->ca_pem);
    auto cert = blob(material->chain_pem);
    auto key = blob(material->key_pem);
    CURLcode rc = CURLE_OK;
    auto set = [&rc, this](CURLoption opt, auto value) {
      if (rc == CURLE_OK)
        rc = curl_easy_setopt(curl, opt, value);
    };
    set(CURLOPT_ERRORBUFFER, errbuf);
    set(CURLOPT_NOSIGNAL, 1L);
    set(CURLOPT_PROTOCOLS_STR, "https");
    set(CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
    set(CURLOPT_HTTPHEADER, headers);
    set(CURLOPT_WRITEFUNCTION, &on_data);
    set(CURLOPT_HEADERFUNCTION, &on_header);
    set(CURLOPT_TCP_KEEPALIVE, 1L);
    // Reuse an idle connection only while the proxy still keeps it open.
    // libcurl counts idle time in whole seconds (rounded down) and gives a
    // connection up once that count exceeds this: reuse is possible for up
    // to `max_idle` + 1 s (see proxy_client_config::max_idle).
    set(CURLOPT_MAXAGE_CONN, static_cast<long>(cfg.max_idle.count()));
    set(CURLOPT_TCP_NODELAY, 1L);
    set(CURLOPT_CONNECTTIMEOUT_MS, to_ms(cfg.connect_timeout));
    set(CURLOPT_CAINFO_BLOB, &ca);
    // Only the configured CA: not the system's bundle file or directory.
    set(CURLOPT_CAINFO, static_cast<char*>(nullptr));
    set(CURLOPT_CAPATH, static_cast<char*>(nullptr));
    // Only a root anchors a chain (libcurl would otherwise let OpenSSL stop
    // at any certificate of the CA blob).
    set(CURLOPT_SSL_OPTIONS, static_cast<long>(CURLSSLOPT_NO_PARTIALCHAIN));
    // The leaf and its intermediates: a proxy that trusts only the
    // vendor's root still gets the chain up to it.
    set(CURLOPT_SSLCERT_BLOB, &cert);
    set(CURLOPT_SSLCERTTYPE, "PEM");
    set(CURLOPT_SSLKEY_BLOB, &key);
    set(CURLOPT_SSLKEYTYPE, "PEM");
    // No TLS session resumption: every new connection presents the current
    // certificate (a resumed session would carry the old one's
    // authentication past a reload) and checks the proxy's afresh.
    set(CURLOPT_SSL_SESSIONID_CACHE, 0L);
    set(CURLOPT_SSL_VERIFYPEER, 1L);
    set(CURLOPT_SSL_VERIFYHOST, 2L);
    // The minimum: 1.3 unless 1.2 is allowed for a proxy that needs it.
    set(CURLOPT_SSLVERSION,
        static_cast<long>(cfg.allow_tls12 ? CURL_SSLVERSION_TLSv1_2
                                          : CURL_SSLVERSION_TLSv1_3));
    // An empty proxy string turns off the environment's proxy variables.
    set(CURLOPT_PROXY, cfg.https_proxy.c_str());
    if (rc != CURLE_OK)
      return caf::make_error(net_errc::tls_failed,
                             std::string{"cannot configure libcurl"},
                             std::string{curl_easy_strerror(rc)});
    ready = true;
    return caf::none;
  }

  caf::expected<http_reply> post(const char* path, const std::string& payload,
                                 std::chrono::milliseconds timeout) {
    auto url = base_url + path;
    http_reply out;
    if (auto err = refresh())
      return err;
    transfer t;
    t.body = &out.body;
    errbuf[0] = '\0';
    CURLcode rc = CURLE_OK;
    auto set = [&rc, this](CURLoption opt, auto value) {
      if (rc == CURLE_OK)
        rc = curl_easy_setopt(curl, opt, value);
    };
    set(CURLOPT_URL, url.c_str());
    set(CURLOPT_POSTFIELDS, payload.data());
    set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(payload.size()));
    set(CURLOPT_TIMEOUT_MS, to_ms(timeout));
    set(CURLOPT_WRITEDATA, static_cast<void*>(&t));
    set(CURLOPT_HEADERDATA, static_cast<void*>(&t));
    long connects = 0;
    if (rc == CURLE_OK) {
      rc = curl_easy_perform(curl);
      curl_easy_getinfo(curl, CURLINFO_NUM_CONNECTS, &connects);
      // A kept-alive connection the proxy closed while it was idle fails on
      // first use: that is no failure of the proxy, so the call goes out
      // again at once on a new connection, without a warning. Only if not
      // a byte of an answer came back: once one did, the proxy had the call
      // and may have acted on it (a result recorded, requests leased), and
      // the failure goes to the caller (the lease expires and the request is
      // redelivered).
      if (connects == 0 && t.received == 0 && dead_connection(rc)) {
        ++reconnects;
        out.body.clear();
        errbuf[0] = '\0';
        rc = curl_easy_perform(curl);
        curl_easy_getinfo(curl, CURLINFO_NUM_CONNECTS, &connects);
      }
    }
    // The body belongs to this call only.
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, static_cast<void*>(nullptr));
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, static_cast<void*>(nullptr));
    if (t.too_large)
      return caf::make_error(net_errc::bad_response, "POST " + url,
                             "response body larger than "
                               + std::to_string(max_response_bytes)
                               + " bytes: transfer aborted");
    if (rc != CURLE_OK) {
      long verify_result = X509_V_OK;
      curl_easy_getinfo(curl, CURLINFO_SSL_VERIFYRESULT, &verify_result);
      return transport_error(rc, errbuf, "POST " + url, connects > 0,
                             verify_result);
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &out.status);
    return out;
  }
};

// -- proxy_client -------------------------------------------------------------

caf::expected<std::unique_ptr<proxy_client>>
proxy_client::create(const proxy_client_config& cfg) {
  if (auto err = check_address(cfg.proxy_addr))
    return err;
  if (cfg.driver_id.empty())
    return caf::make_error(config_errc::missing_option,
                           std::string{"--driver-id"},
                           std::string{"no driver id"});
  if (auto err = check_file(cfg.tls.ca_cert, "--ca-cert"))
    return err;
  if (auto err = check_file(cfg.tls.cert, "--client-cert"))
    return err;
  if (auto err = check_file(cfg.tls.key, "--client-key"))
    return err;
  if (auto rc = global_init(); rc != CURLE_OK)
    return caf::make_error(net_errc::unreachable,
                           std::string{"curl_global_init failed"},
                           std::string{curl_easy_strerror(rc)});
  auto source = cfg.material;
  if (!source) {
    client_tls_options unchecked;
    unchecked.verify = false;
    auto material = load_client_tls(cfg.tls, unchecked);
    if (!material)
      return material.error();
    source = std::make_shared<tls_source>(std::move(*material));
  }
  std::unique_ptr<proxy_client> self{new proxy_client};
  self->impl_ = std::make_unique<impl>();
  self->impl_->cfg = cfg;
  self->impl_->source = std::move(source);
  self->impl_->base_url = "https://" + cfg.proxy_addr;
  if (auto err = self->impl_->setup())
    return err;
  return self;
}

proxy_client::~proxy_client() = default;

caf::expected<http_reply> proxy_client::poll(size_t max,
                                             std::chrono::milliseconds wait) {
  if (wait.count() < 0)
    wait = std::chrono::milliseconds{0};
  max = std::min(max, max_poll_requests);
  auto body = nlohmann::json{{"driver_id", impl_->cfg.driver_id},
                             {"max", max},
                             {"wait_ms", wait.count()}}
                .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return impl_->post("/v1/poll", body, wait + impl_->cfg.poll_grace);
}

caf::expected<http_reply> proxy_client::post_result(const std::string& body) {
  return impl_->post("/v1/results", body, impl_->cfg.post_timeout);
}

caf::error proxy_client::handshake() {
  auto& in = *impl_;
  if (auto err = in.refresh())
    return err;
  auto url = in.base_url + "/";
  in.errbuf[0] = '\0';
  curl_easy_setopt(in.curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(in.curl, CURLOPT_CONNECT_ONLY, 1L);
  curl_easy_setopt(in.curl, CURLOPT_TIMEOUT_MS, to_ms(in.cfg.connect_timeout));
  auto rc = curl_easy_perform(in.curl);
  long verify_result = X509_V_OK;
  curl_easy_getinfo(in.curl, CURLINFO_SSL_VERIFYRESULT, &verify_result);
  curl_easy_setopt(in.curl, CURLOPT_CONNECT_ONLY, 0L);
  if (rc != CURLE_OK)
    return transport_error(rc, in.errbuf, "TLS handshake with " + url, true,
                           verify_result);
  return caf::none;
}

const proxy_client_config& proxy_client::config() const noexcept {
  return impl_->cfg;
}

uint64_t proxy_client::reconnects() const noexcept {
  return impl_->reconnects;
}

const std::string& proxy_client::driver_id() const {
  return config().driver_id;
}

} // namespace hsm::net
