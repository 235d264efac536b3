#!/usr/bin/env bash
#SBATCH --job-name=diffblocks
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Several nodes under SLURM: `srun` starts one process per GPU (as above: --ntasks-per-node = GPUs per
# node) and JAX's SLURM detection fills in jax.distributed.initialize(): the coordinator (first node of
# the step), process count (SLURM_NTASKS), process id (SLURM_PROCID) and local GPU (SLURM_LOCALID).
#
#   sbatch launch/slurm_multinode.sh CONFIG WORKDIR [--config.field=value ...]
#   sbatch --nodes=4 launch/slurm_multinode.sh configs/cifar100_dblock.py /shared/workdirs/c100_32gpu
#
# One process per node instead (it sees all the node's GPUs; fewer processes to coordinate):
#   sbatch --ntasks-per-node=1 --cpus-per-task=64 launch/slurm_multinode.sh CONFIG WORKDIR
# (JAX_LOCAL_DEVICE_IDS is then set below: JAX's detection would otherwise give the process GPU 0 only.)
#
# WORKDIR must be on a file system every node sees: every process writes its part of each checkpoint.
# Each process loads only its 1/processes share of the training split; the global batch
# (config.train.batch_size) must divide by the total number of GPUs. Resubmitting resumes.
set -euo pipefail
if (($# < 2)); then
  sed -n '10,24p' "$0" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}
if [[ "${SLURM_NTASKS_PER_NODE:-1}" == 1 && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((${SLURM_GPUS_PER_NODE##*:} - 1)))
fi
# --kill-on-bad-exit: one failed process stops the step instead of leaving the others in a collective.
srun --kill-on-bad-exit=1 "$PYTHON" -m diffblocks_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
