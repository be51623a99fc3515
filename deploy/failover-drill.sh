#!/usr/bin/env bash
# Failover drill: a PostgreSQL primary and a streaming standby that is its
# synchronous standby (synchronous_standby_names), both on loopback, and two
# drivers (`hsm-driver run`, each with its own SoftHSMv2 token holding one
# shared master key) on the multi-host URL
#   postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/postgres?target_session_attrs=read-write
# behind the reference proxy. Rounds of mixed load with a driver killed
# (SIGKILL) at a random instant of each, as in deploy/crash-drill.sh; in
# the middle round the primary is killed (pg_ctl stop -m immediate) under
# load and the standby promoted 0.2-1.7 s later; the remaining rounds run
# against the promoted standby (the old primary stays down). Then the audit
# of deploy/crash-drill.sh, against the new primary: no request lost, no
# key id with two keys, every key reported before or after the failover
# stored there and signing.
# Exit status 1 if an invariant fails, 2 on bad usage.
#
# Usage: deploy/failover-drill.sh [--rounds R] [--seed S] [--keep DIR] [--lease-ms N]
#   --rounds R    rounds (default 6; the failover is in round R/2+1)
#   --seed S      seeds the plan (load, victims, instants); printed at start
#   --keep DIR    work in DIR (new or empty) and keep it
#   --lease-ms N  the proxy's lease (default 2000)
# Needs what deploy/crash-drill.sh needs. See deploy/lib/drill.sh.
set -euo pipefail
# shellcheck source=deploy/lib/drill.sh
source "$(dirname "$0")/lib/drill.sh"
rounds=6
drill_parse_args "$@"
drill_make_work

pg_dirs=("$work/pg1" "$work/pg2")
db_dir=$work/pg1
standby_dir=$work/pg2
primary_url=$("$pgc" start "$db_dir")
standby_url=$("$pgc" start-standby "$standby_dir" "$db_dir")
db_url="postgresql://postgres@127.0.0.1:$(cat "$db_dir/port"),127.0.0.1:$(cat "$standby_dir/port")/postgres?target_session_attrs=read-write"
say "primary $primary_url, synchronous standby $standby_url: $("$pg_bin/psql" -X -At "$primary_url" \
  -c "SELECT application_name || ' ' || state || ' ' || sync_state FROM pg_stat_replication")"
failover_round=$((rounds / 2 + 1))

plan_db_event() {
  [ "$round" -eq "$failover_round" ] || return 0
  fault_instant
  local t=$fault_ms
  db_plan="$t failover-kill"$'\n'"$((t + 200 + RANDOM % 1500)) promote"
}

drill_setup
grep -h 'synchronous' "$work/a.log" | head -n 2 | sed 's/^/    a.log: /' || true
drill_rounds
drill_finish "failover drill"
