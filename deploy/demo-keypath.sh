#!/usr/bin/env bash
# The key path end to end on the embedded default: a SoftHSMv2 token and a
# SQLite key store under a data folder. Creates the token and its master key
# (first run only), runs the capability probe, generates a key per served
# scheme, signs, and verifies each signature with the openssl command line
# against the public key the driver printed.
#
# Usage: deploy/demo-keypath.sh [DATA_DIR]   (default: ./hsm-driver-data)
# Needs: a build (deploy/build.sh). PINs are random, kept in 0600 files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${HSM_DRIVER_BIN:-$root/build/hsm-driver}
data=$(mkdir -p "${1:-$root/hsm-driver-data}" && cd "${1:-$root/hsm-driver-data}" && pwd)
umask 077

export SOFTHSM2_CONF=$data/softhsm2.conf
export PKCS11_MODULE=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export HSM_TOKEN_LABEL=hsm-driver-dev
export SQLITE_PATH=$data/keys.db
export USER_PIN_FILE=$data/user.pin
export HSM_LOG_LEVEL=${HSM_LOG_LEVEL:-error}
unset USER_PIN

if [ ! -f "$SOFTHSM2_CONF" ]; then
  mkdir -p "$data/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$data/tokens" >"$SOFTHSM2_CONF"
  openssl rand -hex 12 >"$data/user.pin"
  openssl rand -hex 12 >"$data/so.pin"
  echo "== creating token '$HSM_TOKEN_LABEL' and its master key under $data"
  SO_PIN_FILE=$data/so.pin "$bin" token init
  "$bin" master-key init
fi

echo "== capability probe"
"$bin" probe | jq -c '.schemes[]'

hexdec() { tr 'a-f' 'A-F' | basenc -d --base16; }

# DER SubjectPublicKeyInfo prefixes for an uncompressed EC point.
spki_prefix() {
  case $1 in
    secp256k1) echo 3056301006072a8648ce3d020106052b8104000a034200 ;;
    p256) echo 3059301306072a8648ce3d020106082a8648ce3d030107034200 ;;
    ed25519) echo 302a300506032b6570032100 ;;
  esac
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
served=$("$bin" probe | jq -r '.schemes[] | select(.served) | .scheme')
for scheme in $served ed25519; do
  flags=()
  if [ "$scheme" = ed25519 ]; then
    if echo "$served" | grep -qx ed25519; then continue; fi
    echo "== ed25519 is not wrappable on this token: token-resident opt-in"
    flags=(--resident-schemes ed25519)
  fi
  key_id="demo-$scheme"
  echo "== $scheme: generate key '$key_id'"
  "$bin" "${flags[@]}" keys generate --scheme "$scheme" --key-id "$key_id" >"$work/key.json"
  jq -c '.key | {key_id, scheme, public_key, public_key_compressed, storage, created} | with_entries(select(.value != null))' "$work/key.json"
  pub=$(jq -r .key.public_key "$work/key.json")
  if [ "$scheme" = ed25519 ]; then
    printf 'hello from hsm-driver' >"$work/payload"
  else
    printf 'hello from hsm-driver' | openssl dgst -sha256 -binary >"$work/payload"
  fi
  payload_hex=$(od -An -v -tx1 "$work/payload" | tr -d ' \n')
  "$bin" "${flags[@]}" keys sign --key-id "$key_id" --payload "$payload_hex" >"$work/sig.json"
  jq -c '.signature | {signature, recovery_id, der} | with_entries(select(.value != null))' "$work/sig.json"
  { spki_prefix "$scheme" | hexdec; echo -n "$pub" | hexdec; } >"$work/pub.der"
  openssl pkey -pubin -inform DER -in "$work/pub.der" -out "$work/pub.pem"
  if [ "$scheme" = ed25519 ]; then
    jq -r .signature.signature "$work/sig.json" | tr -d '\n' | hexdec >"$work/sig.bin"
    verify=(openssl pkeyutl -verify -pubin -inkey "$work/pub.pem" -rawin -in "$work/payload" -sigfile "$work/sig.bin")
  else
    jq -r .signature.der "$work/sig.json" | tr -d '\n' | hexdec >"$work/sig.bin"
    verify=(openssl pkeyutl -verify -pubin -inkey "$work/pub.pem" -in "$work/payload" -sigfile "$work/sig.bin")
  fi
  if "${verify[@]}" >/dev/null; then
    echo "   openssl: signature verified against the printed public key"
  else
    echo "   openssl: SIGNATURE DID NOT VERIFY" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] && echo "== all signatures verified" || exit 1
