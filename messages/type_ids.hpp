#pragma once

// The project's one CAF type-ID block: every atom and every message type the
// actors exchange. All actors live in one process and these types are never
// serialised, so they are registered as local-only (unsafe) message types in
// interfaces.hpp instead of getting inspect() overloads; the block gives
// them stable IDs and names. Atom texts are at most 10 characters.

#include "messages/audit.hpp"
#include "messages/job.hpp"
#include "messages/key_record.hpp"
#include "messages/results.hpp"
#include "messages/scheme.hpp"

#include "caf/all.hpp"

#include <string>
#include <vector>

namespace hsm {
struct key_lookup;
struct dispatcher_stats;
struct store_stats;
} // namespace hsm

CAF_BEGIN_TYPE_ID_BLOCK(hsm_driver, caf::first_custom_type_id)

  CAF_ADD_TYPE_ID(hsm_driver, (hsm::scheme))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::job))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::job_result))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::key_lookup))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::signature_result))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::dispatcher_stats))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::key_record))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::put_result))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::store_stats))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::audit_batch))
  CAF_ADD_TYPE_ID(hsm_driver, (hsm::audit_entry))

  CAF_ADD_ATOM(hsm_driver, hsm, generate_atom, "generate")
  CAF_ADD_ATOM(hsm_driver, hsm, sign_atom, "sign")
  CAF_ADD_ATOM(hsm_driver, hsm, destroy_atom, "destroy")
  CAF_ADD_ATOM(hsm_driver, hsm, job_atom, "job")
  CAF_ADD_ATOM(hsm_driver, hsm, credit_atom, "credit")
  CAF_ADD_ATOM(hsm_driver, hsm, result_atom, "result")
  CAF_ADD_ATOM(hsm_driver, hsm, session_up_atom, "sessup")
  CAF_ADD_ATOM(hsm_driver, hsm, session_down_atom, "sessdown")
  CAF_ADD_ATOM(hsm_driver, hsm, session_ok_atom, "sessok")
  CAF_ADD_ATOM(hsm_driver, hsm, replace_atom, "replace")
  CAF_ADD_ATOM(hsm_driver, hsm, ready_atom, "ready")
  CAF_ADD_ATOM(hsm_driver, hsm, respawn_atom, "respawn")
  CAF_ADD_ATOM(hsm_driver, hsm, poll_atom, "poll")
  CAF_ADD_ATOM(hsm_driver, hsm, stop_atom, "stop")
  CAF_ADD_ATOM(hsm_driver, hsm, drain_atom, "drain")
  CAF_ADD_ATOM(hsm_driver, hsm, stats_atom, "stats")
  CAF_ADD_ATOM(hsm_driver, hsm, close_atom, "close")
  CAF_ADD_ATOM(hsm_driver, hsm, stuck_atom, "stuck")
  CAF_ADD_ATOM(hsm_driver, hsm, flush_atom, "flush")
  CAF_ADD_ATOM(hsm_driver, hsm, deadline_atom, "deadline")
  CAF_ADD_ATOM(hsm_driver, hsm, audit_atom, "audit")

CAF_END_TYPE_ID_BLOCK(hsm_driver)
