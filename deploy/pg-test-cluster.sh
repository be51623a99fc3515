#!/usr/bin/env bash
# A private PostgreSQL cluster for tests: in a folder of its own, on a
# loopback port, run as a non-root user (`postgres` when started by root),
# trust authentication on 127.0.0.1 only, fsync off (a process crash loses
# nothing; only an OS crash would). Never for production.
#
#   deploy/pg-test-cluster.sh start DIR    prints the connection URL
#   deploy/pg-test-cluster.sh stop DIR
#   deploy/pg-test-cluster.sh restart DIR  (stop, then start on the same port)
#   deploy/pg-test-cluster.sh kill DIR     (immediate stop, like a crash)
set -euo pipefail
cmd=${1:?start|stop|restart|kill}
dir=${2:?cluster folder}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

as_user=()
if [ "$(id -u)" -eq 0 ]; then
  as_user=(runuser -u postgres --)
fi

pg() { "${as_user[@]}" "$bin/$1" "${@:2}"; }

start_on() {
  local port=$1
  pg pg_ctl -D "$dir/data" -l "$dir/server.log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c full_page_writes=off" \
    start >/dev/null
}

case $cmd in
  start)
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
    if [ ! -d "$dir/data" ]; then
      pg initdb -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    for _ in 1 2 3 4 5 6 7 8; do
      port=$((20000 + RANDOM % 40000))
      if start_on "$port" 2>/dev/null; then
        echo "$port" >"$dir/port"
        echo "postgresql://postgres@127.0.0.1:$port/postgres"
        exit 0
      fi
    done
    echo "pg-test-cluster: could not start PostgreSQL (see $dir/server.log)" >&2
    exit 1
    ;;
  stop)
    pg pg_ctl -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
  kill)
    pg pg_ctl -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    ;;
  restart)
    pg pg_ctl -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    start_on "$(cat "$dir/port")"
    ;;
  *)
    echo "usage: $0 start|stop|restart|kill DIR" >&2
    exit 2
    ;;
esac
