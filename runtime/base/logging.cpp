#include "runtime/base/logging.hpp"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <mutex>
#include <string>

namespace hsm {

namespace {

std::mutex mtx;
spdlog::level::level_enum current_level = spdlog::level::info;

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

std::shared_ptr<spdlog::logger> logger(std::string_view component) {
  std::lock_guard<std::mutex> guard{mtx};
  std::string name{component};
  if (auto existing = spdlog::get(name))
    return existing;
  auto result = std::make_shared<spdlog::logger>(name, shared_sink());
  result->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%-5l%$ [%n] %v");
  result->set_level(current_level);
  spdlog::register_logger(result);
  return result;
}

} // namespace hsm
