#!/usr/bin/env bash
# One SLURM job per block, then their merge (docs/block_jobs.md): an array of B tasks, task b training block b of
# the block-parallel run on its own machine, and a merge job that starts once every task has succeeded. The tasks
# share nothing but WORKDIR's file system; they run whenever and wherever SLURM finds room, and one that fails is
# resubmitted alone.
#
#   launch/slurm_blocks.sh B CONFIG WORKDIR [--config.field=value ...]
#   launch/slurm_blocks.sh 3 configs/cifar100_dblock.py /shared/workdirs/c100_blocks
#   SBATCH_ARGS="--gpus=1 --time=12:00:00 --partition=gpu" launch/slurm_blocks.sh 3 configs/digits_dblock.py /shared/d
#   SHARED_FROM=/shared/source launch/slurm_blocks.sh 3 configs/digits_dblock.py /shared/d   (outer parts frozen)
#
# B must be the config's number of blocks. Task b writes WORKDIR/block<b> (its log: WORKDIR/block<b>.out), the
# merge WORKDIR/merged (WORKDIR/merge.out). SBATCH_ARGS: the tasks' sbatch options (default: one GPU, 24 h).
# Resubmit one task: sbatch --array=<b> ... as printed below; rerunning this script resumes every task (a
# finished one says so and exits) and merges again if WORKDIR/merged does not exist.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
# SHARED_FROM=W: the blocks share the outer parts (embeddings, head) frozen from the trained run W, whose weights
# start every job (config.train.init_from, freeze_shared), instead of each block owning a copy of them
# (model.independent_blocks, the default here).
if [[ -n "${SHARED_FROM:-}" ]]; then
  JOB_FLAGS=(--config.train.init_from="$SHARED_FROM" --config.train.freeze_shared=True --config.parallel_blocks=True)
else
  JOB_FLAGS=(--config.model.independent_blocks=True --config.parallel_blocks=True)
fi

if [[ "${1:-}" == --task ]]; then  # Inside the array: block $SLURM_ARRAY_TASK_ID.
  CONFIG=$2 WORKDIR=$3
  shift 3
  b=$SLURM_ARRAY_TASK_ID
  exec "$PYTHON" -m diffblocks_jax.main --config="$CONFIG" --workdir="$WORKDIR/block$b" "${JOB_FLAGS[@]}" \
    --config.train.blocks="$b" "$@"
fi
if [[ "${1:-}" == --merge ]]; then  # After the array: every block's workdir into one run.
  B=$2 WORKDIR=$3
  sources=$(seq -s, -f "$WORKDIR/block%g" 0 $((B - 1)))
  exec "$PYTHON" -m diffblocks_jax.main --mode=merge --workdir="$WORKDIR/merged" --from="$sources"
fi

if (($# < 3)); then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
B=$1 CONFIG=$2 WORKDIR=$3
shift 3
mkdir -p "$WORKDIR"
read -r -a extra <<<"${SBATCH_ARGS:---gpus=1 --time=24:00:00}"
array=$(sbatch --parsable --job-name=diffblocks-block --array=0-$((B - 1)) --output="$WORKDIR/block%a.out" \
  "${extra[@]}" "$0" --task "$CONFIG" "$WORKDIR" "$@")
array=${array%%;*}
if [[ -e "$WORKDIR/merged/config.json" ]]; then
  echo "Submitted array $array (blocks 0-$((B - 1))); $WORKDIR/merged exists already, so no merge is submitted."
  exit 0
fi
merge=$(sbatch --parsable --job-name=diffblocks-merge --dependency=afterok:"$array" --output="$WORKDIR/merge.out" \
  --time=01:00:00 "$0" --merge "$B" "$WORKDIR")
echo "Submitted array $array (block b in $WORKDIR/block<b>) and merge $merge (into $WORKDIR/merged, after all succeed)."
echo "Resubmit block b alone: sbatch --array=<b> --output=$WORKDIR/block%a.out ${extra[*]} $0 --task $CONFIG $WORKDIR $*"
