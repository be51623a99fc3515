#include "runtime/pkcs11/token_admin.hpp"

#include "runtime/pkcs11/key_policy.hpp"
#include "runtime/pkcs11/rv.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <array>
#include <cstring>

namespace hsm::pkcs11 {

caf::error init_token(const module& mod, std::string_view label,
                      const secret_pin& so_pin, const secret_pin& user_pin) {
  if (label.empty() || label.size() > 32)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--token-label"},
                           "a token label has 1 to 32 characters");
  auto all = mod.tokens();
  if (!all)
    return all.error();
  const token_description* free_slot = nullptr;
  for (auto& t : *all) {
    if (t.initialized && t.label == label)
      return caf::make_error(
        config_errc::invalid_option, std::string{"--token-label"},
        "a token labelled '" + std::string{label} + "' exists already");
    if (!t.initialized && free_slot == nullptr)
      free_slot = &t;
  }
  if (free_slot == nullptr)
    return caf::make_error(hsm_errc::fatal, std::string{"C_InitToken"},
                           std::string{"no slot with an uninitialised token"});
  std::array<CK_UTF8CHAR, 32> padded;
  padded.fill(' ');
  std::memcpy(padded.data(), label.data(), label.size());
  auto* so = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(so_pin.data()));
  if (auto rv = mod.fns().init_token(free_slot->slot, so,
                                     static_cast<CK_ULONG>(so_pin.size()),
                                     padded.data());
      rv != CKR_OK)
    return rv_error("C_InitToken", rv);
  // Slot ids may change after C_InitToken: look the token up by label.
  auto slot = mod.find_token(label);
  if (!slot)
    return slot.error();
  auto s = session::open(mod, *slot);
  if (!s)
    return s.error();
  if (auto err = s->login_so(so_pin))
    return err;
  auto* pin = reinterpret_cast<CK_UTF8CHAR*>(
    const_cast<char*>(user_pin.data()));
  auto rv = mod.fns().init_pin(s->handle(), pin,
                               static_cast<CK_ULONG>(user_pin.size()));
  mod.fns().logout(s->handle());
  if (rv != CKR_OK)
    return rv_error("C_InitPIN", rv);
  return caf::none;
}

namespace {

/// The one secret key labelled `label`: `missing` (a
/// `key_errc::master_key_missing` text) when there is none, fatal when
/// there are several (ambiguous).
caf::expected<CK_OBJECT_HANDLE>
find_secret_key(session& s, std::string_view label, std::string missing) {
  attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_text(CKA_LABEL, label);
  auto found = s.find(tmpl, 2);
  if (!found)
    return found.error();
  if (found->empty())
    return caf::make_error(key_errc::master_key_missing, std::move(missing));
  if (found->size() > 1)
    return caf::make_error(hsm_errc::fatal, std::string{"C_FindObjects"},
                           "several secret keys are labelled '"
                             + std::string{label} + "'");
  return found->front();
}

} // namespace

caf::expected<CK_OBJECT_HANDLE> find_master_key(session& s,
                                                std::string_view label) {
  return find_secret_key(s, label,
                         "no master key labelled '" + std::string{label}
                           + "' on the token; create one with "
                             "'hsm-driver master-key init' (test and dev "
                             "tokens) or the HSM vendor's tools");
}

namespace {

/// The master key under `label` if the token holds one (`*created` false),
/// else the key `make(template)` creates (`*created` true).
template <class Make>
caf::expected<CK_OBJECT_HANDLE>
find_or_make_master_key(session& s, std::string_view label, bool* created,
                        Make make) {
  auto existing = find_master_key(s, label);
  if (existing) {
    *created = false;
    return *existing;
  }
  if (existing.error() != key_errc::master_key_missing)
    return existing.error();
  auto key = make(master_key_template(label));
  if (!key)
    return key.error();
  *created = true;
  return *key;
}

} // namespace

std::string row_mac_key_label(std::string_view master_label) {
  return std::string{master_label} + "-row-mac";
}

caf::expected<CK_OBJECT_HANDLE>
find_row_mac_key(session& s, std::string_view master_label) {
  auto label = row_mac_key_label(master_label);
  return find_secret_key(s, label,
                         "no row-MAC key labelled '" + label
                           + "' on the token (it is made beside the master "
                             "key by 'hsm-driver master-key init')");
}

namespace {

/// The row-MAC key under `master_label`'s MAC label, made by `make` from
/// the template if the token has none.
template <class Make>
caf::expected<CK_OBJECT_HANDLE>
find_or_make_row_mac_key(session& s, std::string_view master_label, Make make) {
  auto existing = find_row_mac_key(s, master_label);
  if (existing)
    return *existing;
  if (existing.error() != key_errc::master_key_missing)
    return existing.error();
  return make(row_mac_key_template(row_mac_key_label(master_label)));
}

} // namespace

caf::expected<CK_OBJECT_HANDLE>
create_master_key(session& s, std::string_view label, bool* created) {
  auto mac = find_or_make_row_mac_key(s, label, [&](attributes tmpl) {
    tmpl.add_ulong(CKA_VALUE_LEN, 32);
    return s.generate_key(CKM_GENERIC_SECRET_KEY_GEN, tmpl);
  });
  if (!mac)
    return mac.error();
  return find_or_make_master_key(s, label, created, [&](attributes tmpl) {
    tmpl.add_ulong(CKA_VALUE_LEN, 32);
    return s.generate_key(CKM_AES_KEY_GEN, tmpl);
  });
}

caf::expected<CK_OBJECT_HANDLE>
import_master_key(session& s, std::string_view label,
                  std::span<const uint8_t> value, bool* created) {
  if (value.size() != 32)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--test-value-file"},
                           "a master key value is 32 bytes (64 hex "
                           "characters)");
  // The row-MAC key of a test token follows from the same value, so that
  // two test tokens share it as they share the master key.
  std::array<uint8_t, 32> mac_value{};
  unsigned int mac_len = 0;
  static constexpr std::string_view info = "hsm-driver test row-MAC key";
  HMAC(EVP_sha256(), value.data(), static_cast<int>(value.size()),
       reinterpret_cast<const unsigned char*>(info.data()), info.size(),
       mac_value.data(), &mac_len);
  auto mac = find_or_make_row_mac_key(s, label, [&](attributes tmpl) {
    tmpl.add_bytes(CKA_VALUE, mac_value);
    return s.create(tmpl);
  });
  OPENSSL_cleanse(mac_value.data(), mac_value.size());
  if (!mac)
    return mac.error();
  return find_or_make_master_key(s, label, created, [&](attributes tmpl) {
    tmpl.add_bytes(CKA_VALUE, value);
    return s.create(tmpl);
  });
}

} // namespace hsm::pkcs11
