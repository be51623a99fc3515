#!/usr/bin/env bash
# Checks the deployment files in deploy/ on this machine, without a container
# daemon or a running systemd, and without touching the machine (everything
# goes into a temporary folder):
#
#   unit       hsm-driver.service: `systemd-analyze verify` (as installed,
#              with the --postgres drop-in; any warning fails), the offline
#              `systemd-analyze security` exposure (at most 2.0), the settings
#              the deployment relies on, TimeoutStopSec above the drain timeout
#              (`run --help`) plus the 5 s abandon grace
#   env        hsm-driver.env.example: a syntax that systemd and bash read
#              alike (and bash reads it to the same values), every variable
#              named is one the binary documents (--help, run --help, README
#              "Configuration"), every variable of those help texts is named,
#              and the binary accepts its settings (the first error is the
#              PKCS#11 module, made missing on purpose)
#   install    install.sh --root into a temporary root, three times: the user,
#              the tree with owners and modes, idempotence, local edits kept,
#              modes put back
#   entrypoint docker-entrypoint.sh against good and bad configurations, with
#              a stub hsm-driver on PATH
#   compose    compose.yaml parsed (python3-yaml) and its structure: two
#              drivers, PostgreSQL, the proxy, secrets as files, no secret in
#              an environment
#   e2e        the PKI recipe in compose.yaml's header, run; then through
#              docker-entrypoint.sh with the real binary: a SoftHSMv2 test
#              token (test-token, twice), the reference proxy and a driver with
#              those certificates, a key generated through the admin API; the
#              capability probe under MDWE (PR_SET_MDWE, the kernel's form of
#              MemoryDenyWriteExecute=yes)
#   docker     Dockerfile: every COPY source exists, the copied sources
#              configure with cmake, every package exists in Debian 12, the
#              runtime packages hold every library the binary links, the build
#              packages are in install-deps.sh, non-root user, PIN file
#   lint       shellcheck of the deploy scripts written for this
#
# Usage: deploy/check-deploy.sh [--keep]
#   HSM_DRIVER_BIN   the binary (default: $BUILD_DIR/hsm-driver, else build/hsm-driver)
#   --keep           keep the temporary folder and say where it is
# Exit status: 0 when every check passed (skips are printed as SKIP), 1 otherwise.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deploy=$repo/deploy
bin=${HSM_DRIVER_BIN:-${BUILD_DIR:-$repo/build}/hsm-driver}
keep=0
case ${1:-} in
  --keep) keep=1 ;;
  "") ;;
  *)
    echo "usage: deploy/check-deploy.sh [--keep]" >&2
    exit 2
    ;;
esac

failures=0
skips=0
ok() { echo "ok    $*"; }
fail() {
  echo "FAIL  $*" >&2
  failures=$((failures + 1))
}
skip() {
  echo "SKIP  $*" >&2
  skips=$((skips + 1))
}
# need TOOL PACKAGE: true if TOOL is on PATH, else a failure naming the package.
need() {
  if command -v "$1" >/dev/null 2>&1; then return 0; fi
  fail "$1 is not installed (Debian package $2; deploy/install-deps.sh)"
  return 1
}

work=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$keep" -eq 1 ]; then echo "check-deploy: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
chmod 755 "$work" # the unprivileged parts below read through it

unit=$deploy/hsm-driver.service
env_example=$deploy/hsm-driver.env.example
entry=$deploy/docker-entrypoint.sh
compose=$deploy/compose.yaml
dockerfile=$deploy/Dockerfile
for f in "$unit" "$env_example" "$entry" "$compose" "$dockerfile" "$deploy/install.sh"; do
  [ -f "$f" ] || fail "${f#"$repo"/}: missing"
done
if [ ! -x "$bin" ]; then
  fail "$bin: no binary (build it, or set HSM_DRIVER_BIN); the checks that run it are left out"
  bin=
fi
# python3 with yaml: the one on PATH, else Debian's (python3-yaml).
python_ok=0 py=python3
if need python3 python3; then
  for py in python3 /usr/bin/python3; do
    if "$py" -c 'import yaml' 2>/dev/null; then
      python_ok=1
      break
    fi
  done
  if [ "$python_ok" -eq 0 ]; then
    fail "python3 cannot import yaml (Debian package python3-yaml): the env, compose and Dockerfile checks are left out"
  fi
fi

# The help texts the documented variables come from.
if [ -n "$bin" ]; then
  "$bin" --help >"$work/help.txt" 2>&1 || true
  "$bin" run --help >"$work/run-help.txt" 2>&1 || true
fi
drain_ms=$(sed -n 's/.*--drain-timeout.*\[default: \([0-9]*\)\].*/\1/p' "$work/run-help.txt" 2>/dev/null | head -n 1)
drain_ms=${drain_ms:-30000}
abandon_grace_s=5 # daemon_options::abandon_grace (runtime/app/daemon.hpp)

# -- install (first: the unit checks use what it installs) -------------------------

root=$work/root
install_ok=0
check_install() {
  local out am_root=0 uid="" gid="" line path mode owner group want_u want_g got snap1 snap2
  if [ "$(id -u)" -eq 0 ]; then am_root=1; fi
  mkdir -p "$root/etc"
  if [ "$am_root" -eq 1 ]; then
    printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    : >"$root/etc/shadow"
    : >"$root/etc/gshadow"
    chmod 640 "$root/etc/shadow" "$root/etc/gshadow"
  fi
  if ! out=$("$deploy/install.sh" --root "$root" --bin "$bin" --postgres 2>&1); then
    fail "deploy/install.sh --root $root failed: $out"
    return
  fi
  install_ok=1
  if [ "$am_root" -eq 1 ]; then
    line=$(grep '^hsm-driver:' "$root/etc/passwd" || true)
    uid=$(cut -d: -f3 <<<"$line")
    gid=$(awk -F: '$1 == "hsm-driver" { print $3 }' "$root/etc/group")
    if [ -z "$line" ] || [ -z "$gid" ]; then
      fail "deploy/install.sh: no user or group hsm-driver in $root/etc/passwd, $root/etc/group"
      return
    fi
    if [ "$(cut -d: -f6,7 <<<"$line")" != /var/lib/hsm-driver:/usr/sbin/nologin ] || [ "$uid" -ge 1000 ]; then
      fail "deploy/install.sh: user hsm-driver should be a system user with home /var/lib/hsm-driver and no login shell: $line"
    else
      ok "install: system user and group hsm-driver ($uid:$gid, home /var/lib/hsm-driver, nologin)"
    fi
  else
    skip "install: not root, so no user is made and owners are not checked (modes are)"
  fi
  local bad=0
  while read -r path mode owner group; do
    if [ ! -e "$root$path" ]; then
      fail "deploy/install.sh: $path was not made"
      bad=1
      continue
    fi
    got=$(stat -c '%a %u %g' "$root$path")
    want_u=0 want_g=0
    if [ "$owner" = hsm-driver ]; then want_u=$uid; fi
    if [ "$group" = hsm-driver ]; then want_g=$gid; fi
    if [ "$am_root" -eq 0 ]; then
      got=${got%% *}
      want_u='' want_g=''
    fi
    if [ "$got" != "$mode${want_u:+ $want_u $want_g}" ]; then
      fail "deploy/install.sh: $path is '$got', want mode $mode, $owner:$group"
      bad=1
    fi
  done <<'EOF'
/usr/local/bin/hsm-driver 755 root root
/usr/local/lib/systemd/system/hsm-driver.service 644 root root
/etc/hsm-driver 750 root hsm-driver
/etc/hsm-driver/hsm-driver.env 640 root hsm-driver
/etc/hsm-driver/credentials 700 root root
/var/lib/hsm-driver 700 hsm-driver hsm-driver
/etc/systemd/system/hsm-driver.service.d/postgres.conf 644 root root
EOF
  if ! cmp -s "$env_example" "$root/etc/hsm-driver/hsm-driver.env"; then
    fail "deploy/install.sh: /etc/hsm-driver/hsm-driver.env is not the example"
    bad=1
  fi
  if [ "$bad" -eq 0 ]; then ok "install: the tree, owners and modes"; fi
  if ! grep -q 'systemctl enable --now hsm-driver' <<<"$out" || ! grep -q 'credentials/user-pin' <<<"$out"; then
    fail "deploy/install.sh: the next steps (PIN file, systemctl enable --now) are not printed"
  fi

  snapshot() { (cd "$root" && find . ! -name '*-' -printf '%p %m %U %G %s\n' | sort); }
  snap1=$(snapshot)
  if ! out=$("$deploy/install.sh" --root "$root" --bin "$bin" --postgres 2>&1); then
    fail "deploy/install.sh (second run) failed: $out"
    return
  fi
  snap2=$(snapshot)
  if [ "$snap1" != "$snap2" ]; then
    fail "deploy/install.sh is not idempotent: a second run changed $(diff <(echo "$snap1") <(echo "$snap2") | grep '^[<>]' | head -n 3 | tr '\n' ' ')"
  elif ! grep -q 'hsm-driver unchanged' <<<"$out" || ! grep -q 'kept as it is' <<<"$out"; then
    fail "deploy/install.sh (second run) should report the binary unchanged and the settings kept: $out"
  else
    ok "install: a second run changes nothing"
  fi
  echo '#LOCAL_EDIT=1' >>"$root/etc/hsm-driver/hsm-driver.env"
  chmod 755 "$root/etc/hsm-driver/credentials"
  DESTDIR=$root "$deploy/install.sh" --bin "$bin" >/dev/null 2>&1 || fail "DESTDIR=$root deploy/install.sh failed"
  if ! grep -q LOCAL_EDIT "$root/etc/hsm-driver/hsm-driver.env"; then
    fail "deploy/install.sh overwrote an edited /etc/hsm-driver/hsm-driver.env"
  elif [ "$(stat -c %a "$root/etc/hsm-driver/credentials")" != 700 ]; then
    fail "deploy/install.sh did not put /etc/hsm-driver/credentials back to 0700"
  else
    ok "install: DESTDIR= works, local edits kept, folder modes put back"
  fi
}
if [ -n "$bin" ]; then check_install; fi

# -- unit --------------------------------------------------------------------------

check_unit() {
  local sa=$work/unit out line value
  need systemd-analyze systemd || return 0
  mkdir -p "$sa/hsm-driver.service.d"
  local src=$unit dropin=""
  if [ "$install_ok" -eq 1 ]; then
    src=$root/usr/local/lib/systemd/system/hsm-driver.service
    dropin=$root/etc/systemd/system/hsm-driver.service.d/postgres.conf
  fi
  # The binary as installed (verify wants ExecStart's program to exist).
  local target=${bin:-/bin/true}
  if [ "$install_ok" -eq 1 ]; then target=$root/usr/local/bin/hsm-driver; fi
  sed "s|^ExecStart=/usr/local/bin/hsm-driver|ExecStart=$target|" "$src" >"$sa/hsm-driver.service"
  if [ -n "$dropin" ]; then cp "$dropin" "$sa/hsm-driver.service.d/"; fi
  if ! out=$(systemd-analyze verify "$sa/hsm-driver.service" 2>&1) || [ -n "$out" ]; then
    fail "deploy/hsm-driver.service: systemd-analyze verify: ${out:-failed}"
  else
    ok "unit: systemd-analyze verify (with the --postgres drop-in), no warning"
  fi
  if out=$(systemd-analyze security --offline=yes --threshold=20 "$sa/hsm-driver.service" 2>&1); then
    ok "unit: systemd-analyze security: $(grep -o 'exposure level.*' <<<"$out" | sed 's/ for [^:]*:/:/')"
  else
    fail "deploy/hsm-driver.service: exposure above 2.0: $(grep -E '✗|exposure' <<<"$out" | head -n 12)"
  fi

  # The settings the deployment relies on (key=value as written).
  local missing=()
  # shellcheck disable=SC2016 # the lines as written, $HSM_DRIVER_ARGS included
  for line in 'User=hsm-driver' 'Group=hsm-driver' 'NoNewPrivileges=yes' 'ProtectSystem=strict' \
    'ProtectHome=yes' 'PrivateTmp=yes' 'StateDirectory=hsm-driver' 'StateDirectoryMode=0700' \
    'LoadCredential=user-pin:/etc/hsm-driver/credentials/user-pin' 'Environment=USER_PIN_FILE=%d/user-pin' \
    'LimitCORE=0' 'UMask=0077' 'Restart=on-failure' 'RestartPreventExitStatus=2' \
    'CapabilityBoundingSet=' 'MemoryDenyWriteExecute=yes' 'LockPersonality=yes' 'RestrictRealtime=yes' \
    'ProtectClock=yes' 'ProtectKernelTunables=yes' 'ProtectKernelModules=yes' 'ProtectKernelLogs=yes' \
    'ProtectControlGroups=yes' 'SystemCallFilter=@system-service' \
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' 'EnvironmentFile=/etc/hsm-driver/hsm-driver.env' \
    'ExecStart=/usr/local/bin/hsm-driver run $HSM_DRIVER_ARGS'; do
    grep -qxF -- "$line" "$unit" || missing+=("$line")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    fail "deploy/hsm-driver.service: missing $(printf "'%s' " "${missing[@]}")"
  else
    ok "unit: user, sandbox, credentials, state, core files, umask, restart policy"
  fi
  value=$(sed -n 's/^TimeoutStopSec=//p' "$unit")
  local secs
  case $value in
    *min) secs=$((${value%min} * 60)) ;;
    *s) secs=${value%s} ;;
    *[!0-9]* | "") secs=0 ;;
    *) secs=$value ;;
  esac
  if [ "$secs" -gt $((drain_ms / 1000 + abandon_grace_s)) ]; then
    ok "unit: TimeoutStopSec=$value > drain ${drain_ms} ms + ${abandon_grace_s} s"
  else
    fail "deploy/hsm-driver.service: TimeoutStopSec=${value:-unset} must exceed --drain-timeout (${drain_ms} ms) + ${abandon_grace_s} s, or SIGKILL cuts the drain"
  fi
  if [ -n "$dropin" ] && { ! grep -qx 'LoadCredential=postgres-url:/etc/hsm-driver/credentials/postgres-url' "$dropin" ||
    ! grep -qx 'Environment=POSTGRES_URL_FILE=%d/postgres-url' "$dropin"; }; then
    fail "deploy/install.sh --postgres: the drop-in does not hand the URL over as a credential (POSTGRES_URL_FILE=%d/postgres-url)"
  fi
}
check_unit

# -- env ---------------------------------------------------------------------------

check_env() {
  local out
  if [ "$python_ok" -eq 0 ] || [ -z "$bin" ]; then
    fail "env: needs python3 and the binary"
    return 0
  fi
  # What bash makes of the file, from an empty environment.
  # shellcheck disable=SC2016 # expanded by the inner bash
  env -i bash -c 'set -a; . "$1"; env -0' _ "$env_example" >"$work/env-bash" 2>"$work/env-bash.err" ||
    fail "deploy/hsm-driver.env.example: bash cannot load it: $(cat "$work/env-bash.err")"
  if [ -s "$work/env-bash.err" ]; then
    fail "deploy/hsm-driver.env.example: bash printed: $(cat "$work/env-bash.err")"
  fi
  if ! out=$("$py" - "$env_example" "$work/env-bash" "$work/help.txt" "$work/run-help.txt" \
    "$repo/README.md" "$unit" "$work/env-run" <<'PY'
import re, sys
example, bash_env, helpf, runhelpf, readme, unitf, runenv = sys.argv[1:]
problems = []
name_re = r'[A-Z][A-Z0-9_]*'
value_ok = re.compile(r'(?:[A-Za-z0-9_./:@,+%=?-]*|"[^"$`\\]*")$')
active, commented = {}, {}
for n, line in enumerate(open(example), 1):
    line = line.rstrip('\n')
    where = f'deploy/hsm-driver.env.example:{n}'
    if not line or line == '#' or line.startswith('# '):
        continue
    m = re.fullmatch(rf'(#?)({name_re})=(.*)', line)
    if not m:
        problems.append(f'{where}: neither a setting NAME=value, a commented setting #NAME=value nor a comment "# ...": {line!r}')
        continue
    hashed, name, value = m.groups()
    if not value_ok.match(value):
        problems.append(f'{where}: {name}: value {value!r} has quotes, $, \\ or spaces that systemd and bash may read differently')
    value = value[1:-1] if value.startswith('"') else value
    if hashed:
        commented.setdefault(name, value)
    elif name in active:
        problems.append(f'{where}: {name} is set twice')
    else:
        active[name] = value

# bash must read exactly the active settings.
got = dict(e.split('=', 1) for e in open(bash_env).read().split('\0') if '=' in e)
for k in ('PWD', 'SHLVL', '_', 'OLDPWD'):
    got.pop(k, None)
if got != active:
    problems.append(f'deploy/hsm-driver.env.example: bash reads {got}, the syntax says {active}')

# What the binary documents.
helps = open(helpf).read() + open(runhelpf).read()
flag_vars = set()
for lst in re.findall(r'\[env: ([^;\]]+)', helps):
    for v in lst.split(','):
        flag_vars.add(v.strip().split('=')[0])
pin_vars = set(re.findall(r'\bUSER_PIN(?:_FILE)?\b', helps))
text = open(readme).read()
conf = text.split('\n## Configuration', 1)[1].split('\n## ', 1)[0]
table_vars = set()
for row in conf.splitlines():
    cells = row.split('|')
    if row.startswith('|') and len(cells) > 3:
        table_vars |= set(re.findall(rf'`({name_re})(?:=[^`]*)?`', cells[2]))
conf_words = set(re.findall(r'\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b', conf))
unit = open(unitf).read()
unit_vars = {'HSM_DRIVER_ARGS'} if re.search(r'^ExecStart=.*\$HSM_DRIVER_ARGS\b', unit, re.M) else set()
third_party = {'SOFTHSM2_CONF'}  # SoftHSMv2's own, read by the module
binary_vars = flag_vars | pin_vars | table_vars
if not flag_vars or 'PROXY_ADDR' not in flag_vars:
    problems.append('hsm-driver --help / run --help: no [env: ...] lists found')
for name in sorted(set(active) | set(commented)):
    if name not in binary_vars | unit_vars | third_party:
        problems.append(f'deploy/hsm-driver.env.example: {name} is not a variable the binary documents (--help, run --help, README "Configuration")')
for word in sorted(set(re.findall(r'\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b', open(example).read()))):
    if word not in binary_vars | unit_vars | third_party | conf_words:
        problems.append(f'deploy/hsm-driver.env.example: mentions {word}, which the binary does not document')
for name in sorted(flag_vars | {'USER_PIN_FILE', 'POSTGRES_URL_FILE'}):
    if name not in active and name not in commented:
        problems.append(f'deploy/hsm-driver.env.example: {name} (documented by the binary) is missing; add it, commented out if need be')

# The environment a run check uses: every setting, commented ones too, except
# alternatives to an active one and what the unit or the check sets itself.
skip = {'PKCS11_THALES_MODULE', 'PKCS11_IBM_MODULE', 'SQLITE_PATH', 'POSTGRES_URL',
        'POSTGRES_URL_FILE', 'USER_PIN_FILE', 'CLIENT_KEY', 'SOFTHSM2_CONF', 'HSM_DRIVER_ARGS'}
run = dict(commented)
run.update(active)
args = run.get('HSM_DRIVER_ARGS', '')
with open(runenv, 'w') as f:
    for k, v in sorted(run.items()):
        if k not in skip:
            f.write(f'{k}={v}\n')
    f.write(f'#ARGS={args}\n')
print('\n'.join(problems))
sys.exit(1 if problems else 0)
PY
  ); then
    while IFS= read -r line; do fail "$line"; done <<<"$out"
  else
    ok "env: syntax in the subset systemd and bash read alike (bash reads the same values); every variable documented by the binary; every documented one named"
  fi
  # The binary takes every setting: the first error must be the module, which
  # is made missing here (and SQLite goes to the temporary folder).
  [ -f "$work/env-run" ] || return 0
  local args=() assignments=()
  read -r -a args <<<"$(sed -n 's/^#ARGS=//p' "$work/env-run")"
  mapfile -t assignments < <(grep -v '^#' "$work/env-run")
  printf 'x\n' >"$work/run-pin" && chmod 600 "$work/run-pin"
  out=$(env -i PATH=/usr/bin:/bin "${assignments[@]}" PKCS11_MODULE="$work/no-such-module.so" \
    SQLITE_PATH="$work/env-run.db" USER_PIN_FILE="$work/run-pin" CLIENT_KEY="$work/run-pin" \
    timeout 20 "$bin" run "${args[@]}" 2>&1) || true
  if grep -q -- 'pkcs11-module: PKCS#11 module not found' <<<"$out"; then
    ok "env: hsm-driver run accepts every setting of the example (and HSM_DRIVER_ARGS: ${args[*]:-none})"
  else
    fail "deploy/hsm-driver.env.example: hsm-driver run with its settings stops before the module: $(grep -m1 -E 'error|critical' <<<"$out")"
  fi
}
check_env

# -- entrypoint ----------------------------------------------------------------------

stub=$work/stub
mkdir -p "$stub"
cat >"$stub/hsm-driver" <<'EOF'
#!/usr/bin/env bash
echo "STUB argv: $*"
for v in USER_PIN USER_PIN_FILE POSTGRES_URL_FILE CLIENT_KEY CLIENT_CERT CA_CERT HSM_TOKEN_LABEL HSM_TOKEN_LABEL_FILE; do
  echo "STUB $v=${!v-<unset>}"
done
EOF
chmod 755 "$stub/hsm-driver"

# secrets_dir NAME: a fresh, good secrets folder.
secrets_dir() {
  local d=$work/ep/$1
  mkdir -p "$d"
  (
    umask 077
    echo 1234 >"$d/user-pin"
    echo 'postgresql://hsm:pw@db/keys' >"$d/postgres-url"
    echo key >"$d/client-key"
  )
  echo cert >"$d/client-cert"
  echo ca >"$d/ca-cert"
  chmod 644 "$d/client-cert" "$d/ca-cert"
  echo "$d"
}

# ep_case NAME RC PATTERN SECRETS [VAR=VALUE...] -- [ARGS...]: runs the
# entrypoint in an empty environment; RC and PATTERN (grep -E on its output)
# must match.
ep_case() {
  local name=$1 rc=$2 pattern=$3 dir=$4 vars=() got out
  shift 4
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    vars+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  set +e
  out=$(env -i PATH="$stub:/usr/bin:/bin" HSM_SECRETS_DIR="$dir" HSM_DRIVER_ID=d1 "${vars[@]}" \
    bash "$entry" "$@" 2>&1)
  got=$?
  set -e
  if [ "$got" -ne "$rc" ] || ! grep -qE -- "$pattern" <<<"$out"; then
    fail "deploy/docker-entrypoint.sh, $name: exit $got (want $rc), output does not match /$pattern/: $(head -c 600 <<<"$out" | tr '\n' ' ')"
    ep_failed=$((ep_failed + 1))
    return
  fi
  if [ "$rc" -ne 0 ] && grep -q 'STUB argv' <<<"$out"; then
    fail "deploy/docker-entrypoint.sh, $name: refused, but hsm-driver ran anyway"
    ep_failed=$((ep_failed + 1))
    return
  fi
  ep_passed=$((ep_passed + 1))
}

check_entrypoint() {
  local d
  ep_passed=0 ep_failed=0
  d=$(secrets_dir good)
  ep_case "good configuration" 0 "STUB argv: run\$" "$d" --
  ep_case "secrets mapped from the folder" 0 "STUB CLIENT_KEY=$d/client-key" "$d" --
  ep_case "PIN file from the folder" 0 "STUB USER_PIN_FILE=$d/user-pin" "$d" --
  ep_case "PostgreSQL URL file from the folder" 0 "STUB POSTGRES_URL_FILE=$d/postgres-url" "$d" --
  ep_case "bare flags mean run" 0 "STUB argv: run --sessions 8" "$d" -- --sessions 8
  ep_case "USER_PIN in the environment" 2 "USER_PIN is set in the environment" "$d" USER_PIN=1234 --
  ep_case "SO_PIN in the environment" 2 "SO_PIN is set" "$d" SO_PIN=1234 --
  ep_case "POSTGRES_URL with a password" 2 "POSTGRES_URL holds a password" "$d" \
    POSTGRES_URL=postgresql://hsm:secret@db/keys POSTGRES_URL_FILE= --
  ep_case "POSTGRES_URL password keyword" 2 "POSTGRES_URL holds a password" "$d" \
    'POSTGRES_URL=host=db password=secret' --
  ep_case "POSTGRES_URL without a password" 0 "STUB argv: run" "$d" POSTGRES_URL=postgresql://hsm@db/keys --
  ep_case "NAME_FILE read into NAME" 0 "STUB HSM_TOKEN_LABEL=from-file" "$d" HSM_TOKEN_LABEL_FILE="$d/label" --
  ep_case "NAME and NAME_FILE both set" 2 "HSM_TOKEN_LABEL and HSM_TOKEN_LABEL_FILE are both set" "$d" \
    HSM_TOKEN_LABEL=x HSM_TOKEN_LABEL_FILE="$d/label" --
  ep_case "check prints, runs nothing" 0 "^hsm-driver run --sessions 2\$" "$d" -- check run --sessions 2
  ep_case "--help needs no PIN" 0 "STUB argv: run --help" "$work/ep/none" -- --help
  ep_case "proxy needs no PIN" 0 "STUB argv: proxy --listen" "$work/ep/none" -- proxy --listen 127.0.0.1:0
  ep_case "unknown command" 2 "unknown command 'sign'" "$d" -- sign
  ep_case "HSM_DRIVER_ID unset" 0 "warning: HSM_DRIVER_ID is not set" "$d" HSM_DRIVER_ID= --
  ep_case "SQLite in the container's layer" 0 "warning: the SQLite key store" "$d" \
    POSTGRES_URL_FILE= HSM_SECRETS_DIR="$work/ep/none" USER_PIN_FILE="$d/user-pin" SQLITE_PATH=/no-volume-here/keys.db --
  ep_case "test-token with another module" 2 "SoftHSMv2 test tokens only" "$d" \
    PKCS11_MODULE=/bin/true HSM_TOKEN_LABEL=t -- test-token
  ep_case "PIN file missing" 2 "USER_PIN_FILE=$work/ep/none/user-pin does not exist" "$work/ep/none" \
    USER_PIN_FILE="$work/ep/none/user-pin" --

  d=$(secrets_dir open)
  chmod 644 "$d/user-pin"
  ep_case "PIN file open to others" 2 "has mode 644" "$d" --
  d=$(secrets_dir group)
  chmod 640 "$d/user-pin"
  ep_case "PIN file open to its group" 2 "has mode 640" "$d" --
  d=$(secrets_dir link)
  mv "$d/user-pin" "$d/real-pin"
  ln -s real-pin "$d/user-pin"
  ep_case "PIN file a symbolic link" 2 "is a symbolic link" "$d" --
  d=$(secrets_dir empty)
  : >"$d/user-pin"
  ep_case "PIN file empty" 2 "user-pin is empty" "$d" --
  d=$(secrets_dir dir)
  rm "$d/user-pin"
  mkdir "$d/user-pin"
  ep_case "PIN path a folder" 2 "not a regular file" "$d" --
  d=$(secrets_dir key)
  chmod 644 "$d/client-key"
  ep_case "client key open to others" 2 "CLIENT_KEY=.* has mode 644" "$d" --
  d=$(secrets_dir url)
  chmod 644 "$d/postgres-url"
  ep_case "PostgreSQL URL file open to others" 2 "POSTGRES_URL_FILE=.* has mode 644" "$d" --
  d=$(secrets_dir cert)
  rm "$d/ca-cert"
  ep_case "CA certificate missing" 2 "CA_CERT=/nowhere/ca.pem: no such file" "$d" CA_CERT=/nowhere/ca.pem --
  if [ "$(id -u)" -eq 0 ]; then
    d=$(secrets_dir owner)
    chown 12345 "$d/user-pin"
    ep_case "PIN file of another user" 2 "owned by uid 12345" "$d" --
  else
    skip "entrypoint: a PIN file of another user needs root to make"
  fi
  if [ "$ep_failed" -eq 0 ]; then
    ok "entrypoint: $ep_passed cases (good configurations, secrets in the environment, bad secret files, *_FILE, dry run)"
  fi
}
mkdir -p "$work/ep/none" "$work/ep/good"
printf 'from-file\n' >"$work/ep/good/label" # read by the NAME_FILE cases
if [ -f "$entry" ]; then check_entrypoint; fi

# -- e2e: the compose PKI recipe, the entrypoint with the real binary ---------------------

pki=$work/pki
check_e2e() {
  local recipe out port admin tries token rc softhsm=/usr/lib/softhsm/libsofthsm2.so
  recipe=$(sed -n '/^# pki-recipe-begin$/,/^# pki-recipe-end$/{/pki-recipe-/d; s/^#   \{0,1\}//; p;}' "$compose")
  if [ -z "$recipe" ]; then
    fail "deploy/compose.yaml: no '# pki-recipe-begin' ... '# pki-recipe-end' block"
    return
  fi
  need openssl openssl || return 0
  mkdir -p "$pki"
  if ! out=$(cd "$pki" && bash -euo pipefail -c "$recipe" 2>&1); then
    fail "deploy/compose.yaml: the PKI recipe failed: $out"
    return
  fi
  ok "e2e: the compose PKI recipe makes $(find "$pki" -type f | wc -l) files"
  [ -n "$bin" ] || return 0
  need softhsm2-util softhsm2 || return 0
  need curl curl || return 0
  need jq jq || return 0
  [ -f "$softhsm" ] || {
    fail "$softhsm: missing (Debian package softhsm2)"
    return
  }

  # Secrets folders as compose mounts them for driver-1 and the proxy.
  local s1=$work/e2e/secrets-1 sp=$work/e2e/secrets-proxy e=$work/e2e
  mkdir -p "$s1" "$sp" "$e/tokens"
  (
    umask 077
    cp "$pki/user-pin-1" "$s1/user-pin"
    cp "$pki/so-pin" "$pki/test-master-key" "$s1/"
    cp "$pki/driver-1.key.pem" "$s1/client-key"
    cp "$pki/driver-1.pem" "$s1/client-cert"
    cp "$pki/root.pem" "$s1/ca-cert"
    cp "$pki/admin-token" "$pki/proxy.pem" "$pki/proxy.key.pem" "$pki/root.pem" "$sp/"
  )
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$e/tokens" >"$e/softhsm2.conf"
  local common=(PATH=/usr/bin:/bin HSM_DRIVER_BIN="$bin" HSM_SECRETS_DIR="$s1" PKCS11_MODULE="$softhsm"
    SOFTHSM2_CONF="$e/softhsm2.conf" HSM_TOKEN_LABEL=driver-1 HSM_LOG_LEVEL=warn)
  if ! out=$(env -i "${common[@]}" bash "$entry" test-token 2>&1) ||
    ! out=$(env -i "${common[@]}" bash "$entry" test-token 2>&1) ||
    ! grep -q "token 'driver-1' exists" <<<"$out"; then
    fail "deploy/docker-entrypoint.sh test-token (run twice) failed: $out"
    return
  fi
  ok "e2e: docker-entrypoint.sh test-token makes a SoftHSMv2 token and master key, and again finds them"

  env -i PATH=/usr/bin:/bin HSM_DRIVER_BIN="$bin" HSM_SECRETS_DIR="$work/ep/none" \
    bash "$entry" proxy --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --server-cert "$sp/proxy.pem" --server-key "$sp/proxy.key.pem" --client-ca "$sp/root.pem" \
    --admin-token-file "$sp/admin-token" >"$e/proxy.out" 2>"$e/proxy.log" &
  pids+=($!)
  for tries in $(seq 1 100); do
    if jq -e .listen "$e/proxy.out" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  if ! jq -e .listen "$e/proxy.out" >/dev/null 2>&1; then
    fail "e2e: the proxy did not start through docker-entrypoint.sh (after $tries tries): $(tail -n 3 "$e/proxy.log")"
    return
  fi
  port=$(jq -r .listen "$e/proxy.out")
  port=${port##*:}
  admin=$(jq -r .admin "$e/proxy.out")
  env -i "${common[@]}" HSM_DRIVER_ID=driver-1 PROXY_ADDR="localhost:$port" SQLITE_PATH="$e/keys.db" \
    bash "$entry" run --poll-wait 1000 >"$e/driver.out" 2>"$e/driver.log" &
  local driver_pid=$!
  pids+=("$driver_pid")
  token=$(tr -d '\r\n' <"$sp/admin-token")
  out=$(curl -s --max-time 20 -K <(printf 'header = "Authorization: Bearer %s"\n' "$token") \
    -H 'Content-Type: application/json' \
    -d '{"kind":"generate_key","id":"check-1","params":{"key_id":"check-k1","scheme":"p256"}}' \
    "http://$admin/v1/admin/requests?wait_ms=15000") || true
  if jq -e '.state == "done" and .ok == true and (.result.public_key | length) == 130' <<<"$out" >/dev/null 2>&1; then
    ok "e2e: proxy and driver (through docker-entrypoint.sh, the recipe's certificates, SAN localhost) generate a key"
  else
    fail "e2e: no key through the proxy and driver: ${out:-no answer}; driver: $(tail -n 3 "$e/driver.log")"
  fi
  kill -TERM "$driver_pid" 2>/dev/null || true
  if wait "$driver_pid"; then
    ok "e2e: the driver stops with status 0 on SIGTERM"
  else
    fail "e2e: the driver did not exit 0 on SIGTERM: $(tail -n 3 "$e/driver.log")"
  fi

  # The probe (module load, key generation, wrap, unwrap, sign) under MDWE:
  # no mapping may become writable and executable.
  out=$(env -i "${common[@]}" USER_PIN_FILE="$s1/user-pin" SQLITE_PATH="$e/probe.db" "$py" - "$bin" <<'PY' 2>&1
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print('MDWE-UNAVAILABLE errno', ctypes.get_errno())
    sys.exit(3)
os.execv(sys.argv[1], [sys.argv[1], 'probe'])
PY
  ) && rc=0 || rc=$?
  if [ "$rc" -eq 3 ] && grep -q MDWE-UNAVAILABLE <<<"$out"; then
    skip "e2e: this kernel has no PR_SET_MDWE (Linux >= 6.3): the probe under MDWE was not run"
  elif [ "$rc" -eq 0 ] && grep -q '"ok": true' <<<"$out"; then
    ok "e2e: hsm-driver probe with SoftHSMv2 under MDWE (no writable+executable memory)"
  else
    fail "e2e: hsm-driver probe under MDWE failed (exit $rc): $(grep -m2 -E 'error|critical|message' <<<"$out")"
  fi
}
if [ -f "$compose" ] && [ -f "$entry" ]; then check_e2e; fi

# -- compose -------------------------------------------------------------------------

check_compose() {
  local out
  [ "$python_ok" -eq 1 ] || return 0
  if ! out=$("$py" - "$compose" "$pki" "$work/help.txt" "$work/run-help.txt" "$entry" "$drain_ms" <<'PY'
import os, re, sys, yaml
composef, pki, helpf, runhelpf, entryf, drain_ms = sys.argv[1:]
where = 'deploy/compose.yaml'
problems = []
try:
    doc = yaml.safe_load(open(composef))
except yaml.YAMLError as e:
    print(f'{where}: not valid YAML: {e}')
    sys.exit(1)
services = doc.get('services') or {}
secrets = doc.get('secrets') or {}
volumes = doc.get('volumes') or {}

def subst(s):
    return re.sub(r'\$\{(\w+):-([^}]*)\}', lambda m: os.environ.get(m.group(1), m.group(2)), s)

def seconds(v):
    m = re.fullmatch(r'(?:(\d+)m)?(?:(\d+)s)?', str(v or ''))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m and v else 0

def cmd(svc):
    c = svc.get('command') or []
    return c.split() if isinstance(c, str) else [str(x) for x in c]

def flag(c, name):
    for i, a in enumerate(c):
        if a == name and i + 1 < len(c):
            return c[i + 1]
        if a.startswith(name + '='):
            return a.split('=', 1)[1]
    return None

def env(svc):
    e = svc.get('environment') or {}
    if isinstance(e, list):
        e = dict(x.split('=', 1) if '=' in x else (x, '') for x in e)
    return {k: str(v) for k, v in e.items()}

def secret_targets(svc):
    out = {}
    for s in svc.get('secrets') or []:
        src, tgt = (s, s) if isinstance(s, str) else (s.get('source'), s.get('target') or s.get('source'))
        out[tgt] = src
    return out

loopback = lambda hostport: hostport.rsplit(':', 1)[0] in ('127.0.0.1', 'localhost', '[::1]')

pg = [n for n, s in services.items() if str(s.get('image', '')).startswith('postgres:')]
if not pg:
    problems.append(f'{where}: no PostgreSQL service (image postgres:...)')
elif 'healthcheck' not in services[pg[0]]:
    problems.append(f'{where}: {pg[0]}: no healthcheck, so drivers cannot wait for it')
proxies = [n for n, s in services.items() if cmd(s)[:1] == ['proxy']]
drivers = [n for n, s in services.items() if cmd(s)[:1] == ['run']]
if len(proxies) != 1:
    problems.append(f'{where}: want one reference proxy service (command: proxy ...), found {proxies}')
if len(drivers) < 2:
    problems.append(f'{where}: want at least two drivers (command: run ...), found {drivers}')

proxy_port = None
for n in proxies:
    c = cmd(services[n])
    if not flag(c, '--admin-token-file'):
        problems.append(f'{where}: {n}: no --admin-token-file')
    listen = flag(c, '--listen') or '127.0.0.1:8443'
    if loopback(listen):
        problems.append(f'{where}: {n}: --listen {listen} is loopback: the drivers in other containers cannot reach it')
    proxy_port = listen.rsplit(':', 1)[1]
    admin = flag(c, '--admin-listen') or '127.0.0.1:8444'
    if not loopback(admin) and '--admin-allow-remote' not in c:
        problems.append(f'{where}: {n}: --admin-listen {admin} without --admin-allow-remote: the proxy refuses it')
    for p in services[n].get('ports') or []:
        if not str(p).startswith('127.0.0.1:'):
            problems.append(f'{where}: {n}: port {p} is published beyond the host\'s loopback (the admin API is plain HTTP)')

ids, labels, states = {}, {}, {}
for n in drivers:
    s = services[n]
    e = env(s)
    for key, seen in (('HSM_DRIVER_ID', ids), ('HSM_TOKEN_LABEL', labels)):
        v = e.get(key)
        if not v:
            problems.append(f'{where}: {n}: {key} is not set')
        elif v in seen:
            problems.append(f'{where}: {n} and {seen[v]} share {key}={v}')
        else:
            seen[v] = n
    vols = [str(v) for v in s.get('volumes') or []]
    state = [v.split(':')[0] for v in vols if v.split(':')[1:2] == ['/var/lib/hsm-driver']]
    if not state:
        problems.append(f'{where}: {n}: no volume on /var/lib/hsm-driver (its token and state)')
    elif state[0] in states:
        problems.append(f'{where}: {n} and {states[state[0]]} share the volume {state[0]}')
    else:
        states[state[0]] = n
    t = secret_targets(s)
    for need in ('user-pin', 'client-key', 'client-cert', 'ca-cert', 'postgres-url'):
        if need not in t:
            problems.append(f'{where}: {n}: no secret mounted as {need}')
    addr = e.get('PROXY_ADDR', '')
    if proxies and proxy_port and addr != f'{proxies[0]}:{proxy_port}':
        problems.append(f'{where}: {n}: PROXY_ADDR={addr!r}, want {proxies[0]}:{proxy_port}')
    deps = s.get('depends_on') or {}
    if pg and (not isinstance(deps, dict) or (deps.get(pg[0]) or {}).get('condition') != 'service_healthy'):
        problems.append(f'{where}: {n}: does not wait for {pg[0]} to be healthy')
    if seconds(s.get('stop_grace_period')) <= int(drain_ms) // 1000 + 5:
        problems.append(f'{where}: {n}: stop_grace_period {s.get("stop_grace_period")} must exceed the drain timeout ({drain_ms} ms) + 5 s')

# No secret in any environment; every variable an hsm-driver service sets is known.
helps = open(helpf).read() + open(runhelpf).read()
known = {v.strip().split('=')[0] for l in re.findall(r'\[env: ([^;\]]+)', helps) for v in l.split(',')}
known |= set(re.findall(r'\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b', open(entryf).read().split('set -euo pipefail')[0]))
known |= {'SOFTHSM2_CONF', 'USER_PIN_FILE', 'POSTGRES_URL_FILE'}
for n, s in services.items():
    e = env(s)
    for bad in ('USER_PIN', 'SO_PIN', 'POSTGRES_URL', 'POSTGRES_PASSWORD'):
        if bad in e:
            problems.append(f'{where}: {n}: {bad} in the environment (docker inspect shows it); use a secret file')
    if s.get('image') == services.get(drivers[0] if drivers else '', {}).get('image') and n not in pg:
        for k in e:
            if k not in known:
                problems.append(f'{where}: {n}: {k} is neither a variable of hsm-driver nor of docker-entrypoint.sh')
    for tgt, src in secret_targets(s).items():
        if src not in secrets:
            problems.append(f'{where}: {n}: secret {src} is not defined')
    for v in s.get('volumes') or []:
        name = str(v).split(':')[0]
        if not name.startswith(('.', '/')) and name not in volumes:
            problems.append(f'{where}: {n}: volume {name} is not declared')

# Images built from this repository's Dockerfile.
for n, s in services.items():
    b = s.get('build')
    if isinstance(b, dict):
        ctx = os.path.normpath(os.path.join(os.path.dirname(composef), b.get('context', '.')))
        if not os.path.isfile(os.path.join(ctx, b.get('dockerfile', 'Dockerfile'))):
            problems.append(f'{where}: {n}: build: no {b.get("dockerfile", "Dockerfile")} in the context {ctx}')

# Every secret is a file the PKI recipe makes.
made = set(os.listdir(pki)) if os.path.isdir(pki) else None
for name, spec in secrets.items():
    f = (spec or {}).get('file')
    if not f:
        problems.append(f'{where}: secret {name} is not a file')
    elif made is not None and os.path.basename(subst(f)) not in made:
        problems.append(f'{where}: secret {name}: {os.path.basename(subst(f))} is not made by the PKI recipe')

print('\n'.join(problems))
sys.exit(1 if problems else 0)
PY
  ); then
    while IFS= read -r line; do fail "$line"; done <<<"$out"
  else
    ok "compose: YAML parses; two drivers (own token, id, state), PostgreSQL with a healthcheck, the proxy (admin API on the host's loopback, behind its token), secrets as files from the recipe"
  fi
}
check_compose

# -- docker ------------------------------------------------------------------------------

check_docker() {
  local out out2 line srcs=() pkgs build_pkgs runtime_pkgs extra_pkgs missing found
  [ "$python_ok" -eq 1 ] || return 0
  # Instructions with continuations joined: "COPY a b", "ARG NAME=...".
  out=$("$py" - "$dockerfile" <<'PY'
import re, shlex, sys
text = re.sub(r'\\\n', ' ', open(sys.argv[1]).read())
for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith('#'):
        continue
    word, _, rest = line.partition(' ')
    word = word.upper()
    if word == 'COPY':
        parts = shlex.split(rest)
        if any(p.startswith('--from') for p in parts):
            print('COPYFROM ' + ' '.join(parts))
            continue
        parts = [p for p in parts if not p.startswith('--')]
        for src in parts[:-1]:
            print('SRC ' + src)
        print('DEST ' + parts[-1])
    elif word == 'ARG' and '=' in rest:
        name, value = rest.split('=', 1)
        print(f'ARG {name} {" ".join(shlex.split(value))}')
    elif word in ('FROM', 'USER', 'ENV', 'ENTRYPOINT', 'CMD'):
        print(f'{word} {rest}')
PY
  ) || {
    fail "deploy/Dockerfile: cannot be parsed"
    return
  }
  local bad=0 src
  while read -r src; do
    srcs+=("$src")
    if [ ! -e "$repo/$src" ]; then
      fail "deploy/Dockerfile: COPY source $src does not exist (the build context is the repository's root)"
      bad=1
    fi
  done < <(sed -n 's/^SRC //p' <<<"$out")
  if [ "$bad" -eq 0 ]; then ok "docker: every COPY source exists (${#srcs[@]})"; fi

  # The copied sources configure as the build stage configures them.
  if need cmake cmake; then
    local ctx=$work/docker-context
    mkdir -p "$ctx"
    for src in "${srcs[@]}"; do
      [ -e "$repo/$src" ] || continue
      mkdir -p "$ctx/$(dirname "$src")"
      cp -r "$repo/${src%/}" "$ctx/$(dirname "$src")/"
    done
    if out2=$(cmake -S "$ctx" -B "$ctx/out" -DHSM_DRIVER_BUILD_TESTS=OFF 2>&1); then
      ok "docker: the sources the build stage copies configure (cmake, tests off)"
    else
      fail "deploy/Dockerfile: the copied sources do not configure: $(grep -m3 -E 'Error|error' <<<"$out2")"
    fi
  fi

  build_pkgs=$(sed -n 's/^ARG BUILD_PACKAGES //p' <<<"$out")
  runtime_pkgs=$(sed -n 's/^ARG RUNTIME_PACKAGES //p' <<<"$out")
  extra_pkgs=$(sed -n 's/^ARG EXTRA_PACKAGES //p' <<<"$out")
  if [ -z "$build_pkgs" ] || [ -z "$runtime_pkgs" ]; then
    fail "deploy/Dockerfile: no ARG BUILD_PACKAGES=\"...\" or ARG RUNTIME_PACKAGES=\"...\""
    return
  fi
  read -r -a pkgs <<<"$build_pkgs $runtime_pkgs $extra_pkgs"
  if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
    skip "docker: this machine is not Debian 12, so the package names were not looked up"
  elif need apt-cache apt; then
    found=$(apt-cache show --no-all-versions "${pkgs[@]}" 2>/dev/null | sed -n 's/^Package: //p' | sort -u)
    missing=()
    for p in "${pkgs[@]}"; do
      grep -qxF "$p" <<<"$found" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
      fail "deploy/Dockerfile: not Debian 12 packages (apt-cache show): ${missing[*]} (or run apt-get update)"
    else
      ok "docker: all ${#pkgs[@]} packages exist in Debian 12 (apt-cache show)"
    fi
  fi
  # The runtime packages hold every library the binary links.
  if [ -n "$bin" ] && need dpkg dpkg; then
    missing=()
    local lib path pkg
    while read -r lib path; do
      pkg=$(dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true)
      pkg=${pkg%%:*}
      case $pkg in
        "") missing+=("$lib(no package owns $path)") ;;
        libc6 | libgcc-s1) ;; # in every Debian image
        *) grep -qw -- "$pkg" <<<"$runtime_pkgs" || missing+=("$lib($pkg)") ;;
      esac
    done < <(ldd "$bin" | awk -v needed=" $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')" \
      '$2 == "=>" && index(needed, " " $1 " ") { print $1, $3 }')
    if [ "${#missing[@]}" -gt 0 ]; then
      fail "deploy/Dockerfile: RUNTIME_PACKAGES lacks what the binary links: ${missing[*]}"
    else
      ok "docker: RUNTIME_PACKAGES holds every library build/hsm-driver links (readelf NEEDED, dpkg -S)"
    fi
  fi
  # Build packages come from deploy/install-deps.sh (one list to keep).
  local listed
  listed=$(sed -n '/^packages=(/,/^)/p' "$deploy/install-deps.sh" | sed 's/#.*//' | tr -s '[:blank:]' '\n')
  missing=()
  # shellcheck disable=SC2086 # word list
  for p in $build_pkgs; do grep -qxF "$p" <<<"$listed" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    fail "deploy/Dockerfile: BUILD_PACKAGES not in deploy/install-deps.sh: ${missing[*]}"
  else
    ok "docker: BUILD_PACKAGES are all in deploy/install-deps.sh"
  fi
  # Image settings.
  bad=0
  grep -q '^FROM .*bookworm' <<<"$out" || grep -q '^ARG DEBIAN_IMAGE debian:bookworm' <<<"$out" || {
    fail "deploy/Dockerfile: not based on Debian 12 (bookworm)"
    bad=1
  }
  line=$(sed -n 's/^USER //p' <<<"$out" | tail -n 1)
  if [ -z "$line" ] || [ "${line%%:*}" = 0 ] || [ "${line%%:*}" = root ]; then
    fail "deploy/Dockerfile: the image must end on a non-root USER (found '${line:-none}')"
    bad=1
  fi
  grep -q '^ENV USER_PIN_FILE=/run/secrets/user-pin$' <<<"$out" || {
    fail "deploy/Dockerfile: no ENV USER_PIN_FILE=/run/secrets/user-pin"
    bad=1
  }
  if grep -qE '^ENV (USER_PIN|SO_PIN|POSTGRES_URL)=' <<<"$out"; then
    fail "deploy/Dockerfile: a secret in ENV"
    bad=1
  fi
  if ! grep -q '^DEST /usr/local/bin/docker-entrypoint.sh$' <<<"$out" ||
    ! grep -q '^ENTRYPOINT \["/usr/local/bin/docker-entrypoint.sh"\]' <<<"$out"; then
    fail "deploy/Dockerfile: the entrypoint is not deploy/docker-entrypoint.sh copied to /usr/local/bin"
    bad=1
  fi
  if [ "$bad" -eq 0 ]; then ok "docker: Debian 12 base, non-root user ($line), PIN as a file, the checking entrypoint"; fi
}
check_docker

# -- lint --------------------------------------------------------------------------------

if need shellcheck shellcheck; then
  if out=$(shellcheck "$deploy/install.sh" "$deploy/docker-entrypoint.sh" "$deploy/check-deploy.sh" 2>&1); then
    ok "lint: shellcheck deploy/install.sh deploy/docker-entrypoint.sh deploy/check-deploy.sh"
  else
    fail "shellcheck: $out"
  fi
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "check-deploy: $failures check(s) failed, $skips skipped" >&2
  exit 1
fi
echo "check-deploy: all checks passed ($skips skipped)"
