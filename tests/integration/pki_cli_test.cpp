// `hsm-driver pki csr | issue-leaf | verify`, the real binary: files and
// their modes, JSON on stdout, exit codes, the openssl command line's view
// of what it wrote. No token is needed.

#include "runtime/net/pki.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

namespace hsm {
namespace {

using json = nlohmann::json;

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in{p};
  return {std::istreambuf_iterator<char>{in}, {}};
}

unsigned mode_of(const std::filesystem::path& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 ? (st.st_mode & 0777) : 0;
}

std::string shell(const std::string& cmd) {
  std::string out;
  if (auto* p = ::popen(cmd.c_str(), "r")) {
    std::array<char, 4096> buf{};
    size_t n = 0;
    while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0)
      out.append(buf.data(), n);
    ::pclose(p);
  }
  return out;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos;
       at = text.find(what, at + 1))
    ++n;
  return n;
}

class PkiCliTest : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path()
          / ("hsm-driver-pki-cli-" + std::to_string(::getpid()) + "-"
             + std::to_string(rd() % 100000));
    std::filesystem::create_directories(dir);
  }

  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  test::run_result run(const std::vector<std::string>& args) {
    return test::run_driver(args, {{"HSM_LOG_LEVEL", "info"}});
  }

  std::filesystem::path example() const {
    return std::filesystem::path{HSM_DRIVER_SOURCE_DIR} / "deploy" / "pki"
           / "csr-template.example.json";
  }

  std::filesystem::path dir;
};

TEST_F(PkiCliTest, CsrWritesTheKey0600AndTheTemplatesCsrOnce) {
  auto key = dir / "intermediate-key.pem";
  auto csr = dir / "intermediate.csr";
  auto r = run({"pki", "csr", "--template", example().string(), "--key-out",
                key.string(), "--csr-out", csr.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto j = json::parse(r.out);
  EXPECT_TRUE(j["ok"].get<bool>());
  EXPECT_FALSE(j["key_encrypted"].get<bool>());
  EXPECT_EQ(j["key_algorithm"], "ec P-384");
  EXPECT_EQ(mode_of(key), 0600u);
  EXPECT_EQ(r.out.find("PRIVATE KEY"), std::string::npos);
  EXPECT_EQ(r.err.find("PRIVATE KEY"), std::string::npos);
  auto subject = shell("openssl req -in '" + csr.string()
                       + "' -noout -subject -nameopt RFC2253 2>&1");
  EXPECT_EQ(subject, "subject=CN=Example Wallet Customer hsm-driver CA,OU=HSM "
                     "drivers,O=Example Wallet Customer AG,C=CH\n");
  // The CSR's key is the key written.
  EXPECT_EQ(shell("openssl req -in '" + csr.string() + "' -noout -pubkey"),
            shell("openssl pkey -in '" + key.string() + "' -pubout"));
  // A CA key is never overwritten.
  auto before = slurp(key);
  auto again = run({"pki", "csr", "--template", example().string(), "--key-out",
                    key.string(), "--csr-out", csr.string()});
  EXPECT_EQ(again.exit_code, 2) << again.out << again.err;
  EXPECT_NE(again.out.find("exists"), std::string::npos) << again.out;
  EXPECT_EQ(slurp(key), before);
}

TEST_F(PkiCliTest, CsrKeyIsEncryptedWithAPassphraseFromA0600File) {
  auto pass = dir / "pass";
  std::ofstream{pass} << "a long passphrase\n";
  std::filesystem::permissions(pass, std::filesystem::perms::owner_read
                                       | std::filesystem::perms::owner_write);
  auto key = dir / "k.pem";
  auto r = run({"pki", "csr", "--template", example().string(), "--key-out",
                key.string(), "--csr-out", (dir / "c.csr").string(),
                "--passphrase-file", pass.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_TRUE(json::parse(r.out)["key_encrypted"].get<bool>());
  EXPECT_NE(slurp(key).find("BEGIN ENCRYPTED PRIVATE KEY"), std::string::npos);
  EXPECT_NE(shell(
              "openssl pkey -in '" + key.string()
              + "' -passin pass:'a long passphrase' -noout 2>&1; echo rc=$?")
              .find("rc=0"),
            std::string::npos);
  // A passphrase file others may read is refused, and no key is written.
  std::filesystem::permissions(pass, std::filesystem::perms::group_read,
                               std::filesystem::perm_options::add);
  auto key2 = dir / "k2.pem";
  auto refused = run({"pki", "csr", "--template", example().string(),
                      "--key-out", key2.string(), "--csr-out",
                      (dir / "c2.csr").string(), "--passphrase-file",
                      pass.string()});
  EXPECT_EQ(refused.exit_code, 2) << refused.out << refused.err;
  EXPECT_FALSE(std::filesystem::exists(key2));
}

TEST_F(PkiCliTest, CsrRefusesATemplateWithAnUnknownFieldNamingIt) {
  auto t = dir / "t.json";
  std::ofstream{t} << R"({"key":{"algorithm":"ec"},"subject":[{"CN":"x"}],
    "extensions":{"basic_constraints":{"ca":true},"certificate_policies":[]}})";
  auto key = dir / "k.pem";
  auto r = run({"pki", "csr", "--template", t.string(), "--key-out",
                key.string(), "--csr-out", (dir / "c.csr").string()});
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.out.find("extensions.certificate_policies: unknown field"),
            std::string::npos)
    << r.out;
  EXPECT_FALSE(std::filesystem::exists(key));
}

TEST_F(PkiCliTest, IssueLeafWritesTheRunbookFilesAndVerifyChecksThem) {
  auto pki = net::make_dev_pki(dir / "ca");
  ASSERT_TRUE(pki) << describe(pki.error());
  auto out = dir / "driver-9";
  auto r = run({"pki", "issue-leaf", "--intermediate-cert",
                pki->intermediate_cert.string(), "--intermediate-key",
                (dir / "ca" / "intermediate.key.pem").string(), "--name",
                "driver-9", "--days", "10", "--out-dir", out.string(), "--root",
                pki->root_cert.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto j = json::parse(r.out);
  EXPECT_EQ(j["leaf"]["subject"], "CN=driver-9");
  EXPECT_EQ(j["leaf"]["ekus"], json::array({"clientAuth"}));
  EXPECT_EQ(j["leaf"]["names"], json::array({"DNS:driver-9"}));
  EXPECT_EQ(mode_of(out / "leaf-key.pem"), 0600u);
  EXPECT_EQ(count(slurp(out / "leaf.pem"), "BEGIN CERTIFICATE"), 1u);
  EXPECT_EQ(count(slurp(out / "leaf-chain.pem"), "BEGIN CERTIFICATE"), 2u);
  EXPECT_EQ(count(slurp(out / "chain.pem"), "BEGIN CERTIFICATE"), 2u);
  // The openssl command line agrees: the leaf chains to the root through
  // the intermediate in chain.pem, for client authentication.
  auto v = shell("openssl verify -purpose sslclient -CAfile '"
                 + pki->root_cert.string() + "' -untrusted '"
                 + (out / "chain.pem").string() + "' '"
                 + (out / "leaf.pem").string() + "' 2>&1");
  EXPECT_NE(v.find(": OK"), std::string::npos) << v;
  // The runbook's layout passes; 10 days left is within the warning.
  auto ok = run({"pki", "verify", "--client-cert", (out / "leaf.pem").string(),
                 "--client-key", (out / "leaf-key.pem").string(), "--ca-cert",
                 (out / "chain.pem").string()});
  ASSERT_EQ(ok.exit_code, 0) << ok.out << ok.err;
  auto vj = json::parse(ok.out);
  EXPECT_TRUE(vj["ok"].get<bool>());
  EXPECT_TRUE(vj["expires_soon"].get<bool>());
  EXPECT_GE(vj["days_left"].get<int>(), 9);
  EXPECT_EQ(vj["chain"].size(), 3u);
  // The root alone, without the intermediate: refused, by name.
  auto bad = run({"pki", "verify", "--client-cert", (out / "leaf.pem").string(),
                  "--client-key", (out / "leaf-key.pem").string(), "--ca-cert",
                  pki->root_cert.string()});
  EXPECT_EQ(bad.exit_code, 1) << bad.out << bad.err;
  auto bj = json::parse(bad.out);
  EXPECT_FALSE(bj["ok"].get<bool>());
  EXPECT_EQ(bj["cause"], "wrong_ca");
  // Another key: key_mismatch.
  auto other = run({"pki", "verify", "--client-cert",
                    (out / "leaf.pem").string(), "--client-key",
                    pki->driver_key.string(), "--ca-cert",
                    (out / "chain.pem").string()});
  EXPECT_EQ(other.exit_code, 1) << other.out << other.err;
  EXPECT_EQ(json::parse(other.out)["cause"], "key_mismatch");
  // A leaf may not outlive the intermediate (30 days in the dev PKI).
  auto too_long = run({"pki", "issue-leaf", "--intermediate-cert",
                       pki->intermediate_cert.string(), "--intermediate-key",
                       (dir / "ca" / "intermediate.key.pem").string(), "--name",
                       "driver-10", "--days", "400", "--out-dir",
                       (dir / "driver-10").string()});
  EXPECT_EQ(too_long.exit_code, 2) << too_long.out << too_long.err;
  EXPECT_NE(too_long.out.find("outlive its issuer"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir / "driver-10" / "leaf-key.pem"));
  // Run again into the same folder: refused, and the key in use is kept
  // byte for byte (as is every other file).
  auto key_before = slurp(out / "leaf-key.pem");
  auto cert_before = slurp(out / "leaf.pem");
  auto again = run({"pki", "issue-leaf", "--intermediate-cert",
                    pki->intermediate_cert.string(), "--intermediate-key",
                    (dir / "ca" / "intermediate.key.pem").string(), "--name",
                    "driver-9", "--days", "10", "--out-dir", out.string(),
                    "--root", pki->root_cert.string()});
  EXPECT_NE(again.exit_code, 0) << again.out << again.err;
  EXPECT_NE(again.out.find("never overwritten"), std::string::npos)
    << again.out;
  EXPECT_EQ(slurp(out / "leaf-key.pem"), key_before);
  EXPECT_EQ(slurp(out / "leaf.pem"), cert_before);
  // Only chain.pem in the way: still nothing written.
  auto partial = dir / "driver-11";
  std::filesystem::create_directories(partial);
  { std::ofstream{partial / "chain.pem"} << "placeholder\n"; }
  auto blocked = run({"pki", "issue-leaf", "--intermediate-cert",
                      pki->intermediate_cert.string(), "--intermediate-key",
                      (dir / "ca" / "intermediate.key.pem").string(), "--name",
                      "driver-11", "--days", "10", "--out-dir",
                      partial.string(), "--root", pki->root_cert.string()});
  EXPECT_NE(blocked.exit_code, 0) << blocked.out << blocked.err;
  EXPECT_FALSE(std::filesystem::exists(partial / "leaf-key.pem"));
  EXPECT_EQ(slurp(partial / "chain.pem"), "placeholder\n");
}

} // namespace
} // namespace hsm
