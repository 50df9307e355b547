#!/usr/bin/env bash
# cluster.sh starts, stops and reports on a throwaway Redis Cluster on
# loopback, for the tests that read REDIS_CLUSTER_ADDRS (see README.md here).
#
#   cluster.sh start  [dir]   start the cluster (or reuse the healthy one in
#                             dir) and print REDIS_CLUSTER_ADDRS=host:port,...
#   cluster.sh stop   [dir]   shut its nodes down and remove dir
#   cluster.sh status [dir]   print each node's role and state; exit 1 unless
#                             the cluster in dir is healthy
#
# dir defaults to $REDIS_CLUSTER_DIR, else ${TMPDIR:-/tmp}/coherent-rediscluster.
# Settings (environment):
#   REDIS_CLUSTER_PORT      first port to try (default 7000); the script takes
#                           the first block of free ports from there on
#   REDIS_CLUSTER_MASTERS   number of masters (default 3)
#   REDIS_CLUSTER_REPLICAS  replicas per master (default 1)
#
# start prints REDIS_CLUSTER_ADDRS=... on stdout and nothing else there, so
#   export "$(integration/rediscluster/cluster.sh start)"
# works; progress and errors go to stderr. Every node runs without
# persistence, as a daemon, with its files (nodes-PORT.conf, PORT.log,
# PORT.pid) in dir. cluster-node-timeout is 2s rather than 15s: a replica
# can fail over again only 4 node timeouts after its last election, and
# the fault tests fail shards over and back. A node counts as this cluster's only if its
# CONFIG GET dir is dir, so stop never shuts down someone else's Redis.
set -euo pipefail

marker=.coherent-rediscluster # in dir: this script made it
masters=${REDIS_CLUSTER_MASTERS:-3}
replicas=${REDIS_CLUSTER_REPLICAS:-1}
first_port=${REDIS_CLUSTER_PORT:-7000}
count=$((masters * (1 + replicas)))

log() { echo "rediscluster: $*" >&2; }
die() {
	log "$*"
	exit 1
}

cli() { # port, command...
	local port=$1
	shift
	redis-cli -h 127.0.0.1 -p "$port" "$@"
}

# in_use reports whether something listens on 127.0.0.1:port.
in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ours reports whether the Redis on port runs from dir.
ours() {
	local got
	got=$(timeout 2 redis-cli -h 127.0.0.1 -p "$1" config get dir 2>/dev/null | sed -n 2p) || return 1
	[ "$got" = "$dir" ]
}

ports() { cat "$dir/ports" 2>/dev/null || true; }

addrs() {
	local p out=""
	for p in $(ports); do out="$out,127.0.0.1:$p"; done
	echo "${out#,}"
}

# healthy reports whether every node of dir's cluster is ours, sees the
# cluster as ok, knows every other node without failure flags, and every
# replica's link to its master is up.
healthy() {
	local p n
	[ -s "$dir/ports" ] || return 1
	n=$(ports | wc -w)
	for p in $(ports); do
		ours "$p" || return 1
		cli "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
		[ "$(cli "$p" cluster nodes 2>/dev/null | grep -c ' connected')" -eq "$n" ] || return 1
		if cli "$p" cluster nodes 2>/dev/null | grep -Eq 'fail|handshake|noaddr'; then return 1; fi
		if cli "$p" info replication 2>/dev/null | grep -q '^role:slave'; then
			cli "$p" info replication | grep -q '^master_link_status:up' || return 1
		fi
	done
	local m=0
	for p in $(ports); do
		if cli "$p" info replication 2>/dev/null | grep -q '^role:master'; then m=$((m + 1)); fi
	done
	[ "$m" -eq "$masters" ]
}

wait_healthy() { # seconds
	local i
	for i in $(seq "$(($1 * 10))"); do
		if healthy; then return 0; fi
		sleep 0.1
	done
	return 1
}

# pid_of_ours prints the pid in dir/PORT.pid if that process is a
# redis-server whose working directory is dir (Redis chdirs to its dir).
pid_of_ours() {
	local pid
	pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
	[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir" ] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q redis-server || return 1
	echo "$pid"
}

# shutdown_nodes stops every node of dir that is still running, and waits.
shutdown_nodes() {
	local p pid i
	for p in $(ports); do
		if ours "$p"; then
			cli "$p" shutdown nosave >/dev/null 2>&1 || true
		fi
	done
	for p in $(ports); do
		for i in $(seq 50); do
			pid=$(pid_of_ours "$p") || break
			if [ "$i" -eq 30 ]; then
				log "node $p (pid $pid) ignores SHUTDOWN; killing it"
				kill -9 "$pid" 2>/dev/null || true
			fi
			sleep 0.1
		done
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

# pick_ports prints the first block of count ports from first_port on whose
# ports and cluster bus ports (port + 10000) are all free.
pick_ports() {
	local base p ok
	for ((base = first_port; base + count <= 55535; base += count)); do
		ok=1
		for ((p = base; p < base + count; p++)); do
			if in_use "$p" || in_use "$((p + 10000))"; then
				ok=0
				break
			fi
		done
		if [ "$ok" = 1 ]; then
			seq "$base" "$((base + count - 1))" | xargs
			return 0
		fi
	done
	return 1
}

start_nodes() {
	local p i
	for p in $(ports); do
		redis-server --port "$p" --bind 127.0.0.1 --daemonize yes \
			--dir "$dir" --logfile "$dir/$p.log" --pidfile "$dir/$p.pid" \
			--dbfilename "dump-$p.rdb" --save "" --appendonly no \
			--cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
			--cluster-node-timeout 2000 \
			--repl-diskless-sync yes --repl-diskless-sync-delay 0 >/dev/null 9>&-
	done
	for p in $(ports); do
		for i in $(seq 100); do
			if ours "$p"; then break; fi
			if [ "$i" -eq 100 ]; then
				log "node $p did not come up; its log:"
				tail -n 20 "$dir/$p.log" >&2 || true
				return 1
			fi
			sleep 0.1
		done
	done
}

cmd_start() {
	if healthy; then
		log "reusing the cluster in $dir"
		echo "REDIS_CLUSTER_ADDRS=$(addrs)"
		return 0
	fi
	if [ -e "$dir/ports" ]; then
		log "removing the stale cluster in $dir"
		shutdown_nodes
	fi
	clean
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd -P)
	touch "$dir/$marker"
	# One start at a time picks ports, so that two starts do not pick the
	# same ones; a port taken by someone else meanwhile fails start_nodes,
	# and the next attempt skips it.
	local attempt
	for attempt in 1 2 3; do
		(
			flock -w 120 9 || die "another start holds ${TMPDIR:-/tmp}/coherent-rediscluster.lock"
			pick_ports >"$dir/ports" || die "no free block of $count ports from $first_port on"
			start_nodes
		) 9>"${TMPDIR:-/tmp}/coherent-rediscluster.lock" && break
		log "could not start the nodes (attempt $attempt)"
		shutdown_nodes
		rm -f "$dir/ports"
		[ "$attempt" -lt 3 ] || die "giving up"
	done
	local list=()
	local p
	for p in $(ports); do list+=("127.0.0.1:$p"); done
	log "creating a cluster of ${list[*]}"
	if ! redis-cli --cluster create "${list[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log" 2>&1; then
		cat "$dir/create.log" >&2
		shutdown_nodes
		die "redis-cli --cluster create failed"
	fi
	if ! wait_healthy 60; then
		for p in $(ports); do
			log "node $p:"
			cli "$p" cluster nodes >&2 || true
		done
		shutdown_nodes
		die "the cluster did not become healthy within 60s"
	fi
	log "up: $(addrs)"
	echo "REDIS_CLUSTER_ADDRS=$(addrs)"
}

cmd_stop() {
	if [ ! -d "$dir" ]; then
		log "nothing in $dir"
		return 0
	fi
	[ -e "$dir/$marker" ] || [ -z "$(ls -A "$dir")" ] || die "$dir was not made by this script"
	shutdown_nodes
	clean
	log "stopped"
}

cmd_status() {
	local p role state rc=0
	if [ ! -s "$dir/ports" ]; then
		log "no cluster in $dir"
		return 1
	fi
	for p in $(ports); do
		if ! ours "$p"; then
			echo "127.0.0.1:$p down"
			rc=1
			continue
		fi
		role=$(cli "$p" info replication | sed -n 's/^role:\([a-z]*\).*/\1/p')
		state=$(cli "$p" cluster info | sed -n 's/^cluster_state:\([a-z]*\).*/\1/p')
		echo "127.0.0.1:$p $role cluster_state:$state"
	done
	if [ "$rc" = 0 ] && healthy; then
		echo "REDIS_CLUSTER_ADDRS=$(addrs)"
	else
		rc=1
	fi
	return "$rc"
}

[ $# -ge 1 ] || die "usage: $0 start|stop|status [dir]"
command -v redis-server >/dev/null || die "redis-server not found"
command -v redis-cli >/dev/null || die "redis-cli not found"
action=$1
dir=${2:-${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/coherent-rediscluster}}
case $dir in
/*) ;;
*) dir=$PWD/$dir ;;
esac
if [ "$action" = start ]; then mkdir -p "$dir"; fi
if [ -d "$dir" ]; then dir=$(cd "$dir" && pwd -P); fi
[ "$dir" != / ] || die "refusing to use / as the cluster's directory"

case $action in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) die "usage: $0 start|stop|status [dir]" ;;
esac
