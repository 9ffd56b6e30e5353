#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for medadv's PostgreSQL tests and benchmarks.
#
#   eval "$(.ci/postgres.sh)"     # run it; it prints `export MEDADV_TEST_POSTGRES_URL=...` on stdout
#   source .ci/postgres.sh        # or source it (bash): exports MEDADV_TEST_POSTGRES_URL in your shell
#
# Installs Debian's `postgresql` when no server binaries are present (needs root), makes a cluster in
# $MEDADV_PG_DIR (default /var/tmp/medadv-postgres) owned by the `postgres` user (or by you when not
# root), listening on 127.0.0.1:$MEDADV_PG_PORT (default 55432) only, with trust authentication (the
# server is reachable from this machine only), and a database `medadv_test`. Idempotent: a second
# call reuses the running server; a stale or stopped cluster is started again. Logs go to stderr and
# $MEDADV_PG_DIR/server.log. Stop it with: pg_ctl -D "$MEDADV_PG_DIR" stop (as its owner).

_medadv_pg_main() (
    set -euo pipefail
    dir=${MEDADV_PG_DIR:-/var/tmp/medadv-postgres}
    port=${MEDADV_PG_PORT:-55432}
    db=medadv_test
    log() { echo "postgres.sh: $*" >&2; }

    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bindir" ] || [ ! -x "$bindir/pg_ctl" ]; then
        if [ "$(id -u)" != 0 ]; then
            log "PostgreSQL is not installed and this is not root: run as root, or apt-get install postgresql"
            exit 1
        fi
        log "installing postgresql (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends postgresql >&2
        bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi

    if [ "$(id -u)" = 0 ]; then
        owner=postgres
        as_owner() { runuser -u postgres -- "$@"; }
    else
        owner=$(id -un)
        as_owner() { "$@"; }
    fi
    cd /  # the owner may not be able to read the caller's working directory

    if [ ! -s "$dir/PG_VERSION" ]; then
        log "initdb $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        chown "$owner" "$dir"
        chmod 700 "$dir"
        as_owner "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >&2 ||
            as_owner "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >&2
    fi

    if ! as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        log "starting the server on 127.0.0.1:$port"
        as_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=100" start >&2 || {
            log "the server did not start; the end of $dir/server.log:"
            tail -n 20 "$dir/server.log" >&2 || true
            exit 1
        }
    fi

    psql=("$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1)
    if [ "$(as_owner "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
        log "creating database $db"
        as_owner "${psql[@]}" -c "CREATE DATABASE $db" >&2
    fi
    echo "export MEDADV_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$port/$db"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: export into the caller's shell
    _medadv_pg_out=$(_medadv_pg_main) && eval "$_medadv_pg_out"
    unset _medadv_pg_out
else
    _medadv_pg_main
fi
