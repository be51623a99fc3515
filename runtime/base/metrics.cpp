#include "runtime/base/metrics.hpp"

#include "messages/errors.hpp"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <mutex>

namespace hsm {

namespace {

using steady = std::chrono::steady_clock;

/// Label values of `kind` in `hsm_driver_requests_total`.
constexpr std::array<std::string_view, 3> kind_names{"generate_key", "sign",
                                                     "invalid"};

/// Label values of `outcome` besides the key errors' wire codes: every
/// code `wire_code` can give (messages/errors.hpp), and `other` for a code
/// this list does not know.
constexpr std::array<std::string_view, 7> fixed_outcomes{
  "ok",           "hsm_unavailable", "hsm_error", "store_unavailable",
  "config_error", "internal",        "other"};

/// The last `key_errc` value: the wire codes run from 1 to it.
constexpr auto last_key_errc = key_errc::key_not_on_this_hsm;

constexpr std::array<std::string_view, 4> stage_names{"queue_wait", "hsm",
                                                      "store", "post"};
constexpr std::array<std::string_view, 3> poll_error_names{"unreachable",
                                                           "http_status",
                                                           "bad_response"};
constexpr std::array<std::string_view, 4> post_error_names{
  "unreachable", "server_error", "refused", "bad_response"};
constexpr std::array<std::string_view, 4> store_op_names{"get", "put", "audit",
                                                         "ping"};
constexpr std::array<std::string_view, 2> store_role_names{"keys", "audit"};

/// Distinct (function, rv) series the PKCS#11 error counter holds at most;
/// beyond them every error counts under `other`. Bounds the series even
/// against a module that returns many distinct values.
constexpr size_t max_pkcs11_series = 64;

/// Latency buckets, seconds: 0.5 ms to 30 s.
const prometheus::Histogram::BucketBoundaries& latency_buckets() {
  static const prometheus::Histogram::BucketBoundaries b{
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25,   0.5,   1,      2.5,   5,    10,    30};
  return b;
}

/// True for a standard CKR name (`CKR_` and capitals, digits, `_`): the
/// hex spellings of unknown or vendor-defined values are not.
bool standard_rv_name(std::string_view name) {
  if (name.size() < 5 || name.size() > 64 || name.substr(0, 4) != "CKR_")
    return false;
  if (name.substr(0, 6) == "CKR_0x")
    return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  });
}

/// True for a PKCS#11 function name: `C_` and letters.
bool function_name(std::string_view name) {
  if (name.size() < 3 || name.size() > 32 || name.substr(0, 2) != "C_")
    return false;
  return std::all_of(name.begin() + 2, name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
  });
}

double seconds_since_epoch() {
  return std::chrono::duration<double>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

} // namespace

struct driver_metrics::impl {
  std::shared_ptr<prometheus::Registry> registry
    = std::make_shared<prometheus::Registry>();

  std::vector<std::string> outcomes;
  /// [kind][outcome]
  std::vector<std::vector<prometheus::Counter*>> requests;
  std::array<prometheus::Histogram*, stage_names.size()> stages{};
  prometheus::Gauge* sessions_healthy = nullptr;
  prometheus::Gauge* sessions_configured = nullptr;
  prometheus::Gauge* credits = nullptr;
  prometheus::Gauge* leases_held = nullptr;
  prometheus::Counter* session_restarts = nullptr;
  prometheus::Family<prometheus::Counter>* pkcs11_errors = nullptr;
  std::mutex pkcs11_mtx;
  std::map<std::pair<std::string, std::string>, prometheus::Counter*>
    pkcs11_series;
  std::array<prometheus::Counter*, poll_error_names.size()> poll_errors{};
  std::array<prometheus::Counter*, post_error_names.size()> post_errors{};
  prometheus::Gauge* proxy_last_success = nullptr;
  std::array<prometheus::Counter*, store_op_names.size()> store_errors{};
  std::array<prometheus::Gauge*, store_role_names.size()> store_up{};
  prometheus::Gauge* cert_expiry = nullptr;

  /// Steady time of the last success with the proxy, ns; 0: none yet.
  std::atomic<int64_t> proxy_ok_ns{0};
  std::atomic<bool> stopping{false};

  explicit impl(size_t sessions) {
    auto& reg = *registry;
    for (auto o : fixed_outcomes)
      outcomes.emplace_back(o);
    for (auto c = 1; c <= static_cast<int>(last_key_errc); ++c)
      outcomes.push_back(to_string(static_cast<key_errc>(c)));
    auto& req_fam = prometheus::BuildCounter()
                      .Name("hsm_driver_requests_total")
                      .Help("Requests answered, by kind (generate_key, sign, "
                            "invalid: refused on arrival) and outcome (ok or "
                            "the error's wire code)")
                      .Register(reg);
    for (auto k : kind_names) {
      auto& row = requests.emplace_back();
      for (auto& o : outcomes)
        row.push_back(&req_fam.Add({{"kind", std::string{k}}, {"outcome", o}}));
    }
    auto& stage_fam = prometheus::BuildHistogram()
                        .Name("hsm_driver_stage_duration_seconds")
                        .Help("Duration of one stage of a request: queue_wait "
                              "(waiting for a session), hsm (one session "
                              "call), store (one key store call), post "
                              "(until the proxy has the result)")
                        .Register(reg);
    for (size_t i = 0; i < stage_names.size(); ++i)
      stages[i] = &stage_fam.Add({{"stage", std::string{stage_names[i]}}},
                                 latency_buckets());
    sessions_healthy = &prometheus::BuildGauge()
                          .Name("hsm_driver_sessions_healthy")
                          .Help("HSM sessions logged in and serving")
                          .Register(reg)
                          .Add({});
    sessions_configured = &prometheus::BuildGauge()
                             .Name("hsm_driver_sessions_configured")
                             .Help("HSM sessions configured (--sessions)")
                             .Register(reg)
                             .Add({});
    sessions_configured->Set(static_cast<double>(sessions));
    credits = &prometheus::BuildGauge()
                 .Name("hsm_driver_credits")
                 .Help("Leases the driver may take now (healthy sessions x "
                       "--pipeline, minus leases held; 0 while the store "
                       "fails)")
                 .Register(reg)
                 .Add({});
    leases_held = &prometheus::BuildGauge()
                     .Name("hsm_driver_leases_held")
                     .Help("Leases held: from the poll until the result is "
                           "posted")
                     .Register(reg)
                     .Add({});
    session_restarts = &prometheus::BuildCounter()
                          .Name("hsm_driver_session_restarts_total")
                          .Help("HSM sessions started again after their "
                                "predecessor ended")
                          .Register(reg)
                          .Add({});
    pkcs11_errors = &prometheus::BuildCounter()
                       .Name("hsm_driver_pkcs11_errors_total")
                       .Help("Failed PKCS#11 calls of the serving sessions, "
                             "by function and CKR name")
                       .Register(reg);
    auto& poll_fam = prometheus::BuildCounter()
                       .Name("hsm_driver_poll_errors_total")
                       .Help("Polls of the proxy that failed, by reason")
                       .Register(reg);
    for (size_t i = 0; i < poll_error_names.size(); ++i)
      poll_errors[i] = &poll_fam.Add(
        {{"reason", std::string{poll_error_names[i]}}});
    auto& post_fam = prometheus::BuildCounter()
                       .Name("hsm_driver_post_errors_total")
                       .Help("Posts of results to the proxy that failed, by "
                             "reason")
                       .Register(reg);
    for (size_t i = 0; i < post_error_names.size(); ++i)
      post_errors[i] = &post_fam.Add(
        {{"reason", std::string{post_error_names[i]}}});
    proxy_last_success = &prometheus::BuildGauge()
                            .Name("hsm_driver_proxy_last_success_timestamp_"
                                  "seconds")
                            .Help("Unix time of the last poll or post the "
                                  "proxy answered; 0 before the first")
                            .Register(reg)
                            .Add({});
    auto& store_fam = prometheus::BuildCounter()
                        .Name("hsm_driver_store_errors_total")
                        .Help("Key store operations that failed, by "
                              "operation")
                        .Register(reg);
    for (size_t i = 0; i < store_op_names.size(); ++i)
      store_errors[i] = &store_fam.Add(
        {{"operation", std::string{store_op_names[i]}}});
    auto& up_fam = prometheus::BuildGauge()
                     .Name("hsm_driver_store_up")
                     .Help("1 if the last operation on the store connection "
                           "succeeded, else 0")
                     .Register(reg);
    for (size_t i = 0; i < store_role_names.size(); ++i) {
      store_up[i] = &up_fam.Add(
        {{"connection", std::string{store_role_names[i]}}});
      store_up[i]->Set(1);
    }
    cert_expiry = &prometheus::BuildGauge()
                     .Name("hsm_driver_client_certificate_expiry_timestamp_"
                           "seconds")
                     .Help("Unix time of the notAfter of --client-cert")
                     .Register(reg)
                     .Add({});
  }
};

driver_metrics::driver_metrics(size_t sessions)
  : impl_(std::make_unique<impl>(sessions)) {
  // nop
}

driver_metrics::~driver_metrics() = default;

void driver_metrics::count_request(const job_kind* kind,
                                   std::string_view outcome) {
  size_t k = kind == nullptr ? 2 : *kind == job_kind::generate_key ? 0 : 1;
  auto& outs = impl_->outcomes;
  size_t o = 0;
  while (o < outs.size() && outs[o] != outcome)
    ++o;
  if (o == outs.size())
    o = static_cast<size_t>(
      std::find(fixed_outcomes.begin(), fixed_outcomes.end(), "other")
      - fixed_outcomes.begin());
  impl_->requests[k][o]->Increment();
}

void driver_metrics::observe(request_stage stage, double seconds) {
  impl_->stages[static_cast<size_t>(stage)]->Observe(seconds);
}

void driver_metrics::observe_since(request_stage stage, steady::time_point t) {
  observe(stage, std::chrono::duration<double>(steady::now() - t).count());
}

void driver_metrics::set_dispatch_state(size_t healthy_sessions,
                                        int64_t credits, size_t leases_held) {
  impl_->sessions_healthy->Set(static_cast<double>(healthy_sessions));
  impl_->credits->Set(static_cast<double>(credits));
  impl_->leases_held->Set(static_cast<double>(leases_held));
}

void driver_metrics::count_session_restart() {
  impl_->session_restarts->Increment();
}

void driver_metrics::count_pkcs11_error(std::string_view function,
                                        std::string_view rv_name) {
  std::pair<std::string, std::string> key{
    function_name(function) ? std::string{function} : "other",
    standard_rv_name(rv_name) ? std::string{rv_name} : "other"};
  std::lock_guard<std::mutex> guard{impl_->pkcs11_mtx};
  auto& series = impl_->pkcs11_series;
  auto i = series.find(key);
  if (i == series.end()) {
    if (series.size() >= max_pkcs11_series)
      key = {"other", "other"};
    i = series.find(key);
    if (i == series.end())
      i = series
            .emplace(key, &impl_->pkcs11_errors->Add(
                            {{"function", key.first}, {"rv", key.second}}))
            .first;
  }
  i->second->Increment();
}

void driver_metrics::proxy_reached() {
  impl_->proxy_ok_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                             steady::now().time_since_epoch())
                             .count());
  impl_->proxy_last_success->Set(seconds_since_epoch());
}

void driver_metrics::count_poll_error(poll_error why) {
  impl_->poll_errors[static_cast<size_t>(why)]->Increment();
}

void driver_metrics::count_post_error(post_error why) {
  impl_->post_errors[static_cast<size_t>(why)]->Increment();
}

void driver_metrics::store_answered(store_role role, bool ok) {
  impl_->store_up[static_cast<size_t>(role)]->Set(ok ? 1 : 0);
}

void driver_metrics::count_store_error(store_op op) {
  impl_->store_errors[static_cast<size_t>(op)]->Increment();
}

void driver_metrics::set_client_certificate_expiry(int64_t unix_seconds) {
  impl_->cert_expiry->Set(static_cast<double>(unix_seconds));
}

void driver_metrics::set_stopping() {
  impl_->stopping = true;
}

std::vector<not_ready>
driver_metrics::readiness(std::chrono::milliseconds proxy_window) const {
  std::vector<not_ready> out;
  auto& in = *impl_;
  if (in.stopping.load())
    out.push_back({"driver", "stopping"});
  auto healthy = static_cast<int64_t>(in.sessions_healthy->Value());
  if (healthy < 1)
    out.push_back({"sessions", "0 of "
                                 + std::to_string(static_cast<int64_t>(
                                   in.sessions_configured->Value()))
                                 + " HSM sessions healthy"});
  for (size_t i = 0; i < store_role_names.size(); ++i)
    if (in.store_up[i]->Value() < 1)
      out.push_back({"store", "the last operation on the "
                                + std::string{store_role_names[i]}
                                + " connection failed"});
  auto ok_ns = in.proxy_ok_ns.load();
  if (ok_ns == 0) {
    out.push_back({"proxy", "not reached yet"});
  } else {
    auto since = steady::now().time_since_epoch()
                 - std::chrono::nanoseconds{ok_ns};
    if (since > proxy_window)
      out.push_back(
        {"proxy",
         "no successful poll or post for "
           + std::to_string(
             std::chrono::duration_cast<std::chrono::milliseconds>(since)
               .count())
           + " ms (limit " + std::to_string(proxy_window.count()) + " ms)"});
  }
  return out;
}

std::string driver_metrics::text() const {
  return prometheus::TextSerializer{}.Serialize(impl_->registry->Collect());
}

double driver_metrics::value(
  std::string_view name,
  const std::vector<std::pair<std::string, std::string>>& labels) const {
  for (auto& fam : impl_->registry->Collect()) {
    if (fam.name != name)
      continue;
    for (auto& m : fam.metric) {
      if (m.label.size() != labels.size())
        continue;
      bool all = std::all_of(labels.begin(), labels.end(), [&](auto& want) {
        return std::any_of(m.label.begin(), m.label.end(), [&](auto& have) {
          return have.name == want.first && have.value == want.second;
        });
      });
      if (!all)
        continue;
      switch (fam.type) {
        case prometheus::MetricType::Counter:
          return m.counter.value;
        case prometheus::MetricType::Gauge:
          return m.gauge.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(m.histogram.sample_count);
        default:
          return -1;
      }
    }
  }
  return -1;
}

} // namespace hsm
