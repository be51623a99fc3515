#include "runtime/base/logging.hpp"

#include <spdlog/details/log_msg.h>
#include <spdlog/formatter.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace hsm {

namespace {

std::mutex mtx;
spdlog::level::level_enum current_level = spdlog::level::info;
bool json_format = false;

constexpr const char* text_pattern = "%Y-%m-%dT%H:%M:%S.%e %^%-5l%$ [%n] %v";

/// Appends `text` to `out` as the inside of a JSON string: quotes,
/// backslashes and control characters escaped, valid UTF-8 kept, any
/// other byte as U+FFFD (a log line is always valid JSON).
void append_json_text(std::string& out, std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  for (size_t i = 0; i < text.size();) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 0xf];
      ++i;
    } else if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
    } else {
      // A UTF-8 sequence: its length from the lead byte, then continuation
      // bytes only (overlong and surrogate forms are not worth refusing
      // here: the text is a log message).
      size_t n = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
      bool ok = n > 0 && i + n <= text.size();
      for (size_t k = 1; ok && k < n; ++k)
        ok = (static_cast<unsigned char>(text[i + k]) & 0xc0) == 0x80;
      if (ok) {
        out.append(text.substr(i, n));
        i += n;
      } else {
        out += "\\ufffd";
        ++i;
      }
    }
  }
}

void append_field(std::string& out, std::string_view key,
                  std::string_view value) {
  out += ",\"";
  append_json_text(out, key);
  out += "\":\"";
  append_json_text(out, value);
  out += '"';
}

/// spdlog formatter of the `json` format.
class json_formatter final : public spdlog::formatter {
public:
  void format(const spdlog::details::log_msg& msg,
              spdlog::memory_buf_t& dest) override {
    auto tp = msg.time;
    auto secs = std::chrono::system_clock::to_time_t(tp);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                tp.time_since_epoch())
                .count()
              % 1000;
    std::tm utc{};
    gmtime_r(&secs, &utc);
    char ts[64];
    std::snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                  utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour,
                  utc.tm_min, utc.tm_sec, static_cast<int>(ms));
    auto level = spdlog::level::to_string_view(msg.level);
    auto line = json_log_line(
      ts, std::string_view{level.data(), level.size()},
      std::string_view{msg.logger_name.data(), msg.logger_name.size()},
      std::string_view{msg.payload.data(), msg.payload.size()});
    line += '\n';
    dest.append(line.data(), line.data() + line.size());
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<json_formatter>();
  }
};

void apply_format(spdlog::logger& l) {
  if (json_format)
    l.set_formatter(std::make_unique<json_formatter>());
  else
    l.set_pattern(text_pattern);
}

spdlog::sink_ptr shared_sink() {
  static auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  return sink;
}

} // namespace

caf::error init_logging(std::string_view level) {
  auto lvl = spdlog::level::from_str(std::string{level});
  if (lvl == spdlog::level::off && level != "off")
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--log-level"},
                           "unknown level '" + std::string{level}
                             + "' (trace, debug, info, warn, error, "
                               "critical, off)");
  std::lock_guard<std::mutex> guard{mtx};
  current_level = lvl;
  spdlog::apply_all(
    [lvl](const std::shared_ptr<spdlog::logger>& l) { l->set_level(lvl); });
  return caf::none;
}

caf::error set_log_format(std::string_view format) {
  if (format != "text" && format != "json")
    return caf::make_error(
      config_errc::invalid_option, std::string{"--log-format"},
      "unknown log format '" + std::string{format} + "' (text, json)");
  std::lock_guard<std::mutex> guard{mtx};
  json_format = format == "json";
  spdlog::apply_all(
    [](const std::shared_ptr<spdlog::logger>& l) { apply_format(*l); });
  return caf::none;
}

std::string json_log_line(std::string_view ts, std::string_view level,
                          std::string_view logger, std::string_view msg) {
  std::string out = "{\"ts\":\"";
  append_json_text(out, ts);
  out += '"';
  append_field(out, "level", level);
  append_field(out, "logger", logger);
  // Leading tags: `[req=r1 session=0] text` gives req and session fields
  // (several bracket groups in a row too); anything else stays in msg.
  while (msg.starts_with('[')) {
    auto end = msg.find(']');
    if (end == std::string_view::npos)
      break;
    auto inside = msg.substr(1, end - 1);
    std::vector<std::pair<std::string_view, std::string_view>> tags;
    bool all_tags = !inside.empty();
    while (all_tags && !inside.empty()) {
      auto space = inside.find(' ');
      auto word = inside.substr(0, space);
      auto eq = word.find('=');
      all_tags = eq != std::string_view::npos && eq > 0;
      if (all_tags)
        tags.emplace_back(word.substr(0, eq), word.substr(eq + 1));
      inside = space == std::string_view::npos ? std::string_view{}
                                               : inside.substr(space + 1);
    }
    if (!all_tags)
      break;
    for (auto& [k, v] : tags)
      if (k != "ts" && k != "level" && k != "logger" && k != "msg")
        append_field(out, k, v);
    msg.remove_prefix(end + 1);
    while (msg.starts_with(' '))
      msg.remove_prefix(1);
  }
  append_field(out, "msg", msg);
  out += '}';
  return out;
}

std::shared_ptr<spdlog::logger> logger(std::string_view component) {
  std::lock_guard<std::mutex> guard{mtx};
  std::string name{component};
  if (auto existing = spdlog::get(name))
    return existing;
  auto result = std::make_shared<spdlog::logger>(name, shared_sink());
  apply_format(*result);
  result->set_level(current_level);
  spdlog::register_logger(result);
  return result;
}

} // namespace hsm
