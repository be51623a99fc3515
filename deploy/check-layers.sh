#!/usr/bin/env bash
# Checks that project includes point one way only (DESIGN.md, "Layout"):
#
#   messages <- runtime platform (base <- crypto <- pkcs11, net) and store
#            <- runtime/keys <- actors <- runtime/app
#
# A file in folder F may include a project header ("messages/...",
# "runtime/...", "store/...", "actors/...") only from F itself or from a
# folder of lower rank; two different folders of the same rank may not include
# each other. messages/ may include only CAF ("caf/..."), standard headers
# (<name> without a dot or a slash, or a C header like <stdint.h>) and
# messages/. A source file outside the folders of the table, or directly
# under runtime/, is an error too.
# tests/ and bench/ are exempt; "caf/..." is third party.
#
# Usage: deploy/check-layers.sh [--graph] [ROOT]
#   prints the folder graph ("A -> B  n": n includes from A into B, A != B),
#   then every violation as "file:line: A includes B (points up)"; exits 1 if
#   there is any. --graph prints the graph only and exits 0. ROOT defaults to
#   the checkout this script lives in.
# Plain bash, find and awk (mawk is enough): runs on a bare Debian.
set -euo pipefail

graph_only=0
root=
for arg in "$@"; do
  case $arg in
    --graph) graph_only=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) echo "check-layers: unknown option $arg" >&2; exit 2 ;;
    *) root=$arg ;;
  esac
done
root=${root:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root"

# Every C/C++ file under the layered folders (tracked or not: a new file that
# is not yet added is checked too).
files=()
while IFS= read -r f; do
  files+=("$f")
done < <(find messages runtime store actors -type f \
           \( -name '*.hpp' -o -name '*.cpp' -o -name '*.h' -o -name '*.cc' \
              -o -name '*.ipp' \) 2>/dev/null | LC_ALL=C sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "check-layers: no sources under $root/{messages,runtime,store,actors}" >&2
  exit 2
fi

LC_ALL=C awk -v graph_only="$graph_only" '
BEGIN {
  # folder -> rank; lower may never include higher
  n = split("messages:0 runtime/base:1 runtime/crypto:2 runtime/pkcs11:3 " \
            "runtime/net:3 store:3 runtime/keys:4 actors:5 runtime/app:6",
            table, " ")
  for (i = 1; i <= n; i++) {
    split(table[i], kv, ":")
    rank[kv[1]] = kv[2] + 0
    order[i] = kv[1]
  }
  nfolders = n
  # the C standard library headers, for messages/ (<cstdint> is preferred)
  n = split("assert ctype errno fenv float inttypes limits locale math " \
            "setjmp signal stdarg stdbool stddef stdint stdio stdlib string " \
            "time uchar wchar wctype", cnames, " ")
  for (i = 1; i <= n; i++)
    c_std[cnames[i] ".h"] = 1
  errors = 0
}

# The layer folder of a path: the longest table entry that is a prefix of it,
# or "" when there is none (runtime/x.hpp, runtime/other/x.hpp, ...).
function folder_of(path,    i, f, best) {
  best = ""
  for (i = 1; i <= nfolders; i++) {
    f = order[i]
    if (substr(path, 1, length(f) + 1) == f "/" && length(f) > length(best))
      best = f
  }
  return best
}

# Where a folder-less path points, for messages: "runtime/" for a file
# directly under runtime/, else its first two components.
function raw_folder(path,    parts, k) {
  k = split(path, parts, "/")
  if (k <= 2)
    return parts[1] "/"
  return parts[1] "/" parts[2]
}

function violation(line, text) {
  violations[++errors] = FILENAME ":" line ": " text
}

FILENAME != current {
  current = FILENAME
  from = folder_of(FILENAME)
  if (from == "")
    violations[++errors] = FILENAME ": " raw_folder(FILENAME) \
                           " is not a layer folder (see deploy/check-layers.sh)"
}

/^[ \t]*#[ \t]*include[ \t]*[<"]/ {
  inc = $0
  sub(/^[ \t]*#[ \t]*include[ \t]*/, "", inc)
  quoted = substr(inc, 1, 1) == "\""
  if (quoted)
    sub(/^"/, "", inc)
  else
    sub(/^</, "", inc)
  sub(/[">].*$/, "", inc)
  split(inc, parts, "/")
  first = parts[1]
  project = quoted && (first == "messages" || first == "runtime" \
                       || first == "store" || first == "actors")
  if (!project) {
    # messages/ stands on CAF and the standard library only.
    if (from == "messages") {
      std = !quoted && (inc !~ /[.\/]/ || inc in c_std)
      caf = first == "caf"
      if (!std && !caf)
        violation(FNR, "messages includes " (quoted ? "\"" inc "\"" : "<" inc ">") \
                  " (messages may include only caf/, standard and messages/ headers)")
    }
    next
  }
  to = folder_of(inc)
  if (to == "") {
    violation(FNR, (from == "" ? raw_folder(FILENAME) : from) " includes " inc \
              " (not in a layer folder)")
    next
  }
  if (from == "")
    next  # already reported once for the file
  if (from != to)
    edges[from " -> " to]++
  if (from == to || rank[to] < rank[from])
    next
  if (rank[to] == rank[from])
    violation(FNR, from " includes " to " (same rank " rank[from] ")")
  else
    violation(FNR, from " includes " to " (points up)")
}

END {
  print "folder graph (includes from A into B, A != B):"
  for (i = nfolders; i >= 1; i--)
    for (j = nfolders; j >= 1; j--) {
      e = order[i] " -> " order[j]
      if (e in edges)
        printf "  %-34s %d\n", e, edges[e]
    }
  if (graph_only)
    exit 0
  if (errors == 0) {
    print "check-layers: ok, includes point one way"
    exit 0
  }
  print ""
  for (i = 1; i <= errors; i++)
    print violations[i]
  printf "check-layers: %d violation(s)\n", errors
  exit 1
}
' "${files[@]}"
