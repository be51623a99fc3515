#include "runtime/net/wire_codec.hpp"

#include "runtime/crypto/hex.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <unordered_set>

namespace hsm::net {

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

/// True for the characters of key ids and request ids.
bool id_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
         || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':'
         || c == '-';
}

/// True if `text` nests arrays and objects deeper than `limit`; brackets
/// inside strings do not count. Checked before parsing: the parser would
/// otherwise keep state for every level of a body of brackets.
bool nested_deeper_than(std::string_view text, size_t limit) {
  size_t depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit)
        return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

/// The size and depth checks every body from the proxy passes first.
caf::error check_body(std::string_view body, const char* what) {
  if (body.size() > max_response_bytes)
    return caf::make_error(net_errc::bad_response,
                           std::string{what} + " is larger than "
                             + std::to_string(max_response_bytes) + " bytes");
  if (nested_deeper_than(body, max_json_depth))
    return caf::make_error(net_errc::bad_response,
                           std::string{what} + " is nested deeper than "
                             + std::to_string(max_json_depth) + " levels");
  return caf::none;
}

/// Parses a poll answer keeping only what the protocol names: the
/// `requests` array and in it up to `max` requests (objects; a second copy
/// of an id does not count), their `id`, `lease`, `lease_ms`, `kind` and
/// `params`, and in `params` only `key_id`, `scheme` and `payload`
/// (scalars). Everything else is skipped as it is read (nlohmann's parser
/// callback), so that memory stays in proportion to what is used, and
/// counted where it matters: entries after the `max`-th request, entries
/// that are not objects, second copies.
class poll_filter {
public:
  explicit poll_filter(size_t max) : max_(max) {
    // nop
  }

  /// The callback; `depth` counts the containers around the event.
  bool operator()(int depth, json::parse_event_t event, json& parsed) {
    using ev = json::parse_event_t;
    switch (depth) {
      case 0:
        // The answer itself: an object or nothing.
        return event == ev::object_start || event == ev::object_end;
      case 1:
        if (event == ev::key) {
          requests_key_ = parsed == "requests";
          in_requests_ = false;
          return requests_key_;
        }
        if (event == ev::array_start)
          in_requests_ = requests_key_;
        return true;
      case 2:
        return entry(event, parsed);
      case 3:
        if (event == ev::key)
          return parsed == "id" || parsed == "lease" || parsed == "lease_ms"
                 || parsed == "kind" || parsed == "params";
        // No field of a request is an array.
        return event != ev::array_start;
      case 4:
        if (event == ev::key)
          return parsed == "key_id" || parsed == "scheme"
                 || parsed == "payload";
        // Values in params are scalars; a container there is skipped.
        return event != ev::object_start && event != ev::array_start;
      default:
        return false;
    }
  }

  /// Entries after the `max`-th request.
  size_t excess() const noexcept {
    return excess_;
  }

  /// Entries before it that are not objects.
  size_t not_objects() const noexcept {
    return not_objects_;
  }

  /// Requests whose id came earlier in the answer.
  size_t duplicates() const noexcept {
    return duplicates_;
  }

private:
  /// An event at depth 2: an entry of `requests` starting or ending.
  bool entry(json::parse_event_t event, json& parsed) {
    using ev = json::parse_event_t;
    switch (event) {
      case ev::object_end:
        return finish(parsed);
      case ev::array_end:
        return true;
      case ev::key:
        // Only in a `requests` that is an object: no answer anyway.
        return false;
      default:
        break;
    }
    if (!in_requests_)
      return false;
    if (taken_ >= max_) {
      ++excess_;
      return false;
    }
    if (event != ev::object_start) {
      ++not_objects_;
      return false;
    }
    return true;
  }

  /// A request read whole: a second copy of an id is dropped, anything
  /// else takes one of the `max` places.
  bool finish(const json& request) {
    auto id = request.find("id");
    if (id != request.end() && id->is_string()
        && !ids_.insert(id->get<std::string>()).second) {
      ++duplicates_;
      return false;
    }
    ++taken_;
    return true;
  }

  size_t max_;
  bool requests_key_ = false;
  bool in_requests_ = false;
  size_t taken_ = 0;
  size_t excess_ = 0;
  size_t not_objects_ = 0;
  size_t duplicates_ = 0;
  std::unordered_set<std::string> ids_;
};

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

bool valid_request_id(std::string_view id) {
  return !id.empty() && id.size() <= max_request_id_length
         && std::all_of(id.begin(), id.end(), id_char);
}

bool valid_lease(std::string_view lease) {
  return !lease.empty() && lease.size() <= max_lease_length
         && std::all_of(lease.begin(), lease.end(), [](char c) {
              return id_char(c) || c == '+' || c == '/' || c == '=';
            });
}

std::string printable(std::string_view text, size_t max_chars) {
  std::string out{text.substr(0, max_chars)};
  for (auto& c : out)
    if (c < 0x20 || c > 0x7E)
      c = '?';
  return out;
}

caf::expected<decoded_poll> decode_poll(std::string_view body, size_t max) {
  if (auto err = check_body(body, "poll response"))
    return err;
  poll_filter filter{max};
  json doc = json::parse(
    body,
    [&filter](int depth, json::parse_event_t event, json& parsed) {
      return filter(depth, event, parsed);
    },
    false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("requests")
      || !doc["requests"].is_array())
    return caf::make_error(net_errc::bad_response,
                           std::string{"poll response is not "
                                       "{\"requests\":[...]}"});
  decoded_poll out;
  out.excess = filter.excess();
  out.unanswerable = filter.not_objects();
  out.duplicates = filter.duplicates();
  for (const auto& req : doc["requests"]) {
    auto id = req.find("id");
    auto lease = req.find("lease");
    if (id == req.end() || !id->is_string()
        || !valid_request_id(id->get_ref<const std::string&>())
        || lease == req.end() || !lease->is_string()
        || !valid_lease(lease->get_ref<const std::string&>())) {
      ++out.unanswerable;
      continue;
    }
    wire_request w;
    w.id = id->get<std::string>();
    w.lease = lease->get<std::string>();
    if (auto ms = req.find("lease_ms");
        ms != req.end() && ms->is_number_integer() && ms->get<int64_t>() > 0)
      w.lease_ms = std::min(ms->get<int64_t>(), max_lease_ms);
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
  if (auto err = check_body(body, "batch answer"))
    return err;
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
