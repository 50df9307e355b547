#!/usr/bin/env bash
# pg.sh starts, stops and reports on a throwaway Postgres primary, a
# streaming replica of it and a pgbouncer in transaction mode in front of the
# primary, on loopback, for the tests that read DATABASE_PRIMARY_URL,
# DATABASE_REPLICA_URL and DATABASE_POOLER_URL (see README.md here).
#
#   pg.sh start  [dir]   start them (or reuse the healthy set in dir) and print
#                        DATABASE_PRIMARY_URL=..., DATABASE_REPLICA_URL=... and
#                        DATABASE_POOLER_URL=..., one a line
#   pg.sh stop   [dir]   stop them and remove dir
#   pg.sh status [dir]   print what runs; exit 1 unless all three are healthy
#
# dir defaults to $PG_REPLICA_DIR, else ${TMPDIR:-/tmp}/coherent-pgreplica.
# Settings (environment):
#   PG_REPLICA_PORT  first port to try (default 15432); the script takes the
#                    first three free ports from there on
#   PG_BIN           directory of initdb, pg_ctl and pg_basebackup (default:
#                    the newest /usr/lib/postgresql/*/bin)
#
# start prints the three lines on stdout and nothing else there, so
#   while read -r v; do export "$v"; done < <(integration/pgreplica/pg.sh start)
# works; progress and errors go to stderr. Postgres refuses to run as root:
# run as root, the script runs the servers and pgbouncer as the postgres
# user (runuser), and dir is handed to that user; run as postgres, it runs
# them itself. Everything lives in dir: primary/ and replica/ (data
# directories), sock/ (the servers' and pgbouncer's Unix sockets),
# pgbouncer.ini, userlist.txt, the logs and pids, and ports. Authentication
# is trust on loopback, for the postgres user only through pgbouncer. The
# servers run with fsync off: nothing here survives a crash of the machine,
# nor needs to. pgbouncer is installed with apt-get when missing (as root).
# A process counts as this set's only if it runs from dir, so stop never
# stops someone else's server (never the main Postgres on 5432).
set -euo pipefail

marker=.coherent-pgreplica # in dir: this script made it
first_port=${PG_REPLICA_PORT:-15432}
slot=coherent_replica

log() { echo "pgreplica: $*" >&2; }
die() {
	log "$*"
	exit 1
}

# pg_bin is the directory of the server binaries.
pg_bin() {
	if [ -n "${PG_BIN:-}" ]; then
		echo "$PG_BIN"
		return
	fi
	local d
	d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
	[ -x "$d/initdb" ] || die "no /usr/lib/postgresql/*/bin; set PG_BIN"
	echo "$d"
}

# as_pg runs a command as the postgres user.
as_pg() {
	if [ "$(id -u)" = 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ports() { cat "$dir/ports" 2>/dev/null || true; }
port_of() { # primary|replica|pooler
	local p
	read -r -a p <<<"$(ports)"
	case $1 in
	primary) echo "${p[0]:-}" ;;
	replica) echo "${p[1]:-}" ;;
	pooler) echo "${p[2]:-}" ;;
	esac
}

url() { echo "postgres://postgres@127.0.0.1:$1/postgres?sslmode=disable"; }

print_urls() {
	echo "DATABASE_PRIMARY_URL=$(url "$(port_of primary)")"
	echo "DATABASE_REPLICA_URL=$(url "$(port_of replica)")"
	echo "DATABASE_POOLER_URL=$(url "$(port_of pooler)")"
}

# sql runs a query on port and prints the result, unaligned.
sql() { # port, query
	PGCONNECT_TIMEOUT=3 psql -X -q -A -t -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2" 2>/dev/null
}

# pg_pid prints the postmaster's pid of a data directory of dir, if it runs.
pg_pid() { # primary|replica
	local pid
	pid=$(head -n 1 "$dir/$1/postmaster.pid" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
	[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir/$1" ] || return 1
	echo "$pid"
}

# bouncer_pid prints pgbouncer's pid if it runs with dir's configuration.
bouncer_pid() {
	local pid
	pid=$(cat "$dir/pgbouncer.pid" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "pgbouncer" || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/pgbouncer.ini" || return 1
	echo "$pid"
}

# healthy reports whether the primary accepts writes, the replica is in
# recovery and streams from it, and pgbouncer answers in front of the
# primary, all of them dir's.
healthy() {
	[ -s "$dir/ports" ] || return 1
	local p r b
	p=$(port_of primary)
	r=$(port_of replica)
	b=$(port_of pooler)
	pg_pid primary >/dev/null && pg_pid replica >/dev/null && bouncer_pid >/dev/null || return 1
	[ "$(sql "$p" "SELECT current_setting('data_directory') = '$dir/primary' AND NOT pg_is_in_recovery()")" = t ] || return 1
	[ "$(sql "$r" "SELECT current_setting('data_directory') = '$dir/replica' AND pg_is_in_recovery()")" = t ] || return 1
	[ "$(sql "$p" "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'coherent_replica' AND state = 'streaming'")" = 1 ] || return 1
	[ "$(sql "$b" "SELECT current_setting('data_directory') = '$dir/primary'")" = t ] || return 1
}

wait_until() { # seconds, what, command...
	local secs=$1 what=$2 i
	shift 2
	for i in $(seq "$((secs * 10))"); do
		if "$@"; then return 0; fi
		sleep 0.1
	done
	log "$what did not happen within ${secs}s"
	return 1
}

# stop_all stops whatever of dir still runs, and waits.
stop_all() {
	local pid i
	if pid=$(bouncer_pid); then
		kill -TERM "$pid" 2>/dev/null || true
		for i in $(seq 50); do
			bouncer_pid >/dev/null || break
			if [ "$i" -eq 30 ]; then
				log "pgbouncer (pid $pid) ignores SIGTERM; killing it"
				kill -9 "$pid" 2>/dev/null || true
			fi
			sleep 0.1
		done
	fi
	local bin
	bin=$(pg_bin)
	for d in replica primary; do
		if pid=$(pg_pid "$d"); then
			as_pg "$bin/pg_ctl" -D "$dir/$d" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
			if pid=$(pg_pid "$d"); then
				log "the $d (pid $pid) did not stop; killing it"
				kill -9 "$pid" 2>/dev/null || true
			fi
		fi
	done
}

# clean removes dir if this script made it.
clean() {
	[ -d "$dir" ] || return 0
	if [ -e "$dir/$marker" ]; then
		rm -rf -- "$dir"
	elif [ -z "$(ls -A "$dir")" ]; then
		rmdir -- "$dir"
	else
		die "$dir is not empty and was not made by this script; not removing it"
	fi
}

# pick_ports prints three free ports from first_port on.
pick_ports() {
	local p found=()
	for ((p = first_port; p <= 65535 && ${#found[@]} < 3; p++)); do
		in_use "$p" || found+=("$p")
	done
	[ "${#found[@]}" -eq 3 ] || return 1
	echo "${found[*]}"
}

ensure_pgbouncer() {
	command -v pgbouncer >/dev/null && return 0
	[ "$(id -u)" = 0 ] || die "pgbouncer is not installed, and only root can install it (apt-get install pgbouncer)"
	log "installing pgbouncer"
	# The package's own service is not wanted: policy-rc.d usually stops
	# it from starting in a container; if not, it listens on 6432, which
	# this script never uses.
	if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; } >"$dir/apt.log" 2>&1; then
		cat "$dir/apt.log" >&2
		die "apt-get install pgbouncer failed"
	fi
	command -v pgbouncer >/dev/null || die "pgbouncer still not found after apt-get install"
}

server_conf() { # port
	cat <<EOF

# pg.sh
port = $1
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
hot_standby = on
# The primary keeps the row versions the replica's queries still see, as
# read replicas are run: without it, vacuum on the primary cancels them
# (and even connections being set up) with "conflict with recovery".
hot_standby_feedback = on
fsync = off
shared_buffers = 32MB
max_connections = 200
log_line_prefix = '%m [%p] %a '
EOF
}

start_servers() {
	local bin p r
	bin=$(pg_bin)
	p=$(port_of primary)
	r=$(port_of replica)
	as_pg mkdir -p "$dir/sock"
	as_pg chmod 700 "$dir/sock"
	as_pg "$bin/initdb" -D "$dir/primary" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
		cat "$dir/initdb.log" >&2
		return 1
	}
	server_conf "$p" | as_pg tee -a "$dir/primary/postgresql.conf" >/dev/null
	# 9>&-: the servers and pgbouncer must not inherit the start lock, or
	# they hold it for as long as they run.
	as_pg "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w -t 60 start >/dev/null 9>&- || {
		tail -n 20 "$dir/primary.log" >&2
		return 1
	}
	# A replication slot keeps the WAL the replica has yet to receive.
	as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$p" -U postgres -D "$dir/replica" \
		-R -X stream -C -S "$slot" -c fast --no-sync >"$dir/basebackup.log" 2>&1 || {
		cat "$dir/basebackup.log" >&2
		return 1
	}
	# The copy of postgresql.conf names the primary's port: the last
	# setting wins. -R wrote primary_conninfo and standby.signal.
	server_conf "$r" | as_pg tee -a "$dir/replica/postgresql.conf" >/dev/null
	echo "primary_conninfo = 'host=127.0.0.1 port=$p user=postgres application_name=$slot'" |
		as_pg tee -a "$dir/replica/postgresql.auto.conf" >/dev/null
	as_pg "$bin/pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w -t 60 start >/dev/null 9>&- || {
		tail -n 20 "$dir/replica.log" >&2
		return 1
	}
}

start_bouncer() {
	local p b
	p=$(port_of primary)
	b=$(port_of pooler)
	as_pg tee "$dir/userlist.txt" >/dev/null <<<'"postgres" ""'
	# pool_mode = transaction: a server connection is the client's for one
	# transaction only. pgbouncer 1.18 (Debian 12) keeps no prepared
	# statements across that (max_prepared_statements came in 1.21), and
	# passes on no startup parameter but client_encoding, DateStyle,
	# TimeZone, standard_conforming_strings and application_name: others
	# are refused, except those ignored below (which then do not apply).
	# search_path is refused rather than ignored, so that a client relying
	# on it fails loudly.
	as_pg tee "$dir/pgbouncer.ini" >/dev/null <<EOF
[databases]
* = host=127.0.0.1 port=$p

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $b
unix_socket_dir = $dir/sock
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = 20
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
	as_pg pgbouncer -d "$dir/pgbouncer.ini" >/dev/null 2>"$dir/pgbouncer.err" 9>&- || {
		cat "$dir/pgbouncer.err" >&2
		tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null || true
		return 1
	}
}

cmd_start() {
	if healthy; then
		log "reusing the servers in $dir"
		print_urls
		return 0
	fi
	if [ -e "$dir/ports" ]; then
		log "removing the stale set in $dir"
		stop_all
	fi
	clean
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	touch "$dir/$marker"
	if [ "$(id -u)" = 0 ]; then
		chown postgres: "$dir"
		chmod 700 "$dir"
	fi
	as_pg test -w "$dir" || die "the postgres user cannot write $dir (nor reach it?)"
	ensure_pgbouncer
	local started=$SECONDS attempt
	# One start at a time picks ports, so that two starts do not pick the
	# same ones; a port taken by someone else meanwhile fails a start, and
	# the next attempt skips it.
	for attempt in 1 2 3; do
		if (
			flock -w 120 9 || die "another start holds ${TMPDIR:-/tmp}/coherent-pgreplica.lock"
			pick_ports >"$dir/ports" || die "no three free ports from $first_port on"
			log "primary on $(port_of primary), replica on $(port_of replica), pgbouncer on $(port_of pooler)"
			start_servers && start_bouncer
		) 9>"${TMPDIR:-/tmp}/coherent-pgreplica.lock"; then
			break
		fi
		log "could not start (attempt $attempt)"
		stop_all
		local keep
		keep=$(ls -A "$dir")
		as_pg rm -rf "$dir/primary" "$dir/replica" "$dir/sock"
		rm -f "$dir/ports" "$dir/pgbouncer.pid"
		[ "$attempt" -lt 3 ] || die "giving up; $dir held: $keep"
	done
	if ! wait_until 60 "streaming replication and pgbouncer" healthy; then
		tail -n 20 "$dir/primary.log" "$dir/replica.log" "$dir/pgbouncer.log" >&2 || true
		stop_all
		die "the servers did not become healthy"
	fi
	log "up in $((SECONDS - started))s"
	print_urls
}

cmd_stop() {
	if [ ! -d "$dir" ]; then
		log "nothing in $dir"
		return 0
	fi
	[ -e "$dir/$marker" ] || [ -z "$(ls -A "$dir")" ] || die "$dir was not made by this script"
	stop_all
	clean
	log "stopped"
}

cmd_status() {
	local rc=0 d pid
	if [ ! -s "$dir/ports" ]; then
		log "nothing in $dir"
		return 1
	fi
	for d in primary replica; do
		if pid=$(pg_pid "$d"); then
			echo "$d 127.0.0.1:$(port_of "$d") pid $pid recovery:$(sql "$(port_of "$d")" "SELECT pg_is_in_recovery()" || echo '?')"
		else
			echo "$d 127.0.0.1:$(port_of "$d") down"
			rc=1
		fi
	done
	if pid=$(bouncer_pid); then
		echo "pgbouncer 127.0.0.1:$(port_of pooler) pid $pid pool_mode:transaction"
	else
		echo "pgbouncer 127.0.0.1:$(port_of pooler) down"
		rc=1
	fi
	if [ "$rc" = 0 ] && healthy; then
		print_urls
	else
		rc=1
	fi
	return "$rc"
}

[ $# -ge 1 ] || die "usage: $0 start|stop|status [dir]"
if [ "$(id -u)" = 0 ]; then
	id postgres >/dev/null 2>&1 || die "there is no postgres user to run the servers as"
elif [ "$(id -un)" != postgres ]; then
	die "run as root (the servers then run as postgres) or as postgres"
fi
command -v psql >/dev/null || die "psql not found"
action=$1
dir=${2:-${PG_REPLICA_DIR:-${TMPDIR:-/tmp}/coherent-pgreplica}}
case $dir in
/*) ;;
*) dir=$PWD/$dir ;;
esac
if [ "$action" = start ]; then mkdir -p "$dir"; fi
if [ -d "$dir" ]; then dir=$(cd "$dir" && pwd -P); fi
[ "$dir" != / ] || die "refusing to use / as the servers' directory"

case $action in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) die "usage: $0 start|stop|status [dir]" ;;
esac
