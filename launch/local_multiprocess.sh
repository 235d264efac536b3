#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed over 127.0.0.1, each with its own CPU devices (gloo
# collectives): runs the multi-host code paths without a cluster.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.field=value ...]
#   launch/local_multiprocess.sh 2 configs/testing.py:vit /tmp/mp --config.data.source=digits \
#       --config.data.mean='(0.5,)' --config.data.std='(0.5,)' --config.model.patch_size=4
#
# Environment: PORT (coordinator port; default a free one), DEVICES_PER_PROCESS (CPU devices each; 1).
# Process 0 prints to the terminal; process i>0 logs to WORKDIR/logs/process_i.log. If any process fails,
# the others are stopped.
set -euo pipefail
if (($# < 3)); then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR/logs"

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 0; i < N; i++)); do
  log=/dev/stdout
  ((i > 0)) && log=$WORKDIR/logs/process_$i.log
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1} ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m diffblocks_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --config.distributed.enabled=True --config.distributed.coordinator_address="127.0.0.1:$PORT" \
      --config.distributed.num_processes="$N" --config.distributed.process_id="$i" "$@" >"$log" 2>&1 &
  pids+=($!)
done
for ((i = 0; i < N; i++)); do
  if ! wait -n; then
    echo "A process failed: stopping the others (logs in $WORKDIR/logs)." >&2
    stop_all
    wait || true
    exit 1
  fi
done
