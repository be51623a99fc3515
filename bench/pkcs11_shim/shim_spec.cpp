#include "bench/pkcs11_shim/shim_spec.hpp"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <map>
#include <vector>

namespace hsm::shim {

namespace {

constexpr std::string_view blanks = " \t\r\n";

std::string_view trim(std::string_view text) {
  auto first = text.find_first_not_of(blanks);
  if (first == std::string_view::npos)
    return {};
  auto last = text.find_last_not_of(blanks);
  return text.substr(first, last - first + 1);
}

/// Splits at every `sep`; keeps empty pieces (the caller decides).
std::vector<std::string_view> split(std::string_view text, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (;;) {
    auto pos = text.find(sep, start);
    if (pos == std::string_view::npos) {
      out.push_back(text.substr(start));
      return out;
    }
    out.push_back(text.substr(start, pos - start));
    start = pos + 1;
  }
}

std::string quoted(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out += '"';
  out += text;
  out += '"';
  return out;
}

struct unit {
  std::string_view suffix;
  duration size;
};

// Longest suffix first: "ms" must not be read as "s".
constexpr std::array<unit, 4> units{{
  {"ns", std::chrono::nanoseconds{1}},
  {"us", std::chrono::microseconds{1}},
  {"ms", std::chrono::milliseconds{1}},
  {"s", std::chrono::seconds{1}},
}};

/// The rules of one kind, before `*` is applied: target -> value.
template <class Value>
struct rule_set {
  std::array<std::optional<Value>, function_count> named{};
  std::optional<Value> fallback;
};

/// Reads `target:value` pairs into `rules`; `parse_value` reads one value.
/// Returns an error message, empty on success.
template <class Value, class ParseValue>
std::string read_rules(std::string_view kind, std::string_view text,
                       rule_set<Value>& rules, ParseValue parse_value) {
  for (auto raw_rule : split(text, ',')) {
    auto rule = trim(raw_rule);
    if (rule.empty())
      return "empty rule in " + quoted(kind) + " (expected <function>:<value>)";
    auto colon = rule.find(':');
    if (colon == std::string_view::npos)
      return "rule " + quoted(rule) + ": expected <function>:<value>";
    auto target = trim(rule.substr(0, colon));
    auto value_text = trim(rule.substr(colon + 1));
    auto value = parse_value(value_text);
    if (!value)
      return "rule " + quoted(rule) + ": " + value.error;
    if (target == "*") {
      if (rules.fallback)
        return "rule " + quoted(rule) + ": \"*\" is given twice in "
               + quoted(kind);
      rules.fallback = *value.value;
      continue;
    }
    if (target == "C_GetFunctionList")
      return "rule " + quoted(rule)
             + ": C_GetFunctionList is answered by the shim itself";
    auto index = function_index(target);
    if (!index)
      return "rule " + quoted(rule) + ": unknown PKCS#11 function "
             + quoted(target) + " (names are case-sensitive, e.g. C_Sign)";
    if (rules.named[*index])
      return "rule " + quoted(rule) + ": " + std::string{target}
             + " is given twice in " + quoted(kind);
    rules.named[*index] = *value.value;
  }
  return {};
}

} // namespace

bool spec::forwards_at_once() const noexcept {
  return std::all_of(delay.begin(), delay.end(),
                     [](duration d) { return d == duration::zero(); });
}

parsed<duration> parse_duration(std::string_view text) {
  text = trim(text);
  if (text.empty())
    return {std::nullopt, "missing duration (e.g. 2ms, 500us)"};
  if (text == "0")
    return {duration::zero(), {}};
  auto digits_end = text.find_first_not_of("0123456789");
  if (digits_end == 0)
    return {std::nullopt, "duration " + quoted(text)
                            + " must start with digits (e.g. 2ms, 500us)"};
  if (digits_end == std::string_view::npos)
    return {std::nullopt,
            "duration " + quoted(text) + " has no unit (ns, us, ms or s)"};
  auto suffix = text.substr(digits_end);
  auto match = std::find_if(units.begin(), units.end(),
                            [&](const unit& u) { return u.suffix == suffix; });
  if (match == units.end())
    return {std::nullopt, "duration " + quoted(text)
                            + ": unknown unit (ns, us, ms or s; no "
                              "fractions: 1500us, not 1.5ms)"};
  uint64_t count = 0;
  auto digits = text.substr(0, digits_end);
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(),
                                   count);
  auto limit = static_cast<uint64_t>(max_delay / match->size);
  if (ec != std::errc{} || end != digits.data() + digits.size()
      || count > limit)
    return {std::nullopt,
            "duration " + quoted(text) + " is longer than the limit of 1h"};
  return {match->size * static_cast<duration::rep>(count), {}};
}

parsed<spec> parse_spec(std::string_view text) {
  rule_set<duration> delays;
  for (auto raw_clause : split(text, ';')) {
    auto clause = trim(raw_clause);
    if (clause.empty())
      continue;
    auto eq = clause.find('=');
    if (eq == std::string_view::npos)
      return {std::nullopt, "clause " + quoted(clause)
                              + ": expected <kind>=<rules> (e.g. "
                                "delay=C_Sign:2ms)"};
    auto kind = trim(clause.substr(0, eq));
    auto rules = clause.substr(eq + 1);
    std::string error;
    if (kind == "delay")
      error = read_rules(kind, rules, delays, parse_duration);
    else
      // Later kinds (fail, hang) get their own rule_set and value parser.
      error = "unknown kind " + quoted(kind) + " (known: delay)";
    if (!error.empty())
      return {std::nullopt, "clause " + quoted(clause) + ": " + error};
  }
  spec out;
  for (size_t i = 0; i < function_count; ++i)
    out.delay[i] = delays.named[i].value_or(
      delays.fallback.value_or(duration::zero()));
  return {out, {}};
}

std::string to_string(duration d) {
  if (d == duration::zero())
    return "0";
  for (auto u = units.rbegin(); u != units.rend(); ++u)
    if (d % u->size == duration::zero())
      return std::to_string(d / u->size) + std::string{u->suffix};
  return std::to_string(d.count()) + "ns"; // unreachable: ns divides all
}

std::string to_string(const spec& s) {
  // The most frequent delay becomes `*`; the others are listed by name.
  std::map<duration::rep, size_t> frequency;
  for (auto d : s.delay)
    ++frequency[d.count()];
  auto most = std::max_element(frequency.begin(), frequency.end(),
                               [](const auto& x, const auto& y) {
                                 return x.second < y.second;
                               });
  auto fallback = duration{most->first};
  std::string rules;
  for (size_t i = 0; i < function_count; ++i) {
    if (s.delay[i] == fallback)
      continue;
    if (!rules.empty())
      rules += ',';
    rules += function_names[i];
    rules += ':';
    rules += to_string(s.delay[i]);
  }
  if (fallback != duration::zero()) {
    if (!rules.empty())
      rules += ',';
    rules += "*:" + to_string(fallback);
  }
  return rules.empty() ? std::string{} : "delay=" + rules;
}

} // namespace hsm::shim
