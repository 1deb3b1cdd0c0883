#!/usr/bin/env bash
# A throwaway PostgreSQL server (Debian's postgresql-15) for tests and local
# trials of the scale-out mode: its own cluster in DIR, on a free loopback
# port, trust authentication for the user "tlserve", one database "tlserve".
# PostgreSQL refuses to run as root: as root the server runs as the
# "postgres" user (DIR is handed to it, so it must be reachable: e.g. a
# directory made by mktemp -d directly under /tmp).
#   scripts/pg-temp.sh start DIR    prints the URI: postgresql://tlserve@127.0.0.1:PORT/tlserve
#   scripts/pg-temp.sh stop DIR     stops it at once and deletes DIR
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
cmd=$1
dir=$(readlink -f "$2")
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bindir/initdb" ] || { echo "pg-temp: no PostgreSQL server (apt install postgresql-15)" >&2; exit 1; }
as_owner=()
if [ "$(id -u)" -eq 0 ]; then as_owner=(runuser -u postgres --); fi

case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir"
    "${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -A trust -U tlserve -E UTF8 --locale=C.UTF-8 \
      --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # A free port, asked of the kernel; another process may take it before
    # the server binds it, so a failed start tries another.
    for attempt in 1 2 3 4 5; do
      port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
      if "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null 2>&1; then
        "$bindir/createdb" -h 127.0.0.1 -p "$port" -U tlserve tlserve
        echo "postgresql://tlserve@127.0.0.1:$port/tlserve"
        exit 0
      fi
    done
    echo "pg-temp: the server did not start; its log:" >&2
    tail -20 "$dir/server.log" >&2
    exit 1
    ;;
  stop)
    if [ -d "$dir/data" ]; then
      "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
