#include "messages/errors.hpp"

#include "caf/atom.hpp"
#include "caf/message.hpp"
#include "caf/sec.hpp"

namespace hsm {

std::string to_string(hsm_errc x) {
  switch (x) {
    case hsm_errc::retryable:
      return "retryable";
    case hsm_errc::reopen_session:
      return "reopen_session";
    case hsm_errc::reinit_module:
      return "reinit_module";
    case hsm_errc::fatal:
      return "fatal";
  }
  return "hsm_errc(" + std::to_string(static_cast<int>(x)) + ")";
}

std::string to_string(key_errc x) {
  switch (x) {
    case key_errc::unknown_key:
      return "unknown_key";
    case key_errc::scheme_unsupported:
      return "scheme_unsupported";
    case key_errc::invalid_payload:
      return "invalid_payload";
    case key_errc::invalid_request:
      return "invalid_request";
    case key_errc::key_corrupted:
      return "key_corrupted";
    case key_errc::signature_mismatch:
      return "signature_mismatch";
    case key_errc::master_key_mismatch:
      return "master_key_mismatch";
    case key_errc::master_key_missing:
      return "master_key_missing";
    case key_errc::master_key_weak:
      return "master_key_weak";
    case key_errc::key_not_on_this_hsm:
      return "key_not_on_this_hsm";
  }
  return "key_errc(" + std::to_string(static_cast<int>(x)) + ")";
}

std::string to_string(store_errc x) {
  switch (x) {
    case store_errc::unavailable:
      return "unavailable";
    case store_errc::query_failed:
      return "query_failed";
    case store_errc::schema_too_new:
      return "schema_too_new";
    case store_errc::corrupt_row:
      return "corrupt_row";
  }
  return "store_errc(" + std::to_string(static_cast<int>(x)) + ")";
}

std::string to_string(config_errc x) {
  switch (x) {
    case config_errc::invalid_option:
      return "invalid_option";
    case config_errc::missing_option:
      return "missing_option";
    case config_errc::bad_file:
      return "bad_file";
  }
  return "config_errc(" + std::to_string(static_cast<int>(x)) + ")";
}

std::string to_string(net_errc x) {
  switch (x) {
    case net_errc::unreachable:
      return "unreachable";
    case net_errc::tls_failed:
      return "tls_failed";
    case net_errc::http_status:
      return "http_status";
    case net_errc::bad_response:
      return "bad_response";
    case net_errc::bad_tls_material:
      return "bad_tls_material";
  }
  return "net_errc(" + std::to_string(static_cast<int>(x)) + ")";
}

namespace {

template <class Enum>
bool in_category(const caf::error& err) {
  return err.category() == caf::detail::error_factory<Enum>::category;
}

/// Joins the elements of an error's context with ": ". With `hide_numbers`
/// (project errors), `uint64_t` elements are left out: the CK_RV a PKCS#11
/// failure carries is for code, and its CKR name is already in the text.
std::string context_text(const caf::error& err, bool hide_numbers) {
  const auto& ctx = err.context();
  std::string out;
  for (size_t i = 0; i < ctx.size(); ++i) {
    if (hide_numbers && ctx.match_element<uint64_t>(i))
      continue;
    if (!out.empty())
      out += ": ";
    if (ctx.match_element<std::string>(i))
      out += ctx.get_as<std::string>(i);
    else
      out += ctx.stringify(i);
  }
  return out;
}

} // namespace

std::string describe(const caf::error& err) {
  if (!err)
    return "ok";
  std::string head;
  if (in_category<hsm_errc>(err))
    head = "hsm: " + to_string(static_cast<hsm_errc>(err.code()));
  else if (in_category<key_errc>(err))
    head = "key: " + to_string(static_cast<key_errc>(err.code()));
  else if (in_category<store_errc>(err))
    head = "store: " + to_string(static_cast<store_errc>(err.code()));
  else if (in_category<config_errc>(err))
    head = "config: " + to_string(static_cast<config_errc>(err.code()));
  else if (in_category<net_errc>(err))
    head = "net: " + to_string(static_cast<net_errc>(err.code()));
  else if (err.category() == caf::atom("system"))
    head = "system: " + caf::to_string(static_cast<caf::sec>(err.code()));
  else
    return caf::to_string(err);
  auto ctx = context_text(err, err.category() != caf::atom("system"));
  return ctx.empty() ? head : head + " (" + ctx + ")";
}

bool is_retryable(const caf::error& err) {
  if (in_category<hsm_errc>(err))
    return err.code() != static_cast<uint8_t>(hsm_errc::fatal);
  if (in_category<key_errc>(err))
    return err.code() == static_cast<uint8_t>(key_errc::key_not_on_this_hsm);
  if (in_category<net_errc>(err))
    return err.code() == static_cast<uint8_t>(net_errc::unreachable)
           || err.code() == static_cast<uint8_t>(net_errc::http_status);
  if (in_category<store_errc>(err))
    return err.code() == static_cast<uint8_t>(store_errc::unavailable)
           || err.code() == static_cast<uint8_t>(store_errc::query_failed);
  return false;
}

bool is_fatal(const caf::error& err) {
  return err == hsm_errc::fatal;
}

bool is_session_failure(const caf::error& err) {
  return err == hsm_errc::retryable || err == hsm_errc::reopen_session
         || err == hsm_errc::reinit_module || err == caf::sec::request_timeout
         || err == caf::sec::request_receiver_down;
}

std::string wire_code(const caf::error& err) {
  if (in_category<key_errc>(err))
    return to_string(static_cast<key_errc>(err.code()));
  if (in_category<hsm_errc>(err))
    return is_fatal(err) ? "hsm_error" : "hsm_unavailable";
  if (in_category<store_errc>(err))
    return "store_unavailable";
  if (in_category<config_errc>(err))
    return "config_error";
  return "internal";
}

} // namespace hsm
