#!/usr/bin/env bash
# Submit one of the sbatch scripts with its #SBATCH defaults overridden from the environment.
#
#   bash slurm/submit.sh single CONFIG.yaml [dotted.key=value ...] [--dry-run]
#   bash slurm/submit.sh multi  CONFIG.yaml [dotted.key=value ...] [--dry-run]
#   bash slurm/submit.sh sweep  SWEEP_FILE  [dotted.key=value ...] [--dry-run]
#
# --parsable is passed to sbatch (prints only the job id).
# Environment (unset = the script's #SBATCH default): NODES (multi), GPUS_PER_NODE, CPUS_PER_TASK,
# TIME, PARTITION, ACCOUNT, QOS, JOB_NAME, SIGNAL_SECONDS (USR1 this long before the time limit),
# ARRAY_PARALLEL (sweep: max tasks at once), CPU=1 (no GPUs: --gpus-per-node=0 and CPUS_PER_TASK
# defaulting to NPROC_PER_NODE or 2), SBATCH_EXTRA (more sbatch options, split on spaces).
# Runs from the repository root, so the log goes to slurm/logs/. Prints the sbatch command.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
parsable=()
args=()
for a in "$@"; do
  case "$a" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --parsable) parsable=(--parsable) ;;
    *) args+=("$a") ;;
  esac
done
if [ ${#args[@]} -lt 2 ]; then
  echo "submit.sh: usage: submit.sh single|multi|sweep CONFIG_OR_SWEEP_FILE [dotted.key=value ...]" >&2
  exit 2
fi
kind=${args[0]}
case "$kind" in
  single) script=slurm/single_node.sbatch ;;
  multi) script=slurm/multi_node.sbatch ;;
  sweep) script=slurm/sweep.sbatch ;;
  *) echo "submit.sh: unknown kind '$kind' (single, multi or sweep)" >&2; exit 2 ;;
esac

opts=()
[ -n "${JOB_NAME:-}" ] && opts+=("--job-name=$JOB_NAME")
[ -n "${TIME:-}" ] && opts+=("--time=$TIME")
[ -n "${PARTITION:-}" ] && opts+=("--partition=$PARTITION")
[ -n "${ACCOUNT:-}" ] && opts+=("--account=$ACCOUNT")
[ -n "${QOS:-}" ] && opts+=("--qos=$QOS")
[ -n "${SIGNAL_SECONDS:-}" ] && opts+=("--signal=USR1@$SIGNAL_SECONDS")
if [ "$kind" = multi ] && [ -n "${NODES:-}" ]; then opts+=("--nodes=$NODES"); fi
gpus=${GPUS_PER_NODE:-}
cpus=${CPUS_PER_TASK:-}
if [ "${CPU:-0}" = 1 ]; then
  gpus=0
  cpus=${cpus:-${NPROC_PER_NODE:-2}}
fi
[ -n "$gpus" ] && opts+=("--gpus-per-node=$gpus")
[ -n "$cpus" ] && opts+=("--cpus-per-task=$cpus")
if [ "$kind" = sweep ]; then
  sweep=${args[1]}
  [ -f "$sweep" ] || { echo "submit.sh: sweep file not found: $sweep" >&2; exit 2; }
  n=$(grep -c -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$sweep" || true)
  [ "$n" -gt 0 ] || { echo "submit.sh: $sweep has no runs" >&2; exit 2; }
  opts+=("--array=0-$(( n - 1 ))${ARRAY_PARALLEL:+%$ARRAY_PARALLEL}")
fi
if [ -n "${SBATCH_EXTRA:-}" ]; then
  read -r -a extra <<<"$SBATCH_EXTRA"
  opts+=("${extra[@]}")
fi

cmd=(sbatch ${parsable[@]+"${parsable[@]}"} ${opts[@]+"${opts[@]}"} "$script" "${args[@]:1}")
printf '%q ' "${cmd[@]}" >&2; echo >&2
[ "$dry_run" = 1 ] && exit 0
mkdir -p slurm/logs
exec "${cmd[@]}"
