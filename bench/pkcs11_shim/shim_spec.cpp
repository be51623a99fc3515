#include "bench/pkcs11_shim/shim_spec.hpp"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <utility>

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

bool all_digits(std::string_view text) {
  return !text.empty()
         && text.find_first_not_of("0123456789") == std::string_view::npos;
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

// The CKR_ names of p11-kit's <p11-kit/pkcs11.h> (PKCS#11 2.40), without
// CKR_VENDOR_DEFINED; the test compares them with runtime/pkcs11/rv.cpp.
constexpr named_rv rv_table[] = {
  {"CKR_OK", 0},
  {"CKR_CANCEL", 1},
  {"CKR_HOST_MEMORY", 2},
  {"CKR_SLOT_ID_INVALID", 3},
  {"CKR_GENERAL_ERROR", 5},
  {"CKR_FUNCTION_FAILED", 6},
  {"CKR_ARGUMENTS_BAD", 7},
  {"CKR_NO_EVENT", 8},
  {"CKR_NEED_TO_CREATE_THREADS", 9},
  {"CKR_CANT_LOCK", 0xa},
  {"CKR_ATTRIBUTE_READ_ONLY", 0x10},
  {"CKR_ATTRIBUTE_SENSITIVE", 0x11},
  {"CKR_ATTRIBUTE_TYPE_INVALID", 0x12},
  {"CKR_ATTRIBUTE_VALUE_INVALID", 0x13},
  {"CKR_ACTION_PROHIBITED", 0x1B},
  {"CKR_DATA_INVALID", 0x20},
  {"CKR_DATA_LEN_RANGE", 0x21},
  {"CKR_DEVICE_ERROR", 0x30},
  {"CKR_DEVICE_MEMORY", 0x31},
  {"CKR_DEVICE_REMOVED", 0x32},
  {"CKR_ENCRYPTED_DATA_INVALID", 0x40},
  {"CKR_ENCRYPTED_DATA_LEN_RANGE", 0x41},
  {"CKR_FUNCTION_CANCELED", 0x50},
  {"CKR_FUNCTION_NOT_PARALLEL", 0x51},
  {"CKR_FUNCTION_NOT_SUPPORTED", 0x54},
  {"CKR_KEY_HANDLE_INVALID", 0x60},
  {"CKR_KEY_SIZE_RANGE", 0x62},
  {"CKR_KEY_TYPE_INCONSISTENT", 0x63},
  {"CKR_KEY_NOT_NEEDED", 0x64},
  {"CKR_KEY_CHANGED", 0x65},
  {"CKR_KEY_NEEDED", 0x66},
  {"CKR_KEY_INDIGESTIBLE", 0x67},
  {"CKR_KEY_FUNCTION_NOT_PERMITTED", 0x68},
  {"CKR_KEY_NOT_WRAPPABLE", 0x69},
  {"CKR_KEY_UNEXTRACTABLE", 0x6a},
  {"CKR_MECHANISM_INVALID", 0x70},
  {"CKR_MECHANISM_PARAM_INVALID", 0x71},
  {"CKR_OBJECT_HANDLE_INVALID", 0x82},
  {"CKR_OPERATION_ACTIVE", 0x90},
  {"CKR_OPERATION_NOT_INITIALIZED", 0x91},
  {"CKR_PIN_INCORRECT", 0xa0},
  {"CKR_PIN_INVALID", 0xa1},
  {"CKR_PIN_LEN_RANGE", 0xa2},
  {"CKR_PIN_EXPIRED", 0xa3},
  {"CKR_PIN_LOCKED", 0xa4},
  {"CKR_SESSION_CLOSED", 0xb0},
  {"CKR_SESSION_COUNT", 0xb1},
  {"CKR_SESSION_HANDLE_INVALID", 0xb3},
  {"CKR_SESSION_PARALLEL_NOT_SUPPORTED", 0xb4},
  {"CKR_SESSION_READ_ONLY", 0xb5},
  {"CKR_SESSION_EXISTS", 0xb6},
  {"CKR_SESSION_READ_ONLY_EXISTS", 0xb7},
  {"CKR_SESSION_READ_WRITE_SO_EXISTS", 0xb8},
  {"CKR_SIGNATURE_INVALID", 0xc0},
  {"CKR_SIGNATURE_LEN_RANGE", 0xc1},
  {"CKR_TEMPLATE_INCOMPLETE", 0xd0},
  {"CKR_TEMPLATE_INCONSISTENT", 0xd1},
  {"CKR_TOKEN_NOT_PRESENT", 0xe0},
  {"CKR_TOKEN_NOT_RECOGNIZED", 0xe1},
  {"CKR_TOKEN_WRITE_PROTECTED", 0xe2},
  {"CKR_UNWRAPPING_KEY_HANDLE_INVALID", 0xf0},
  {"CKR_UNWRAPPING_KEY_SIZE_RANGE", 0xf1},
  {"CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT", 0xf2},
  {"CKR_USER_ALREADY_LOGGED_IN", 0x100},
  {"CKR_USER_NOT_LOGGED_IN", 0x101},
  {"CKR_USER_PIN_NOT_INITIALIZED", 0x102},
  {"CKR_USER_TYPE_INVALID", 0x103},
  {"CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x104},
  {"CKR_USER_TOO_MANY_TYPES", 0x105},
  {"CKR_WRAPPED_KEY_INVALID", 0x110},
  {"CKR_WRAPPED_KEY_LEN_RANGE", 0x112},
  {"CKR_WRAPPING_KEY_HANDLE_INVALID", 0x113},
  {"CKR_WRAPPING_KEY_SIZE_RANGE", 0x114},
  {"CKR_WRAPPING_KEY_TYPE_INCONSISTENT", 0x115},
  {"CKR_RANDOM_SEED_NOT_SUPPORTED", 0x120},
  {"CKR_RANDOM_NO_RNG", 0x121},
  {"CKR_DOMAIN_PARAMS_INVALID", 0x130},
  {"CKR_CURVE_NOT_SUPPORTED", 0x140},
  {"CKR_BUFFER_TOO_SMALL", 0x150},
  {"CKR_SAVED_STATE_INVALID", 0x160},
  {"CKR_INFORMATION_SENSITIVE", 0x170},
  {"CKR_STATE_UNSAVEABLE", 0x180},
  {"CKR_CRYPTOKI_NOT_INITIALIZED", 0x190},
  {"CKR_CRYPTOKI_ALREADY_INITIALIZED", 0x191},
  {"CKR_MUTEX_BAD", 0x1a0},
  {"CKR_MUTEX_NOT_LOCKED", 0x1a1},
  {"CKR_NEW_PIN_MODE", 0x1b0},
  {"CKR_NEXT_OTP", 0x1b1},
  {"CKR_EXCEEDED_MAX_ITERATIONS", 0x1c0},
  {"CKR_FIPS_SELF_TEST_FAILED", 0x1c1},
  {"CKR_LIBRARY_LOAD_FAILED", 0x1c2},
  {"CKR_PIN_TOO_WEAK", 0x1c3},
  {"CKR_PUBLIC_KEY_INVALID", 0x1c4},
  {"CKR_FUNCTION_REJECTED", 0x200},
};

/// The largest count `@N`, `/N` take (a typo guard).
constexpr uint64_t max_count = 1'000'000'000'000'000'000;

/// Reads a call count: decimal digits, at least 1.
parsed<uint64_t> parse_count(std::string_view text) {
  text = trim(text);
  if (!all_digits(text))
    return {std::nullopt, "expected a call count (digits, e.g. @3, /10), got "
                            + quoted(text)};
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc{} || end != text.data() + text.size() || n > max_count)
    return {std::nullopt, "call count " + quoted(text) + " is too large"};
  if (n == 0)
    return {std::nullopt,
            "calls are counted from 1, " + quoted(text) + " selects none"};
  return {n, {}};
}

/// Reads P of `%P`: digits, optionally '.' and 1 to 6 digits; 0 < P <= 100.
parsed<uint32_t> parse_percent(std::string_view text) {
  text = trim(text);
  auto dot = text.find('.');
  auto whole = text.substr(0, dot);
  auto fraction = dot == std::string_view::npos ? std::string_view{}
                                                : text.substr(dot + 1);
  if (!all_digits(whole)
      || (dot != std::string_view::npos && !all_digits(fraction)))
    return {std::nullopt,
            "expected a percentage (e.g. %1, %0.5, %100), got " + quoted(text)};
  if (fraction.size() > 6)
    return {std::nullopt,
            "percentage " + quoted(text) + " has more than 6 decimals"};
  if (whole.size() > 3)
    return {std::nullopt, "percentage " + quoted(text) + " is above 100"};
  uint64_t value = 0;
  for (char c : whole)
    value = value * 10 + static_cast<uint64_t>(c - '0');
  for (size_t i = 0; i < 6; ++i)
    value = value * 10
            + (i < fraction.size() ? static_cast<uint64_t>(fraction[i] - '0')
                                   : 0);
  if (value == 0)
    return {std::nullopt, "percentage " + quoted(text) + " selects no call"};
  if (value > all_millionths)
    return {std::nullopt, "percentage " + quoted(text) + " is above 100"};
  return {static_cast<uint32_t>(value), {}};
}

/// A value split at its last `for` word: what comes before, and the
/// duration text after it (nullopt without `for`).
std::pair<std::string_view, std::optional<std::string_view>>
split_for(std::string_view text) {
  auto blank = [](char c) { return blanks.find(c) != std::string_view::npos; };
  for (size_t pos = text.rfind("for"); pos != std::string_view::npos;
       pos = pos == 0 ? std::string_view::npos : text.rfind("for", pos - 1)) {
    bool starts = pos == 0 || blank(text[pos - 1]);
    bool ends = pos + 3 < text.size() && blank(text[pos + 3]);
    if (starts && ends)
      return {trim(text.substr(0, pos)), trim(text.substr(pos + 3))};
  }
  return {text, std::nullopt};
}

/// A value (without `for`) split into what comes before its `when`
/// (the CK_RVs) and the `when`.
std::pair<std::string_view, std::string_view>
split_when(std::string_view text) {
  auto pos = text.find_first_of("@/%");
  if (pos == std::string_view::npos)
    return {trim(text), {}};
  return {trim(text.substr(0, pos)), trim(text.substr(pos))};
}

template <class Rule>
using rule_value = parsed<std::optional<Rule>>;

/// The `for D` part of `hang` and `outage`: more than 0.
parsed<duration> parse_length(std::string_view text) {
  auto d = parse_duration(text);
  if (d && *d.value == duration::zero())
    return {std::nullopt, "\"for 0\" lasts no time"};
  return d;
}

rule_value<fail_rule> parse_fail(std::string_view text) {
  if (text == "none")
    return {std::optional<fail_rule>{}, {}};
  auto [head, length] = split_for(text);
  if (length)
    return {std::nullopt, "\"for\" belongs to hang and outage, not fail"};
  auto [what, when] = split_when(head);
  if (what.empty())
    return {std::nullopt,
            "missing CK_RV before the call selector (e.g. CKR_DEVICE_ERROR%1)"};
  fail_rule rule;
  for (auto name : split(what, '|')) {
    auto rv = parse_rv(name);
    if (!rv)
      return {std::nullopt, rv.error};
    rule.codes.push_back(*rv.value);
  }
  auto sel = parse_selector(when, false);
  if (!sel)
    return {std::nullopt, sel.error};
  rule.when = *sel.value;
  return {std::optional<fail_rule>{std::move(rule)}, {}};
}

rule_value<hang_rule> parse_hang(std::string_view text) {
  if (text == "none")
    return {std::optional<hang_rule>{}, {}};
  auto [head, length] = split_for(text);
  auto [what, when] = split_when(head);
  if (!what.empty())
    return {std::nullopt, quoted(what)
                            + ": a hang takes no CK_RV (e.g. @10, or @10 "
                              "for 30s)"};
  hang_rule rule;
  auto sel = parse_selector(when, false);
  if (!sel)
    return {std::nullopt, sel.error};
  rule.when = *sel.value;
  if (length) {
    auto bound = parse_length(*length);
    if (!bound)
      return {std::nullopt, bound.error};
    rule.bound = *bound.value;
  }
  return {rule, {}};
}

rule_value<invalidate_rule> parse_invalidate(std::string_view text) {
  if (text == "none")
    return {std::optional<invalidate_rule>{}, {}};
  auto [head, length] = split_for(text);
  if (length)
    return {std::nullopt, "\"for\" belongs to hang and outage, not invalidate"};
  auto [what, when] = split_when(head);
  if (!what.empty())
    return {std::nullopt,
            quoted(what) + ": invalidate takes no CK_RV (e.g. @50, %1)"};
  auto sel = parse_selector(when, false);
  if (!sel)
    return {std::nullopt, sel.error};
  return {invalidate_rule{*sel.value}, {}};
}

rule_value<outage_rule> parse_outage(std::string_view text) {
  if (text == "none")
    return {std::optional<outage_rule>{}, {}};
  auto [head, length] = split_for(text);
  if (!length)
    return {std::nullopt, "an outage needs its length (e.g. "
                          "CKR_DEVICE_REMOVED@100 for 5s)"};
  auto [what, when] = split_when(head);
  if (what.empty())
    return {std::nullopt, "missing CK_RV (e.g. CKR_DEVICE_REMOVED@100 for 5s)"};
  if (what.find('|') != std::string_view::npos)
    return {std::nullopt,
            "an outage answers with one CK_RV, not " + quoted(what)};
  auto rv = parse_rv(what);
  if (!rv)
    return {std::nullopt, rv.error};
  auto sel = parse_selector(when, true);
  if (!sel)
    return {std::nullopt, sel.error};
  auto d = parse_length(*length);
  if (!d)
    return {std::nullopt, d.error};
  return {outage_rule{*rv.value, *sel.value, *d.value}, {}};
}

/// The rules of one kind, before `*` is applied: target -> value.
template <class Value>
struct rule_set {
  std::array<std::optional<Value>, function_count> named{};
  std::optional<Value> fallback;

  /// Every function's value: its own, else `*`'s, else `none`.
  std::array<Value, function_count> expand(const Value& none) const {
    std::array<Value, function_count> out;
    for (size_t i = 0; i < function_count; ++i)
      out[i] = named[i] ? *named[i] : fallback.value_or(none);
    return out;
  }
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
      rules.fallback = std::move(*value.value);
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
    rules.named[*index] = std::move(*value.value);
  }
  return {};
}

/// splitmix64's finaliser: a well-mixed 64-bit hash of `x`.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9;
  x = (x ^ (x >> 27)) * 0x94d049bb133111eb;
  return x ^ (x >> 31);
}

/// A uniform 64-bit draw for (seed, salt, function, call).
uint64_t draw(uint64_t seed, uint64_t salt, size_t index, uint64_t n) {
  return mix(mix(mix(mix(seed) ^ salt) ^ index) ^ n);
}

/// `pick_code`'s salt: apart from every fault kind's.
constexpr uint64_t pick_salt = 0x70696b; // "pik"

std::string percent_to_string(uint32_t millionths) {
  auto text = std::to_string(millionths / 1'000'000);
  auto fraction = millionths % 1'000'000;
  if (fraction == 0)
    return text;
  char digits[8];
  std::snprintf(digits, sizeof(digits), "%06u", fraction);
  std::string_view f{digits};
  return text + "." + std::string{f.substr(0, f.find_last_not_of('0') + 1)};
}

std::string rule_to_string(const fail_rule& r) {
  std::string out;
  for (auto code : r.codes) {
    if (!out.empty())
      out += '|';
    out += rv_name(code);
  }
  return out + to_string(r.when);
}

std::string rule_to_string(const hang_rule& r) {
  auto out = to_string(r.when);
  if (r.bound)
    out += (out.empty() ? "for " : " for ") + to_string(*r.bound);
  return out;
}

std::string rule_to_string(const invalidate_rule& r) {
  return to_string(r.when);
}

std::string rule_to_string(const outage_rule& r) {
  return rv_name(r.code) + to_string(r.when) + " for " + to_string(r.length);
}

std::string value_to_string(duration d) {
  return to_string(d);
}

template <class Rule>
std::string value_to_string(const std::optional<Rule>& r) {
  return r ? rule_to_string(*r) : "none";
}

/// One kind's clause: the most frequent value becomes `*` (on a tie: `none`,
/// else the first in function order), the others are listed by name.
template <class Value>
std::string kind_to_string(std::string_view kind,
                           const std::array<Value, function_count>& values,
                           const Value& none) {
  std::vector<std::pair<size_t, size_t>> groups; // first index, count
  for (size_t i = 0; i < function_count; ++i) {
    auto same = std::find_if(groups.begin(), groups.end(), [&](auto& g) {
      return values[g.first] == values[i];
    });
    if (same != groups.end())
      ++same->second;
    else
      groups.emplace_back(i, 1);
  }
  auto best = groups.begin();
  for (auto g = groups.begin(); g != groups.end(); ++g)
    if (g->second > best->second
        || (g->second == best->second && values[g->first] == none))
      best = g;
  const auto& fallback = values[best->first];
  std::string rules;
  for (size_t i = 0; i < function_count; ++i) {
    if (values[i] == fallback)
      continue;
    if (!rules.empty())
      rules += ',';
    rules += function_names[i];
    rules += ':';
    rules += value_to_string(values[i]);
  }
  if (!(fallback == none)) {
    if (!rules.empty())
      rules += ',';
    rules += "*:" + value_to_string(fallback);
  }
  return rules.empty() ? std::string{} : std::string{kind} + "=" + rules;
}

template <class Rule>
bool any_rule(const std::array<std::optional<Rule>, function_count>& rules) {
  return std::any_of(rules.begin(), rules.end(),
                     [](const auto& r) { return r.has_value(); });
}

} // namespace

std::string_view to_string(fault_kind kind) {
  switch (kind) {
    case fault_kind::fail:
      return "fail";
    case fault_kind::hang:
      return "hang";
    case fault_kind::invalidate:
      return "invalidate";
    case fault_kind::session_invalid:
      return "session_invalid";
    case fault_kind::outage:
      return "outage";
  }
  return "?";
}

bool spec::injects_faults() const noexcept {
  return any_rule(fail) || any_rule(hang) || any_rule(invalidate)
         || any_rule(outage);
}

bool spec::forwards_at_once() const noexcept {
  return std::all_of(delay.begin(), delay.end(),
                     [](duration d) { return d == duration::zero(); })
         && !injects_faults() && counts.empty();
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

std::span<const named_rv> known_rvs() {
  return rv_table;
}

parsed<rv_code> parse_rv(std::string_view text) {
  text = trim(text);
  if (text.empty())
    return {std::nullopt, "missing CK_RV (e.g. CKR_DEVICE_ERROR)"};
  std::optional<rv_code> code;
  if (text.starts_with("0x") || text.starts_with("0X")) {
    auto hex = text.substr(2);
    rv_code value = 0;
    auto [end, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), value,
                                     16);
    if (hex.empty() || ec != std::errc{} || end != hex.data() + hex.size())
      return {std::nullopt,
              "CK_RV " + quoted(text) + " is not a hexadecimal number"};
    code = value;
  } else {
    auto match = std::find_if(std::begin(rv_table), std::end(rv_table),
                              [&](const named_rv& r) {
                                return r.name == text;
                              });
    if (match == std::end(rv_table))
      return {std::nullopt,
              "unknown CK_RV " + quoted(text)
                + " (a CKR_ name of PKCS#11 2.40, e.g. CKR_DEVICE_ERROR, or "
                  "a number such as 0x80000001)"};
    code = match->code;
  }
  if (*code == 0)
    return {std::nullopt, quoted(text) + " is CKR_OK, not a fault"};
  return {code, {}};
}

std::string rv_name(rv_code rv) {
  for (const auto& r : rv_table)
    if (r.code == rv)
      return std::string{r.name};
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%lx", rv);
  return buf;
}

parsed<selector> parse_selector(std::string_view text, bool allow_time) {
  text = trim(text);
  selector out;
  if (text.empty())
    return {out, {}};
  auto rest = trim(text.substr(1));
  auto fail = [&](std::string why) {
    return parsed<selector>{std::nullopt, quoted(text) + ": " + why};
  };
  switch (text.front()) {
    case '@': {
      if (rest.ends_with('+')) {
        auto n = parse_count(rest.substr(0, rest.size() - 1));
        if (!n)
          return fail(n.error);
        out.how = selector::mode::from_nth;
        out.n = *n.value;
        return {out, {}};
      }
      if (all_digits(rest)) {
        auto n = parse_count(rest);
        if (!n)
          return fail(n.error);
        out.how = selector::mode::nth;
        out.n = *n.value;
        return {out, {}};
      }
      if (!allow_time)
        return fail("expected @N or @N+ (a time @T is for outage only)");
      auto t = parse_duration(rest);
      if (!t)
        return fail(t.error);
      out.how = selector::mode::at_time;
      out.at = *t.value;
      return {out, {}};
    }
    case '/': {
      auto n = parse_count(rest);
      if (!n)
        return fail(n.error);
      out.how = selector::mode::every_nth;
      out.n = *n.value;
      return {out, {}};
    }
    case '%': {
      auto p = parse_percent(rest);
      if (!p)
        return fail(p.error);
      out.how = selector::mode::chance;
      out.millionths = *p.value;
      return {out, {}};
    }
    default:
      return fail("expected @N, @N+, /N or %P");
  }
}

parsed<spec> parse_spec(std::string_view text) {
  rule_set<duration> delays;
  rule_set<std::optional<fail_rule>> fails;
  rule_set<std::optional<hang_rule>> hangs;
  rule_set<std::optional<invalidate_rule>> invalidates;
  rule_set<std::optional<outage_rule>> outages;
  spec out;
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
    if (kind == "delay") {
      error = read_rules(kind, rules, delays, parse_duration);
    } else if (kind == "fail") {
      error = read_rules(kind, rules, fails, parse_fail);
    } else if (kind == "hang") {
      error = read_rules(kind, rules, hangs, parse_hang);
    } else if (kind == "invalidate") {
      error = read_rules(kind, rules, invalidates, parse_invalidate);
    } else if (kind == "outage") {
      error = read_rules(kind, rules, outages, parse_outage);
    } else if (kind == "seed") {
      auto digits = trim(rules);
      uint64_t seed = 0;
      auto [end, ec] = std::from_chars(digits.data(),
                                       digits.data() + digits.size(), seed);
      if (out.seed)
        error = "the seed is given twice";
      else if (!all_digits(digits) || ec != std::errc{}
               || end != digits.data() + digits.size())
        error = "expected a seed of decimal digits below 2^64, got "
                + quoted(digits);
      else
        out.seed = seed;
    } else if (kind == "counts") {
      auto path = trim(rules);
      if (!out.counts.empty())
        error = "the counts file is given twice";
      else if (path.empty())
        error = "missing the path of the counts file";
      else
        out.counts = path;
    } else {
      error = "unknown kind " + quoted(kind)
              + " (known: delay, fail, hang, invalidate, outage, seed, "
                "counts)";
    }
    if (!error.empty())
      return {std::nullopt, "clause " + quoted(clause) + ": " + error};
  }
  out.delay = delays.expand(duration::zero());
  out.fail = fails.expand(std::nullopt);
  out.hang = hangs.expand(std::nullopt);
  out.invalidate = invalidates.expand(std::nullopt);
  out.outage = outages.expand(std::nullopt);
  return {std::move(out), {}};
}

std::string spec_text_from_file(std::string_view content) {
  std::string out;
  for (auto line : split(content, '\n')) {
    auto code = trim(line.substr(0, line.find('#')));
    if (code.empty())
      continue;
    out += code;
    out += ';';
  }
  return out;
}

bool chance_hit(uint64_t seed, fault_kind kind, size_t index, uint64_t n,
                uint32_t millionths) {
  if (millionths >= all_millionths)
    return true;
  auto salt = static_cast<uint64_t>(kind) + 1;
  return draw(seed, salt, index, n) % all_millionths < millionths;
}

bool selects(const selector& when, uint64_t n, uint64_t seed, fault_kind kind,
             size_t index) {
  switch (when.how) {
    case selector::mode::every_call:
      return true;
    case selector::mode::nth:
      return n == when.n;
    case selector::mode::from_nth:
      return n >= when.n;
    case selector::mode::every_nth:
      return when.n != 0 && n % when.n == 0;
    case selector::mode::chance:
      return chance_hit(seed, kind, index, n, when.millionths);
    case selector::mode::at_time:
      return false;
  }
  return false;
}

rv_code pick_code(const std::vector<rv_code>& codes, uint64_t seed,
                  size_t index, uint64_t n) {
  if (codes.size() <= 1)
    return codes.empty() ? rv_code{0} : codes.front();
  return codes[draw(seed, pick_salt, index, n) % codes.size()];
}

std::string to_string(duration d) {
  if (d == duration::zero())
    return "0";
  for (auto u = units.rbegin(); u != units.rend(); ++u)
    if (d % u->size == duration::zero())
      return std::to_string(d / u->size) + std::string{u->suffix};
  return std::to_string(d.count()) + "ns"; // unreachable: ns divides all
}

std::string to_string(const selector& when) {
  switch (when.how) {
    case selector::mode::every_call:
      return {};
    case selector::mode::nth:
      return "@" + std::to_string(when.n);
    case selector::mode::from_nth:
      return "@" + std::to_string(when.n) + "+";
    case selector::mode::every_nth:
      return "/" + std::to_string(when.n);
    case selector::mode::chance:
      return "%" + percent_to_string(when.millionths);
    case selector::mode::at_time:
      return "@" + to_string(when.at);
  }
  return {};
}

std::string to_string(const spec& s) {
  std::vector<std::string> clauses;
  if (s.seed)
    clauses.push_back("seed=" + std::to_string(*s.seed));
  if (!s.counts.empty())
    clauses.push_back("counts=" + s.counts);
  clauses.push_back(kind_to_string("delay", s.delay, duration::zero()));
  clauses.push_back(kind_to_string("fail", s.fail, {}));
  clauses.push_back(kind_to_string("hang", s.hang, {}));
  clauses.push_back(kind_to_string("invalidate", s.invalidate, {}));
  clauses.push_back(kind_to_string("outage", s.outage, {}));
  std::string out;
  for (const auto& c : clauses) {
    if (c.empty())
      continue;
    if (!out.empty())
      out += ';';
    out += c;
  }
  return out;
}

} // namespace hsm::shim
