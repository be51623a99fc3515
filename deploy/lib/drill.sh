# shellcheck shell=bash
# Shared by deploy/crash-drill.sh and deploy/failover-drill.sh (sourced, not
# run): the set-up of a drill (two SoftHSMv2 tokens, one per driver, holding
# one master key; the dev PKI; the reference proxy; two `hsm-driver run`
# drivers on one PostgreSQL), its rounds of load with faults on a seeded
# schedule, the wait for every answer, and the audit of what the drivers
# answered. A drill script sources this file and then:
#
#   drill_parse_args "$@"    --rounds, --seed, --keep, --lease-ms, --help
#   drill_make_work          the work folder, the clean-up trap
#   ...                      starts PostgreSQL (deploy/pg-test-cluster.sh),
#                            adds each cluster folder to `pg_dirs`, sets
#                            `db_dir` (the primary's folder) and `db_url`
#   drill_setup              tokens, PKI, proxy, drivers, one key per scheme
#   drill_rounds             `rounds` rounds; each calls the script's
#                            `plan_db_event` (round number in `round`),
#                            which sets `db_plan` to the round's database
#                            events ("MS ACTION" lines, or empty)
#   drill_finish NAME        stops the drivers, audits, prints the summary;
#                            returns 1 if an invariant fails
#
# Each round enqueues through the proxy's admin API (request ids rNN-qMMM),
# in 6 waves 200 ms apart:
#   - generate_key of 8 new key ids (secp256k1, p256, and ed25519 when the
#     tokens serve it), and 3 of them again, same scheme, in the same or a
#     later wave (a race for one key id between the two drivers),
#   - generate_key of 3 keys from earlier rounds, same scheme (the stored
#     key comes back), and of 2 with another scheme (`invalid_request`),
#   - 16 signs with keys from earlier rounds (DRILL_SIGNS; a 32-byte hash
#     for ECDSA, the message for Ed25519),
#   - a sign with a key id never generated (`unknown_key`),
#   - generate_key ed25519 when the tokens cannot wrap Ed25519 keys
#     (SoftHSMv2 2.6: `scheme_unsupported`),
# and kills one driver (SIGKILL) 0-19 ms after a random wave went out (the
# drivers serve a wave in ~10-20 ms), starting it again 0-800 ms later;
# database faults fall on such instants too, and run beside the load (the
# waves go on while the database restarts). Then it waits until every
# request is answered (DRILL_ROUND_DEADLINE_S, default 120 s) and records
# the answers.
#
# The plan (the load, which driver dies, when, the database events) comes
# from bash's RANDOM seeded with --seed, drawn in this shell only; the
# processes' own timing is not reproducible, so a seed replays the plan,
# not the interleaving.

drill_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${HSM_DRIVER_BIN:-$drill_root/build/hsm-driver}
pgc=$drill_root/deploy/pg-test-cluster.sh
pg_bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
export PKCS11_MODULE=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export LC_ALL=C
unset PKCS11_THALES_MODULE PKCS11_IBM_MODULE USER_PIN SO_PIN SQLITE_PATH POSTGRES_URL

# -- settings -------------------------------------------------------------------

rounds=20
seed=$((RANDOM * 32768 + RANDOM))
keep=
lease_ms=2000
round_deadline_s=${DRILL_ROUND_DEADLINE_S:-120}
waves=6              # a round's load goes out in this many waves,
wave_ms=200          # this far apart; faults fall in that window
signs_per_round=${DRILL_SIGNS:-16}
drivers=(a b)

# -- state ----------------------------------------------------------------------

work=
pki=
db_url=
db_dir=
standby_dir=         # failover drill: the standby's cluster folder
pg_dirs=()
proxy_pid=
proxy_addr=
admin=
admin_token=         # the admin API's bearer token, if the proxy has one
declare -A driver_pid=()
schemes=()           # what the tokens serve
ed25519_served=0
key_ids=()           # keys answered ok in earlier rounds, and their schemes
key_schemes=()
round=0
qn=0                 # requests in this round so far
load_file=
db_plan=
kills=0
kills_holding=0      # kills of a driver that held leases at that instant
db_restarts=0
db_job=              # a database restart running beside the load
db_kills=0
failovers=0
keys_before_failover=
driver_exits=0       # drivers that exited without the drill killing them
stuck_rounds=0
unclean_stops=0      # drivers that did not exit 0 soon after SIGTERM
failures=0           # invariants broken (drill_finish)
started_s=${EPOCHREALTIME%.*}
now_ms=0

say() { printf '[%4ds] %s\n' $((${EPOCHREALTIME%.*} - started_s)) "$*"; }
die() {
  echo "drill: $*" >&2
  exit 1
}
bad_usage() {
  echo "drill: $*" >&2
  exit 2
}
# Sets now_ms (no subshell, no process).
tick() {
  local t=${EPOCHREALTIME/./}
  now_ms=$((t / 1000))
}
rr() { printf '%02d' "$1"; }
# True if FILE holds a whole JSON value for which FILTER is true (jq -e
# alone is true for an empty file).
json_holds() { [ -s "$1" ] && [ "$(jq "$2" "$1" 2>/dev/null)" = true ]; }

# The calling script's header comment.
drill_usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

drill_parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --rounds) rounds=${2:?--rounds N}; shift 2 ;;
      --seed) seed=${2:?--seed S}; shift 2 ;;
      --keep) keep=${2:?--keep DIR}; shift 2 ;;
      --lease-ms) lease_ms=${2:?--lease-ms N}; shift 2 ;;
      -h | --help) drill_usage; exit 0 ;;
      *) bad_usage "unknown option '$1' (--help shows the usage)" ;;
    esac
  done
  [[ $rounds =~ ^[1-9][0-9]*$ ]] || bad_usage "--rounds must be a positive number"
  [[ $seed =~ ^[0-9]+$ ]] || bad_usage "--seed must be a number"
  [[ $lease_ms =~ ^[1-9][0-9]*$ ]] || bad_usage "--lease-ms must be a positive number"
  [ -x "$bin" ] || die "no binary at $bin (deploy/build.sh, or set HSM_DRIVER_BIN)"
  local tool
  for tool in jq curl openssl basenc sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (deploy/install-deps.sh)"
  done
  [ -n "$pg_bin" ] || die "PostgreSQL is missing (deploy/install-deps.sh)"
  [ -f "$PKCS11_MODULE" ] || die "no PKCS#11 module at $PKCS11_MODULE (softhsm2)"
  RANDOM=$seed
}

# The work folder (temporary, or --keep DIR) and the trap that stops every
# process the drill started and removes the folder unless kept.
drill_make_work() {
  if [ -n "$keep" ]; then
    mkdir -p "$keep"
    work=$(cd "$keep" && pwd)
    [ -z "$(ls -A "$work")" ] || die "--keep $work: the folder must be new or empty"
  else
    work=$(mktemp -d /tmp/hsm-driver-drill.XXXXXX)
  fi
  trap drill_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # PostgreSQL runs as `postgres` when we are root: it must reach its folder.
  chmod 711 "$work"
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -x "$work"; then
    die "user postgres cannot reach $work (give --keep a folder under /tmp)"
  fi
  umask 077
  say "work folder $work; seed $seed; $rounds rounds"
}

drill_cleanup() {
  local rc=$? n d
  set +e
  trap - INT TERM
  for n in "${!driver_pid[@]}"; do
    kill -9 "${driver_pid[$n]}" 2>/dev/null
  done
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null; fi
  wait 2>/dev/null
  for d in "${pg_dirs[@]}"; do "$pgc" kill "$d"; done
  if [ -n "$keep" ]; then
    echo "drill: kept $work (driver logs a.log b.log, requests.jsonl, outcomes.jsonl, pg*/server.log)" >&2
  elif [ -n "$work" ]; then
    rm -rf "$work"
  fi
  exit "$rc"
}

# -- set-up -----------------------------------------------------------------------

# Runs a command against driver NAME's token: with_token NAME CMD...
with_token() {
  local n=$1
  shift
  SOFTHSM2_CONF=$work/hsm-$n/softhsm2.conf HSM_TOKEN_LABEL=hsm-$n "$@"
}

# A SoftHSMv2 token of its own for driver NAME with the shared master key,
# made from a known value as the redundancy tests do (test tokens only).
make_token() {
  local n=$1 d=$work/hsm-$1
  mkdir -p "$d/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$d/tokens" >"$d/softhsm2.conf"
  with_token "$n" env SO_PIN_FILE="$work/so.pin" "$bin" token init >/dev/null 2>>"$work/setup.log"
  with_token "$n" "$bin" master-key init --test-value-file "$work/master.hex" >/dev/null 2>>"$work/setup.log"
}

# The dev PKI as the binary makes it: `hsm-driver dev` writes it under its
# data folder (root, intermediate, proxy and driver certificates), and
# proves on the way that the binary works end to end; it is stopped as soon
# as it has printed its demo.
make_pki() {
  local d=$work/dev pid
  env -u SOFTHSM2_CONF -u USER_PIN_FILE HSM_LOG_LEVEL=warn \
    "$bin" dev --data-dir "$d" >"$work/dev.out" 2>"$work/dev.log" &
  pid=$!
  for _ in $(seq 1 600); do
    if json_holds "$work/dev.out" 'has("ok")' || ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
  json_holds "$work/dev.out" '.ok == true' ||
    die "hsm-driver dev failed: $(tail -n 5 "$work/dev.log")"
  pki=$d/pki
}

# The reference proxy. Its admin API's bearer token is in the file it
# writes (`--admin-token-file`, which it prints as `admin_token_file`); a
# proxy without that option has an open admin API.
start_proxy() {
  local token_flag=()
  if "$bin" proxy --help | grep -q -- --admin-token-file; then
    token_flag=(--admin-token-file "$work/admin.token")
  fi
  "$bin" proxy --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --lease-ms "$lease_ms" \
    --server-cert "$pki/server.chain.pem" --server-key "$pki/server.key.pem" \
    --client-ca "$pki/root.pem" "${token_flag[@]}" >"$work/proxy.out" 2>"$work/proxy.log" &
  proxy_pid=$!
  for _ in $(seq 1 100); do
    if json_holds "$work/proxy.out" 'has("ok")' || ! kill -0 "$proxy_pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  json_holds "$work/proxy.out" '.ok == true and .admin != null' ||
    die "the proxy did not start: $(tail -n 5 "$work/proxy.log")"
  proxy_addr=$(jq -r .listen "$work/proxy.out")
  admin=http://$(jq -r .admin "$work/proxy.out")
  local token_file
  token_file=$(jq -r '.admin_token_file // empty' "$work/proxy.out")
  if [ -n "$token_file" ]; then admin_token=$(tr -d '\r\n' <"$token_file"); fi
  local code
  code=$(admin_curl -o /dev/null -w '%{http_code}' "$admin/v1/admin/stats") || true
  [ "$code" = 200 ] || die "the proxy's admin API answers $code to GET /v1/admin/stats (see $work/proxy.log)"
}

# curl against the admin API, with the bearer token if there is one; the
# URL names 127.0.0.1, which is also the Host the proxy wants.
admin_curl() {
  if [ -n "$admin_token" ]; then
    curl -s -K <(printf 'header = "Authorization: Bearer %s"\n' "$admin_token") "$@"
  else
    curl -s "$@"
  fi
}

start_driver() {
  local n=$1
  echo "==== drill: start $(date +%T.%N)" >>"$work/$n.log"
  # A simple command, so that $! is the driver itself (a function run in
  # the background would be a subshell, and SIGKILL would miss the driver).
  SOFTHSM2_CONF=$work/hsm-$n/softhsm2.conf HSM_TOKEN_LABEL=hsm-$n \
    "$bin" run --postgres-url "$db_url" \
    --proxy-addr "$proxy_addr" --ca-cert "$pki/root.pem" \
    --client-cert "$pki/driver.chain.pem" --client-key "$pki/driver.key.pem" \
    --driver-id "$n" --sessions 2 --pipeline 2 --poll-wait 1000 \
    >>"$work/$n.log" 2>&1 &
  driver_pid[$n]=$!
}

# SIGKILL to driver NAME; counts whether it held leases then (read from the
# proxy just after: what it held stays leased until the leases expire).
kill_driver() {
  local n=$1 held
  kill -9 "${driver_pid[$n]}" 2>/dev/null || true
  # Reaped here, quietly (else bash reports the job "Killed" on its own).
  wait "${driver_pid[$n]}" 2>/dev/null || true
  held=$(admin_curl "$admin/v1/admin/stats" | jq --arg n "$n" '.in_flight[$n] // 0') || held=0
  echo "==== drill: SIGKILL $(date +%T.%N), holding ${held:-?} lease(s)" >>"$work/$n.log"
  kills=$((kills + 1))
  if [ "${held:-0}" -gt 0 ]; then kills_holding=$((kills_holding + 1)); fi
}

# A driver that exited without being killed is a finding: counted, the end
# of its log shown, and started again so that the drill goes on.
check_drivers() {
  local n rc
  for n in "${drivers[@]}"; do
    if ! kill -0 "${driver_pid[$n]}" 2>/dev/null; then
      rc=0
      wait "${driver_pid[$n]}" || rc=$?
      driver_exits=$((driver_exits + 1))
      say "FINDING: driver $n exited by itself (status $rc); the end of $n.log:"
      tail -n 15 "$work/$n.log" | sed 's/^/    /'
      start_driver "$n"
    fi
  done
}

drill_setup() {
  local n s served
  openssl rand -hex 32 >"$work/master.hex"
  openssl rand -hex 12 >"$work/user.pin"
  openssl rand -hex 12 >"$work/so.pin"
  export USER_PIN_FILE=$work/user.pin HSM_LOG_LEVEL=${HSM_LOG_LEVEL:-info}
  make_pki
  for n in "${drivers[@]}"; do make_token "$n"; done
  served=$(with_token a "$bin" --log-level error --postgres-url "$db_url" probe |
    jq -r '.schemes[] | select(.served) | .scheme')
  for s in secp256k1 p256 ed25519; do
    if grep -qx "$s" <<<"$served"; then schemes+=("$s"); fi
  done
  if grep -qx ed25519 <<<"$served"; then ed25519_served=1; fi
  say "schemes served: ${schemes[*]}$([ "$ed25519_served" -eq 1 ] ||
    echo '; ed25519 is not (not wrappable on this token): its generates expect scheme_unsupported')"
  start_proxy
  for n in "${drivers[@]}"; do start_driver "$n"; done
  say "proxy $proxy_addr (admin $admin, lease $lease_ms ms); drivers ${drivers[*]}, each its own token, on $db_url"
  # Round 0: one key per scheme, no faults, so that round 1 has keys to use.
  : >"$work/requests.jsonl"
  : >"$work/outcomes.jsonl"
  round=0
  qn=0
  load_file=$work/r00.w1
  : >"$load_file"
  for s in "${schemes[@]}"; do add_request generate_key "r00-$s" "$s" ok; done
  enqueue_file "$load_file"
  await_round
  learn_keys
  [ "${#key_ids[@]}" -gt 0 ] || die "round 0 made no key (see $work/a.log, $work/b.log)"
}

# -- load -------------------------------------------------------------------------

# Appends one request to the current wave file and to requests.jsonl:
# add_request KIND KEY_ID SCHEME EXPECT [PAYLOAD_HEX]   (EXPECT: ok, error:CODE)
add_request() {
  local kind=$1 key=$2 s=$3 expect=$4 payload=${5:-} id params
  qn=$((qn + 1))
  printf -v id 'r%02d-q%03d' "$round" "$qn"
  if [ "$kind" = generate_key ]; then
    params="{\"key_id\":\"$key\",\"scheme\":\"$s\"}"
  else
    params="{\"key_id\":\"$key\",\"payload\":\"$payload\"}"
  fi
  printf '{"kind":"%s","id":"%s","params":%s}\n' "$kind" "$id" "$params" >>"$load_file"
  printf '{"id":"%s","round":%d,"kind":"%s","key_id":"%s","scheme":"%s","expect":"%s","payload":"%s"}\n' \
    "$id" "$round" "$kind" "$key" "$s" "$expect" "$payload" >>"$work/requests.jsonl"
}

# Sets load_file to wave N of this round.
to_wave() { load_file=$work/r$(rr "$round").w$1; }
# Sets load_file to a random wave of this round from wave N on.
any_wave() { to_wave $(($1 + RANDOM % (waves - $1 + 1))); }

# A fresh payload: 32 bytes (a "hash" for ECDSA, the message for Ed25519),
# fixed by the seed and the request.
payload_for() { printf '%s' "$seed:$round:$qn" | sha256sum | cut -c1-64; }

# Sets `fault_ms` to a random instant of the load: 0-19 ms after a random
# wave went out (a wave is served in ~10-20 ms: SoftHSMv2 signs ~1000 and
# generates ~500 a second here, so a fault between waves would find the
# drivers idle).
fault_instant() { fault_ms=$((RANDOM % waves * wave_ms + RANDOM % 20)); }

# Sets `pick` to a random index into key_ids.
pick_key() { pick=$((RANDOM % ${#key_ids[@]})); }

# Round `round`'s load, in `waves` wave files.
build_round() {
  local i k s other w new=() news=()
  qn=0
  for ((w = 1; w <= waves; w++)); do : >"$work/r$(rr "$round").w$w"; done
  for i in 0 1 2 3 4 5 6 7; do
    s=${schemes[$((RANDOM % ${#schemes[@]}))]}
    printf -v k 'r%02d-k%d' "$round" "$i"
    new+=("$k")
    news+=("$s")
    to_wave $((1 + i * waves / 8))
    add_request generate_key "$k" "$s" ok
  done
  # The same key ids again, in the wave of the first ask or a later one.
  for i in 0 3 6; do
    any_wave $((1 + i * waves / 8))
    add_request generate_key "${new[$i]}" "${news[$i]}" ok
  done
  for i in 1 2 3; do
    any_wave 1
    pick_key
    add_request generate_key "${key_ids[$pick]}" "${key_schemes[$pick]}" ok
  done
  for i in 1 2; do
    any_wave 1
    pick_key
    other=secp256k1
    if [ "${key_schemes[$pick]}" = secp256k1 ]; then other=p256; fi
    add_request generate_key "${key_ids[$pick]}" "$other" error:invalid_request
  done
  for ((i = 0; i < signs_per_round; i++)); do
    any_wave 1
    pick_key
    add_request sign "${key_ids[$pick]}" - ok "$(payload_for)"
  done
  any_wave 1
  add_request sign "r$(rr "$round")-never" - error:unknown_key "$(payload_for)"
  if [ "$ed25519_served" -eq 0 ]; then
    any_wave 1
    add_request generate_key "r$(rr "$round")-ed" ed25519 error:scheme_unsupported
  fi
}

# Enqueues every request of a JSON-lines file, in one curl run.
enqueue_file() {
  local line sep=
  [ -s "$1" ] || return 0
  while IFS= read -r line; do
    printf '%surl = "%s/v1/admin/requests"\nheader = "Content-Type: application/json"\ndata = "%s"\noutput = "/dev/null"\n' \
      "$sep" "$admin" "${line//\"/\\\"}"
    if [ -n "$admin_token" ]; then printf 'header = "Authorization: Bearer %s"\n' "$admin_token"; fi
    sep=$'next\n'
  done <"$1" | curl -sf -K - || die "could not enqueue (the proxy's admin API at $admin)"
}

# The state of each request id on stdin, one JSON object per line.
fetch_states() {
  local id urls=
  while IFS= read -r id; do
    if [ -n "$id" ]; then urls+="url = \"$admin/v1/admin/requests/$id\""$'\n'; fi
  done
  if [ -n "$admin_token" ]; then urls+="header = \"Authorization: Bearer $admin_token\""$'\n'; fi
  if [ -n "$urls" ]; then curl -s -K - <<<"$urls" | jq -c .; fi
}

# Ids of this round's requests.
round_ids() {
  jq -r --arg p "r$(rr "$round")-" 'select(.id | startswith($p)) | .id' "$work/requests.jsonl"
}

# Waits until every request of this round is answered, then appends their
# outcomes to outcomes.jsonl (read now: the proxy forgets answered requests
# after a while). What is still open at the deadline is shown and recorded
# as it stands (the audit counts it lost).
await_round() {
  local deadline open left
  tick
  deadline=$((now_ms + round_deadline_s * 1000))
  open=$(round_ids)
  while :; do
    check_drivers
    open=$(fetch_states <<<"$open" | jq -r 'select(.state != "done") | .id')
    [ -n "$open" ] || break
    tick
    if [ "$now_ms" -ge "$deadline" ]; then
      left=$(wc -l <<<"$open")
      stuck_rounds=$((stuck_rounds + 1))
      say "FINDING: round $round: $left request(s) unanswered after ${round_deadline_s}s, e.g.:"
      fetch_states <<<"$open" | head -n 5 | sed 's/^/    /'
      admin_curl "$admin/v1/admin/stats" | sed 's/^/    stats: /'
      echo
      break
    fi
    sleep 0.2
  done
  round_ids | fetch_states >>"$work/outcomes.jsonl"
}

# Adds the new keys this round's answers reported to key_ids.
learn_keys() {
  local k s
  while read -r k s; do
    key_ids+=("$k")
    key_schemes+=("$s")
  done < <(jq -r --arg p "r$(rr "$round")-" 'select(.ok == true and (.id | startswith($p)))
    | .result | select(.public_key != null and (.key_id | startswith($p)))
    | "\(.key_id) \(.scheme)"' "$work/outcomes.jsonl" | sort -u)
}

# -- rounds -------------------------------------------------------------------------

drill_rounds() {
  local victim t_kill events t action arg t0 n w
  for ((round = 1; round <= rounds; round++)); do
    build_round
    victim=${drivers[$((RANDOM % ${#drivers[@]}))]}
    events=
    for ((w = 1; w <= waves; w++)); do events+="$(((w - 1) * wave_ms)) wave $w"$'\n'; done
    fault_instant
    t_kill=$fault_ms
    events+="$t_kill kill $victim"$'\n'"$((t_kill + RANDOM % 800)) start $victim"
    db_plan=
    plan_db_event
    if [ -n "$db_plan" ]; then events+=$'\n'"$db_plan"; fi
    n=$(cat "$work/r$(rr "$round")".w? | wc -l)
    say "round $round/$rounds: $n requests; SIGKILL $victim at $t_kill ms${db_plan:+; database: ${db_plan//$'\n'/, }}"
    tick
    t0=$now_ms
    while read -r t action arg; do
      tick
      if [ $((t0 + t)) -gt "$now_ms" ]; then
        sleep "$(((t0 + t - now_ms) / 1000)).$(printf '%03d' $(((t0 + t - now_ms) % 1000)))"
      fi
      run_event "$action" "$arg"
    done < <(sort -s -n -k1,1 <<<"$events")
    db_wait
    await_round
    tick
    say "round $round: answered in $((now_ms - t0)) ms"
    learn_keys
  done
}

# One event of a round's plan. Database events act on `db_dir`:
# db-restart (fast stop, start), db-kill (immediate stop), db-start,
# failover-kill (immediate stop of the primary, never started again),
# promote (the standby in `standby_dir` becomes the primary).
run_event() {
  local action=$1 arg=${2:-}
  case $action in
    wave) enqueue_file "$work/r$(rr "$round").w$arg" ;;
    kill) kill_driver "$arg" ;;
    start) start_driver "$arg" ;;
    db-restart)
      db_wait
      "$pgc" restart "$db_dir" &
      db_job=$!
      db_restarts=$((db_restarts + 1))
      ;;
    db-kill)
      db_wait
      "$pgc" kill "$db_dir"
      db_kills=$((db_kills + 1))
      ;;
    db-start)
      db_wait
      "$pgc" restart "$db_dir" &
      db_job=$!
      ;;
    failover-kill)
      "$pgc" kill "$db_dir"
      echo "==== drill: primary killed $(date +%T.%N)" | tee -a "$work/a.log" >>"$work/b.log"
      # Counted after the kill, so as not to delay it: no new key can be
      # reported without its primary.
      keys_before_failover=$(answered_generates)
      ;;
    promote)
      "$pgc" promote "$standby_dir"
      echo "==== drill: standby promoted $(date +%T.%N)" | tee -a "$work/a.log" >>"$work/b.log"
      db_dir=$standby_dir
      failovers=$((failovers + 1))
      ;;
    *) die "unknown event $action" ;;
  esac
}

# Waits for a database restart running beside the load; it must succeed.
db_wait() {
  if [ -n "$db_job" ]; then
    wait "$db_job" || die "PostgreSQL did not start again (see $db_dir/server.log)"
    db_job=
  fi
}

# Key ids reported by an ok generate answer so far (earlier rounds, and
# this one's answers until now).
answered_generates() {
  { cat "$work/outcomes.jsonl"; round_ids | fetch_states; } |
    jq -r 'select(.ok == true) | .result | select(.public_key != null) | .key_id' | sort -u | wc -l
}

# -- audit ----------------------------------------------------------------------------

# A PEM public key for SCHEME from its hex encoding (SEC1 uncompressed for
# ECDSA, 32 raw bytes for Ed25519): the DER SubjectPublicKeyInfo prefix,
# then the key, as demo-keypath.sh does.
pem_of() {
  local s=$1 hex=$2 out=$3 prefix
  case $s in
    secp256k1) prefix=3056301006072a8648ce3d020106052b8104000a034200 ;;
    p256) prefix=3059301306072a8648ce3d020106082a8648ce3d030107034200 ;;
    ed25519) prefix=302a300506032b6570032100 ;;
  esac
  printf '%s%s' "$prefix" "$hex" | unhex | openssl pkey -pubin -inform DER -out "$out" 2>/dev/null
}
unhex() { tr 'a-f' 'A-F' | basenc -d --base16; }

# Verifies with the openssl command line: verify_sig SCHEME PEM PAYLOAD_HEX
# SIG_HEX, where SIG_HEX is the DER signature for ECDSA (over the 32-byte
# hash given as payload, which the driver signs as is) and the raw 64 bytes
# for Ed25519 (over the message).
verify_sig() {
  local s=$1 pem=$2 t=$work/verify
  printf '%s' "$3" | unhex >"$t.payload"
  printf '%s' "$4" | unhex >"$t.sig"
  if [ "$s" = ed25519 ]; then
    openssl pkeyutl -verify -pubin -inkey "$pem" -rawin -in "$t.payload" -sigfile "$t.sig" >/dev/null 2>&1
  else
    openssl pkeyutl -verify -pubin -inkey "$pem" -in "$t.payload" -sigfile "$t.sig" >/dev/null 2>&1
  fi
}

# SIGTERM to every driver; each must exit 0 within its drain time.
stop_drivers() {
  local n rc
  for n in "${drivers[@]}"; do kill -TERM "${driver_pid[$n]}" 2>/dev/null || true; done
  for n in "${drivers[@]}"; do
    rc=0
    for _ in $(seq 1 450); do
      kill -0 "${driver_pid[$n]}" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "${driver_pid[$n]}" 2>/dev/null; then
      say "FINDING: driver $n did not stop within 45 s of SIGTERM"
      kill -9 "${driver_pid[$n]}"
      wait "${driver_pid[$n]}" 2>/dev/null || true
      unclean_stops=$((unclean_stops + 1))
    else
      wait "${driver_pid[$n]}" || rc=$?
      if [ "$rc" -ne 0 ]; then
        say "FINDING: driver $n exited $rc after SIGTERM; the end of $n.log:"
        tail -n 10 "$work/$n.log" | sed 's/^/    /'
        unclean_stops=$((unclean_stops + 1))
      fi
    fi
    unset "driver_pid[$n]"
  done
}

# One line of the summary: row LABEL VALUE [must-be-0]
row() {
  local mark=
  if [ "${3:-}" = must-be-0 ]; then
    if [ "$2" -ne 0 ]; then
      mark="  <-- must be 0"
      failures=$((failures + 1))
    else
      mark="  (must be 0)"
    fi
  fi
  printf '  %-52s %7s%s\n' "$1" "$2" "$mark"
}

drill_finish() {
  local name=$1 a=$work/audit
  mkdir -p "$a"
  say "stopping the drivers (SIGTERM)"
  stop_drivers
  say "auditing"
  admin_curl "$admin/v1/admin/stats" >"$work/stats.json"
  # Each request with its outcome.
  jq -c -n --slurpfile q "$work/requests.jsonl" --slurpfile o "$work/outcomes.jsonl" '
    ($o | map(select(.id != null) | {(.id): .}) | add // {}) as $m
    | $q[] | . + {st: ($m[.id] // {state: "unknown"})}
    | . + {done: (.st.state == "done"), ok: (.st.ok == true),
           code: (if .st.ok == false then (.st.error.code // "?") else null end)}
    | . + {expected: (if (.done | not) then false
                      elif .expect == "ok" then .ok
                      else ((.ok | not) and ("error:" + .code) == .expect) end)}' \
    >"$a/joined.jsonl"
  local enqueued ok lost unexpected two_keys errors
  enqueued=$(jq -s length "$a/joined.jsonl")
  ok=$(jq -s 'map(select(.ok)) | length' "$a/joined.jsonl")
  lost=$(jq -s 'map(select(.done | not)) | length' "$a/joined.jsonl")
  unexpected=$(jq -s 'map(select(.done and (.expected | not))) | length' "$a/joined.jsonl")
  errors=$(jq -r -s 'map(select(.done and (.ok | not))) | group_by(.code)
    | map("\(.[0].code) \(length) \(if all(.expected) then "expected" else "UNEXPECTED" end)")[]' "$a/joined.jsonl")
  # What ok generate answers reported, per key id: one public key only.
  jq -r 'select(.kind == "generate_key" and .ok)
    | "\(.st.result.key_id) \(.st.result.scheme) \(.st.result.public_key) \(.scheme)"' \
    "$a/joined.jsonl" | sort -u >"$a/reported_all.txt"
  two_keys=$(cut -d' ' -f1,3 "$a/reported_all.txt" | sort -u | cut -d' ' -f1 | uniq -d | wc -l)
  local wrong_scheme
  wrong_scheme=$(awk '$2 != $4' "$a/reported_all.txt" | wc -l)
  awk '!seen[$1]++ {print $1, $2, $3}' "$a/reported_all.txt" >"$a/reported.txt"
  local reported
  reported=$(wc -l <"$a/reported.txt")
  # The store's rows, on the primary that serves now.
  "$pg_bin/psql" -X -q -At -F ' ' "$db_url" \
    -c "SELECT key_id, scheme, encode(public_key, 'hex') FROM keys ORDER BY key_id" \
    >"$a/rows.txt" || die "cannot read the key store at $db_url"
  local rows missing differs
  rows=$(wc -l <"$a/rows.txt")
  missing=$(join -v1 <(sort "$a/reported.txt") <(sort "$a/rows.txt") | wc -l)
  differs=$(join <(sort "$a/reported.txt") <(sort "$a/rows.txt") | awk '$2 != $4 || $3 != $5' | wc -l)
  local unreported
  unreported=$(join -v2 <(sort "$a/reported.txt") <(sort "$a/rows.txt") | wc -l)
  # Every reported key signs a fresh payload through `hsm-driver keys sign`
  # (token a and b in turn: both copies of the master key), verified by
  # openssl against the reported public key.
  local k s pub i=0 tok payload out sig cli_ok=0 cli_bad=0
  mkdir -p "$a/pub"
  while read -r k s pub; do
    pem_of "$s" "$pub" "$a/pub/$k.pem" || true
  done <"$a/reported.txt"
  say "signing with each of the $reported reported keys through hsm-driver keys sign"
  while read -r k s pub; do
    tok=${drivers[$((i % ${#drivers[@]}))]}
    i=$((i + 1))
    payload=$(printf 'audit:%s:%s' "$seed" "$k" | sha256sum | cut -c1-64)
    out=$(with_token "$tok" "$bin" --log-level error --postgres-url "$db_url" \
      keys sign --key-id "$k" --payload "$payload" 2>>"$a/keys-sign.err") || out='{}'
    if [ "$s" = ed25519 ]; then
      sig=$(jq -r '.signature.signature // empty' <<<"$out")
    else
      sig=$(jq -r '.signature.der // empty' <<<"$out")
    fi
    if [ -n "$sig" ] && [ "$(jq -r .key.public_key <<<"$out")" = "$pub" ] &&
      verify_sig "$s" "$a/pub/$k.pem" "$payload" "$sig"; then
      cli_ok=$((cli_ok + 1))
    else
      cli_bad=$((cli_bad + 1))
      echo "$k (token $tok): ${out:0:200} $(tail -n 1 "$a/keys-sign.err")" >>"$a/keys-sign.failed"
    fi
  done <"$a/reported.txt"
  # Every signature the drivers returned, verified by openssl against the
  # key's reported public key; its fingerprint names that key.
  local id fp want sig_ok=0 sig_bad=0
  while read -r id k payload sig fp; do
    s=$(awk -v k="$k" '$1 == k {print $2}' "$a/reported.txt")
    pub=$(awk -v k="$k" '$1 == k {print $3}' "$a/reported.txt")
    want=sha256:$(printf '%s' "$pub" | unhex | sha256sum | cut -c1-64)
    if [ -n "$s" ] && [ "$fp" = "$want" ] && verify_sig "$s" "$a/pub/$k.pem" "$payload" "$sig"; then
      sig_ok=$((sig_ok + 1))
    else
      sig_bad=$((sig_bad + 1))
      echo "$id $k $payload $sig $fp" >>"$a/signatures.failed"
    fi
  done < <(jq -r 'select(.kind == "sign" and .ok)
    | "\(.id) \(.key_id) \(.payload) \(if .st.result.scheme == "ed25519" then .st.result.signature else .st.result.der end) \(.st.result.public_key_fingerprint)"' \
    "$a/joined.jsonl")
  # The audit trail: every driver's chain intact (`audit verify`), and no
  # ok answer the proxy has without its row (outcome ok, same request id).
  local trail_breaks=0 unaudited
  if ! USER_PIN= "$bin" --log-level error --postgres-url "$db_url" audit verify \
    >"$a/audit-verify.json" 2>"$a/audit-verify.err"; then
    trail_breaks=$(jq '.breaks | length' "$a/audit-verify.json" 2>/dev/null || echo 1)
    [ "$trail_breaks" -gt 0 ] 2>/dev/null || trail_breaks=1
  fi
  "$pg_bin/psql" -X -q -At "$db_url" \
    -c "SELECT DISTINCT request_id FROM audit_log WHERE outcome = 'ok' ORDER BY 1" \
    >"$a/audited_ok.txt" || die "cannot read the audit trail at $db_url"
  jq -r 'select(.ok) | .id' "$a/joined.jsonl" | LC_ALL=C sort -u >"$a/answered_ok.txt"
  unaudited=$(LC_ALL=C comm -23 "$a/answered_ok.txt" <(LC_ALL=C sort -u "$a/audited_ok.txt") | wc -l)
  local audit_rows
  audit_rows=$("$pg_bin/psql" -X -q -At "$db_url" -c "SELECT COUNT(*) FROM audit_log")

  local redelivered rejected dead given
  redelivered=$(jq .redelivered "$work/stats.json")
  rejected=$(jq .rejected_results "$work/stats.json")
  dead=$(jq .dead_polls "$work/stats.json")
  given=$(jq .given_back "$work/stats.json")

  local wall=$((${EPOCHREALTIME%.*} - started_s))
  echo
  echo "== $name: seed $seed, $rounds rounds, lease $lease_ms ms, wall time ${wall} s"
  row "requests enqueued" "$enqueued"
  row "answered ok" "$ok"
  local code n how
  while read -r code n how; do
    [ -n "$code" ] || continue
    row "answered with error $code ($how)" "$n"
  done <<<"$errors"
  row "answers other than expected" "$unexpected" must-be-0
  row "lost (never answered)" "$lost" must-be-0
  row "key ids with two public keys" "$two_keys" must-be-0
  row "ok generate answers with another scheme" "$wrong_scheme" must-be-0
  row "reported keys (key ids with an ok generate)" "$reported"
  row "reported keys without their row (or row differs)" $((missing + differs)) must-be-0
  row "rows in the store" "$rows"
  row "  of which no answer reported" "$unreported"
  row "reported keys that sign (keys sign + openssl)" "$cli_ok"
  row "reported keys that do not sign" "$cli_bad" must-be-0
  row "driver signatures verified by openssl" "$sig_ok"
  row "driver signatures failing (or wrong fingerprint)" "$sig_bad" must-be-0
  row "audit rows" "$audit_rows"
  row "audit chain breaks (audit verify)" "$trail_breaks" must-be-0
  row "ok answers without their audit row" "$unaudited" must-be-0
  row "driver kills (SIGKILL)" "$kills"
  row "  of which the driver held leases" "$kills_holding"
  row "database restarts (fast stop, start)" "$db_restarts"
  row "database crashes (immediate stop, start)" "$db_kills"
  row "failovers (primary killed, standby promoted)" "$failovers"
  if [ -n "$keys_before_failover" ]; then
    row "  keys reported before the failover" "$keys_before_failover"
  fi
  row "driver exits the drill did not cause" "$driver_exits" must-be-0
  row "drivers not stopping cleanly on SIGTERM" "$unclean_stops" must-be-0
  row "rounds with requests unanswered at the deadline" "$stuck_rounds" must-be-0
  row "proxy: deliveries after the first" "$redelivered"
  row "proxy: results refused (lease not current)" "$rejected"
  row "proxy: dead polls / leases given back" "$dead/$given"
  if [ -s "$a/keys-sign.failed" ]; then echo "  keys that did not sign:"; head -n 5 "$a/keys-sign.failed" | sed 's/^/    /'; fi
  if [ -s "$a/signatures.failed" ]; then echo "  signatures that failed:"; head -n 5 "$a/signatures.failed" | sed 's/^/    /'; fi
  if [ "$unexpected" -gt 0 ]; then
    echo "  unexpected answers:"
    jq -c 'select(.done and (.expected | not)) | {id, kind, key_id, scheme, expect, st}' "$a/joined.jsonl" |
      head -n 10 | sed 's/^/    /'
  fi
  if [ "$failures" -eq 0 ]; then
    echo "== $name: PASS"
    return 0
  fi
  echo "== $name: FAIL ($failures invariant(s) broken; run with --keep DIR to keep the logs)"
  return 1
}
