#!/usr/bin/env bash
# One node, one process that sees all of the node's GPUs: the 'data' mesh axis spans them (data parallel),
# or, with --config.parallel_blocks=True, they form B groups, one block each.
#
#   launch/single_node.sh CONFIG WORKDIR [--config.field=value ...]
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/single_node.sh configs/cifar100_dblock.py workdirs/c100_4gpu
#
# The global batch (config.train.batch_size) is split over the GPUs and must divide by their number.
# Rerunning the same command resumes from WORKDIR/checkpoints.
set -euo pipefail
if (($# < 2)); then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
exec "$PYTHON" -m diffblocks_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
