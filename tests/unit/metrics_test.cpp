// The driver's metrics as values (counts, labels, bounds, readiness) and
// `--metrics-listen` as `run` reads it. No network, no token.

#include "runtime/base/metrics.hpp"

#include "runtime/app/run_options.hpp"

#include <gtest/gtest.h>

#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

namespace hsm {
namespace {

using labels = std::vector<std::pair<std::string, std::string>>;

/// The names of every metric in `text` (from its `# TYPE` lines), with
/// their types.
std::map<std::string, std::string> types_in(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in{text};
  for (std::string line; std::getline(in, line);) {
    std::istringstream words{line};
    std::string hash, what, name, type;
    if (words >> hash >> what >> name >> type && hash == "#" && what == "TYPE")
      out[name] = type;
  }
  return out;
}

/// Every label value in `text`.
std::set<std::string> label_values_in(const std::string& text) {
  std::set<std::string> out;
  static const std::regex label{R"re([a-z_]+="([^"]*)")re"};
  for (std::sregex_iterator i{text.begin(), text.end(), label}, end; i != end;
       ++i)
    out.insert((*i)[1].str());
  return out;
}

TEST(MetricsTest, RequestsAreCountedByKindAndOutcome) {
  driver_metrics m{2};
  auto sign = job_kind::sign;
  auto gen = job_kind::generate_key;
  m.count_request(&sign, "ok");
  m.count_request(&sign, "ok");
  m.count_request(&sign, "unknown_key");
  m.count_request(&gen, "ok");
  m.count_request(nullptr, "invalid_request");
  m.count_request(&gen, "a code no release knows");
  auto at = [&](std::string kind, std::string outcome) {
    return m.value("hsm_driver_requests_total",
                   labels{{"kind", kind}, {"outcome", outcome}});
  };
  EXPECT_EQ(at("sign", "ok"), 2);
  EXPECT_EQ(at("sign", "unknown_key"), 1);
  EXPECT_EQ(at("generate_key", "ok"), 1);
  EXPECT_EQ(at("invalid", "invalid_request"), 1);
  EXPECT_EQ(at("generate_key", "other"), 1);
  EXPECT_EQ(at("sign", "hsm_unavailable"), 0) << "every series exists at 0";
  EXPECT_EQ(at("sign", "a code no release knows"), -1);
  // The text format carries the same numbers.
  auto text = m.text();
  EXPECT_NE(text.find("hsm_driver_requests_total{kind=\"sign\",outcome=\"ok\"}"
                      " 2"),
            std::string::npos)
    << text;
}

TEST(MetricsTest, NamesFollowThePrometheusConventions) {
  driver_metrics m{3};
  m.count_pkcs11_error("C_Sign", "CKR_DEVICE_ERROR");
  auto types = types_in(m.text());
  for (auto name :
       {"hsm_driver_requests_total", "hsm_driver_stage_duration_seconds",
        "hsm_driver_sessions_healthy", "hsm_driver_sessions_configured",
        "hsm_driver_session_restarts_total", "hsm_driver_pkcs11_errors_total",
        "hsm_driver_credits", "hsm_driver_leases_held",
        "hsm_driver_poll_errors_total", "hsm_driver_post_errors_total",
        "hsm_driver_proxy_last_success_timestamp_seconds",
        "hsm_driver_store_errors_total", "hsm_driver_store_up",
        "hsm_driver_client_certificate_expiry_timestamp_seconds"})
    EXPECT_EQ(types.count(name), 1u) << name;
  for (auto& [name, type] : types) {
    EXPECT_EQ(name.rfind("hsm_driver_", 0), 0u) << name;
    bool total = name.size() > 6 && name.substr(name.size() - 6) == "_total";
    EXPECT_EQ(total, type == "counter") << name << " is a " << type;
    if (type == "histogram") {
      EXPECT_NE(name.find("_seconds"), std::string::npos) << name;
    }
  }
  EXPECT_EQ(m.value("hsm_driver_sessions_configured"), 3);
}

TEST(MetricsTest, Pkcs11ErrorLabelsStayBounded) {
  driver_metrics m{1};
  m.count_pkcs11_error("C_Sign", "CKR_DEVICE_ERROR");
  m.count_pkcs11_error("C_Sign", "CKR_DEVICE_ERROR");
  m.count_pkcs11_error("C_Login", "CKR_VENDOR_DEFINED+0x2a");
  m.count_pkcs11_error("C_Login", "CKR_0x00000999");
  m.count_pkcs11_error("key k1 was here", "CKR_GENERAL_ERROR");
  EXPECT_EQ(m.value("hsm_driver_pkcs11_errors_total",
                    labels{{"function", "C_Sign"}, {"rv", "CKR_DEVICE_ERROR"}}),
            2);
  EXPECT_EQ(m.value("hsm_driver_pkcs11_errors_total",
                    labels{{"function", "C_Login"}, {"rv", "other"}}),
            2);
  EXPECT_EQ(m.value("hsm_driver_pkcs11_errors_total",
                    labels{{"function", "other"}, {"rv", "CKR_GENERAL_ERROR"}}),
            1);
  // A module that returns ever new values cannot grow the series without
  // bound.
  for (int i = 0; i < 500; ++i)
    m.count_pkcs11_error("C_Sign", "CKR_NUMBER_" + std::to_string(i));
  auto text = m.text();
  size_t series = 0;
  for (auto at = text.find("\nhsm_driver_pkcs11_errors_total{");
       at != std::string::npos;
       at = text.find("\nhsm_driver_pkcs11_errors_total{", at + 1))
    ++series;
  EXPECT_LE(series, 65u);
  EXPECT_GE(m.value("hsm_driver_pkcs11_errors_total",
                    labels{{"function", "other"}, {"rv", "other"}}),
            500 - 64);
  for (auto& v : label_values_in(text))
    EXPECT_EQ(v.find("k1"), std::string::npos) << v;
}

TEST(MetricsTest, StageDurationsAreHistograms) {
  driver_metrics m{1};
  m.observe(request_stage::hsm, 0.003);
  m.observe(request_stage::hsm, 0.2);
  m.observe_since(request_stage::post, std::chrono::steady_clock::now());
  EXPECT_EQ(
    m.value("hsm_driver_stage_duration_seconds", labels{{"stage", "hsm"}}), 2);
  EXPECT_EQ(
    m.value("hsm_driver_stage_duration_seconds", labels{{"stage", "post"}}), 1);
  EXPECT_EQ(m.value("hsm_driver_stage_duration_seconds",
                    labels{{"stage", "queue_wait"}}),
            0);
  auto text = m.text();
  EXPECT_NE(text.find("hsm_driver_stage_duration_seconds_bucket{stage=\"hsm\","
                      "le=\"0.005\"} 1"),
            std::string::npos)
    << text;
}

TEST(MetricsTest, ReadinessNamesWhatIsMissing) {
  driver_metrics m{2};
  auto names = [&](std::chrono::milliseconds window) {
    std::set<std::string> out;
    for (auto& r : m.readiness(window))
      out.insert(r.component);
    return out;
  };
  using std::chrono::milliseconds;
  // Fresh: no session, the proxy never reached.
  EXPECT_EQ(names(milliseconds{60000}),
            (std::set<std::string>{"sessions", "proxy"}));
  m.set_dispatch_state(1, 2, 0);
  m.proxy_reached();
  EXPECT_TRUE(names(milliseconds{60000}).empty());
  m.store_answered(store_role::audit, false);
  EXPECT_EQ(names(milliseconds{60000}), std::set<std::string>{"store"});
  m.store_answered(store_role::audit, true);
  std::this_thread::sleep_for(milliseconds{5});
  EXPECT_EQ(names(milliseconds{1}), std::set<std::string>{"proxy"});
  m.set_dispatch_state(0, 0, 0);
  auto why = m.readiness(milliseconds{60000});
  ASSERT_EQ(why.size(), 1u);
  EXPECT_EQ(why[0].reason, "0 of 2 HSM sessions healthy");
  m.set_dispatch_state(2, 4, 0);
  m.set_stopping();
  EXPECT_EQ(names(milliseconds{60000}), std::set<std::string>{"driver"});
}

TEST(MetricsTest, ClientCertificateExpiryIsSettable) {
  driver_metrics m{1};
  EXPECT_EQ(m.value("hsm_driver_client_certificate_expiry_timestamp_seconds"),
            0);
  m.set_client_certificate_expiry(1798874267);
  EXPECT_EQ(m.value("hsm_driver_client_certificate_expiry_timestamp_seconds"),
            1798874267);
  m.set_client_certificate_expiry(1800000000);
  EXPECT_EQ(m.value("hsm_driver_client_certificate_expiry_timestamp_seconds"),
            1800000000);
}

// -- --metrics-listen ---------------------------------------------------------

env_lookup env_of(std::map<std::string, std::string> vars) {
  return [vars](std::string_view name) -> std::optional<std::string> {
    auto i = vars.find(std::string{name});
    if (i == vars.end())
      return std::nullopt;
    return i->second;
  };
}

run_flags with_tls() {
  run_flags f;
  f.proxy_addr = "proxy:8443";
  f.ca_cert = "/pki/ca.pem";
  f.client_cert = "/pki/driver.pem";
  f.client_key = "/pki/driver.key";
  f.driver_id = "d";
  return f;
}

TEST(MetricsListenTest, OffByDefault) {
  auto o = resolve_run_options(driver_config{}, with_tls(), env_of({}));
  ASSERT_TRUE(o) << describe(o.error());
  EXPECT_FALSE(o->metrics_listen);
  auto off = resolve_run_options(driver_config{}, with_tls(),
                                 env_of({{"HSM_METRICS_LISTEN", "off"}}));
  ASSERT_TRUE(off) << describe(off.error());
  EXPECT_FALSE(off->metrics_listen);
}

TEST(MetricsListenTest, FlagWinsOverTheEnvironment) {
  auto f = with_tls();
  auto env = env_of({{"HSM_METRICS_LISTEN", "127.0.0.1:9100"}});
  auto from_env = resolve_run_options(driver_config{}, f, env);
  ASSERT_TRUE(from_env) << describe(from_env.error());
  ASSERT_TRUE(from_env->metrics_listen);
  EXPECT_EQ(from_env->metrics_listen->host, "127.0.0.1");
  EXPECT_EQ(from_env->metrics_listen->port, 9100);
  f.metrics_listen = "[::1]:0";
  auto flagged = resolve_run_options(driver_config{}, f, env);
  ASSERT_TRUE(flagged) << describe(flagged.error());
  ASSERT_TRUE(flagged->metrics_listen);
  EXPECT_EQ(flagged->metrics_listen->host, "::1");
  EXPECT_EQ(flagged->metrics_listen->port, 0);
  EXPECT_FALSE(flagged->metrics_listen->allow_remote);
}

TEST(MetricsListenTest, RemoteAddressOnlyWhenAskedFor) {
  auto f = with_tls();
  f.metrics_listen = "0.0.0.0:9100";
  auto refused = resolve_run_options(driver_config{}, f, env_of({}));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error(), config_errc::invalid_option);
  auto text = describe(refused.error());
  EXPECT_NE(text.find("--metrics-listen"), std::string::npos) << text;
  EXPECT_NE(text.find("--metrics-allow-remote"), std::string::npos) << text;
  f.metrics_allow_remote = true;
  auto allowed = resolve_run_options(driver_config{}, f, env_of({}));
  ASSERT_TRUE(allowed) << describe(allowed.error());
  ASSERT_TRUE(allowed->metrics_listen);
  EXPECT_TRUE(allowed->metrics_listen->allow_remote);
}

TEST(MetricsListenTest, MalformedAddressNamesTheFlag) {
  auto f = with_tls();
  f.metrics_listen = "http://127.0.0.1:9100/metrics";
  auto o = resolve_run_options(driver_config{}, f, env_of({}));
  ASSERT_FALSE(o);
  EXPECT_EQ(o.error(), config_errc::invalid_option);
  EXPECT_NE(describe(o.error()).find("--metrics-listen"), std::string::npos)
    << describe(o.error());
}

} // namespace
} // namespace hsm
