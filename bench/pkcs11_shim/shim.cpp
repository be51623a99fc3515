// hsm_pkcs11_shim: a PKCS#11 module that forwards every call to a real
// module, after the delay HSM_SHIM_SPEC gives for that function
// (bench/pkcs11_shim/README.md). For benchmarks and tests only: it makes a
// fast software token behave like a slow or remote HSM.
//
// Exports one symbol, C_GetFunctionList. Its function list is built at
// compile time; every entry except C_GetFunctionList forwards to the same
// entry of the real module's list. The environment (HSM_SHIM_MODULE,
// HSM_SHIM_SPEC) is read and the real module dlopen'd once, on the first
// C_GetFunctionList; the state is immutable afterwards, so calls from any
// number of threads read it without a lock, and each call sleeps on its own
// thread (no lock is held while sleeping). Set-up problems are reported by
// C_Initialize: CKR_ARGUMENTS_BAD for a bad spec, CKR_GENERAL_ERROR for a
// missing or unloadable module, each with one line on stderr.

#include "bench/pkcs11_shim/shim_spec.hpp"
#include <dlfcn.h>
#include <p11-kit/pkcs11.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace {

using hsm::shim::function_count;
using hsm::shim::function_index;

/// What the shim knows after set-up. Never changes once built.
struct shim_state {
  /// The real module's function list; null when set-up failed.
  CK_FUNCTION_LIST* real = nullptr;
  /// The parsed HSM_SHIM_SPEC.
  hsm::shim::spec behaviour;
  /// What C_Initialize returns when set-up failed.
  CK_RV setup_rv = CKR_OK;
  /// Why set-up failed, for stderr.
  std::string problem;
};

CK_RV shim_get_function_list(CK_FUNCTION_LIST** list);

shim_state failed(CK_RV rv, std::string problem) {
  shim_state st;
  st.setup_rv = rv;
  st.problem = std::move(problem);
  return st;
}

shim_state set_up() {
  const char* spec_text = std::getenv("HSM_SHIM_SPEC");
  auto sp = hsm::shim::parse_spec(spec_text != nullptr ? spec_text : "");
  if (!sp)
    return failed(CKR_ARGUMENTS_BAD, "bad HSM_SHIM_SPEC: " + sp.error);
  const char* path = std::getenv("HSM_SHIM_MODULE");
  if (path == nullptr || *path == '\0')
    return failed(CKR_GENERAL_ERROR,
                  "HSM_SHIM_MODULE is not set (the path of the real "
                  "PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)");
  // Never dlclose'd: like the driver's own module (runtime/pkcs11/module.cpp)
  // the real module stays mapped until exit, so that no thread left inside
  // it, and no handler it registered, runs unmapped code.
  void* handle = ::dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (handle == nullptr) {
    const char* why = ::dlerror();
    return failed(CKR_GENERAL_ERROR,
                  std::string{"cannot load HSM_SHIM_MODULE="} + path + ": "
                    + (why != nullptr ? why : "dlopen failed"));
  }
  void* sym = ::dlsym(handle, "C_GetFunctionList");
  if (sym == nullptr)
    return failed(CKR_GENERAL_ERROR, std::string{"HSM_SHIM_MODULE="} + path
                                       + " has no C_GetFunctionList");
  CK_C_GetFunctionList get_list = nullptr;
  static_assert(sizeof(get_list) == sizeof(sym));
  std::memcpy(&get_list, &sym, sizeof(sym));
  // Calling our own C_GetFunctionList here would re-enter this set-up.
  // Compared by the object file holding it, not by address: inside the
  // shim, the address of its exported function need not be the one dlsym
  // returns.
  Dl_info real_info{};
  Dl_info own_info{};
  if (::dladdr(sym, &real_info) != 0
      && ::dladdr(reinterpret_cast<void*>(&shim_get_function_list), &own_info)
           != 0
      && real_info.dli_fbase == own_info.dli_fbase)
    return failed(CKR_GENERAL_ERROR, std::string{"HSM_SHIM_MODULE="} + path
                                       + " is the shim itself");
  shim_state st;
  if (auto rv = get_list(&st.real); rv != CKR_OK || st.real == nullptr)
    return failed(CKR_GENERAL_ERROR, std::string{"C_GetFunctionList of "} + path
                                       + " failed (CK_RV " + std::to_string(rv)
                                       + ")");
  st.behaviour = *sp.value;
  return st;
}

/// The set-up, done on first use (thread-safe static initialisation).
const shim_state& state() {
  static const shim_state st = set_up();
  return st;
}

/// Sleeps the delay the spec gives function `index`; holds no lock.
void delay(size_t index) {
  auto d = state().behaviour.delay[index];
  if (d > hsm::shim::duration::zero())
    std::this_thread::sleep_for(d);
}

// -- the forwarding entries ---------------------------------------------------

template <class Fn>
struct forwarder;

/// One entry per `CK_FUNCTION_LIST` member with signature CK_RV(Args...).
template <class... Args>
struct forwarder<CK_RV (*)(Args...)> {
  /// Delays, then calls the real module's `Member`.
  template <auto Member, size_t Index>
  static CK_RV call(Args... args) {
    const auto& st = state();
    if (st.real == nullptr)
      return CKR_CRYPTOKI_NOT_INITIALIZED;
    delay(Index);
    return (st.real->*Member)(args...);
  }
};

/// C_Initialize: reports a failed set-up, else forwards like the others.
CK_RV shim_initialize(void* args) {
  const auto& st = state();
  if (st.setup_rv != CKR_OK) {
    std::fprintf(stderr, "hsm_pkcs11_shim: %s\n", st.problem.c_str());
    return st.setup_rv;
  }
  delay(*function_index("C_Initialize"));
  return st.real->C_Initialize(args);
}

/// The list and a proof that it is complete.
struct built_list {
  CK_FUNCTION_LIST list;
  /// seen[i]: function_names[i] has its entry.
  std::array<bool, function_count> seen;
};

#define HSM_SHIM_FORWARD(name)                                                 \
  out.list.name = &forwarder<decltype(CK_FUNCTION_LIST::name)>::call<          \
    &CK_FUNCTION_LIST::name, *function_index(#name)>;                          \
  out.seen[*function_index(#name)] = true

constexpr built_list build_list() {
  built_list out{};
  out.list.version = CK_VERSION{2, 40};
  out.list.C_Initialize = &shim_initialize;
  out.seen[*function_index("C_Initialize")] = true;
  out.list.C_GetFunctionList = &shim_get_function_list;
  HSM_SHIM_FORWARD(C_Finalize);
  HSM_SHIM_FORWARD(C_GetInfo);
  HSM_SHIM_FORWARD(C_GetSlotList);
  HSM_SHIM_FORWARD(C_GetSlotInfo);
  HSM_SHIM_FORWARD(C_GetTokenInfo);
  HSM_SHIM_FORWARD(C_GetMechanismList);
  HSM_SHIM_FORWARD(C_GetMechanismInfo);
  HSM_SHIM_FORWARD(C_InitToken);
  HSM_SHIM_FORWARD(C_InitPIN);
  HSM_SHIM_FORWARD(C_SetPIN);
  HSM_SHIM_FORWARD(C_OpenSession);
  HSM_SHIM_FORWARD(C_CloseSession);
  HSM_SHIM_FORWARD(C_CloseAllSessions);
  HSM_SHIM_FORWARD(C_GetSessionInfo);
  HSM_SHIM_FORWARD(C_GetOperationState);
  HSM_SHIM_FORWARD(C_SetOperationState);
  HSM_SHIM_FORWARD(C_Login);
  HSM_SHIM_FORWARD(C_Logout);
  HSM_SHIM_FORWARD(C_CreateObject);
  HSM_SHIM_FORWARD(C_CopyObject);
  HSM_SHIM_FORWARD(C_DestroyObject);
  HSM_SHIM_FORWARD(C_GetObjectSize);
  HSM_SHIM_FORWARD(C_GetAttributeValue);
  HSM_SHIM_FORWARD(C_SetAttributeValue);
  HSM_SHIM_FORWARD(C_FindObjectsInit);
  HSM_SHIM_FORWARD(C_FindObjects);
  HSM_SHIM_FORWARD(C_FindObjectsFinal);
  HSM_SHIM_FORWARD(C_EncryptInit);
  HSM_SHIM_FORWARD(C_Encrypt);
  HSM_SHIM_FORWARD(C_EncryptUpdate);
  HSM_SHIM_FORWARD(C_EncryptFinal);
  HSM_SHIM_FORWARD(C_DecryptInit);
  HSM_SHIM_FORWARD(C_Decrypt);
  HSM_SHIM_FORWARD(C_DecryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptFinal);
  HSM_SHIM_FORWARD(C_DigestInit);
  HSM_SHIM_FORWARD(C_Digest);
  HSM_SHIM_FORWARD(C_DigestUpdate);
  HSM_SHIM_FORWARD(C_DigestKey);
  HSM_SHIM_FORWARD(C_DigestFinal);
  HSM_SHIM_FORWARD(C_SignInit);
  HSM_SHIM_FORWARD(C_Sign);
  HSM_SHIM_FORWARD(C_SignUpdate);
  HSM_SHIM_FORWARD(C_SignFinal);
  HSM_SHIM_FORWARD(C_SignRecoverInit);
  HSM_SHIM_FORWARD(C_SignRecover);
  HSM_SHIM_FORWARD(C_VerifyInit);
  HSM_SHIM_FORWARD(C_Verify);
  HSM_SHIM_FORWARD(C_VerifyUpdate);
  HSM_SHIM_FORWARD(C_VerifyFinal);
  HSM_SHIM_FORWARD(C_VerifyRecoverInit);
  HSM_SHIM_FORWARD(C_VerifyRecover);
  HSM_SHIM_FORWARD(C_DigestEncryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptDigestUpdate);
  HSM_SHIM_FORWARD(C_SignEncryptUpdate);
  HSM_SHIM_FORWARD(C_DecryptVerifyUpdate);
  HSM_SHIM_FORWARD(C_GenerateKey);
  HSM_SHIM_FORWARD(C_GenerateKeyPair);
  HSM_SHIM_FORWARD(C_WrapKey);
  HSM_SHIM_FORWARD(C_UnwrapKey);
  HSM_SHIM_FORWARD(C_DeriveKey);
  HSM_SHIM_FORWARD(C_SeedRandom);
  HSM_SHIM_FORWARD(C_GenerateRandom);
  HSM_SHIM_FORWARD(C_GetFunctionStatus);
  HSM_SHIM_FORWARD(C_CancelFunction);
  HSM_SHIM_FORWARD(C_WaitForSlotEvent);
  return out;
}

#undef HSM_SHIM_FORWARD

constexpr built_list shim_built = build_list();

constexpr bool every_function_forwarded() {
  for (bool b : shim_built.seen)
    if (!b)
      return false;
  return true;
}

static_assert(every_function_forwarded(),
              "an entry of CK_FUNCTION_LIST does not forward");

/// The list handed out; PKCS#11 wants a non-const pointer to it.
CK_FUNCTION_LIST shim_list = shim_built.list;

CK_RV shim_get_function_list(CK_FUNCTION_LIST** list) {
  if (list == nullptr)
    return CKR_ARGUMENTS_BAD;
  (void) state(); // reads the environment, loads the real module
  *list = &shim_list;
  return CKR_OK;
}

} // namespace

/// The module's only export: the shim's function list. Never fails for a
/// set-up problem; C_Initialize reports those.
extern "C" [[gnu::visibility("default")]] CK_RV
C_GetFunctionList(CK_FUNCTION_LIST** list) {
  return shim_get_function_list(list);
}
