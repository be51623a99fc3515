#!/usr/bin/env bash
# Crash-consistency drill: two drivers (`hsm-driver run`, each with its own
# SoftHSMv2 token holding one shared master key) on one private PostgreSQL
# cluster, behind the reference proxy with a short lease. Each round
# enqueues a mixed load (new keys, repeated generates of the same key id
# with the same and with another scheme, signs, unknown keys) and, while it
# is in flight, kills a random driver with SIGKILL at a random instant and
# starts it again; every third round the database goes down mid-load too
# (a fast restart, or an immediate stop started again 0-1 s later). After
# each round it waits until every request is answered. Then it audits and
# prints a summary: every request answered (none lost), errors only where
# expected (`invalid_request` for another scheme, `unknown_key`,
# `scheme_unsupported`), one public key per key id, every reported key
# stored and signing (`hsm-driver keys sign` on each token, verified by
# openssl), every signature the drivers returned verified by openssl.
# Exit status 1 if an invariant fails, 2 on bad usage.
#
# Usage: deploy/crash-drill.sh [--rounds R] [--seed S] [--keep DIR] [--lease-ms N]
#   --rounds R    rounds of load and faults (default 20; CI runs 3)
#   --seed S      seeds the plan (load, victims, instants); printed at start
#   --keep DIR    work in DIR (new or empty) and keep it: logs, requests,
#                 answers, the database; processes are stopped either way
#   --lease-ms N  the proxy's lease (default 2000)
# Needs: a build (deploy/build.sh; HSM_DRIVER_BIN names another binary),
# softhsm2, postgresql, jq, curl, openssl. See deploy/lib/drill.sh.
set -euo pipefail
# shellcheck source=deploy/lib/drill.sh
source "$(dirname "$0")/lib/drill.sh"
drill_parse_args "$@"
drill_make_work

pg_dirs=("$work/pg")
db_dir=$work/pg
db_url=$("$pgc" start "$db_dir")

# Every third round: the database goes down at a random instant of the
# load (as a driver kill does), by a fast restart or by an immediate stop
# (a crash) started again 0-1 s later; the load goes on meanwhile.
plan_db_event() {
  [ $((round % 3)) -eq 0 ] || return 0
  fault_instant
  local t=$fault_ms
  if [ $((RANDOM % 2)) -eq 0 ]; then
    db_plan="$t db-restart"
  else
    db_plan="$t db-kill"$'\n'"$((t + RANDOM % 1000)) db-start"
  fi
}

drill_setup
drill_rounds
drill_finish "crash drill"
