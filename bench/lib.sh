# What compare.sh and budget.sh share: a work directory cleaned up on exit, the release
# binaries and the counter guest, a Lockstep cluster on 127.0.0.1 (3 nodes unless told), and
# wrk runs.
# Sourced after `set -euo pipefail`, from the repository root.

WORK=$(mktemp -d "/tmp/lockstep-$(basename "$0" .sh).XXXXXX")
PIDS=()
cleanup() {
  exec 2>/dev/null # no "Killed" notices for our own background jobs
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# BIN: the release binaries (built unless LOCKSTEP_BIN_DIR names them); WASM: the counter guest,
# built as module authors are told to (README, "Writing a machine"), unless LOCKSTEP_WASM names it.
build() {
  rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [ -n "${LOCKSTEP_BIN_DIR:-}" ] || cargo build --release -q -p lockstep --bins
  BIN=${LOCKSTEP_BIN_DIR:-$target_dir/release}
  if [ -z "${LOCKSTEP_WASM:-}" ]; then
    cargo build --release -q --target wasm32-wasip2 -p counter --config profile.release.lto=true \
      --config profile.release.codegen-units=1 --config profile.release.debug=false
  fi
  WASM=${LOCKSTEP_WASM:-$target_dir/wasm32-wasip2/release/counter.wasm}
}

wait_http() { # url
  for _ in $(seq 1 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "timed out waiting for $1" >&2
  return 1
}

# Node i serves HTTP on 127.0.0.1:${HTTP_PREFIX}i and Raft on 127.0.0.1:${RAFT_PREFIX}i; its pid
# is LS_PID[i]. NODES (set by start_cluster) is how many there are.
declare -a LS_PID
start_lockstep() { # id
  "$BIN/lockstep" serve --id "$1" --data-dir "$WORK/ls$1" --http "127.0.0.1:$HTTP_PREFIX$1" \
    --raft "127.0.0.1:$RAFT_PREFIX$1" --peers "$PEERS" ${LS_FLAGS:-} 2>>"$WORK/ls$1.log" >/dev/null &
  LS_PID[$1]=$!
  PIDS+=($!)
}

stop_lockstep() { # id (kill -9, as a crash)
  kill -9 "${LS_PID[$1]}" 2>/dev/null || true
  wait "${LS_PID[$1]}" 2>/dev/null || true
}

leader_url() {
  for _ in $(seq 1 200); do
    for i in $(seq 1 "$NODES"); do
      if curl -sf "http://127.0.0.1:$HTTP_PREFIX$i/v1/cluster" 2>/dev/null | grep -q '"role":"leader"'; then
        echo "http://127.0.0.1:$HTTP_PREFIX$i"
        return 0
      fi
    done
    sleep 0.05
  done
  echo "no leader elected" >&2
  return 1
}

# Starts the nodes (3 unless a count is given), waits for a leader (LS: its URL) and deploys
# counter there.
start_cluster() { # http-prefix raft-prefix [nodes], e.g. 730 740
  HTTP_PREFIX=$1
  RAFT_PREFIX=$2
  NODES=${3:-3}
  PEERS=$(for i in $(seq 1 "$NODES"); do printf '%s=127.0.0.1:%s%s,' "$i" "$2" "$i"; done)
  PEERS=${PEERS%,}
  for i in $(seq 1 "$NODES"); do start_lockstep "$i"; done
  for i in $(seq 1 "$NODES"); do wait_http "http://127.0.0.1:$HTTP_PREFIX$i/healthz"; done
  LS=$(leader_url)
  curl -sf -X PUT --data-binary "@$WASM" "$LS/v1/machines/counter" >/dev/null
}

# wrk -t2 with bench/wrk.lua for DUR seconds; prints "requests/s p50 p99 errors" (ms).
run() { # url body conns
  BODY="$2" wrk -t2 -c"$3" -d"${DUR}s" --timeout 10s -s bench/wrk.lua "$1" 2>/dev/null \
    | awk '/^RESULT/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%.0f %.2f %.2f %d\n", v["requests"] / v["seconds"], v["p50"], v["p99"], v["errors"] }'
}
