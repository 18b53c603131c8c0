#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests (issue 10: distributed search).
#
#   eval "$(bash .ci/postgres.sh start)"   # starts a server, prints `export` lines:
#                                          #   ARCHPASS_TEST_POSTGRES=postgresql+psycopg://postgres@127.0.0.1:PORT/archpass
#                                          #   ARCHPASS_TEST_POSTGRES_DIR=<temporary folder>
#   bash .ci/postgres.sh stop "$ARCHPASS_TEST_POSTGRES_DIR"   # stops it and removes the folder
#   bash .ci/postgres.sh run CMD [ARGS...]  # start, run CMD with the variables set, stop (always)
#
# The data directory, the unix socket and the log live in one temporary folder; the port
# is a free one.  Loopback connections by `postgres` are trusted; every other role needs
# a password (the role `archpass_pw`, password `archpass-test-pw`, owner of the database
# `archpass_pw`, exists so the tests can check what a wrong password looks like).  When the machine runs this as root, the
# server runs as the `postgres` user (initdb refuses root).  PostgreSQL is installed with
# apt only when no server binaries are found.
set -euo pipefail

find_bindir() {
    local d
    for d in ${PG_BINDIR:-} /usr/lib/postgresql/*/bin; do
        if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then
        # from / : the caller's folder may not be readable by the postgres user
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

start() {
    local bindir
    if ! bindir=$(find_bindir); then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            echo "postgres.sh: PostgreSQL not found; installing it with apt-get" >&2
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2
            bindir=$(find_bindir)
        else
            echo "postgres.sh: no PostgreSQL server binaries (initdb, pg_ctl) found; install postgresql" >&2
            return 1
        fi
    fi
    local dir port
    dir=$(mktemp -d "${TMPDIR:-/tmp}/archpass-pg.XXXXXX")
    chmod 755 "$dir"
    mkdir "$dir/data" "$dir/socket"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir/data" "$dir/socket"
        chmod 777 "$dir"  # the server writes its log here
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_server_user "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        return 1
    }
    cat >"$dir/data/pg_hba.conf" <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir/data/pg_hba.conf"
    as_server_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir/socket -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
        start >&2 || {
        cat "$dir/server.log" >&2
        return 1
    }
    as_server_user "$bindir/psql" -h "$dir/socket" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE DATABASE archpass" \
        -c "CREATE ROLE archpass_pw LOGIN PASSWORD 'archpass-test-pw'" \
        -c "CREATE DATABASE archpass_pw OWNER archpass_pw" >&2
    echo "$bindir" >"$dir/bindir"
    echo "export ARCHPASS_TEST_POSTGRES=postgresql+psycopg://postgres@127.0.0.1:$port/archpass"
    echo "export ARCHPASS_TEST_POSTGRES_DIR=$dir"
}

stop() {
    local dir=${1:-${ARCHPASS_TEST_POSTGRES_DIR:-}}
    if [ -z "$dir" ] || [ ! -f "$dir/bindir" ]; then
        echo "postgres.sh: no server folder given (stop DIR)" >&2
        return 1
    fi
    as_server_user "$(cat "$dir/bindir")/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}

run() {
    local exports
    exports=$(start)
    eval "$exports"
    trap 'stop "$ARCHPASS_TEST_POSTGRES_DIR"' EXIT
    "$@"
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 start | stop DIR | run CMD [ARGS...]" >&2; exit 2 ;;
esac
