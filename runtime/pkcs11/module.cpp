#include "runtime/pkcs11/module.hpp"

#include "runtime/pkcs11/rv.hpp"

#include <dlfcn.h>

#include <cstring>
#include <system_error>
#include <utility>

namespace hsm::pkcs11 {

namespace {

/// Forwards every call to a CK_FUNCTION_LIST from the loaded library.
class dl_function_table final : public function_table {
public:
  explicit dl_function_table(CK_FUNCTION_LIST* list) : f_(list) {
    // nop
  }

  CK_RV initialize(CK_C_INITIALIZE_ARGS* args) override {
    return f_->C_Initialize(args);
  }
  CK_RV finalize() override {
    return f_->C_Finalize(nullptr);
  }
  CK_RV get_slot_list(CK_BBOOL present, CK_SLOT_ID* list,
                      CK_ULONG* count) override {
    return f_->C_GetSlotList(present, list, count);
  }
  CK_RV get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO* info) override {
    return f_->C_GetTokenInfo(slot, info);
  }
  CK_RV init_token(CK_SLOT_ID slot, CK_UTF8CHAR* pin, CK_ULONG len,
                   CK_UTF8CHAR* label) override {
    return f_->C_InitToken(slot, pin, len, label);
  }
  CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags,
                     CK_SESSION_HANDLE* s) override {
    return f_->C_OpenSession(slot, flags, nullptr, nullptr, s);
  }
  CK_RV close_session(CK_SESSION_HANDLE s) override {
    return f_->C_CloseSession(s);
  }
  CK_RV login(CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR* pin,
              CK_ULONG len) override {
    return f_->C_Login(s, user, pin, len);
  }
  CK_RV logout(CK_SESSION_HANDLE s) override {
    return f_->C_Logout(s);
  }
  CK_RV init_pin(CK_SESSION_HANDLE s, CK_UTF8CHAR* pin, CK_ULONG len) override {
    return f_->C_InitPIN(s, pin, len);
  }
  CK_RV find_objects_init(CK_SESSION_HANDLE s, CK_ATTRIBUTE* t,
                          CK_ULONG n) override {
    return f_->C_FindObjectsInit(s, t, n);
  }
  CK_RV find_objects(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE* objs, CK_ULONG max,
                     CK_ULONG* n) override {
    return f_->C_FindObjects(s, objs, max, n);
  }
  CK_RV find_objects_final(CK_SESSION_HANDLE s) override {
    return f_->C_FindObjectsFinal(s);
  }
  CK_RV get_attribute_value(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                            CK_ATTRIBUTE* t, CK_ULONG n) override {
    return f_->C_GetAttributeValue(s, o, t, n);
  }
  CK_RV create_object(CK_SESSION_HANDLE s, CK_ATTRIBUTE* t, CK_ULONG n,
                      CK_OBJECT_HANDLE* o) override {
    return f_->C_CreateObject(s, t, n, o);
  }
  CK_RV destroy_object(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) override {
    return f_->C_DestroyObject(s, o);
  }
  CK_RV generate_key(CK_SESSION_HANDLE s, CK_MECHANISM* m, CK_ATTRIBUTE* t,
                     CK_ULONG n, CK_OBJECT_HANDLE* k) override {
    return f_->C_GenerateKey(s, m, t, n, k);
  }
  CK_RV generate_key_pair(CK_SESSION_HANDLE s, CK_MECHANISM* m,
                          CK_ATTRIBUTE* pub, CK_ULONG npub, CK_ATTRIBUTE* priv,
                          CK_ULONG npriv, CK_OBJECT_HANDLE* hpub,
                          CK_OBJECT_HANDLE* hpriv) override {
    return f_->C_GenerateKeyPair(s, m, pub, npub, priv, npriv, hpub, hpriv);
  }
  CK_RV wrap_key(CK_SESSION_HANDLE s, CK_MECHANISM* m, CK_OBJECT_HANDLE wk,
                 CK_OBJECT_HANDLE k, CK_BYTE* out, CK_ULONG* len) override {
    return f_->C_WrapKey(s, m, wk, k, out, len);
  }
  CK_RV unwrap_key(CK_SESSION_HANDLE s, CK_MECHANISM* m, CK_OBJECT_HANDLE uk,
                   CK_BYTE* in, CK_ULONG len, CK_ATTRIBUTE* t, CK_ULONG n,
                   CK_OBJECT_HANDLE* k) override {
    return f_->C_UnwrapKey(s, m, uk, in, len, t, n, k);
  }
  CK_RV sign_init(CK_SESSION_HANDLE s, CK_MECHANISM* m,
                  CK_OBJECT_HANDLE k) override {
    return f_->C_SignInit(s, m, k);
  }
  CK_RV sign(CK_SESSION_HANDLE s, CK_BYTE* data, CK_ULONG len, CK_BYTE* sig,
             CK_ULONG* sig_len) override {
    return f_->C_Sign(s, data, len, sig, sig_len);
  }
  CK_RV set_attribute_value(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                            CK_ATTRIBUTE* t, CK_ULONG n) override {
    return f_->C_SetAttributeValue(s, o, t, n);
  }
  CK_RV copy_object(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE* t,
                    CK_ULONG n, CK_OBJECT_HANDLE* copy) override {
    return f_->C_CopyObject(s, o, t, n, copy);
  }

private:
  CK_FUNCTION_LIST* f_;
};

} // namespace

std::string trim_padded(const CK_UTF8CHAR* text, size_t size) {
  std::string out{reinterpret_cast<const char*>(text), size};
  while (!out.empty() && (out.back() == ' ' || out.back() == '\0'))
    out.pop_back();
  return out;
}

caf::expected<module> module::load(const std::filesystem::path& path,
                                   const table_decorator& wrap) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    return caf::make_error(config_errc::bad_file,
                           std::string{"--pkcs11-module"},
                           "PKCS#11 module not found: " + path.string());
  module result;
  result.path_ = path;
  // RTLD_NODELETE: some modules leave threads or atexit handlers behind that
  // crash once their code is unmapped; the library stays mapped until exit.
  result.handle_ = ::dlopen(path.c_str(),
                            RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (result.handle_ == nullptr) {
    const char* why = ::dlerror();
    return caf::make_error(config_errc::bad_file,
                           std::string{"--pkcs11-module"},
                           "cannot load " + path.string() + ": "
                             + (why != nullptr ? why : "dlopen failed"));
  }
  auto* sym = ::dlsym(result.handle_, "C_GetFunctionList");
  if (sym == nullptr)
    return caf::make_error(config_errc::bad_file,
                           std::string{"--pkcs11-module"},
                           path.string()
                             + " is not a PKCS#11 module (no "
                               "C_GetFunctionList)");
  CK_C_GetFunctionList get_list = nullptr;
  static_assert(sizeof(get_list) == sizeof(sym));
  std::memcpy(&get_list, &sym, sizeof(sym));
  CK_FUNCTION_LIST* list = nullptr;
  if (auto rv = get_list(&list); rv != CKR_OK || list == nullptr)
    return rv_error("C_GetFunctionList", rv);
  std::unique_ptr<function_table> fns = std::make_unique<dl_function_table>(
    list);
  if (wrap)
    fns = wrap(std::move(fns));
  result.fns_ = std::move(fns);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  if (auto rv = result.fns_->initialize(&args); rv != CKR_OK)
    return rv_error("C_Initialize", rv);
  result.initialized_ = true;
  return result;
}

pkcs11::module::module(module&& other) noexcept
  : path_(std::move(other.path_)),
    handle_(std::exchange(other.handle_, nullptr)),
    fns_(std::move(other.fns_)),
    initialized_(std::exchange(other.initialized_, false)) {
  // nop
}

module& module::operator=(module&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    handle_ = std::exchange(other.handle_, nullptr);
    fns_ = std::move(other.fns_);
    initialized_ = std::exchange(other.initialized_, false);
  }
  return *this;
}

module::~module() {
  release();
}

void module::release() noexcept {
  if (initialized_ && fns_)
    fns_->finalize();
  initialized_ = false;
  fns_.reset();
  if (handle_ != nullptr)
    ::dlclose(handle_);
  handle_ = nullptr;
}

caf::expected<std::vector<token_description>> module::tokens() const {
  CK_ULONG count = 0;
  if (auto rv = fns_->get_slot_list(CK_TRUE, nullptr, &count); rv != CKR_OK)
    return rv_error("C_GetSlotList", rv);
  std::vector<CK_SLOT_ID> slots(count);
  if (auto rv = fns_->get_slot_list(CK_TRUE, slots.data(), &count);
      rv != CKR_OK)
    return rv_error("C_GetSlotList", rv);
  slots.resize(count);
  std::vector<token_description> result;
  for (auto slot : slots) {
    CK_TOKEN_INFO info{};
    if (auto rv = fns_->get_token_info(slot, &info); rv != CKR_OK) {
      if (rv == CKR_TOKEN_NOT_PRESENT)
        continue;
      return rv_error("C_GetTokenInfo", rv);
    }
    token_description t;
    t.slot = slot;
    t.label = trim_padded(info.label, sizeof(info.label));
    t.manufacturer = trim_padded(info.manufacturerID,
                                 sizeof(info.manufacturerID));
    t.model = trim_padded(info.model, sizeof(info.model));
    t.serial = trim_padded(info.serialNumber, sizeof(info.serialNumber));
    t.initialized = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
    result.push_back(std::move(t));
  }
  return result;
}

caf::expected<CK_SLOT_ID> module::find_token(std::string_view label) const {
  auto all = tokens();
  if (!all)
    return all.error();
  std::vector<CK_SLOT_ID> found;
  for (auto& t : *all)
    if (t.initialized && t.label == label)
      found.push_back(t.slot);
  if (found.empty())
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--token-label"},
                           "no initialised token labelled '"
                             + std::string{label} + "' in " + path_.string());
  if (found.size() > 1)
    return caf::make_error(config_errc::invalid_option,
                           std::string{"--token-label"},
                           std::to_string(found.size())
                             + " tokens are labelled '" + std::string{label}
                             + "'; labels must be unique");
  return found.front();
}

} // namespace hsm::pkcs11
