#!/usr/bin/env bash
# A multi-node Ray cluster on this machine (a head plus N worker raylets), for trying
# submission and node-failure drills without cloud machines. A thin wrapper around
# `orchestrator cluster`; see docs/deploy.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/local-cluster.sh COMMAND [ARGS...]

Commands:
  up [N] [OPTIONS]   start a head and N worker raylets (default: $N, else 2)
  down [OPTIONS]     stop exactly the processes `up` started
  status [OPTIONS]   show which nodes are alive
  -h, --help         this text

OPTIONS are passed on to `orchestrator cluster up|down|status` (see its --help).

Environment:
  N             worker count when `up` gets none (default 2)
  ORCHESTRATOR  the CLI to run (default: `orchestrator` on PATH, else .venv/bin/orchestrator)

Then, for example (the cluster turns on token auth; the token is in ~/.ray/auth_token):
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
      -- orchestrator run configs/digits.yaml --set storage.root=$PWD/runs
EOF
}

# The repo's virtualenv is the usual install; PATH wins so an activated env is respected.
find_cli() {
  if [[ -n "${ORCHESTRATOR:-}" ]]; then
    echo "$ORCHESTRATOR"
  elif command -v orchestrator >/dev/null 2>&1; then
    echo orchestrator
  else
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -x "$root/.venv/bin/orchestrator" ]]; then
      echo "$root/.venv/bin/orchestrator"
    else
      echo "error: no orchestrator CLI; run 'make setup' or set ORCHESTRATOR" >&2
      return 1
    fi
  fi
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift

case "$cmd" in
  up)
    workers="${N:-2}"
    # A bare number as the first argument is the worker count; the rest passes through.
    if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
      workers="$1"
      shift
    fi
    cli="$(find_cli)"
    exec "$cli" cluster up --workers "$workers" "$@"
    ;;
  down | status)
    cli="$(find_cli)"
    exec "$cli" cluster "$cmd" "$@"
    ;;
  -h | --help | help)
    usage
    ;;
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
