#!/usr/bin/env bash
# A multi-node Ray cluster on this machine (a head plus N worker nodes), for trying
# submission and node-failure drills without cloud machines. Plain `ray start`, one
# `ray start --block` per node, each in its own session; the pids are recorded so that
# `down` stops exactly those (never `ray stop`, which stops every Ray on the machine).
# See docs/deploy.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/local-cluster.sh COMMAND [ARGS...]

Commands:
  up [N] [OPTIONS]   start a head and N worker nodes (default: $N, else 2)
  down               stop exactly the processes `up` started (SIGTERM, then SIGKILL)
  status             the recorded nodes and whether they run
  kill-node NAME     SIGKILL every process of one node (worker-1, ...): a node-failure drill
  -h, --help         this text

Options of up:
  --port PORT            GCS port of the head (default 6379)
  --dashboard-port PORT  dashboard / Jobs API port, on 127.0.0.1 (default 8265)
  --num-cpus N           CPUs of each worker node (default 1)
  --head-num-cpus N      CPUs of the head (default: --num-cpus; 0 keeps training off it)

Environment:
  N          worker count when `up` gets none (default 2)
  STATE_DIR  pids, addresses and node logs (default ~/.orchestrator/local-cluster)
  RAY        the ray CLI (default: `ray` on PATH, else .venv/bin/ray)
  GRACE      seconds between SIGTERM and SIGKILL in `down` (default 20)
  RAY_health_check_period_ms, RAY_health_check_failure_threshold
             how soon the head declares a lost node dead (default 1000 and 3: about
             2.5 s; Ray's own 3000 and 5 take about 15 s)

Token authentication is on (the token is ~/.ray/auth_token, created when missing), so
clients need RAY_AUTH_MODE=token, for example:
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
      -- orchestrator run configs/digits.yaml --set storage.root=$PWD/runs
EOF
}

STATE_DIR="${STATE_DIR:-$HOME/.orchestrator/local-cluster}"
NODES="$STATE_DIR/nodes" # one line per node: name pid start-time

find_ray() {
  if [[ -n "${RAY:-}" ]]; then
    echo "$RAY"
  elif command -v ray >/dev/null 2>&1; then
    command -v ray
  else
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [[ -x "$root/.venv/bin/ray" ]] || { echo "error: no ray CLI; run 'make setup' or set RAY" >&2; return 1; }
    echo "$root/.venv/bin/ray"
  fi
}

started() { ps -o lstart= -p "$1" 2>/dev/null | tr -s ' ' _ || true; }

# The recorded process when it still runs (not a zombie, not a later process that reused its pid).
alive() { [[ -n "$2" && "$(started "$1")" == "$2" && "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }

# Every process in a node's session: its `ray start`, the raylet, its workers.
members() { ps -e -o pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

die() { echo "error: $1" >&2; exit "${2:-1}"; }

start_node() { # name, then ray start arguments
  local name="$1" log="$STATE_DIR/$1.log"
  shift
  setsid "$ray" start --block --disable-usage-stats --temp-dir "$tmp" --min-worker-port 0 \
    --max-worker-port 0 --dashboard-agent-listen-port "$(free_port)" "$@" </dev/null >"$log" 2>&1 &
  local pid=$!
  echo "$name $pid $(started "$pid")" >>"$NODES"
  for _ in $(seq 1 "$((${TIMEOUT:-120} * 4))"); do
    grep -qs "Ray runtime started" "$log" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  die "$name: \`ray start\` did not come up; its log ends:
$(tail -n 25 "$log")"
}

stop_nodes() { # names, stopped in this order; prints what survived SIGKILL
  local grace="${GRACE:-20}" name pid t sids=() left
  for name in "$@"; do
    read -r _ pid t < <(grep "^$name " "$NODES") || continue
    alive "$pid" "$t" && kill -TERM "$pid" 2>/dev/null
    sids+=("$pid")
  done
  for sig in TERM KILL -; do # the leaders had SIGTERM: wait, then signal every member
    for _ in $(seq 1 "$((grace * 2))"); do
      left="$(for s in "${sids[@]}"; do members "$s"; done)"
      [[ -z "$left" ]] && return 0
      sleep 0.5
    done
    # shellcheck disable=SC2086
    [[ "$sig" == - ]] || kill -"$sig" $left 2>/dev/null || true
    grace=5
  done
  echo "$left"
}

up() {
  local workers="${N:-2}" port=6379 dash=8265 cpus=1 head_cpus=""
  if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then workers="$1"; shift; fi
  while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "$1 needs a number" 2
    case "$1" in
      --port) port="$2" ;;
      --dashboard-port) dash="$2" ;;
      --num-cpus) cpus="$2" ;;
      --head-num-cpus) head_cpus="$2" ;;
      *) die "unknown option '$1' (see --help)" 2 ;;
    esac
    shift 2
  done
  if [[ -s "$NODES" ]]; then
    while read -r name pid t; do
      alive "$pid" "$t" && die "a cluster is already up (recorded in $STATE_DIR); stop it with: $0 down"
    done <"$NODES"
    clear_state # stale: nothing it recorded runs
  fi
  ray="$(find_ray)"
  local bin
  bin="$(dirname "$(command -v "$ray")")"
  PY=python3
  if [[ -x "$bin/python" ]]; then # ray's own environment: a job's `orchestrator` / `python` too
    PY="$bin/python"
    export PATH="$bin:$PATH"
  fi
  mkdir -p "$STATE_DIR" "$HOME/.ray"
  [[ -e "$HOME/.ray/auth_token" ]] || (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$HOME/.ray/auth_token")
  export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  # A lost node is seen in about 2.5 s instead of 15 (see deploy/Dockerfile); yours win.
  export RAY_health_check_period_ms="${RAY_health_check_period_ms:-1000}"
  export RAY_health_check_failure_threshold="${RAY_health_check_failure_threshold:-3}"
  tmp="$(mktemp -d /tmp/orch-lc-XXXXXX)" # short: Ray puts unix sockets under it
  echo "$tmp" >"$STATE_DIR/temp_dir"
  : >"$NODES"
  trap 'echo "up failed; stopping what it started" >&2; stop_nodes $(cut -d" " -f1 "$NODES") >/dev/null; clear_state' EXIT
  start_node head --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --num-cpus "${head_cpus:-$cpus}"
  address="$(cat "$tmp/ray_current_cluster")"
  for _ in $(seq 1 120); do # the Jobs API
    (exec 3<>"/dev/tcp/127.0.0.1/$dash") 2>/dev/null && break
    sleep 0.5
  done
  echo "$address" >"$STATE_DIR/address"
  echo "http://127.0.0.1:$dash" >"$STATE_DIR/dashboard"
  for i in $(seq 1 "$workers"); do
    start_node "worker-$i" --address "$address" --num-cpus "$cpus"
  done
  trap - EXIT
  echo "up: head + $workers worker node(s); state and logs in $STATE_DIR"
  echo "address:   $address"
  echo "dashboard: http://127.0.0.1:$dash  (Jobs API)"
}

clear_state() {
  local tmp
  tmp="$(cat "$STATE_DIR/temp_dir" 2>/dev/null || true)"
  [[ "$tmp" == /tmp/orch-lc-* ]] && rm -rf "$tmp"
  rm -f "$NODES" "$STATE_DIR"/{address,dashboard,temp_dir} "$STATE_DIR"/*.log
  rmdir "$STATE_DIR" 2>/dev/null || true
}

down() {
  [[ -s "$NODES" ]] || { echo "nothing to stop: no cluster recorded in $STATE_DIR"; return 0; }
  local left
  # Workers first, then the head.
  left="$(stop_nodes $(grep -v '^head ' "$NODES" | cut -d' ' -f1) head)"
  [[ -z "$left" ]] || die "still running after SIGKILL: $(echo $left); state kept in $STATE_DIR"
  echo "down: stopped $(cut -d' ' -f1 "$NODES" | tr '\n' ' ')"
  clear_state
}

status() {
  [[ -s "$NODES" ]] || die "no cluster recorded in $STATE_DIR; start one with: $0 up"
  echo "address $(cat "$STATE_DIR/address" 2>/dev/null)  dashboard $(cat "$STATE_DIR/dashboard" 2>/dev/null)"
  printf '%-10s %8s %6s %s\n' node pid state processes
  while read -r name pid t; do
    printf '%-10s %8s %6s %s\n' "$name" "$pid" "$(alive "$pid" "$t" && echo up || echo DOWN)" \
      "$(members "$pid" | wc -l)"
  done <"$NODES"
}

kill_node() { # a node lost at once: SIGKILL its whole session (raylet, workers, agents)
  local name="$1" pid t left
  read -r _ pid t < <(grep "^$name " "$NODES" 2>/dev/null) || die "no node '$name' recorded in $STATE_DIR (see: $0 status)" 2
  alive "$pid" "$t" || die "$name is not running"
  # SIGKILL is delivered asynchronously: a member can still be listed (and a raylet can still
  # fork) for a moment after kill(2) returns, so wait until the session is empty.
  for _ in $(seq 1 100); do
    left="$(members "$pid")"
    [[ -z "$left" ]] && { echo "kill-node: SIGKILLed $name (session $pid)"; return 0; }
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  die "$name: still running 10 s after SIGKILL: $(echo $left)"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  up) up "$@" ;;
  down | status)
    [[ $# -eq 0 ]] || die "$cmd takes no arguments" 2
    "$cmd"
    ;;
  kill-node)
    [[ $# -eq 1 ]] || die "kill-node takes one node name (see: $0 status)" 2
    kill_node "$1"
    ;;
  -h | --help | help) usage ;;
  "")
    usage >&2
    exit 2
    ;;
  *)
    echo "error: unknown command '$cmd'" >&2
    usage >&2
    exit 2
    ;;
esac
