#!/usr/bin/env bash
# Where the CPU goes, in µs per request: a Lockstep cluster (NODES nodes, 3 by default) and the
# bare-HTTP ceiling, one after the other, under the same wrk load (POST, 16-byte body), each
# sampled system-wide with perf's cpu-clock. Rows are who spent the CPU (wrk; the leader's and
# the followers' (summed) runtimes, disk queues and FSM threads; the kernel's own threads; idle),
# columns what kind of work it was (user space, the TCP send path, which on loopback includes
# the receiver's side, TCP receive, fsync, file writes, epoll, futex, scheduling, anything else
# in the kernel).
# Needs perf (Debian: linux-perf) and root or perf_event_paranoid <= 0.
#
#   bench/budget.sh                     # 256 connections, 12 s per target (perf samples 8 s)
#   CONNS=64 bench/budget.sh
#   NODES=1 bench/budget.sh             # a one-node cluster: the pipeline without replication
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-256}
NODES=${NODES:-3}
case "$NODES" in 1 | 3 | 5) ;; *) echo "NODES must be 1, 3 or 5" >&2; exit 1 ;; esac
DUR=${DUR:-12}
FREQ=${FREQ:-499}
[ "$DUR" -gt 4 ] || { echo "DUR must be more than 4 (seconds)" >&2; exit 1; }
. bench/lib.sh

command -v perf >/dev/null && command -v wrk >/dev/null || { echo "needs perf and wrk" >&2; exit 1; }
build

# Drives $1 with wrk for DUR s, samples the whole machine for DUR-4 s in the middle, and prints
# "requests-per-second" (the perf data is left in $WORK/$2.data).
profile() { # url name
  run "$1" '{"add":1}       ' "$CONNS" >"$WORK/$2.wrk" &
  local w=$!
  sleep 2
  # cpu-clock: every sample stands for 1/FREQ s of a CPU's time, busy or idle.
  perf record -e cpu-clock -a -g -F "$FREQ" -o "$WORK/$2.data" -- sleep $((DUR - 4)) \
    >/dev/null 2>"$WORK/$2.perf.err" || true
  wait "$w"
  if [ ! -s "$WORK/$2.data" ]; then
    echo "perf record failed (root or kernel.perf_event_paranoid <= 0 needed):" >&2
    cat "$WORK/$2.perf.err" >&2
    return 1
  fi
  cut -d' ' -f1 "$WORK/$2.wrk"
}

# perf script -> the table. $1: rps, $2: sampled seconds, $3: "pid=role,pid=role,...",
# $4: the name the data was recorded under.
table() {
  perf script -i "$WORK/$4.data" -F comm,pid,tid,ip,sym 2>/dev/null | awk -v rps="$1" -v secs="$2" \
    -v freq="$FREQ" -v roles="$3" '
    BEGIN {
      n = split(roles, rs, ",")
      for (i = 1; i <= n; i++) { split(rs[i], kv, "="); role[kv[1]] = kv[2] }
      nk = split("user tcp-send tcp-recv fsync file-write epoll futex sched kernel", kinds, " ")
    }
    function who(comm, pid) {
      if (comm == "wrk") return "wrk"
      if (comm == "swapper") return "idle"
      if (pid in role) {
        if (comm ~ /^log-manager/) return role[pid] " disk queue"
        if (comm ~ /^fsm-caller/) return role[pid] " FSM"
        return role[pid] " runtime"
      }
      return "kernel threads, others"
    }
    function kind(   i, f) {
      if (nf == 0 || frames[1] !~ /^ffff/) return "user"
      for (i = 1; i <= nf; i++) {
        f = syms[i]
        if (f == "tcp_sendmsg") return "tcp-send"
        if (f == "tcp_recvmsg") return "tcp-recv"
        if (f == "do_fsync") return "fsync"
        if (f == "ksys_pwrite64" || f == "__x64_sys_pwrite64") return "file-write"
        if (f == "do_epoll_wait") return "epoll"
        if (f == "do_futex") return "futex"
      }
      for (i = 1; i <= nf; i++) if (syms[i] == "__schedule") return "sched"
      return "kernel"
    }
    function flush() {
      if (cur != "") { k = kind(); cost[cur, k]++; total[cur]++; all++ }
      cur = ""; nf = 0
    }
    /^[^ \t]/ { flush(); split($2, p, "/"); cur = who($1, p[1]); next }
    /^[ \t]+[0-9a-f]+ / { nf++; frames[nf] = $1; syms[nf] = $2; next }
    /^$/ { flush() }
    END {
      flush()
      per = 1e6 / freq / (rps * secs)   # µs of CPU per request, per sample
      printf "%-26s %7s", "µs of CPU per request", "total"
      for (k = 1; k <= nk; k++) printf " %10s", kinds[k]
      printf "\n"
      cmd = "sort -rn | cut -d\\| -f2"   # largest first
      for (w in total) {
        line = sprintf("%d|%-26s %7.2f", total[w], w, total[w] * per)
        for (k = 1; k <= nk; k++) line = line sprintf(" %10.2f", cost[w, kinds[k]] * per)
        print line | cmd
      }
      close(cmd)
      printf "%-26s %7.2f\n", "all", all * per
    }'
}

# --- Lockstep: NODES nodes, counter deployed -------------------------------------------------
start_cluster 731 741 "$NODES"
ROLES=""
for i in $(seq 1 "$NODES"); do
  r=followers; [ "$LS" = "http://127.0.0.1:$HTTP_PREFIX$i" ] && r=leader
  ROLES+="${LS_PID[$i]}=$r,"
done
LS_RPS=$(profile "$LS/v1/machines/counter/tasks" lockstep) || exit 1
for i in $(seq 1 "$NODES"); do stop_lockstep "$i"; done

# --- the ceiling ---------------------------------------------------------------------------------
"$BIN/http-ceiling" 127.0.0.1:7910 >/dev/null &
CEIL_PID=$!
PIDS+=($!)
wait_http http://127.0.0.1:7910/
CEIL_RPS=$(profile http://127.0.0.1:7910/ ceiling) || exit 1

echo "Lockstep, $NODES node(s), $CONNS connections: $LS_RPS tasks/s"
table "$LS_RPS" $((DUR - 4)) "$ROLES" lockstep
echo
echo "bare-HTTP ceiling, $CONNS connections: $CEIL_RPS requests/s"
table "$CEIL_RPS" $((DUR - 4)) "$CEIL_PID=server" ceiling
