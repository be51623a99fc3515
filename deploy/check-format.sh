#!/usr/bin/env bash
# Checks that every tracked C++ file (*.cpp, *.hpp) is formatted as the
# repository's .clang-format says. Changes nothing: lists the files that are
# not formatted and exits 1; fix them with `clang-format -i FILE...`.
#
# Usage: deploy/check-format.sh [-v]   (-v also prints clang-format's warnings)
# Needs clang-format (Debian 12: clang-format 14, see deploy/install-deps.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

verbose=0
case ${1:-} in
  -v) verbose=1 ;;
  "") ;;
  *) echo "usage: $0 [-v]" >&2; exit 2 ;;
esac

clang_format=${CLANG_FORMAT:-clang-format}
if ! command -v "$clang_format" >/dev/null; then
  echo "check-format: $clang_format not found (apt-get install clang-format)" >&2
  exit 2
fi
if [ ! -f .clang-format ]; then
  echo "check-format: no .clang-format in $root" >&2
  exit 2
fi

# a broken .clang-format would otherwise list every file
if ! err=$("$clang_format" --style=file --dump-config 2>&1 >/dev/null); then
  echo "check-format: .clang-format is not valid for $("$clang_format" --version):" >&2
  printf "%s\n" "$err" >&2
  exit 2
fi

files=()
while IFS= read -r -d '' f; do
  # a tracked file deleted in the work tree (mid-rename) has nothing to check
  if [ -f "$f" ]; then files+=("$f"); fi
done < <(git ls-files -z -- '*.cpp' '*.hpp')
if [ "${#files[@]}" -eq 0 ]; then
  echo "check-format: no tracked *.cpp/*.hpp files" >&2
  exit 2
fi

bad=()
for f in "${files[@]}"; do
  if ! out=$("$clang_format" --style=file --dry-run -Werror "$f" 2>&1); then
    bad+=("$f")
    if [ "$verbose" -eq 1 ]; then
      printf '%s\n' "$out"
    fi
  fi
done

if [ "${#bad[@]}" -ne 0 ]; then
  echo "check-format: ${#bad[@]} of ${#files[@]} files are not formatted" \
       "($("$clang_format" --version)):"
  printf '  %s\n' "${bad[@]}"
  echo "fix them with: clang-format -i FILE... (-v shows the differences)"
  exit 1
fi
echo "check-format: ${#files[@]} files formatted"
