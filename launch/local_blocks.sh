#!/usr/bin/env bash
# One job per block on this machine, then their merge (docs/block_jobs.md): block b trains alone in
# WORKDIR/block<b>, one job after another (the default) or side by side, and WORKDIR/merged is the merged run.
#
#   launch/local_blocks.sh B CONFIG WORKDIR [--config.field=value ...]
#   launch/local_blocks.sh 3 configs/digits_dblock.py workdirs/digits_blocks
#   JOBS=3 GPUS=0,1,2 launch/local_blocks.sh 3 configs/cifar100_dblock.py workdirs/c100_blocks
#   SHARED_FROM=workdirs/digits launch/local_blocks.sh 3 configs/digits_dblock.py workdirs/d   (outer parts frozen)
#
# B must be the config's number of blocks. JOBS: how many jobs run at once (default 1: one after another; side by
# side, job b logs to WORKDIR/block<b>.log). GPUS: job b sees GPU number b mod the list's length
# (CUDA_VISIBLE_DEVICES). Rerunning resumes every job (a finished one says so) and merges if WORKDIR/merged does
# not exist. A failed job stops the script before the merge; the jobs that finished stay finished.
set -euo pipefail
if (($# < 3)); then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
B=$1 CONFIG=$2 WORKDIR=$3
shift 3
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
JOBS=${JOBS:-1}
# SHARED_FROM=W: the blocks share the outer parts (embeddings, head) frozen from the trained run W, whose weights
# start every job (config.train.init_from, freeze_shared), instead of each block owning a copy of them
# (model.independent_blocks, the default here).
if [[ -n "${SHARED_FROM:-}" ]]; then
  JOB_FLAGS=(--config.train.init_from="$SHARED_FROM" --config.train.freeze_shared=True --config.parallel_blocks=True)
else
  JOB_FLAGS=(--config.model.independent_blocks=True --config.parallel_blocks=True)
fi
IFS=, read -r -a gpus <<<"${GPUS:-}"
mkdir -p "$WORKDIR"

run_block() {
  local b=$1
  shift
  local env=()
  ((${#gpus[@]})) && env=(CUDA_VISIBLE_DEVICES="${gpus[$((b % ${#gpus[@]}))]}")
  env "${env[@]}" "$PYTHON" -m diffblocks_jax.main --config="$CONFIG" --workdir="$WORKDIR/block$b" \
    "${JOB_FLAGS[@]}" --config.train.blocks="$b" "$@"
}

failed=0
running=0
for ((b = 0; b < B; b++)); do
  if ((JOBS <= 1)); then
    run_block "$b" "$@" || { echo "Block $b failed: fix it and run this script again (finished blocks are kept)." >&2; exit 1; }
    continue
  fi
  if ((running >= JOBS)); then
    wait -n || failed=1
    running=$((running - 1))
  fi
  run_block "$b" "$@" >"$WORKDIR/block$b.log" 2>&1 &
  running=$((running + 1))
done
while ((running > 0)); do
  wait -n || failed=1
  running=$((running - 1))
done
if ((failed)); then
  echo "A block job failed (logs: $WORKDIR/block<b>.log): fix it and run this script again." >&2
  exit 1
fi
if [[ -e "$WORKDIR/merged/config.json" ]]; then
  echo "$WORKDIR/merged exists already: nothing to merge."
  exit 0
fi
exec "$PYTHON" -m diffblocks_jax.main --mode=merge --workdir="$WORKDIR/merged" \
  --from="$(seq -s, -f "$WORKDIR/block%g" 0 $((B - 1)))"
