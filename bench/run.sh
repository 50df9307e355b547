#!/usr/bin/env bash
# Runs every benchmark of issue 7 and regenerates the tables and charts of
# BENCHMARKS.md.
#
#   bench/run.sh [-quick] [-out DIR] [-svg DIR] [-only STEP,...]
#
#   -quick    each benchmark once, briefly (for CI): -benchtime=1x for Go
#             benchmarks, -quick for the programs
#   -out DIR  where the raw outputs, tables.md and the JSON go
#             (default: a new temporary directory, printed at the end)
#   -svg DIR  where readpath.svg and fanout.svg go (default: bench/ for a
#             full run, the -out directory for -quick, so that a quick run
#             leaves the committed charts alone)
#   -only S   run only these steps (comma-separated: readpath, readpath-c8,
#             readpath-rate, readpath-procs1, hitpath, fanout, hotkeys, size,
#             writepath, stampede, replica)
#             into an -out DIR of an earlier run, and regenerate its tables
#             and charts from what the DIR then holds
#
# Needs Postgres and Redis (DATABASE_URL, REDIS_URL, or the local defaults);
# the replica step uses DATABASE_PRIMARY_URL and DATABASE_REPLICA_URL, or
# starts a primary and a replica of its own with integration/pgreplica/pg.sh;
# wrk, if installed, cross-checks the read path; benchstat, if installed,
# summarises the hit path. Every step records the load average beside its
# output, in tables.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
out=""
svg=""
only=""
while [ $# -gt 0 ]; do
	case "$1" in
	-quick) quick=1 ;;
	-out) out=$2; shift ;;
	-svg) svg=$2; shift ;;
	-only) only=",$2,"; shift ;;
	*) echo "usage: bench/run.sh [-quick] [-out DIR] [-svg DIR] [-only STEP,...]" >&2; exit 2 ;;
	esac
	shift
done
if [ -z "$out" ]; then out=$(mktemp -d "${TMPDIR:-/tmp}/coherent-bench.XXXXXX"); fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "$svg" ]; then
	if [ "$quick" = 1 ]; then svg=$out; else svg=bench; fi
fi
mkdir -p "$svg"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

tables=$out/tables.md
load() { cut -d' ' -f1-3 /proc/loadavg; }

# step NAME COMMAND...: runs COMMAND with its output in $out/NAME.txt and
# its errors in $out/NAME.log, and notes the command and the load in
# $out/steps.tsv (replacing an earlier line of NAME).
step() {
	local name=$1
	shift
	if [ -n "$only" ] && [[ $only != *",$name,"* ]]; then return 0; fi
	echo "bench: $name: $*" >&2
	local before after
	before=$(load)
	"$@" >"$out/$name.txt" 2>"$out/$name.log" || {
		echo "bench: $name failed:" >&2
		cat "$out/$name.log" >&2
		exit 1
	}
	after=$(load)
	grep -v "^$name	" "$out/steps.tsv" >"$out/steps.tsv.new" || true
	printf '%s\t%s\t%s\t%s\n' "$name" "$before" "$after" "$*" >>"$out/steps.tsv.new"
	mv "$out/steps.tsv.new" "$out/steps.tsv"
}

# The replica step's servers: the ones named, else a set of this run's own,
# stopped on exit.
pg_dir=""
need_replica() {
	[ -z "$only" ] || [[ $only == *",replica,"* ]]
}
if need_replica && [ -z "${DATABASE_PRIMARY_URL:-}${DATABASE_REPLICA_URL:-}" ]; then
	pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/coherent-bench-pg.XXXXXX")
	trap 'integration/pgreplica/pg.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
	pg_env=$(integration/pgreplica/pg.sh start "$pg_dir")
	while read -r v; do export "${v?}"; done <<<"$pg_env"
fi

if [ -z "$only" ]; then : >"$out/steps.tsv"; else touch "$out/steps.tsv"; fi
if [ "$quick" = 1 ]; then
	bt=(-benchtime=1x -count=1)
	step readpath go run ./bench/readpath -quick -json "$out/readpath.json"
	step hitpath go test -run '^$' -bench . "${bt[@]}" ./bench/hitpath
	step fanout go run ./bench/fanout -quick -json "$out/fanout.json"
	step hotkeys go run ./bench/hotkeys -quick -json "$out/hotkeys.json"
	step size go run ./bench/size -quick -json "$out/size.json"
	step writepath go test -run '^$' -bench WritePathVsRaw "${bt[@]}" ./store
	step stampede go test -run '^$' -bench Stampede "${bt[@]}" ./bench/stampede
	step replica go test -run '^$' -bench ReplicaReadPath "${bt[@]}" ./store
else
	wrk=()
	if command -v wrk >/dev/null; then wrk=(-wrk); fi
	step readpath go run ./bench/readpath "${wrk[@]}" -json "$out/readpath.json"
	step readpath-c8 go run ./bench/readpath -concurrency 8 -json "$out/readpath-c8.json"
	step readpath-rate go run ./bench/readpath -rate 15000 -json "$out/readpath-rate.json"
	step readpath-procs1 env GOMAXPROCS=1 go run ./bench/readpath -json "$out/readpath-procs1.json"
	step hitpath go test -run '^$' -bench . -count 6 ./bench/hitpath
	step fanout go run ./bench/fanout -json "$out/fanout.json"
	step hotkeys go run ./bench/hotkeys -json "$out/hotkeys.json"
	step size go run ./bench/size -json "$out/size.json"
	step writepath go test -run '^$' -bench WritePathVsRaw -benchtime=2000x -count=6 ./store
	step stampede go test -run '^$' -bench Stampede -benchtime=20x -count=3 ./bench/stampede
	step replica go test -run '^$' -bench ReplicaReadPath -benchtime=2s -count=6 ./store
fi

echo "bench: charts in $svg" >&2
charts=()
if [ -f "$out/readpath.json" ]; then charts+=(-readpath "$out/readpath.json"); fi
if [ -f "$out/readpath-rate.json" ]; then charts+=(-readpath-paced "$out/readpath-rate.json"); fi
if [ -f "$out/fanout.json" ]; then charts+=(-fanout "$out/fanout.json"); fi
go run ./bench/chart "${charts[@]}" -dir "$svg"

# The tables.
{
	echo "# Benchmark tables ($(date -u +%Y-%m-%dT%H:%MZ)$([ "$quick" = 1 ] && echo ', -quick'))"
	echo
	echo "## Machine"
	echo
	echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
	echo "- $(go version)"
	if command -v psql >/dev/null; then
		echo "- Postgres $(psql "$DATABASE_URL" -Atc 'SHOW server_version' 2>/dev/null || echo '?')"
	fi
	if command -v redis-cli >/dev/null; then
		echo "- Redis $(redis-cli -u "$REDIS_URL" INFO server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p')"
	fi
	echo "- kernel $(uname -r); clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null || echo '?')"
	echo
	for name in readpath readpath-c8 readpath-rate readpath-procs1 hitpath fanout hotkeys size writepath stampede replica; do
		line=$(grep "^$name	" "$out/steps.tsv" || true)
		[ -n "$line" ] || continue
		IFS=$'\t' read -r name before after cmd <<<"$line"
		echo "## $name"
		echo
		echo "\`$cmd\` — load $before → $after"
		echo
		case "$name" in
		hitpath | writepath | stampede | replica)
			go run ./bench/chart -benchmd "$out/$name.txt"
			if [ "$name" = hitpath ] && command -v benchstat >/dev/null && [ "$quick" = 0 ]; then
				echo
				echo '```'
				benchstat -col /impl "$out/$name.txt" 2>/dev/null || true
				echo '```'
			fi
			;;
		*) cat "$out/$name.txt" ;;
		esac
		echo
	done
} >"$tables"

echo "bench: raw outputs and $tables in $out" >&2
