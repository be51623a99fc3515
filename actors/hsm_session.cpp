#include "actors/hsm_session.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "runtime/pkcs11/token_admin.hpp"

#include <optional>

namespace hsm {

namespace {

struct session_state {
  std::shared_ptr<const session_context> ctx;
  std::optional<pkcs11::session> sess;
  keys::key_handles keys;
  size_t index = 0;
};

using session_ptr = hsm_session_actor::stateful_pointer<session_state>;

/// Counts `err` by function and CKR name if it is a failed PKCS#11 call.
void count_pkcs11_error(const session_context& ctx, const caf::error& err) {
  if (!ctx.metrics)
    return;
  if (auto rv = pkcs11::rv_of(err))
    ctx.metrics->count_pkcs11_error(pkcs11::function_of(err).value_or("other"),
                                    pkcs11::rv_name(*rv));
}

/// Ends the actor after a session-level failure; the reply still goes out.
template <class T>
caf::result<T> fail(session_ptr self, caf::error err) {
  count_pkcs11_error(*self->state.ctx, err);
  if (is_session_failure(err)) {
    logger("hsm")->warn("[session={}] failed: {}", self->state.index,
                        describe(err));
    self->quit(err);
  }
  return err;
}

/// Opens the session, logs in and finds the master key.
caf::error open_session(session_state& st) {
  const auto& ctx = *st.ctx;
  if (ctx.pin_rejected->load())
    return caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                           std::string{"PIN rejected earlier; not tried "
                                       "again"});
  auto opened = pkcs11::session::open(*ctx.mod, ctx.slot);
  if (!opened)
    return opened.error();
  st.sess.emplace(std::move(*opened));
  if (auto err = st.sess->login(*ctx.pin)) {
    if (pkcs11::pin_rejected(err))
      ctx.pin_rejected->store(true);
    return err;
  }
  auto keys = keys::find_key_handles(*st.sess, ctx.master_keys);
  if (!keys)
    return keys.error();
  st.keys = std::move(*keys);
  return caf::none;
}

hsm_session_actor::behavior_type
session_impl(session_ptr self, std::shared_ptr<const session_context> ctx,
             size_t index, uint64_t generation,
             session_supervisor_actor supervisor) {
  auto& st = self->state;
  st.ctx = std::move(ctx);
  st.index = index;
  if (auto err = open_session(st)) {
    count_pkcs11_error(*st.ctx, err);
    logger("hsm")->error("[session={}] cannot start: {}", index, describe(err));
    self->quit(err);
    return hsm_session_actor::behavior_type::make_empty_behavior();
  }
  caf::anon_send(supervisor, ready_atom::value, index, generation);
  return {
    [=](generate_atom, const std::string& key_id,
        scheme s) -> caf::result<key_record> {
      auto& state = self->state;
      const auto& cap = state.ctx->caps.of(s);
      auto rec = keys::make_key(*state.sess, state.keys, s, key_id,
                                cap.resident, nullptr, cap.params);
      if (!rec)
        return fail<key_record>(self, rec.error());
      return std::move(*rec);
    },
    [=](sign_atom, const key_record& rec,
        const std::vector<uint8_t>& payload) -> caf::result<signature_result> {
      auto& state = self->state;
      auto raw = keys::sign_with(*state.sess, state.keys, rec, payload);
      if (!raw)
        return fail<signature_result>(self, raw.error());
      // Verified before released (invariant 3), on this session's thread.
      auto sig = crypto::finish_signature(rec.scheme, rec.public_key, payload,
                                          *raw);
      if (!sig)
        return sig.error();
      return signature_result{rec.key_id, rec.scheme, std::move(*sig)};
    },
    [=](destroy_atom, const key_record& rec) {
      if (auto err = keys::destroy_resident_key(*self->state.sess, rec))
        logger("hsm")->warn("[session={}] could not remove an unstored "
                            "resident key of {}: {}",
                            self->state.index, rec.key_id, describe(err));
    },
  };
}

} // namespace

hsm_session_actor spawn_hsm_session(caf::actor_system& sys,
                                    std::shared_ptr<const session_context> ctx,
                                    size_t index, uint64_t generation,
                                    session_supervisor_actor supervisor,
                                    spawn_mode mode) {
  return spawn_as(sys, mode, session_impl, std::move(ctx), index, generation,
                  std::move(supervisor));
}

} // namespace hsm
