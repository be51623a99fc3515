#!/usr/bin/env bash
# Installs hsm-driver as a systemd service: the system user and group
# hsm-driver (no login shell, home /var/lib/hsm-driver), the folders, the
# binary, the unit and, if there is none yet, the settings file; then prints
# what is left to do (the PIN, the TLS files, `systemctl enable --now`).
# Idempotent: run it again to upgrade the binary and the unit. It never
# touches the settings file, the credentials or the keys once they exist,
# and it sets the folders' owners and modes back to the ones below.
#
# Usage: deploy/install.sh [--root DIR] [--bin PATH] [--postgres]
#   --root DIR   install into DIR instead of / (also: DESTDIR=DIR). The user
#                is then added to DIR/etc/passwd with `useradd --prefix`, if
#                DIR/etc/passwd exists (else no user is made); nothing outside
#                DIR is touched and systemd is not reloaded. Without root
#                rights files keep the installing user as owner.
#   --bin PATH   the binary (default: $BUILD_DIR/hsm-driver, else build/hsm-driver)
#   --postgres   also add the drop-in that hands the PostgreSQL URL to the
#                driver as a credential (POSTGRES_URL_FILE)
#
# What it makes (owner, mode):
#   /usr/local/bin/hsm-driver                            root, 0755
#   /usr/local/lib/systemd/system/hsm-driver.service     root, 0644
#   /etc/hsm-driver/                                     root:hsm-driver, 0750
#   /etc/hsm-driver/hsm-driver.env                       root:hsm-driver, 0640
#   /etc/hsm-driver/credentials/                         root:root, 0700
#   /var/lib/hsm-driver/                                 hsm-driver:hsm-driver, 0700
#   /etc/systemd/system/hsm-driver.service.d/postgres.conf   root, 0644 (--postgres)
set -euo pipefail
umask 022 # folders made on the way (e.g. under --root) are 0755

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
bin=${BUILD_DIR:-$repo/build}/hsm-driver
postgres=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "install.sh: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --root)
      [ $# -ge 2 ] || die "--root needs a folder"
      root=$2
      shift 2
      ;;
    --bin)
      [ $# -ge 2 ] || die "--bin needs a path"
      bin=$2
      shift 2
      ;;
    --postgres)
      postgres=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

root=${root%/}
if [ -n "$root" ]; then
  case $root in /*) ;; *) die "--root/DESTDIR must be an absolute path, not '$root'" ;; esac
  mkdir -p "$root"
elif [ "$(id -u)" -ne 0 ]; then
  die "installing into / needs root (sudo $0), or give --root DIR"
fi
if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
  die "$bin: no executable binary there (build it with deploy/build.sh, or pass --bin)"
fi
unit_src=$repo/deploy/hsm-driver.service
env_src=$repo/deploy/hsm-driver.env.example
for f in "$unit_src" "$env_src"; do
  [ -f "$f" ] || die "$f: missing from the source tree"
done

user=hsm-driver
am_root=0
if [ "$(id -u)" -eq 0 ]; then am_root=1; fi

# -- the user and group ----------------------------------------------------------
# Ids are read from the target's own files, so that --root never looks at the
# host's users.
passwd_file=$root/etc/passwd
lookup_id() { # lookup_id FILE NAME -> the numeric id, or nothing
  if [ -f "$1" ]; then awk -F: -v n="$2" '$1 == n { print $3; exit }' "$1"; fi
}
if [ -z "$root" ] || [ -f "$passwd_file" ]; then
  if [ -n "$(lookup_id "$passwd_file" "$user")" ]; then
    echo "install.sh: user $user exists"
  elif [ "$am_root" -eq 1 ]; then
    prefix=()
    if [ -n "$root" ]; then prefix=(--prefix "$root"); fi
    useradd "${prefix[@]}" --system --user-group --home-dir /var/lib/hsm-driver \
      --no-create-home --shell /usr/sbin/nologin --comment "hsm-driver daemon" "$user" ||
      die "useradd $user failed"
    echo "install.sh: created system user and group $user"
  else
    echo "install.sh: not root: user $user not created in $passwd_file" >&2
  fi
else
  echo "install.sh: no $passwd_file: user $user not created (files stay the installing user's)" >&2
fi
uid=$(lookup_id "$passwd_file" "$user")
gid=$(lookup_id "$root/etc/group" "$user")

# place PATH MODE OWNER GROUP: sets the mode, and the owner when we may
# (owner and group are user names or "root"; ids come from the target).
place() {
  local path=$1 mode=$2 owner=$3 group=$4 o g
  chmod "$mode" "$path"
  [ "$am_root" -eq 1 ] || return 0
  case $owner in root) o=0 ;; *) o=$uid ;; esac
  case $group in root) g=0 ;; *) g=$gid ;; esac
  if [ -z "$o" ] || [ -z "$g" ]; then
    echo "install.sh: $path: no user $user in the target, left owned by root" >&2
    return 0
  fi
  chown "$o:$g" "$path"
}

dir() { # dir PATH MODE OWNER GROUP
  mkdir -p "$root$1"
  place "$root$1" "$2" "$3" "$4"
}

# -- folders -----------------------------------------------------------------------
dir /usr/local/bin 0755 root root
dir /usr/local/lib/systemd/system 0755 root root
dir /etc/hsm-driver 0750 root "$user"
dir /etc/hsm-driver/credentials 0700 root root
dir /var/lib/hsm-driver 0700 "$user" "$user"

# copy SRC DEST MODE: installs SRC as DEST (replacing it, so that a running
# binary is not written into), says whether it changed.
copy() {
  local src=$1 dest=$root$2 mode=$3 what=installed
  if [ -f "$dest" ]; then
    if cmp -s "$src" "$dest"; then what=unchanged; else what=updated; fi
  fi
  if [ "$what" != unchanged ]; then
    install -m "$mode" "$src" "$dest.new.$$"
    mv -f "$dest.new.$$" "$dest"
  fi
  place "$dest" "$mode" root root
  echo "install.sh: $2 $what"
}

copy "$bin" /usr/local/bin/hsm-driver 0755
copy "$unit_src" /usr/local/lib/systemd/system/hsm-driver.service 0644

env_file=/etc/hsm-driver/hsm-driver.env
if [ -e "$root$env_file" ]; then
  echo "install.sh: $env_file kept as it is"
else
  install -m 0640 "$env_src" "$root$env_file"
  place "$root$env_file" 0640 root "$user"
  echo "install.sh: $env_file created from deploy/hsm-driver.env.example: edit it"
fi

if [ "$postgres" -eq 1 ]; then
  dropin=/etc/systemd/system/hsm-driver.service.d/postgres.conf
  dir /etc/systemd/system/hsm-driver.service.d 0755 root root
  if [ -e "$root$dropin" ]; then
    echo "install.sh: $dropin kept as it is"
  else
    cat >"$root$dropin.new.$$" <<'EOF'
# Written by deploy/install.sh --postgres: the PostgreSQL key store's URL
# (with its password) as a systemd credential. Leave SQLITE_PATH unset.
[Service]
LoadCredential=postgres-url:/etc/hsm-driver/credentials/postgres-url
Environment=POSTGRES_URL_FILE=%d/postgres-url
EOF
    mv -f "$root$dropin.new.$$" "$root$dropin"
    place "$root$dropin" 0644 root root
    echo "install.sh: $dropin created"
  fi
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install.sh: systemd reloaded"
fi

# -- what is left ----------------------------------------------------------------------
# Each credential: present and private, or what to do.
creds=(user-pin client-key.pem)
if [ "$postgres" -eq 1 ] || [ -e "$root/etc/systemd/system/hsm-driver.service.d/postgres.conf" ]; then
  creds+=(postgres-url)
fi
todo=()
for c in "${creds[@]}"; do
  f=/etc/hsm-driver/credentials/$c
  if [ ! -e "$root$f" ]; then
    todo+=("$f")
  elif [ -n "$(find "$root$f" -maxdepth 0 -perm /077)" ]; then
    echo "install.sh: $f: group or others may read it: chmod 600 it" >&2
  fi
done

cat <<EOF

Next steps (as root):
  1. The secrets, one file each in /etc/hsm-driver/credentials/ (root's, 0600;
     systemd hands them to the driver, the hsm-driver user never reads them):
       umask 077
       cat >/etc/hsm-driver/credentials/user-pin           # the token's user PIN, one line
       cp driver.key.pem /etc/hsm-driver/credentials/client-key.pem
EOF
if [ "$postgres" -eq 1 ]; then
  cat <<'EOF'
       cat >/etc/hsm-driver/credentials/postgres-url       # postgresql://hsm:PASSWORD@db1,db2/keys?target_session_attrs=read-write
EOF
fi
cat <<EOF
  2. The vendor's CA and this driver's certificate chain (public):
       install -m 644 vendor-root.pem driver.chain.pem /etc/hsm-driver/
  3. Edit /etc/hsm-driver/hsm-driver.env (PKCS11_MODULE, HSM_TOKEN_LABEL, PROXY_ADDR, ...).
  4. systemctl enable --now hsm-driver && journalctl -u hsm-driver -f
EOF
if [ "${#todo[@]}" -gt 0 ]; then
  echo "Still missing: ${todo[*]}"
fi
