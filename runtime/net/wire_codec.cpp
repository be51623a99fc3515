#include "runtime/net/wire_codec.hpp"

#include "runtime/crypto/hex.hpp"

#include <nlohmann/json.hpp>

namespace hsm::net {

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

caf::error bad(std::string what) {
  return caf::make_error(key_errc::invalid_request, std::move(what));
}

/// Decodes one request's kind and params into `out`; returns the error to
/// answer with.
caf::error decode_request(const json& req, wire_request& out) {
  if (!req.contains("kind") || !req["kind"].is_string())
    return bad("missing kind");
  if (!req.contains("params") || !req["params"].is_object())
    return bad("missing params object");
  const auto& params = req["params"];
  auto kind = req["kind"].get<std::string>();
  if (!params.contains("key_id") || !params["key_id"].is_string())
    return bad("params.key_id missing or not a string");
  out.key_id = params["key_id"].get<std::string>();
  if (kind == "generate_key") {
    out.kind = job_kind::generate_key;
    if (!params.contains("scheme") || !params["scheme"].is_string())
      return bad("params.scheme missing or not a string");
    out.scheme_name = params["scheme"].get<std::string>();
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
                               + std::to_string(max_payload_bytes) + " bytes");
    auto bytes = crypto::from_hex(hex);
    if (!bytes)
      return caf::make_error(key_errc::invalid_request,
                             "params.payload: " + describe(bytes.error()));
    out.payload = std::move(*bytes);
    return caf::none;
  }
  // Quoted and cut short: the kind comes from the network and ends up in
  // logs.
  return bad("unknown kind "
             + json(kind.substr(0, 40))
                 .dump(-1, ' ', true, json::error_handler_t::replace)
             + " (generate_key, sign)");
}

ordered_json result_entry(const job_result& r) {
  ordered_json e;
  e["id"] = r.id;
  e["lease"] = r.lease;
  e["ok"] = r.ok();
  std::visit(
    [&e](const auto& outcome) {
      using type = std::decay_t<decltype(outcome)>;
      if constexpr (std::is_same_v<type, error_result>)
        e["error"] = to_json(outcome);
      else
        e["result"] = to_json(outcome);
    },
    r.outcome);
  return e;
}

std::string dump(const ordered_json& j) {
  return j.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

} // namespace

caf::expected<decoded_poll> decode_poll(std::string_view body) {
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("requests")
      || !doc["requests"].is_array())
    return caf::make_error(net_errc::bad_response,
                           std::string{"poll response is not "
                                       "{\"requests\":[...]}"});
  decoded_poll out;
  for (const auto& req : doc["requests"]) {
    if (!req.is_object() || !req.contains("id") || !req["id"].is_string()
        || !req.contains("lease") || !req["lease"].is_string()
        || req["id"].get_ref<const std::string&>().empty()) {
      ++out.unanswerable;
      continue;
    }
    wire_request w;
    w.id = req["id"].get<std::string>();
    w.lease = req["lease"].get<std::string>();
    if (auto ms = req.find("lease_ms");
        ms != req.end() && ms->is_number_integer() && ms->get<int64_t>() > 0)
      w.lease_ms = ms->get<int64_t>();
    w.error = decode_request(req, w);
    out.requests.push_back(std::move(w));
  }
  return out;
}

ordered_json to_json(const key_result& r) {
  ordered_json res;
  res["key_id"] = r.key_id;
  res["scheme"] = std::string{to_string(r.scheme)};
  res["public_key"] = crypto::to_hex(r.public_key);
  if (!r.public_key_compressed.empty())
    res["public_key_compressed"] = crypto::to_hex(r.public_key_compressed);
  if (!r.public_key_fingerprint.empty())
    res["public_key_fingerprint"] = r.public_key_fingerprint;
  res["storage"] = r.storage;
  return res;
}

ordered_json to_json(const signature_result& r) {
  ordered_json res;
  res["key_id"] = r.key_id;
  res["scheme"] = std::string{to_string(r.scheme)};
  res["signature"] = crypto::to_hex(r.sig.raw);
  if (r.sig.recovery_id)
    res["recovery_id"] = *r.sig.recovery_id;
  if (!r.sig.der.empty())
    res["der"] = crypto::to_hex(r.sig.der);
  if (!r.sig.public_key_fingerprint.empty())
    res["public_key_fingerprint"] = r.sig.public_key_fingerprint;
  return res;
}

ordered_json to_json(const error_result& r) {
  return ordered_json{{"code", r.code},
                      {"message", r.message},
                      {"retryable", r.retryable}};
}

std::string encode_result(const job_result& r, std::string_view driver_id) {
  auto body = result_entry(r);
  body["driver_id"] = std::string{driver_id};
  return dump(body);
}

std::string encode_results(const std::vector<job_result>& rs,
                           std::string_view driver_id) {
  ordered_json body;
  body["driver_id"] = std::string{driver_id};
  body["results"] = ordered_json::array();
  for (const auto& r : rs)
    body["results"].push_back(result_entry(r));
  return dump(body);
}

caf::expected<std::vector<result_status>>
decode_result_statuses(std::string_view body,
                       const std::vector<job_result>& sent) {
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("results")
      || !doc["results"].is_array())
    return caf::make_error(net_errc::bad_response,
                           std::string{"batch answer is not "
                                       "{\"results\":[...]}"});
  std::vector<result_status> out(sent.size(), result_status::refused);
  const auto& entries = doc["results"];
  for (size_t i = 0; i < sent.size(); ++i) {
    // Matched by position when the ids agree, else by id.
    const json* entry = nullptr;
    if (i < entries.size() && entries[i].is_object()
        && entries[i].value("id", json{}) == sent[i].id)
      entry = &entries[i];
    for (size_t k = 0; entry == nullptr && k < entries.size(); ++k)
      if (entries[k].is_object()
          && entries[k].value("id", json{}) == sent[i].id)
        entry = &entries[k];
    if (entry == nullptr)
      continue;
    auto status = entry->value("status", std::string{});
    if (status == "accepted")
      out[i] = result_status::accepted;
    else if (status == "lease_not_current")
      out[i] = result_status::lease_not_current;
  }
  return out;
}

} // namespace hsm::net
