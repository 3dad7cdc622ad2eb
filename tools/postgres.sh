#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and benchmarks, from Debian's packages.
#
#   tools/postgres.sh start DIR PORT   initdb (if new) and start on 127.0.0.1:PORT; prints the URL
#   tools/postgres.sh stop DIR         fast shutdown
#
# Installs the `postgresql` package when its binaries are missing (CI on a fresh machine). The
# server runs as the `postgres` system user when started by root (PostgreSQL refuses root),
# listens on loopback only, trusts local connections, and keeps everything under DIR.
set -euo pipefail

cmd=${1:?usage: postgres.sh start DIR PORT | stop DIR}
dir=${2:?data directory}

bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    done
    return 1
}

if ! bin=$(bindir); then
    echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bin=$(bindir)
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    port=${3:?port}
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -U gateway --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=on" \
        start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    "$bin/psql" -h 127.0.0.1 -p "$port" -U gateway -d postgres -qtAc \
        "SELECT 1 FROM pg_database WHERE datname = 'gateway'" | grep -q 1 \
        || "$bin/createdb" -h 127.0.0.1 -p "$port" -U gateway gateway
    echo "postgresql://gateway@127.0.0.1:$port/gateway"
    ;;
stop)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
*)
    echo "usage: postgres.sh start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
