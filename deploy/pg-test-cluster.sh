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
#
# A streaming standby, for failover drills (deploy/failover-drill.sh):
#
#   deploy/pg-test-cluster.sh start-standby DIR PRIMARY_DIR
#       a base backup of the running cluster PRIMARY_DIR, started as its
#       streaming standby (application_name `standby_<name of DIR>`), and
#       made the primary's synchronous standby (synchronous_standby_names);
#       waits until the primary reports it `sync`, prints its URL
#   deploy/pg-test-cluster.sh promote DIR  (the standby becomes a primary;
#       it has no synchronous standby of its own)
set -euo pipefail
cmd=${1:?start|stop|restart|kill|start-standby|promote}
dir=${2:?cluster folder}
bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)

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

# Starts the cluster in DIR on a free random port; prints its URL.
start_anywhere() {
  for _ in 1 2 3 4 5 6 7 8; do
    port=$((20000 + RANDOM % 40000))
    if start_on "$port" 2>/dev/null; then
      echo "$port" >"$dir/port"
      echo "postgresql://postgres@127.0.0.1:$port/postgres"
      return 0
    fi
  done
  echo "pg-test-cluster: could not start PostgreSQL (see $dir/server.log)" >&2
  return 1
}

make_dir() {
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
}

case $cmd in
  start)
    make_dir
    if [ ! -d "$dir/data" ]; then
      pg initdb -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    start_anywhere
    ;;
  start-standby)
    primary=${3:?primary cluster folder}
    pport=$(cat "$primary/port")
    name=standby_$(basename "$dir" | tr -c 'a-zA-Z0-9_\n' _)
    psql_primary=(pg psql -X -q -At -h 127.0.0.1 -p "$pport" -U postgres -d postgres)
    make_dir
    if [ ! -d "$dir/data" ]; then
      pg pg_basebackup -h 127.0.0.1 -p "$pport" -U postgres -D "$dir/data" \
        -X stream -R --checkpoint=fast >/dev/null
      # The copy must not wait for a synchronous standby of its own once
      # promoted, and names itself so that the primary can wait for it.
      auto=$dir/data/postgresql.auto.conf
      pg_conf=$(grep -v '^synchronous_standby_names' "$auto" || true)
      printf '%s\nprimary_conninfo = '\''host=127.0.0.1 port=%s user=postgres application_name=%s'\''\n' \
        "$pg_conf" "$pport" "$name" | "${as_user[@]}" tee "$auto" >/dev/null
    fi
    url=$(start_anywhere)
    "${psql_primary[@]}" -c "ALTER SYSTEM SET synchronous_standby_names = '\"$name\"'" \
      -c "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 1 300); do
      state=$("${psql_primary[@]}" -c \
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$name'")
      if [ "$state" = sync ]; then
        echo "$url"
        exit 0
      fi
      sleep 0.1
    done
    echo "pg-test-cluster: $name is not the primary's synchronous standby (see $dir/server.log)" >&2
    exit 1
    ;;
  promote)
    pg pg_ctl -D "$dir/data" -w -t 30 promote >/dev/null
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
    echo "usage: $0 start|stop|restart|kill DIR, start-standby DIR PRIMARY_DIR, promote DIR" >&2
    exit 2
    ;;
esac
