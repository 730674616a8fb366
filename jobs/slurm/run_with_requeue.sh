#!/bin/bash
# Shared body of the sbatch scripts: launch the training job step, forward SLURM's time-limit
# warning to the ranks, and requeue the job when the ranks stopped early with a checkpoint.
#
# The ranks react to SIGUSR1/SIGTERM/SIGINT by agreeing on the next step, checkpointing every
# client there and exiting with code 3 (runtime.signals.EXIT_RESUMABLE). A requeued job runs the
# same command on the same run.out_dir and resumes from that checkpoint.
#
# Usage (from an sbatch script): run_with_requeue.sh JOB.yaml [key=value ...]
set -uo pipefail

job=${1:?usage: run_with_requeue.sh JOB.yaml [key=value ...]}
shift
# One thread pool per rank sized to its CPUs; without this every rank starts one thread per core.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# From Slurm 22.05 on, srun does not inherit sbatch's --cpus-per-task: without passing it, every
# task of the step is bound to one CPU while it runs torch and loader threads. Pass it explicitly
# (and export it for any srun a site wrapper adds). The ranks log the CPUs they really got.
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

# --kill-on-bad-exit: a rank that dies takes the step down instead of leaving the others in MPI.
# --mpi: how srun wires the ranks into one MPI job. Open MPI 5 (also the PyPI wheel) speaks
# PMIx only: with pmi2 or none every rank starts alone. Sites choose with MHD_SRUN_MPI (e.g.
# pmix_v4, or pmi2 for an MPICH build of mpi4py); `srun --mpi=list` shows what SLURM offers.
# The root rank writes the job's exit code here: srun's own exit code is not enough (when the
# ranks stop on a signal with code 3, srun --kill-on-bad-exit kills the ranks still finalising
# MPI and reports their SIGTERM instead).
export MHD_EXIT_FILE="${TMPDIR:-/tmp}/mhd-exit-${SLURM_JOB_ID:-$$}-$$"
rm -f "$MHD_EXIT_FILE"
srun --kill-on-bad-exit=1 --mpi="${MHD_SRUN_MPI:-pmix}" "${cpus[@]}" python -m mhd_hpc.train "$job" "$@" &
step_pid=$!

forward() {
    echo "[run_with_requeue] $(date -Is) signal received: asking ranks to checkpoint and stop"
    kill -USR1 "$step_pid" 2>/dev/null || true   # srun forwards SIGUSR1 to every task
}
trap forward USR1 TERM

while true; do
    wait "$step_pid"
    rc=$?
    # 'wait' also returns when a trapped signal arrives; keep waiting while srun still runs.
    kill -0 "$step_pid" 2>/dev/null || break
done

reported=$(cat "$MHD_EXIT_FILE" 2>/dev/null || true)
rm -f "$MHD_EXIT_FILE"
if [ "$rc" -eq 3 ] || [ "$reported" = 3 ]; then
    echo "[run_with_requeue] $(date -Is) ranks checkpointed; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$rc" -eq 0 ] && [ "$reported" != 0 ]; then  # srun succeeded, but nothing trained
    echo "[run_with_requeue] $(date -Is) the training step ended without the job's exit code" \
         "(srun failed to launch the ranks?): failing the job"
    exit 1
fi
echo "[run_with_requeue] $(date -Is) training step ended with exit code $rc"
exit "$rc"
