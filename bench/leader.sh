#!/usr/bin/env bash
# Where a loaded leader's CPU goes, by component of the pipeline: a 3-node cluster under the same
# wrk load as compare.sh, the leader's process sampled with perf and DWARF call graphs (release
# binaries carry debug info), each sample given to the first component its call stack names.
# Prints µs of the leader's CPU per task and the share of each. budget.sh splits the whole
# machine by thread and by kind of kernel work; this splits the leader's runtime by what it was
# doing. Needs perf (Debian: linux-perf) and root or perf_event_paranoid <= 0.
#
#   bench/leader.sh                 # 256 connections, 12 s, the leader sampled for 4 s
#   CONNS=64 FREQ=999 bench/leader.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-256}
DUR=${DUR:-12}
FREQ=${FREQ:-499}
SECS=${SECS:-4}
[ "$DUR" -ge $((SECS + 4)) ] || { echo "DUR must be at least SECS + 4" >&2; exit 1; }
. bench/lib.sh

command -v perf >/dev/null && command -v wrk >/dev/null || { echo "needs perf and wrk" >&2; exit 1; }
build
start_cluster 790 795
pid=
for i in 1 2 3; do [ "$LS" = "http://127.0.0.1:790$i" ] && pid=${LS_PID[$i]}; done
[ -n "$pid" ] || { echo "leader $LS is not one of the nodes started" >&2; exit 1; }

run "$LS/v1/machines/counter/tasks" '{"add":1}       ' "$CONNS" >"$WORK/wrk" &
w=$!
sleep 3
perf record -F "$FREQ" --call-graph dwarf,16384 -p "$pid" -o "$WORK/leader.data" -- sleep "$SECS" \
  >/dev/null 2>"$WORK/perf.err" || true
wait "$w"
[ -s "$WORK/leader.data" ] || { echo "perf record failed:" >&2; cat "$WORK/perf.err" >&2; exit 1; }
rps=$(cut -d' ' -f1 "$WORK/wrk")
echo "leader $LS, $CONNS connections: $rps tasks/s; $SECS s of its CPU sampled at $FREQ Hz"

# A sample is a header line (thread name, tid) and its frames, leaf first, then a blank line.
perf script -i "$WORK/leader.data" -F comm,tid,ip,sym 2>/dev/null | awk -v rps="$rps" \
  -v secs="$SECS" -v freq="$FREQ" '
  function component(comm, stack) {
    if (comm ~ /^log-manager/) return "disk queue (group commit: redb, fdatasync)"
    if (comm ~ /^fsm-caller/) return "state-machine thread (on-apply)"
    if (comm != "tokio-rt-worker") return "other threads"
    if (stack ~ /writev/) return "HTTP response write (writev; on loopback, wrk'\''s receive too)"
    if (stack ~ /lockstep::api::server/ && stack ~ /recvfrom|__libc_recv/) return "HTTP request read (recvfrom)"
    if (stack ~ /lockstep::api::route/) return "handler (route, body, admission, propose, response)"
    if (stack ~ /lockstep::api::server/) return "hyper (parse, dispatch, encode)"
    if (stack ~ /CoreLoop/) return "core loop (apply queue, Raft core, replicators, ballot box)"
    if (stack ~ /lockstep::transport/) return "peer transport (frames to and from followers)"
    if (stack ~ /park|epoll_wait|Driver::turn|futex/) return "runtime: parking, epoll, wake-ups"
    return "runtime: other"
  }
  function flush() {
    if (comm == "") return
    n[component(comm, stack)]++
    total++
    comm = ""
  }
  /^[^ \t]/ { flush(); comm = $1; stack = ""; next }
  /^[ \t]*$/ { flush(); next }
  { sub(/^[ \t]*[0-9a-f]+ /, ""); stack = stack " " $0 }
  END {
    flush()
    if (total == 0 || rps == 0) { print "no samples" > "/dev/stderr"; exit 1 }
    per = 1e6 / freq / (rps * secs)
    printf "%8s %7s  %s\n", "µs/task", "share", "component"
    for (c in n) printf "%8.2f %6.1f%%  %s\n", n[c] * per, 100 * n[c] / total, c | "sort -rn"
    close("sort -rn")
    printf "%8.2f %6.1f%%  %s\n", total * per, 100, "all (the leader process)"
  }'
