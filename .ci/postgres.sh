#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the service tests and print its URL.
#
#   export CPP_TEST_DATABASE_URL="$(.ci/postgres.sh)"
#   pytest tests/service/test_store.py
#
# Installs PostgreSQL with apt-get when it is missing. Settings (all optional): PGPORT (default 55432),
# PGDATA_DIR (default /tmp/cpp-postgres), PGDATABASE_NAME (default cpp_test). Stop the server with
#   pg_ctl -D "$PGDATA_DIR" stop   (as the postgres user when run as root).
# Logs go to stderr; stdout holds only the URL.
set -euo pipefail

port="${PGPORT:-55432}"
datadir="${PGDATA_DIR:-/tmp/cpp-postgres}"
dbname="${PGDATABASE_NAME:-cpp_test}"
password="cpp-test"

# The directory of the newest server install (initdb ships with the server, not the client).
find_bin() { ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname; }

bindir="$(find_bin)"
if [[ -z "$bindir" ]]; then
  echo "installing PostgreSQL with apt-get" >&2
  sudo_cmd=""
  [[ "$(id -u)" -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y postgresql >&2
  bindir="$(find_bin)"
fi

# PostgreSQL refuses to run as root: use the postgres account then.
run() {
  if [[ "$(id -u)" -eq 0 ]]; then
    su postgres -s /bin/bash -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

if [[ ! -f "$datadir/PG_VERSION" ]]; then
  mkdir -p "$datadir"
  [[ "$(id -u)" -eq 0 ]] && chown postgres "$datadir"
  pwfile="$(mktemp)"
  echo "$password" >"$pwfile"
  [[ "$(id -u)" -eq 0 ]] && chown postgres "$pwfile"
  run "$bindir/initdb" -D "$datadir" -U postgres --auth=scram-sha-256 --pwfile="$pwfile" >&2
  rm -f "$pwfile"
fi

if ! run "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
  run "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w \
    -o "-h 127.0.0.1 -p $port -k $datadir -c max_connections=200 -c fsync=off" start >&2
fi

export PGPASSWORD="$password"
if ! "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$dbname'" \
    | grep -q 1; then
  "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$dbname" >&2
fi

echo "postgresql://postgres:${password}@127.0.0.1:${port}/${dbname}"
