#!/usr/bin/env bash
# Single node, N processes through torchrun (one per GPU; 2 on a CPU-only machine).
#
#   bash launch/single_node.sh [--nproc_per_node N] [--dry-run] CONFIG.yaml [dotted.key=value ...] [--quiet] [--no-resume]
#
# N defaults to the visible GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi), or 2 without GPUs (gloo on
# the CPU); train.batch_size must be divisible by N. Paths are relative to the repository root.
# SIGUSR1 or SIGTERM to this script: every process finishes its step, checkpoints, and the script
# exits 75; rerunning the same command resumes. Environment: PYTHON (default python3),
# NPROC_PER_NODE, OMP_NUM_THREADS (default: CPU cores / N), RESEND_SECONDS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # also sets PYTHON and PREEMPTED_EXIT_CODE
dry_run=0
nproc=${NPROC_PER_NODE:-}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --nproc_per_node|--nproc-per-node) nproc=${2:?"$1 needs a value"}; shift ;;
    --nproc_per_node=*|--nproc-per-node=*) nproc=${1#*=} ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ ${#args[@]} -eq 0 ]; then
  echo "single_node.sh: give a config file, e.g. configs/debug.yaml" >&2
  exit 2
fi

gpus=$(count_gpus)
if [ -z "$nproc" ]; then
  if [ "$gpus" -gt 0 ]; then nproc=$gpus; else nproc=2; fi
fi
case "$nproc" in
  ''|*[!0-9]*|0) echo "single_node.sh: --nproc_per_node must be a positive integer, got '$nproc'" >&2; exit 2 ;;
esac
cores=${SLURM_CPUS_PER_TASK:-$(nproc)}
threads=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}

# torchrun handles only SIGINT/SIGHUP/SIGQUIT itself: SIGTERM and SIGUSR1 go to the workers,
# which checkpoint at the next step boundary (see run_torchrun below).
cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 "--nproc-per-node=$nproc"
     "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT" -m framework train "${args[@]}")
if [ "$dry_run" = 1 ]; then
  show "OMP_NUM_THREADS=$threads" "${cmd[@]}"
  exit 0
fi
export OMP_NUM_THREADS=$threads

run_torchrun "${cmd[@]}"
