#!/usr/bin/env bash
# Two builds of Lockstep, alternated: each round starts a fresh 3-node cluster of build A, drives
# its leader with wrk for DUR s, then the same with build B. Prints per run the throughput, p50,
# p99, the nodes' CPU per task (from /proc) and their peak RSS, so a change is judged on pairs
# measured minutes apart on this shared machine rather than on two separate runs. Ends with each
# build's medians and how many pairs B won.
#
#   bench/ab.sh <bin-dir-A> <bin-dir-B>          # 4 pairs, 8 s each, 256 connections
#   PAIRS=6 DUR=10 CONNS=64 NODES=1 bench/ab.sh old/release new/release
#   BATCH=256 CONNS=64 bench/ab.sh A B       # the batch endpoint, 256 tasks per request
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: bench/ab.sh <bin-dir-A> <bin-dir-B>" >&2; exit 1; }
A=$1 B=$2
PAIRS=${PAIRS:-4}
DUR=${DUR:-8}
CONNS=${CONNS:-256}
BATCH=${BATCH:-} # tasks per request through the batch endpoint; unset: one task per request
LOCKSTEP_BIN_DIR=$A # only the guest is built here; each run names its binaries
. bench/lib.sh
build
cpu_ticks() { # the nodes' user + system time, in clock ticks
  local t=0 i
  for i in $(seq 1 "$NODES"); do
    read -r u s < <(cut -d' ' -f14,15 "/proc/${LS_PID[$i]}/stat")
    t=$((t + u + s))
  done
  echo "$t"
}
one() { # label bin-dir
  BIN=$2
  start_cluster 770 780 "${NODES:-3}"
  local c0 c1 rps p50 p99 err rss=""
  c0=$(cpu_ticks)
  if [ -n "$BATCH" ]; then
    read -r rps p50 p99 err <<<"$(run "$LS/v1/machines/counter/tasks:batch" "$BATCH_BODY" "$CONNS")"
    rps=$((rps * BATCH))
  else
    read -r rps p50 p99 err <<<"$(run "$LS/v1/machines/counter/tasks" '{"add":1}       ' "$CONNS")"
  fi
  c1=$(cpu_ticks)
  for i in $(seq 1 "$NODES"); do
    rss+="$(awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/${LS_PID[$i]}/status") "
    stop_lockstep "$i"
  done
  rm -rf "$WORK"/ls*
  printf '%s  %7s tasks/s  p50 %6s ms  p99 %6s ms  errors %s  nodes %5.2f us CPU/task  peak RSS MiB %s\n' \
    "$1" "$rps" "$p50" "$p99" "$err" \
    "$(echo "($c1 - $c0) * 1000000 / $(getconf CLK_TCK) / ($rps * $DUR)" | bc -l)" "$rss"
}
if [ -n "$BATCH" ]; then
  BATCH_BODY="[$(printf '{"add":1},%.0s' $(seq 1 "$BATCH"))"
  BATCH_BODY="${BATCH_BODY%,}]"
fi
# Not through a pipe: `one` must run in this shell, so that `cleanup` knows the nodes it started.
RUNS=$WORK/runs
for p in $(seq 1 "$PAIRS"); do
  one "A $p" "$A" >>"$RUNS"
  tail -n1 "$RUNS"
  one "B $p" "$B" >>"$RUNS"
  tail -n1 "$RUNS"
done
# The verdict: medians of each build and how many pairs B won, on throughput and on CPU per task.
awk '
  function median(v, n,   i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  /^[AB] [0-9]+ / && $4 == "tasks/s" && $16 == "CPU/task" { rps[$1, $2] = $3; cpu[$1, $2] = $14 }
  END {
    for (p = 1; rps["A", p] != "" && rps["B", p] != ""; p++) {
      ra[p] = rps["A", p]; rb[p] = rps["B", p]; ca[p] = cpu["A", p]; cb[p] = cpu["B", p]
      fast += rb[p] > ra[p]; lean += cb[p] < ca[p]; n = p
    }
    if (!n) { print "no complete pair to judge"; exit }
    printf "median  A %.0f  B %.0f tasks/s (B/A %.3f, B faster in %d of %d pairs)\n", median(ra, n), median(rb, n), median(rb, n) / median(ra, n), fast, n
    printf "median  A %.2f  B %.2f us CPU/task (B leaner in %d of %d pairs)\n", median(ca, n), median(cb, n), lean, n
  }' "$RUNS"
