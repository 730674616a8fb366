#!/bin/bash
# Shared body of the sbatch scripts: launch the training job step, forward SLURM's time-limit
# warning to the ranks, and requeue the job when the ranks stopped early with a checkpoint.
#
# The ranks react to SIGUSR1/SIGTERM by agreeing on the next log step, checkpointing every
# client there and exiting with code 3 (mhd_hpc.trainer.EXIT_RESUMABLE). A requeued job runs the
# same command on the same run.out_dir and resumes from that checkpoint.
#
# Usage (from an sbatch script): run_with_requeue.sh JOB.yaml [key=value ...]
set -uo pipefail

job=${1:?usage: run_with_requeue.sh JOB.yaml [key=value ...]}
shift
# One thread pool per rank sized to its CPUs; without this every rank starts one thread per core.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --kill-on-bad-exit: a rank that dies takes the step down instead of leaving the others in MPI.
# --mpi: how srun wires the ranks into one MPI job. Open MPI 5 (also the PyPI wheel) speaks
# PMIx only: with pmi2 or none every rank starts alone. Sites choose with MHD_SRUN_MPI (e.g.
# pmix_v4, or pmi2 for an MPICH build of mpi4py); `srun --mpi=list` shows what SLURM offers.
srun --kill-on-bad-exit=1 --mpi="${MHD_SRUN_MPI:-pmix}" python -m mhd_hpc.train "$job" "$@" &
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

if [ "$rc" -eq 3 ]; then
    echo "[run_with_requeue] $(date -Is) ranks checkpointed; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[run_with_requeue] $(date -Is) training step ended with exit code $rc"
exit "$rc"
