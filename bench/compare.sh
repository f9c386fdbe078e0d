#!/usr/bin/env bash
# Lockstep vs etcd vs the bare-HTTP ceiling, on this machine, in one run, with one load generator
# (wrk). Everything listens on 127.0.0.1 and is stopped on exit.
#
#   bench/compare.sh                 # 10 s per point, 16/64/256 connections, 3 rounds each
#   DUR=5 CONNS="256" ROUNDS=1 bench/compare.sh
#   LS_FLAGS="--snapshot-every 0" bench/compare.sh   # Lockstep keeping its whole log
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-"16 64 256"}
BATCH=${BATCH:-256}
RESTART_ENTRIES=${RESTART_ENTRIES:-1000000}
. bench/lib.sh

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need etcd || ! need etcdctl || ! need curl || ! need bc; then
  echo "installing wrk, etcd-server, etcd-client, curl, bc (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk etcd-server etcd-client curl bc >/dev/null
fi
build

# --- Lockstep: 3 nodes -----------------------------------------------------------------------
start_cluster 730 740

# --- restart with a long log: fill it to RESTART_ENTRIES through the batch endpoint, kill -9 a
# follower, and time its restart until it serves its applied state again (before the load runs,
# so the log holds the number of entries the target names) -----------------------------------
BATCH_BODY="[$(printf '{"add":1},%.0s' $(seq 1 "$BATCH"))"
BATCH_BODY="${BATCH_BODY%,}]"
commit() { curl -sf "$1/v1/cluster" | sed -n 's/.*"commit_index":\([0-9]*\).*/\1/p'; }
applied() { curl -sf "$1/v1/cluster" 2>/dev/null | sed -n 's/.*"applied_index":\([0-9]*\).*/\1/p'; }
while [ "$(commit "$LS")" -lt "$RESTART_ENTRIES" ]; do
  BODY="$BATCH_BODY" wrk -t2 -c16 -d1s -s bench/wrk.lua "$LS/v1/machines/counter/tasks:batch" >/dev/null 2>&1
done
TARGET=$(commit "$LS")
VICTIM=""
for i in 1 2 3; do [ "http://127.0.0.1:$HTTP_PREFIX$i" = "$LS" ] || { VICTIM=$i; break; }; done
stop_lockstep "$VICTIM"
t0=$(date +%s.%N)
start_lockstep "$VICTIM"
until [ "$(applied "http://127.0.0.1:$HTTP_PREFIX$VICTIM" || echo 0)" -ge "$TARGET" ] 2>/dev/null; do sleep 0.01; done
t1=$(date +%s.%N)
field() { curl -sf "$1/v1/cluster" | sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p"; }
V="http://127.0.0.1:$HTTP_PREFIX$VICTIM"
IN_LOG=$(( $(field "$V" last_index) - $(field "$V" compacted_index) ))
printf 'restart of node %s with %s entries committed, %s of them in its log (the rest in its snapshot): serving its applied state again after %.2f s\n' \
  "$VICTIM" "$TARGET" "$IN_LOG" "$(echo "$t1 - $t0" | bc -l)"
LS=$(leader_url)

# --- etcd: 3 members, durable (etcd always fsyncs its WAL) ------------------------------------
EC="e1=http://127.0.0.1:12381,e2=http://127.0.0.1:12382,e3=http://127.0.0.1:12383"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "http://127.0.0.1:1237$i" --advertise-client-urls "http://127.0.0.1:1237$i" \
    --listen-peer-urls "http://127.0.0.1:1238$i" --initial-advertise-peer-urls "http://127.0.0.1:1238$i" \
    --initial-cluster "$EC" --initial-cluster-state new --initial-cluster-token lockstep-bench \
    --log-level error >"$WORK/etcd$i.log" 2>&1 &
  PIDS+=($!)
done
ETCD=""
for _ in $(seq 1 200); do
  ETCD=$(ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:12371,127.0.0.1:12372,127.0.0.1:12373 \
    endpoint status 2>/dev/null | awk -F', ' '$5=="true"{print $1}' | head -1) || true
  [ -n "$ETCD" ] && break
  sleep 0.1
done
[ -n "$ETCD" ] || { echo "etcd did not elect a leader" >&2; exit 1; }
case $ETCD in http*) ;; *) ETCD="http://$ETCD" ;; esac

# --- the ceiling -------------------------------------------------------------------------------
"$BIN/http-ceiling" 127.0.0.1:7900 >/dev/null &
PIDS+=($!)
wait_http http://127.0.0.1:7900/ || true

# --- load ----------------------------------------------------------------------------------------
PAYLOAD='{"add":1}       '                                   # 16 bytes
ETCD_BODY='{"key":"a2V5","value":"MDEyMzQ1Njc4OWFiY2RlZg=="}' # value: 16 bytes

# Each point runs ROUNDS times, the three targets interleaved (so a slow minute on this shared
# machine hits all three alike); the table shows each target's median round by throughput (its
# p50 and p99 are that round's; with an even ROUNDS, the lower of the two middle rounds) and the
# ratios of those throughputs, and every round's throughput (and p99) follows it.
RESULTS="$WORK/results"
for c in $CONNS; do
  for r in $(seq 1 "$ROUNDS"); do
    echo "lockstep $c $r $(run "$LS/v1/machines/counter/tasks" "$PAYLOAD" "$c")" >>"$RESULTS"
    echo "etcd $c $r $(run "$ETCD/v3/kv/put" "$ETCD_BODY" "$c")" >>"$RESULTS"
    echo "ceiling $c $r $(run http://127.0.0.1:7900/ "$PAYLOAD" "$c")" >>"$RESULTS"
  done
done
median() { # target conns column -> the median round's value in that column (rounds sorted by rps)
  awk -v t="$1" -v c="$2" '$1 == t && $2 == c' "$RESULTS" | sort -k4,4n \
    | awk -v col="$3" '{ v[NR] = $col } END { print v[int((NR + 1) / 2)] }'
}
printf '\n%s round(s) per point; each target'"'"'s median round by throughput\n' "$ROUNDS"
printf '%-8s | %-28s | %-28s | %-28s | %-9s | %-9s\n' conns "lockstep tasks/s p50 p99 ms" "etcd puts/s p50 p99 ms" \
  "ceiling req/s p50 p99 ms" "ls/etcd" "ls/ceil"
for c in $CONNS; do
  row=""
  for t in lockstep etcd ceiling; do
    row+=$(printf '| %9s %8s %8s ' "$(median $t "$c" 4)" "$(median $t "$c" 5)" "$(median $t "$c" 6)")
  done
  printf '%-8s %s| %8.2fx | %8.2f\n' "$c" "$row" \
    "$(echo "$(median lockstep "$c" 4) / $(median etcd "$c" 4)" | bc -l)" \
    "$(echo "$(median lockstep "$c" 4) / $(median ceiling "$c" 4)" | bc -l)"
done
echo
for c in $CONNS; do
  for t in lockstep etcd ceiling; do
    printf '%-4s conns, %-8s per round (p99 ms): %s\n' "$c" "$t" "$(awk -v t=$t -v c="$c" '$1 == t && $2 == c { printf "%s (%s) ", $4, $6 }' "$RESULTS")"
  done
done
errors=$(awk '$7 != 0 { printf "%s at %s conns round %s: %s errors; ", $1, $2, $3, $7 }' "$RESULTS")
[ -z "$errors" ] || echo "errors: $errors"

# --- the batch endpoint ----------------------------------------------------------------------------
LS=$(leader_url)
read -r br bp50 bp99 berr <<<"$(run "$LS/v1/machines/counter/tasks:batch" "$BATCH_BODY" 64)"
echo
echo "batch endpoint: $BATCH tasks/request, 64 connections: $((br * BATCH)) tasks/s (p50 ${bp50} ms, p99 ${bp99} ms, errors $berr)"

# --- memory ----------------------------------------------------------------------------------------
for i in 1 2 3; do
  echo "lockstep node $i peak RSS: $(awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/${LS_PID[$i]}/status")"
done

