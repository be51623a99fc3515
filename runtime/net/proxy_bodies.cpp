#include "runtime/net/proxy_bodies.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace hsm::net {

namespace {

using json = nlohmann::json;

body_complaint complaint(std::string message) {
  return body_complaint{std::move(message)};
}

/// The body as a JSON object; nullopt if it is not one. The non-throwing
/// parser: no exception leaves here.
std::optional<json> parse_object(std::string_view body) {
  auto out = json::parse(body, nullptr, false);
  if (out.is_discarded() || !out.is_object())
    return std::nullopt;
  return out;
}

const char* const not_an_object = "body is not a JSON object";

/// `obj[key]` if it is a non-empty string.
const std::string* find_string(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_string())
    return nullptr;
  const auto& text = it->get_ref<const std::string&>();
  return text.empty() ? nullptr : &text;
}

std::string must_be_string(const char* key) {
  return std::string{"\""} + key + "\" must be a non-empty string";
}

/// `obj[key]` if it is an integer >= `min`.
std::optional<uint64_t> find_count(const json& obj, const char* key,
                                   uint64_t min) {
  auto it = obj.find(key);
  std::optional<uint64_t> out;
  if (it != obj.end() && it->is_number_unsigned())
    out = it->get<uint64_t>();
  else if (it != obj.end() && it->is_number_integer()
           && it->get<int64_t>() >= 0)
    out = static_cast<uint64_t>(it->get<int64_t>());
  if (out && *out < min)
    out.reset();
  return out;
}

std::string must_be_count(const char* key, uint64_t min) {
  return std::string{"\""} + key
         + "\" must be an integer >= " + std::to_string(min);
}

/// Reads one result entry.
posted_result read_entry(const json& entry) {
  posted_result out;
  if (!entry.is_object()) {
    out.complaint = complaint("a result must be an object");
    return out;
  }
  if (auto* id = find_string(entry, "id"))
    out.id = *id;
  for (auto key : {"id", "lease"}) {
    if (find_string(entry, key) == nullptr) {
      out.complaint = complaint(must_be_string(key));
      return out;
    }
  }
  out.lease = *find_string(entry, "lease");
  auto ok_it = entry.find("ok");
  if (ok_it == entry.end() || !ok_it->is_boolean()) {
    out.complaint = complaint("\"ok\" must be a boolean");
    return out;
  }
  out.outcome.ok = ok_it->get<bool>();
  if (out.outcome.ok) {
    auto it = entry.find("result");
    if (it == entry.end() || !it->is_object())
      out.complaint = complaint(
        "\"result\" must be an object when \"ok\" is true");
    else
      out.outcome.body = dump_json(*it);
    return out;
  }
  auto it = entry.find("error");
  auto valid = it != entry.end() && it->is_object();
  if (valid) {
    auto code = it->find("code");
    auto msg = it->find("message");
    auto rt = it->find("retryable");
    valid = code != it->end() && code->is_string() && msg != it->end()
            && msg->is_string() && rt != it->end() && rt->is_boolean();
    if (valid)
      out.outcome.retryable = rt->get<bool>();
  }
  if (!valid)
    out.complaint = complaint(
      "\"error\" must be an object with a string \"code\", a string "
      "\"message\" and a boolean \"retryable\" when \"ok\" is false");
  else
    out.outcome.body = dump_json(*it);
  return out;
}

} // namespace

std::string dump_json(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

body_read<poll_ask> read_poll_ask(std::string_view body) {
  auto obj = parse_object(body);
  if (!obj)
    return complaint(not_an_object);
  poll_ask out;
  if (auto* driver = find_string(*obj, "driver_id"))
    out.driver_id = *driver;
  else
    return complaint(must_be_string("driver_id"));
  if (auto max = find_count(*obj, "max", 1))
    out.max = *max;
  else
    return complaint(must_be_count("max", 1));
  if (auto wait = find_count(*obj, "wait_ms", 0))
    out.wait_ms = *wait;
  else
    return complaint(must_be_count("wait_ms", 0));
  return out;
}

body_read<posted_results> read_results(std::string_view body) {
  auto obj = parse_object(body);
  if (!obj)
    return complaint(not_an_object);
  posted_results out;
  if (auto* driver = find_string(*obj, "driver_id"))
    out.driver_id = *driver;
  else
    return complaint(must_be_string("driver_id"));
  auto batch = obj->find("results");
  if (batch == obj->end()) {
    auto one = read_entry(*obj);
    if (one.complaint)
      return std::move(*one.complaint);
    out.results.push_back(std::move(one));
    return out;
  }
  if (!batch->is_array())
    return complaint("\"results\" must be an array");
  out.batch = true;
  out.results.reserve(batch->size());
  for (const auto& entry : *batch)
    out.results.push_back(read_entry(entry));
  return out;
}

body_read<enqueue_ask> read_enqueue(std::string_view body) {
  auto obj = parse_object(body);
  if (!obj)
    return complaint(not_an_object);
  enqueue_ask out;
  if (auto* kind = find_string(*obj, "kind"))
    out.kind = *kind;
  else
    return complaint(must_be_string("kind"));
  auto params = obj->find("params");
  if (params == obj->end() || !params->is_object())
    return complaint("\"params\" must be an object");
  out.params = dump_json(*params);
  if (obj->contains("id")) {
    if (auto* id = find_string(*obj, "id"))
      out.id = *id;
    else
      return complaint(must_be_string("id"));
  }
  return out;
}

body_read<fault_ask> read_fault_ask(std::string_view body) {
  auto obj = parse_object(body);
  if (!obj)
    return complaint(not_an_object);
  fault_ask out;
  if (auto* fault = find_string(*obj, "fault"))
    out.fault = *fault;
  else
    return complaint(must_be_string("fault"));
  if (obj->contains("polls")) {
    auto polls = find_count(*obj, "polls", 1);
    if (!polls)
      return complaint(must_be_count("polls", 1));
    if (*polls > max_fault_polls)
      return complaint("\"polls\" must be <= "
                       + std::to_string(max_fault_polls));
    out.polls = *polls;
  }
  return out;
}

} // namespace hsm::net
