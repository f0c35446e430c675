#!/usr/bin/env bash
# Multi-node: run this once on every node; torchrun's c10d rendezvous joins them into one job.
#
#   bash launch/multi_node.sh --nnodes N --node_rank R --rdzv_endpoint HOST:PORT \
#        [--nproc_per_node G] [--rdzv_id ID] [--dry-run] CONFIG.yaml [dotted.key=value ...]
#
# Defaults from the environment: NNODES, NODE_RANK, MASTER_ADDR + MASTER_PORT (port 29500),
# NPROC_PER_NODE, RDZV_ID; inside a SLURM job also SLURM_JOB_NUM_NODES, SLURM_NODEID and
# SLURM_JOB_ID. HOST must be node rank 0's address (it hosts the rendezvous store); G defaults to
# the visible GPUs, or 2 without GPUs. run_dir must be on a filesystem shared by all nodes.
# SIGUSR1/SIGTERM: checkpoint at the next step, exit 75 (rerun to resume), as single_node.sh.
# Environment: PYTHON (default python3), OMP_NUM_THREADS (default: CPU cores / G), RESEND_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # also sets PYTHON and PREEMPTED_EXIT_CODE
dry_run=0
nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
endpoint=""
if [ -n "${MASTER_ADDR:-}" ]; then endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"; fi
nproc=${NPROC_PER_NODE:-}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-sparsemill}}
args=()
need() { [ $# -ge 2 ] || { echo "multi_node.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --nnodes) need "$@"; nnodes=$2; shift ;;
    --nnodes=*) nnodes=${1#*=} ;;
    --node_rank|--node-rank) need "$@"; node_rank=$2; shift ;;
    --node_rank=*|--node-rank=*) node_rank=${1#*=} ;;
    --rdzv_endpoint|--rdzv-endpoint) need "$@"; endpoint=$2; shift ;;
    --rdzv_endpoint=*|--rdzv-endpoint=*) endpoint=${1#*=} ;;
    --nproc_per_node|--nproc-per-node) need "$@"; nproc=$2; shift ;;
    --nproc_per_node=*|--nproc-per-node=*) nproc=${1#*=} ;;
    --rdzv_id|--rdzv-id) need "$@"; rdzv_id=$2; shift ;;
    --rdzv_id=*|--rdzv-id=*) rdzv_id=${1#*=} ;;
    *) args+=("$1") ;;
  esac
  shift
done
fail() { echo "multi_node.sh: $*" >&2; exit 2; }
[ ${#args[@]} -gt 0 ] || fail "give a config file, e.g. configs/debug.yaml"
[ -n "$nnodes" ] || fail "give --nnodes (or set NNODES)"
[ -n "$node_rank" ] || fail "give --node_rank (or set NODE_RANK)"
[ -n "$endpoint" ] || fail "give --rdzv_endpoint HOST:PORT (or set MASTER_ADDR and MASTER_PORT)"
case "$nnodes" in ''|*[!0-9]*|0) fail "--nnodes must be a positive integer, got '$nnodes'" ;; esac
case "$node_rank" in ''|*[!0-9]*) fail "--node_rank must be an integer >= 0, got '$node_rank'" ;; esac
[ "$node_rank" -lt "$nnodes" ] || fail "--node_rank $node_rank is not below --nnodes $nnodes"
case "$endpoint" in *:[0-9]*) ;; *) fail "--rdzv_endpoint must look like HOST:PORT, got '$endpoint'" ;; esac

gpus=$(count_gpus)
if [ -z "$nproc" ]; then
  if [ "$gpus" -gt 0 ]; then nproc=$gpus; else nproc=2; fi
fi
case "$nproc" in ''|*[!0-9]*|0) fail "--nproc_per_node must be a positive integer, got '$nproc'" ;; esac
cores=${SLURM_CPUS_PER_TASK:-$(nproc)}
threads=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
# Node rank 0 hosts the c10d store at the endpoint (explicit, not guessed from host names).
if [ "$node_rank" = 0 ]; then is_host=true; else is_host=false; fi

cmd=("$PYTHON" -m torch.distributed.run "--nnodes=$nnodes" "--nproc-per-node=$nproc"
     --rdzv-backend=c10d "--rdzv-endpoint=$endpoint" "--rdzv-id=$rdzv_id" "--rdzv-conf=is_host=$is_host"
     "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT" -m framework train "${args[@]}")
if [ "$dry_run" = 1 ]; then
  show "OMP_NUM_THREADS=$threads" "${cmd[@]}"
  exit 0
fi
export OMP_NUM_THREADS=$threads
echo "multi_node.sh: node $node_rank of $nnodes ($(hostname -s)), $nproc processes, rendezvous $endpoint id $rdzv_id" >&2

run_torchrun "${cmd[@]}"
