#!/usr/bin/env bash
# Debug mode: one process on the CPU (or one GPU when present), progress bar, deterministic seed.
#
#   bash launch/debug.sh CONFIG.yaml [dotted.key=value ...] [--dry-run]
#
# Writes checkpoints, SAELens exports, TensorBoard logs, eval.json and summary.json into the
# config's run_dir (override with run_dir=...). Environment: PYTHON (default python3).
# SIGUSR1/SIGTERM: checkpoint at the next step and exit 75; rerunning the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
dry_run=0
args=()
for a in "$@"; do
  case "$a" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    --dry-run) dry_run=1 ;;
    *) args+=("$a") ;;
  esac
done
if [ ${#args[@]} -eq 0 ]; then
  echo "debug.sh: give a config file, e.g. configs/debug.yaml" >&2
  exit 2
fi

cmd=("$PYTHON" -m framework train "${args[@]}")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
