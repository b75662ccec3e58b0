#!/usr/bin/env bash
# Per-task wrapper that launchers/slurm/*.sbatch start with `srun` (one task per GPU, or per
# CPU rank). It sets the torch.distributed / DeepSpeed variables from Slurm's own, then runs
# the command it is given:
#
#   RANK        <- SLURM_PROCID        global rank of this task
#   WORLD_SIZE  <- SLURM_NTASKS        tasks in the job step
#   LOCAL_RANK  <- SLURM_LOCALID       rank on this node (= the GPU index DeepSpeed picks)
#   LOCAL_SIZE, LOCAL_WORLD_SIZE       tasks on this node (from SLURM_STEP_TASKS_PER_NODE)
#   CROSS_RANK  <- SLURM_NODEID        node index;  CROSS_SIZE <- SLURM_NNODES
#
# MASTER_ADDR and MASTER_PORT come from the batch script (same for every task).
# gps_ds.distributed.init_distributed reads these and picks nccl when CUDA is available,
# gloo otherwise.
set -euo pipefail

: "${SLURM_PROCID:?rank_env.sh runs under srun (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?MASTER_ADDR is not set (the batch script sets it)}"
: "${MASTER_PORT:?MASTER_PORT is not set (the batch script sets it)}"

export RANK="$SLURM_PROCID"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?}}"
export LOCAL_RANK="${SLURM_LOCALID:?}"
export CROSS_RANK="${SLURM_NODEID:-0}"
export CROSS_SIZE="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"

# Tasks on this node: SLURM_STEP_TASKS_PER_NODE reads like "4(x2),2" (one count per node,
# "(xN)" repeating it N times); take the count of node number SLURM_NODEID.
local_size() {
    local spec="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}" node="${SLURM_NODEID:-0}" i=0 part count rep
    [ -n "$spec" ] || { echo 1; return; }
    IFS=',' read -r -a parts <<<"$spec"
    for part in "${parts[@]}"; do
        count="${part%%(*}"
        rep=1
        if [[ "$part" == *"(x"* ]]; then rep="${part##*(x}"; rep="${rep%)}"; fi
        if [ "$node" -lt $((i + rep)) ]; then echo "$count"; return; fi
        i=$((i + rep))
    done
    echo 1
}
LOCAL_SIZE="$(local_size)"
export LOCAL_SIZE LOCAL_WORLD_SIZE="$LOCAL_SIZE"

# Slurm may bind each task to its own GPU (--gpus-per-task, --gpu-bind): then the task sees a
# single device, which is device 0 for CUDA, whatever its local rank.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
    IFS=',' read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    if [ "${#visible[@]}" -eq 1 ] && [ "$LOCAL_SIZE" -gt 1 ]; then
        export LOCAL_RANK=0
    elif [ "$LOCAL_RANK" -ge "${#visible[@]}" ]; then
        echo "rank_env.sh: rank $RANK has local rank $LOCAL_RANK but only ${#visible[@]} GPU(s) are visible" \
             "(CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES): ask for as many tasks per node as GPUs per node" >&2
        exit 2
    fi
fi

# One rank per GPU or CPU slot: keep intra-op threads to the CPUs Slurm gave this task.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# USR1 is the batch script's requeue signal (--signal=B:USR1@...); one that reaches a rank
# anyway (`scancel --signal=USR1` without --batch) must not kill the training.
trap '' USR1

echo "gps-ds slurm: rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_SIZE node $CROSS_RANK/$CROSS_SIZE" \
     "on $(hostname) master $MASTER_ADDR:$MASTER_PORT"
exec "$@"
