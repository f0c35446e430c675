# shellcheck shell=bash
# Sourced by slurm/*.sbatch: the job header, the rendezvous address, and the srun step with
# signal forwarding and self-requeue. Not meant to be run on its own.
#
# Exit code 75 (framework/preemption.py) means "checkpoint written, run me again": the job then
# requeues itself with `scontrol requeue`, and the next start resumes from RUN_DIR/checkpoints.
# Variables: MAX_REQUEUES (default 100), STEP_WAIT_SECONDS (multi-node: kill the other nodes this
# long after the first one exits, default 600).

PREEMPTED_EXIT_CODE=75

sm_log() { echo "[sparsemill-slurm $(date +%H:%M:%S)] $*" >&2; }

sm_header() {
  local job=${SLURM_JOB_ID:-?}
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then job="$job (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})"; fi
  sm_log "=== job $job '${SLURM_JOB_NAME:-}' attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) (restart count ${SLURM_RESTART_COUNT:-0})"
  sm_log "nodes ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-1}), cpus/task ${SLURM_CPUS_PER_TASK:-?}, gpus/node ${SLURM_GPUS_ON_NODE:-0}, repo $PWD"
}

# MASTER_ADDR = first host of the allocation, MASTER_PORT = 10000 + job id mod 20000 (below the
# Linux ephemeral range); RDZV_HOST / RDZV_PORT override them. Variables inherited from the
# submitting shell (MASTER_*, NNODES, NODE_RANK) are not trusted.
sm_rendezvous() {
  MASTER_ADDR=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')}
  MASTER_PORT=${RDZV_PORT:-$(( 10000 + ${SLURM_JOB_ID:-0} % 20000 ))}
  NNODES=${SLURM_JOB_NUM_NODES:-1}
  RDZV_ID=${SLURM_JOB_ID:-sparsemill}
  export MASTER_ADDR MASTER_PORT NNODES RDZV_ID
  unset NODE_RANK  # each node's launcher takes SLURM_NODEID
  sm_log "rendezvous $MASTER_ADDR:$MASTER_PORT, $NNODES node(s)"
}

# sm_run srun ARGS...: run the step in the background so that signals reach this shell. USR1 sent
# to the batch shell only (scancel --batch, --signal=B:USR1@...) is forwarded to the step (srun
# passes it to every task); TERM (scancel, time limit, preemption by SLURM) is not: SLURM signals
# the steps itself, and a cancelled job is not requeued. Requeues when the step exits 75, or
# exits non-zero after a USR1.
sm_run() {
  local pid rc=0 got=""
  "$@" &
  pid=$!
  trap 'got=USR1; sm_log "batch shell got SIGUSR1: forwarding to the step"; kill -USR1 "$pid" 2>/dev/null || true' USR1
  trap 'got=TERM; sm_log "batch shell got SIGTERM: the job is ending (cancelled, time limit or preempted)"' TERM
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" 2>/dev/null || true
  done
  wait "$pid" 2>/dev/null || rc=$?
  trap - USR1 TERM
  sm_log "step exited with code $rc"
  if [ "$got" = TERM ]; then
    [ "$rc" = "$PREEMPTED_EXIT_CODE" ] && sm_log "checkpoint written; resubmit the same job to resume (SLURM requeues preempted jobs itself with PreemptMode=REQUEUE)"
    return "$rc"
  fi
  if [ "$rc" = "$PREEMPTED_EXIT_CODE" ] || { [ "$got" = USR1 ] && [ "$rc" != 0 ]; }; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "${MAX_REQUEUES:-100}" ]; then
      sm_log "preempted, but already requeued $restarts times (MAX_REQUEUES=${MAX_REQUEUES:-100}): not requeueing"
      return "$PREEMPTED_EXIT_CODE"
    fi
    sm_log "preempted: requeueing job ${SLURM_JOB_ID} (restart $(( restarts + 1 ))); it resumes from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || { sm_log "scontrol requeue failed; resubmit the same job to resume"; return "$PREEMPTED_EXIT_CODE"; }
    return 0
  fi
  return "$rc"
}
