# Shared by single_node.sh and multi_node.sh (sourced): GPU counting, command printing, and
# running torchrun so that preemption signals reach the workers as checkpoint requests.
# shellcheck shell=bash

PYTHON=${PYTHON:-python3}
PREEMPTED_EXIT_CODE=75  # a stopped (checkpointed) run: rerun the same command to resume

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

# Print a command so that it can be pasted into a shell (quoting only where needed).
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

# torchrun runs with SIGTERM/SIGUSR1 ignored, so it never kills the workers mid-checkpoint. This
# script forwards those signals to each worker once its handler is installed (SigCgt in
# /proc/PID/status; re-checked every RESEND_SECONDS until torchrun exits), so a signal that
# arrives while the model is still loading is acted on at the first step, and a worker that is
# already shutting down (handlers reset) is never hit. A run stopped after such a signal exits 75.
# If this script dies (kill -9, OOM), torchrun is killed with it (setpriv --pdeathsig, where
# util-linux has it) and its workers with torchrun (framework/watchdog.py, which learns
# torchrun's pid from SPARSEMILL_AGENT_PID).
run_torchrun() {
  local pid rc sig="" delivered=" " resend=${RESEND_SECONDS:-1} guard=()
  if setpriv --pdeathsig KILL true 2>/dev/null; then guard=(setpriv --pdeathsig KILL); fi
  (trap '' TERM USR1; export SPARSEMILL_AGENT_PID=$BASHPID; exec ${guard[@]+"${guard[@]}"} "$@") &
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
