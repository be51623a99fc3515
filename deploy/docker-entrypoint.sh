#!/usr/bin/env bash
# Entrypoint of the hsm-driver image (deploy/Dockerfile): checks the
# configuration the container was given, then execs hsm-driver. A container's
# environment is readable by anyone who may run `docker inspect`, so secrets
# come as files (Docker or compose secrets under /run/secrets), never as
# variables.
#
# Usage (the image's command; default `run`):
#   run [FLAGS]       the daemon; bare flags (`--sessions 8`) mean `run FLAGS`
#   proxy FLAGS       the reference proxy (no PIN)
#   test-token        SoftHSMv2 test tokens only: makes the token
#                     HSM_TOKEN_LABEL if it is missing (SO_PIN_FILE,
#                     USER_PIN_FILE) and its master key from the value in
#                     HSM_TEST_MASTER_KEY_FILE (shared by every test token)
#   probe | keys | master-key | audit | token  ARGS   hsm-driver ARGS, checked like run
#   check [COMMAND]   the checks of COMMAND (default run), then prints the
#                     command it would exec instead of running it
#   any command with -h or --help goes straight to hsm-driver
#
# Secret files in $HSM_SECRETS_DIR (default /run/secrets) are used when the
# variable is not set: user-pin (USER_PIN_FILE), so-pin (SO_PIN_FILE),
# postgres-url (POSTGRES_URL_FILE), client-key (CLIENT_KEY), client-cert
# (CLIENT_CERT), ca-cert (CA_CERT), test-master-key (HSM_TEST_MASTER_KEY_FILE).
# NAME_FILE is read into NAME for PROXY_ADDR, HSM_TOKEN_LABEL,
# HSM_MASTER_KEY_LABEL, HSM_DRIVER_ID, HSM_LOG_LEVEL, HSM_TLS_MIN,
# HSM_HTTPS_PROXY and HSM_RESIDENT_SCHEMES, and names the file itself for
# CA_CERT, CLIENT_CERT and CLIENT_KEY (the driver reads USER_PIN_FILE,
# SO_PIN_FILE and POSTGRES_URL_FILE itself).
#
# Refuses to start (exit 2, naming the variable and the file): USER_PIN or
# SO_PIN in the environment; POSTGRES_URL holding a password; NAME and
# NAME_FILE both set; a secret file (PIN, URL, master key value) that is
# missing, a symbolic link, not a regular file, neither this user's nor
# root's, open to group or others, unreadable or empty; a client key open to
# others; a named certificate or module that is not there. Warns when the
# SQLite store would live in the container's own layer, and when
# HSM_DRIVER_ID is unset (the container's host name changes when it is
# re-created).
set -euo pipefail

prog=docker-entrypoint
bin=${HSM_DRIVER_BIN:-hsm-driver}
secrets=${HSM_SECRETS_DIR:-/run/secrets}
state_dir=/var/lib/hsm-driver
problems=0

say() { echo "$prog: $*" >&2; }
bad() {
  say "$*"
  problems=$((problems + 1))
}

# -- checks --------------------------------------------------------------------

# secret_file VAR: the file VAR names holds a secret the driver reads with its
# own checks (runtime/base/secret_file.cpp); the same checks here, with what
# to do on the host.
secret_file() {
  local var=$1 f=${!1:-} owner mode
  if [ -z "$f" ]; then
    bad "$var is not set: mount the secret as a file (e.g. $secrets/...) and set $var"
    return
  fi
  if [ -L "$f" ]; then
    bad "$var=$f is a symbolic link: the driver opens it without following links; name the file itself"
    return
  fi
  if [ ! -e "$f" ]; then
    bad "$var=$f does not exist: mount the secret there"
    return
  fi
  if [ ! -f "$f" ]; then
    bad "$var=$f is not a regular file"
    return
  fi
  owner=$(stat -c %u "$f")
  mode=$(stat -c %a "$f")
  if [ "$owner" != "$(id -u)" ] && [ "$owner" != 0 ]; then
    bad "$var=$f is owned by uid $owner, neither this user (uid $(id -u)) nor root: on the host, chown $(id -u) it (compose mounts secret files with their host owner and mode)"
    return
  fi
  if (((8#$mode & 8#077) != 0)); then
    bad "$var=$f has mode $mode: group or others may read it; on the host, chmod 600 it"
    return
  fi
  if [ ! -r "$f" ]; then
    bad "$var=$f (uid $owner, mode $mode) is not readable by uid $(id -u): on the host, chown $(id -u) it"
    return
  fi
  if [ ! -s "$f" ]; then
    bad "$var=$f is empty"
  fi
}

# public_file VAR: a certificate or module named by VAR, if set.
public_file() {
  local var=$1 f=${!1:-}
  [ -n "$f" ] || return 0
  if [ ! -f "$f" ]; then
    bad "$var=$f: no such file in the container (mount it, or build an image FROM this one that holds it)"
  elif [ ! -r "$f" ]; then
    bad "$var=$f is not readable by uid $(id -u)"
  fi
}

# client_key: the driver refuses a key that others may read or its group may
# write (runtime/net/proxy_client.cpp); a group read is allowed.
client_key() {
  local f=${CLIENT_KEY:-} mode
  [ -n "$f" ] || return 0
  public_file CLIENT_KEY
  [ -f "$f" ] || return 0
  mode=$(stat -c %a "$f")
  if (((8#$mode & 8#027) != 0)); then
    bad "CLIENT_KEY=$f has mode $mode: others may read it or its group write it; on the host, chmod 600 it"
  fi
}

# The longest mount point that holds PATH ("/" is the container's own layer).
mount_of() {
  awk -v p="$1" '
    { m = $5; gsub(/\\040/, " ", m)
      if ((p == m || index(p, m "/") == 1 || m == "/") && length(m) > length(best)) best = m }
    END { print best }' /proc/self/mountinfo
}

# -- the environment -------------------------------------------------------------

for var in USER_PIN SO_PIN; do
  if [ -n "${!var:-}" ]; then
    bad "$var is set in the environment, where \`docker inspect\` shows it: mount the PIN as a secret file and set ${var}_FILE (default $secrets/$(echo "$var" | tr 'A-Z_' 'a-z-'))"
  fi
  unset "$var"
done

if [ -n "${POSTGRES_URL:-}" ]; then
  # A password in a URI's user part (user:pw@) or as a keyword (password=).
  if [[ $POSTGRES_URL =~ ^[a-z]+://[^/@]*:[^/@]*@ ]] || [[ $POSTGRES_URL =~ (^|[[:space:]?&])password[[:space:]]*= ]]; then
    bad "POSTGRES_URL holds a password, which \`docker inspect\` shows: put the URL in a secret file and set POSTGRES_URL_FILE (default $secrets/postgres-url)"
  fi
fi

# NAME_FILE holding the value of NAME.
for var in PROXY_ADDR HSM_TOKEN_LABEL HSM_MASTER_KEY_LABEL HSM_DRIVER_ID \
  HSM_LOG_LEVEL HSM_TLS_MIN HSM_HTTPS_PROXY HSM_RESIDENT_SCHEMES; do
  file_var=${var}_FILE
  f=${!file_var:-}
  [ -n "$f" ] || continue
  if [ -n "${!var:-}" ]; then
    bad "$var and $file_var are both set: set one"
  elif [ ! -f "$f" ] || [ ! -r "$f" ]; then
    bad "$file_var=$f: no readable file there"
  else
    value=$(cat "$f")
    export "$var=$value"
  fi
  unset "$file_var"
done

# NAME_FILE naming the file NAME names.
for var in CA_CERT CLIENT_CERT CLIENT_KEY; do
  file_var=${var}_FILE
  f=${!file_var:-}
  [ -n "$f" ] || continue
  if [ -n "${!var:-}" ] && [ "${!var}" != "$f" ]; then
    bad "$var and $file_var are both set: set one"
  else
    export "$var=$f"
  fi
  unset "$file_var"
done

# Files in the secrets folder, for variables not set.
default_from_secret() { # default_from_secret VAR NAME
  if [ -z "${!1:-}" ] && [ -e "$secrets/$2" ]; then export "$1=$secrets/$2"; fi
}
default_from_secret USER_PIN_FILE user-pin
default_from_secret SO_PIN_FILE so-pin
default_from_secret POSTGRES_URL_FILE postgres-url
default_from_secret CLIENT_KEY client-key
default_from_secret CLIENT_CERT client-cert
default_from_secret CA_CERT ca-cert
default_from_secret HSM_TEST_MASTER_KEY_FILE test-master-key

# -- the command -------------------------------------------------------------------

dry_run=0
if [ "${1:-}" = check ]; then
  dry_run=1
  shift
fi
if [ $# -eq 0 ]; then set -- run; fi
case $1 in -*) set -- run "$@" ;; esac

for a in "$@"; do
  case $a in -h | --help) exec "$bin" "$@" ;; esac
done

cmd=$1
case $cmd in
  run | probe | keys | master-key | token | test-token)
    secret_file USER_PIN_FILE
    ;;
  audit | proxy) ;;
  *)
    say "unknown command '$cmd' (run, proxy, test-token, probe, keys, master-key, audit, token, check)"
    exit 2
    ;;
esac

if [ "$cmd" != proxy ]; then
  if [ -n "${POSTGRES_URL_FILE:-}" ]; then secret_file POSTGRES_URL_FILE; fi
  public_file PKCS11_MODULE
fi

if [ "$cmd" = run ]; then
  public_file CA_CERT
  public_file CLIENT_CERT
  client_key
  if [ -z "${HSM_DRIVER_ID:-}" ]; then
    say "warning: HSM_DRIVER_ID is not set: the driver id (its audit chain, its leases) is the container's host name, which changes when the container is re-created"
  fi
fi

if [ "$cmd" != proxy ] && [ "$cmd" != test-token ] &&
  [ -z "${POSTGRES_URL_FILE:-}" ] && [ -z "${POSTGRES_URL:-}" ]; then
  db=${SQLITE_PATH:-$state_dir/keys.db}
  if [ "$(mount_of "$db")" = / ]; then
    say "warning: the SQLite key store $db is in the container's own layer: its keys go when the container goes; mount a volume on $(dirname "$db")"
  fi
fi

if [ "$cmd" = test-token ]; then
  case ${PKCS11_MODULE:-} in
    */libsofthsm2.so) ;;
    *) bad "test-token makes SoftHSMv2 test tokens only; PKCS11_MODULE=${PKCS11_MODULE:-} is not SoftHSMv2's" ;;
  esac
  secret_file SO_PIN_FILE
  secret_file HSM_TEST_MASTER_KEY_FILE
  [ -n "${HSM_TOKEN_LABEL:-}" ] || bad "HSM_TOKEN_LABEL is not set: test-token needs the label of the token to make"
fi

if [ "$problems" -gt 0 ]; then
  say "$problems problem(s) in the configuration; not starting"
  exit 2
fi

if [ "$cmd" = test-token ]; then
  # A label already on a token means it was made before (a restart).
  if softhsm2-util --show-slots 2>/dev/null |
    awk -v l="$HSM_TOKEN_LABEL" '$1 == "Label:" { sub(/^[ \t]*Label:[ \t]*/, ""); sub(/[ \t]+$/, ""); if ($0 == l) f = 1 } END { exit !f }'; then
    say "token '$HSM_TOKEN_LABEL' exists"
    token_cmd=()
  else
    token_cmd=("$bin" token init)
  fi
  if [ "$dry_run" -eq 1 ]; then
    echo "${token_cmd[*]:+${token_cmd[*]}; }$bin master-key init --test-value-file $HSM_TEST_MASTER_KEY_FILE"
    exit 0
  fi
  if [ "${#token_cmd[@]}" -gt 0 ]; then "${token_cmd[@]}" >/dev/null; fi
  exec "$bin" master-key init --test-value-file "$HSM_TEST_MASTER_KEY_FILE"
fi

if [ "$dry_run" -eq 1 ]; then
  echo "$bin $*"
  exit 0
fi
exec "$bin" "$@"
