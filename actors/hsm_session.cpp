#include "actors/hsm_session.hpp"

#include "runtime/logging.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/token_admin.hpp"

namespace hsm {

namespace {

struct session_state {
  std::shared_ptr<const session_context> ctx;
  std::optional<pkcs11::session> sess;
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  size_t index = 0;
};

using session_ptr = hsm_session_actor::stateful_pointer<session_state>;

bool session_level(const caf::error& err) {
  return err == hsm_errc::reopen_session || err == hsm_errc::reinit_module
         || err == hsm_errc::retryable;
}

/// Ends the actor after a session-level failure; the reply still goes out.
template <class T>
caf::result<T> fail(session_ptr self, caf::error err) {
  if (session_level(err)) {
    logger("hsm")->warn("[slot={}] session failed: {}", self->state.index,
                        describe(err));
    self->quit(err);
  }
  return err;
}

hsm_session_actor::behavior_type
session_impl(session_ptr self, std::shared_ptr<const session_context> ctx,
             size_t index, uint64_t generation, caf::actor supervisor) {
  auto& st = self->state;
  st.ctx = ctx;
  st.index = index;
  auto opened = pkcs11::session::open(*ctx->mod, ctx->slot);
  caf::error err;
  if (ctx->pin_rejected->load()) {
    err = caf::make_error(hsm_errc::fatal, std::string{"C_Login"},
                          std::string{"PIN rejected earlier; not tried "
                                      "again"});
  } else if (!opened) {
    err = opened.error();
  } else {
    st.sess.emplace(std::move(*opened));
    err = st.sess->login(*ctx->pin);
    if (err && describe(err).find("CKR_PIN_") != std::string::npos)
      ctx->pin_rejected->store(true);
    if (!err) {
      auto master = pkcs11::find_master_key(*st.sess, ctx->master_key_label);
      if (master)
        st.master = *master;
      else
        err = master.error();
    }
  }
  if (err) {
    logger("hsm")->error("[slot={}] cannot start: {}", index, describe(err));
    self->quit(err);
    return hsm_session_actor::behavior_type::make_empty_behavior();
  }
  caf::anon_send(supervisor, ready_atom::value, index, generation);
  return {
    [=](generate_atom, const std::string& key_id,
        scheme s) -> caf::result<store::key_record> {
      auto& state = self->state;
      auto rec = make_key(*state.sess, state.master, s, key_id,
                          state.ctx->caps.of(s).resident);
      if (!rec)
        return fail<store::key_record>(self, rec.error());
      return std::move(*rec);
    },
    [=](sign_atom, const store::key_record& rec,
        const std::vector<uint8_t>& payload) -> caf::result<raw_signature> {
      auto& state = self->state;
      auto raw = sign_with(*state.sess, state.master, rec, payload);
      if (!raw)
        return fail<raw_signature>(self, raw.error());
      return raw_signature{std::move(*raw)};
    },
    [=](destroy_atom, const store::key_record& rec) {
      if (!rec.resident())
        return;
      std::vector<uint8_t> id{rec.key_id.begin(), rec.key_id.end()};
      std::string label{rec.key_blob.begin(), rec.key_blob.end()};
      if (auto derr = pkcs11::destroy_resident(*self->state.sess, id, label))
        logger("hsm")->warn("[slot={}] could not remove an unstored resident "
                            "key of {}: {}",
                            self->state.index, rec.key_id, describe(derr));
    },
  };
}

} // namespace

hsm_session_actor spawn_hsm_session(caf::actor_system& sys,
                                    std::shared_ptr<const session_context> ctx,
                                    size_t index, uint64_t generation,
                                    caf::actor supervisor, spawn_mode mode) {
  if (mode == spawn_mode::detached)
    return sys.spawn<caf::detached>(session_impl, std::move(ctx), index,
                                    generation, std::move(supervisor));
  return sys.spawn(session_impl, std::move(ctx), index, generation,
                   std::move(supervisor));
}

} // namespace hsm
