# Sourced by the distcls sbatch scripts (not run on its own). Runs the job's training step so that
# a warning signal becomes a checkpoint and a requeue:
#
#   #SBATCH --signal=B:USR1@180     SLURM sends SIGUSR1 to this batch shell 180 s before the time
#                                   limit (or: scancel --signal=USR1 --batch JOBID, by hand)
#   -> the batch shell sends SIGTERM to every process of the job's steps (scancel --signal=TERM:
#      a signal only, no kill timer; a SIGTERM to srun itself would kill the step within seconds).
#      torchrun's agent handles SIGTERM in every torch version: it stops its workers and waits.
#   -> every rank stops at the next step boundary, rank 0 saves a mid-epoch checkpoint, the
#      ranks exit with code 3
#   -> this shell requeues the job ONCE (scontrol requeue), and nothing else does: ranks never
#      call scontrol. The new instance has SLURM_RESTART_COUNT > 0, so distcls resumes from the
#      newest readable checkpoint in run.out_dir by itself.
# A job that had already finished when the signal came (exit 0) is not requeued.

distcls_fail() {  # one line in the job log, exit 2 (a mistake in the submission)
  echo "distcls: error: $*" >&2
  exit 2
}

distcls_check_args() {  # usage: distcls_check_args SCRIPT_NAME "$@"
  local name=$1
  shift
  # a config file, or a shipped config's name (configs/ of the checkout or of the installed distcls: --config finds it)
  if [ $# -lt 1 ] || { [ ! -f "$1" ] && [ ! -f "${distcls_dir:-.}/configs/${1%.yaml}.yaml" ]; }; then
    distcls_fail "${1:-no config given}: config file not found (looked in $PWD and ${distcls_dir:-.}/configs); usage: sbatch slurm/$name CONFIG.yaml|NAME [key.sub=value ...], submitted from the distcls checkout or with distcls's venv active"
  fi
}

distcls_job_id() {  # the id scontrol requeue needs (array jobs: ARRAYID_TASKID)
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

# The scripts pass --cpus-per-task to srun explicitly: srun of some Slurm releases (22.05 among
# them) does not take it from the batch allocation, and the training step would then get one core
# per task for all its ranks and data-loading workers.
distcls_run_requeueable() {  # usage: distcls_run_requeueable srun [SRUN_ARG...] COMMAND [ARG...]
  local child rc
  DISTCLS_SIGNALLED=0
  trap 'DISTCLS_SIGNALLED=1; echo "distcls-slurm: SIGUSR1 at $(date +%T): stopping the training step (SIGTERM) for a checkpoint, then requeueing"; scancel --signal=TERM "$SLURM_JOB_ID"' USR1
  echo "distcls-slurm: job $(distcls_job_id) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?} at $(date +%T): $*"
  "$@" &
  child=$!
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break  # still running: wait was interrupted by the trap, keep waiting
  done
  # The step may have exited while the trap ran: then the wait above returned 138 (interrupted by
  # USR1), not its status. bash keeps a child's status until it is waited for, so ask once more
  # (an older bash that already handed it out answers 127: keep the status we have).
  wait "$child"
  local again=$?
  [ "$again" != 127 ] && rc=$again
  trap - USR1
  echo "distcls-slurm: training step exited with $rc at $(date +%T)"
  if [ "$DISTCLS_SIGNALLED" = 1 ] && [ "$rc" != 0 ]; then
    # torchrun reports its own shutdown on SIGTERM with a SignalException traceback above: expected.
    echo "distcls-slurm: requeueing job $(distcls_job_id); it resumes from the newest checkpoint"
    scontrol requeue "$(distcls_job_id)" || echo "distcls: error: scontrol requeue $(distcls_job_id) failed; resubmit with --resume auto" >&2
  fi
  return "$rc"
}
