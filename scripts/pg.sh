#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for the tests.
#
#   scripts/pg.sh start    install PostgreSQL if absent (apt-get), initdb the
#                          first time, start, create database relay_test,
#                          apply internal/store/schema.sql, print the URL;
#                          idempotent (already running is fine)
#   scripts/pg.sh install  only install PostgreSQL if absent (apt-get)
#   scripts/pg.sh stop     pg_ctl stop -m fast; idempotent
#   scripts/pg.sh status   exit 0 when the cluster is running
#   scripts/pg.sh env      print the export lines for the Go tests
#   scripts/pg.sh wipe     stop and delete the cluster
#
# stop/start keep the data directory, so a test may stop PostgreSQL and start
# it again with its data (RELAY_TEST_PG_SCRIPT points at this file).
#
# Settings (environment):
#   RELAY_TEST_STATE     state root (/tmp/relay-test); the cluster is in $RELAY_TEST_STATE/pg
#   RELAY_TEST_PG_PORT   port (25432)
#   RELAY_TEST_PG_HOST   address it listens on (127.0.0.1); any other address
#                        also admits clients of the networks it is directly on
#                        (pg_hba samenet): the cluster test's pods reach it so
#                        from inside the test's own network namespace
#   RELAY_TEST_PG_DB     database name (relay_test)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
SCHEMA="$REPO/internal/store/schema.sql"

STATE_ROOT="${RELAY_TEST_STATE:-/tmp/relay-test}"
STATE="$STATE_ROOT/pg"
DATA="$STATE/data"
SOCK="$STATE/sock"
LOGFILE="$STATE/postgres.log"
PORT="${RELAY_TEST_PG_PORT:-25432}"
HOST="${RELAY_TEST_PG_HOST:-127.0.0.1}"
DB="${RELAY_TEST_PG_DB:-relay_test}"
URL="postgres://postgres@$HOST:$PORT/$DB?sslmode=disable"

log() { echo "pg.sh: $*" >&2; }
die() { echo "pg.sh: $*" >&2; exit 1; }

find_bindir() {
	local d
	for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
		if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
			echo "$d"
			return 0
		fi
	done
	return 1
}

ensure_installed() {
	BINDIR="$(find_bindir || true)"
	if [ -z "$BINDIR" ]; then
		[ "$(id -u)" = 0 ] || die "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin and not root to apt-get install them"
		log "PostgreSQL not found; installing with apt-get"
		export DEBIAN_FRONTEND=noninteractive
		local try
		for try in 1 2; do
			{ apt-get update -qq && apt-get install -y -qq postgresql postgresql-client; } >&2 && break
			[ "$try" = 2 ] && die "apt-get install postgresql failed"
			log "apt-get failed; retrying in 5s"
			sleep 5
		done
		BINDIR="$(find_bindir)" || die "postgresql installed but initdb/pg_ctl still not found"
	fi
	PSQL="$BINDIR/psql"
	[ -x "$PSQL" ] || PSQL="$(command -v psql)" || die "psql not found"
}

# PostgreSQL refuses to run as root: as root, run the server tools as the
# 'postgres' system user (created by the Debian package).
as_pg() {
	if [ "$(id -u)" = 0 ]; then
		(cd / && runuser -u postgres -- "$@")
	else
		"$@"
	fi
}

prepare_dirs() {
	if [ "$(id -u)" = 0 ]; then
		id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
		mkdir -p "$STATE_ROOT"
		chmod 0755 "$STATE_ROOT"
		mkdir -p "$STATE" "$SOCK"
		chown postgres: "$STATE" "$SOCK"
		[ ! -e "$LOGFILE" ] || chown postgres: "$LOGFILE"
	else
		mkdir -p "$STATE" "$SOCK"
	fi
	chmod 0700 "$STATE"
	chmod 0755 "$STATE_ROOT" 2>/dev/null || true
}

is_running() {
	[ -f "$DATA/PG_VERSION" ] && as_pg "$BINDIR/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

psql_admin() {
	PGOPTIONS="-c client_min_messages=warning" "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U postgres "$@"
}

start() {
	ensure_installed
	prepare_dirs
	local t0=$SECONDS
	if [ ! -f "$DATA/PG_VERSION" ]; then
		log "initdb in $DATA"
		rm -rf "$DATA"
		as_pg "$BINDIR/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
			>"$STATE/initdb.log" 2>&1 || {
			cat "$STATE/initdb.log" >&2
			die "initdb failed"
		}
		# Loopback only, trust (initdb's pg_hba has host lines for 127.0.0.1
		# and ::1 only, plus the local socket). Durability is not wanted here.
		cat >>"$DATA/postgresql.conf" <<EOF

# scripts/pg.sh: throwaway test cluster
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
log_min_messages = warning
EOF
	fi
	if [ "$HOST" != 127.0.0.1 ] && ! grep -q '^host all all samenet trust$' "$DATA/pg_hba.conf"; then
		echo 'host all all samenet trust' >>"$DATA/pg_hba.conf"
	fi
	if is_running; then
		log "already running"
	else
		if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
			die "port $PORT on $HOST is taken by another process; set RELAY_TEST_PG_PORT"
		fi
		as_pg "$BINDIR/pg_ctl" start -D "$DATA" -l "$LOGFILE" -w -t 60 -o "-p $PORT -h $HOST" >/dev/null || {
			tail -n 30 "$LOGFILE" >&2 || true
			die "pg_ctl start failed (log: $LOGFILE)"
		}
		log "started in $((SECONDS - t0))s (port $PORT, log $LOGFILE)"
	fi
	if [ "$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
		psql_admin -d postgres -c "CREATE DATABASE \"$DB\""
	fi
	# The schema is CREATE ... IF NOT EXISTS throughout: safe on every start.
	psql_admin -d "$DB" -f "$SCHEMA" >/dev/null
	echo "$URL"
}

stop() {
	BINDIR="$(find_bindir || true)"
	if [ -z "$BINDIR" ] || [ ! -f "$DATA/PG_VERSION" ]; then
		log "not running"
		return 0
	fi
	if ! is_running; then
		log "not running"
		return 0
	fi
	local t0=$SECONDS
	as_pg "$BINDIR/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null
	log "stopped in $((SECONDS - t0))s"
}

print_env() {
	echo "export RELAY_TEST_DATABASE_URL='$URL'"
	echo "export RELAY_TEST_PG_SCRIPT=$SCRIPT"
}

case "${1:-}" in
install) ensure_installed ;;
start) start ;;
stop) stop ;;
status)
	BINDIR="$(find_bindir || true)"
	if [ -n "$BINDIR" ] && is_running; then
		echo "running at $URL"
		exit 0
	fi
	echo "not running"
	exit 1
	;;
env) print_env ;;
wipe)
	stop
	rm -rf "$STATE"
	log "wiped $STATE"
	;;
*)
	echo "usage: $0 install|start|stop|status|env|wipe" >&2
	exit 2
	;;
esac
