#include "runtime/wire.hpp"

#include <nlohmann/json.hpp>

#include "runtime/crypto/hex.hpp"

namespace hsm {

namespace {

using json = nlohmann::json;

job_result reject(const std::string& id, const std::string& lease,
                  const caf::error& err) {
  job_result r;
  r.id = id;
  r.lease = lease;
  r.ok = false;
  r.error_code = wire_code(err);
  r.error_message = describe(err);
  r.retryable = is_retryable(err);
  return r;
}

caf::error bad(std::string what) {
  return caf::make_error(key_errc::invalid_request, std::move(what));
}

/// Validates one request; fills `out` or returns the error to answer with.
caf::error parse_request(const json& req, job& out) {
  if (!req.contains("kind") || !req["kind"].is_string())
    return bad("missing kind");
  if (!req.contains("params") || !req["params"].is_object())
    return bad("missing params object");
  const auto& params = req["params"];
  auto kind = req["kind"].get<std::string>();
  if (!params.contains("key_id") || !params["key_id"].is_string())
    return bad("params.key_id missing or not a string");
  out.key_id = params["key_id"].get<std::string>();
  if (auto err = validate_key_id(out.key_id))
    return err;
  if (kind == "generate_key") {
    out.kind = job_kind::generate_key;
    if (!params.contains("scheme") || !params["scheme"].is_string())
      return bad("params.scheme missing or not a string");
    auto s = parse_scheme_name(params["scheme"].get<std::string>());
    if (!s)
      return s.error();
    out.scheme = *s;
    return caf::none;
  }
  if (kind == "sign") {
    out.kind = job_kind::sign;
    if (!params.contains("payload") || !params["payload"].is_string())
      return bad("params.payload missing or not a hex string");
    const auto& hex = params["payload"].get_ref<const std::string&>();
    if (hex.size() > 2 * max_payload_bytes + 2)
      return caf::make_error(key_errc::invalid_payload,
                             "payload larger than "
                               + std::to_string(max_payload_bytes)
                               + " bytes");
    auto bytes = crypto::from_hex(hex);
    if (!bytes)
      return caf::make_error(key_errc::invalid_request,
                             "params.payload: " + describe(bytes.error()));
    out.payload = std::move(*bytes);
    return caf::none;
  }
  // Quoted and cut short: the kind comes from the network and ends up in
  // logs.
  return bad("unknown kind " + json(kind.substr(0, 40)).dump(-1, ' ', true,
                                                             json::error_handler_t::replace)
             + " (generate_key, sign)");
}

} // namespace

caf::expected<parsed_poll> parse_poll(std::string_view body) {
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("requests")
      || !doc["requests"].is_array())
    return caf::make_error(net_errc::bad_response,
                           std::string{"poll response is not "
                                       "{\"requests\":[...]}"});
  parsed_poll out;
  for (const auto& req : doc["requests"]) {
    if (!req.is_object() || !req.contains("id") || !req["id"].is_string()
        || !req.contains("lease") || !req["lease"].is_string()
        || req["id"].get_ref<const std::string&>().empty()) {
      ++out.unanswerable;
      continue;
    }
    job j;
    j.id = req["id"].get<std::string>();
    j.lease = req["lease"].get<std::string>();
    if (auto err = parse_request(req, j))
      out.rejected.push_back(reject(j.id, j.lease, err));
    else
      out.jobs.push_back(std::move(j));
  }
  return out;
}

job_result error_result(const job& j, const caf::error& err) {
  return reject(j.id, j.lease, err);
}

job_result key_result(const job& j, const key_view& v) {
  json res;
  res["key_id"] = v.key_id;
  res["scheme"] = std::string{to_string(v.scheme)};
  res["public_key"] = crypto::to_hex(v.public_key);
  if (!v.public_key_compressed.empty())
    res["public_key_compressed"] = crypto::to_hex(v.public_key_compressed);
  res["storage"] = v.storage;
  job_result r;
  r.id = j.id;
  r.lease = j.lease;
  r.ok = true;
  r.result_json = res.dump();
  return r;
}

job_result signature_result(const job& j, const signature_view& v) {
  json res;
  res["key_id"] = v.key_id;
  res["scheme"] = std::string{to_string(v.scheme)};
  res["signature"] = crypto::to_hex(v.sig.raw);
  if (v.sig.recovery_id)
    res["recovery_id"] = *v.sig.recovery_id;
  if (!v.sig.der.empty())
    res["der"] = crypto::to_hex(v.sig.der);
  job_result r;
  r.id = j.id;
  r.lease = j.lease;
  r.ok = true;
  r.result_json = res.dump();
  return r;
}

std::string encode_result(const job_result& r, std::string_view driver_id) {
  json body;
  body["id"] = r.id;
  body["lease"] = r.lease;
  body["driver_id"] = std::string{driver_id};
  body["ok"] = r.ok;
  if (r.ok)
    body["result"] = json::parse(r.result_json, nullptr, false);
  else
    body["error"] = {{"code", r.error_code},
                     {"message", r.error_message},
                     {"retryable", r.retryable}};
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

} // namespace hsm
