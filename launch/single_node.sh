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

PYTHON=${PYTHON:-python3}
PREEMPTED_EXIT_CODE=75
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

# Visible GPUs: CUDA_VISIBLE_DEVICES when set (SLURM sets it), else nvidia-smi, else none.
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case "$CUDA_VISIBLE_DEVICES" in
      ""|-1|NoDevFiles) echo 0 ;;
      *) awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES" ;;
    esac
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
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
# Print a command so that it can be pasted into a shell (quoting only where needed).
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
if [ "$dry_run" = 1 ]; then
  show "OMP_NUM_THREADS=$threads" "${cmd[@]}"
  exit 0
fi
export OMP_NUM_THREADS=$threads

# torchrun runs with SIGTERM/SIGUSR1 ignored, so it never kills the workers mid-checkpoint. This
# script forwards those signals to each worker once its handler is installed (SigCgt in
# /proc/PID/status; re-checked every RESEND_SECONDS until torchrun exits), so a signal that
# arrives while the model is still loading is acted on at the first step, and a worker that is
# already shutting down (handlers reset) is never hit. A run stopped after such a signal exits 75.
run_torchrun() {
  local pid rc sig="" delivered=" " resend=${RESEND_SECONDS:-1}
  (trap '' TERM USR1; exec "$@") &
  pid=$!
  trap 'sig=USR1; forward_signal' USR1
  trap 'sig=TERM; forward_signal' TERM
  trap ':' INT  # Ctrl-C reaches torchrun directly; keep waiting for it
  while kill -0 "$pid" 2>/dev/null; do
    if [ -n "$sig" ]; then
      sleep "$resend"
      forward_signal
    else
      wait "$pid" 2>/dev/null || true
    fi
  done
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  if [ -n "$sig" ] && [ "$rc" != 0 ]; then
    echo "$(basename "$0"): stopped by SIG$sig (torchrun exit code $rc); rerun the same command to resume from the checkpoint (exit code $PREEMPTED_EXIT_CODE)" >&2
    return "$PREEMPTED_EXIT_CODE"
  fi
  return "$rc"
}
# Send $sig to every worker (child of torchrun $pid) that catches it and has not had it yet.
forward_signal() {
  local w mask num
  num=$(kill -l "$sig")
  for w in $(pgrep -P "$pid" 2>/dev/null); do
    case "$delivered" in *" $w "*) continue ;; esac
    if [ -r "/proc/$w/status" ]; then
      mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$w/status" 2>/dev/null) || continue
      if [ -z "$mask" ] || (( ((16#$mask >> (num - 1)) & 1) == 0 )); then continue; fi
    fi
    kill -s "$sig" "$w" 2>/dev/null && delivered="$delivered$w "
  done
  return 0
}
run_torchrun "${cmd[@]}"
