# Sourced by launchers/slurm/*.sbatch (not run on its own): finds the repository, the config
# and the interpreter, and derives the variables every rank needs from Slurm's.
# Sets: ROOT, CONFIG, PYTHON, MASTER_ADDR, MASTER_PORT, WORLD_SIZE (exported), OUTPUT_DIR (the
# run's output.dir), DERIVED (an array of `--set` arguments to put before the user's), SRUN_ARGS
# (options for srun).
# Consumes the config argument from the caller's positional parameters.

gps_fail() { echo "gps-ds slurm: error: $*" >&2; exit 2; }

: "${SLURM_JOB_ID:?run this with sbatch (SLURM_JOB_ID is not set)}"

ROOT="${GPS_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT" || gps_fail "cannot enter $ROOT"
[ -f "$ENTRY" ] || gps_fail "$ROOT/$ENTRY not found: submit from the gps-ds repository root or set GPS_DS_ROOT"

# The config: $CONFIG, else the first argument.
if [ -z "${CONFIG:-}" ]; then
    if [ "$#" -eq 0 ] || [[ "$1" == -* ]]; then
        gps_fail "no config: sbatch $(basename "$ENTRY" .py)... CONFIG.json [--set KEY=VALUE ...] (or CONFIG=... in the environment)"
    fi
    CONFIG="$1"
    shift
fi
[ -f "$CONFIG" ] || gps_fail "config file not found: $CONFIG (relative paths start at $ROOT)"

# The interpreter: $PYTHON; else the active virtualenv/conda environment's python; else the
# repository's .venv (what `make install` creates); else python3 on PATH.
if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && command -v python >/dev/null 2>&1; then
        PYTHON=python
    elif [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON="$ROOT/.venv/bin/python"
        # as if activated: the environment's own tools first (DeepSpeed's op builds call ninja)
        export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH"
    else
        PYTHON=python3
    fi
fi

# Rendezvous: rank 0 runs on the first node of the allocation.
if [ -n "${GPS_DS_MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$GPS_DS_MASTER_ADDR"
else
    # (read all lines: `| head -n 1` would end scontrol with SIGPIPE, fatal under pipefail)
    mapfile -t gps_hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    MASTER_ADDR="${gps_hosts[0]:-}"
    [ -n "$MASTER_ADDR" ] || gps_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
fi
MASTER_PORT="${GPS_DS_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
WORLD_SIZE="${SLURM_NTASKS:?}"
export MASTER_ADDR MASTER_PORT WORLD_SIZE

# What the user's arguments already set.
gps_user_sets() {  # gps_user_sets KEY ARGS...: true when some argument reads KEY=...
    local key="$1" a
    shift
    for a in "$@"; do
        case "$a" in "$key="* | "--set=$key="*) return 0 ;; esac
    done
    return 1
}

DERIVED=()
OUTPUT_DIR=""
for a in "$@"; do
    case "$a" in output.dir=* | --set=output.dir=*) OUTPUT_DIR="${a#*output.dir=}" ;; esac
done
# One output folder per job: <config's output.dir, else runs/<config name>>-<job id>.
if [ -z "$OUTPUT_DIR" ]; then
    base="$("$PYTHON" - "$CONFIG" <<'PY' 2>/dev/null || true
import json, sys
try:
    print((json.load(open(sys.argv[1])).get("output") or {}).get("dir") or "")
except Exception:
    print("")
PY
)"
    [ -n "$base" ] || base="runs/$(basename "$CONFIG" .json)"
    OUTPUT_DIR="${base%/}-${SLURM_JOB_ID}"
    DERIVED+=(--set "output.dir=$OUTPUT_DIR")
fi
# MLflow: the usual environment variables, when set, name the server and the experiment.
if [ -n "${MLFLOW_TRACKING_URI:-}" ] && ! gps_user_sets tracking.uri "$@"; then
    DERIVED+=(--set "tracking.uri=$MLFLOW_TRACKING_URI")
fi
if [ -n "${MLFLOW_EXPERIMENT_NAME:-}" ] && ! gps_user_sets tracking.experiment "$@"; then
    DERIVED+=(--set "tracking.experiment=$MLFLOW_EXPERIMENT_NAME")
fi
mlflow_vars="$(compgen -e | grep '^MLFLOW_' | tr '\n' ' ' || true)"
# Network settings for NCCL (GPUs) and gloo (CPU ranks): passed through as they are (srun
# --export=ALL), listed with their values in the log (they hold no secrets).
net_settings=""
for v in $(compgen -e | grep -E '^(NCCL_|TORCH_NCCL_|TORCH_DISTRIBUTED_DEBUG$|GLOO_SOCKET_IFNAME$|TP_SOCKET_IFNAME$)' || true); do
    net_settings+="$v=${!v} "
done

# srun: every variable of this shell reaches the tasks (MLFLOW_*, MASTER_*, PATH, ...);
# one failing rank ends the step instead of leaving the others waiting in a collective.
SRUN_ARGS=(--export=ALL --kill-on-bad-exit=1)
# Slurm 22.05+ no longer passes sbatch's --cpus-per-task on to srun by itself.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] \
        && [ "$SLURM_GPUS_ON_NODE" != "$SLURM_NTASKS_PER_NODE" ]; then
    echo "gps-ds slurm: warning: $SLURM_GPUS_ON_NODE GPU(s) per node but $SLURM_NTASKS_PER_NODE task(s)" \
         "per node; one rank per GPU needs --ntasks-per-node=$SLURM_GPUS_ON_NODE" >&2
fi

echo "gps-ds slurm: $(date "+%F %T") job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST], $WORLD_SIZE rank(s)," \
     "master $MASTER_ADDR:$MASTER_PORT"
# (user:password@ in a URI is masked in the log)
echo "gps-ds slurm: $PYTHON $ENTRY --config $CONFIG ${DERIVED[*]} $*" | sed -E 's#://[^/@ ]+@#://***@#g'
echo "gps-ds slurm: MLflow variables forwarded: ${mlflow_vars:-none}"
echo "gps-ds slurm: network settings forwarded: ${net_settings:-none}"
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [ -z "${NCCL_SOCKET_IFNAME:-}" ]; then
    echo "gps-ds slurm: note: ${SLURM_JOB_NUM_NODES} nodes and no NCCL_SOCKET_IFNAME: NCCL picks the interface" \
         "itself; if ranks cannot reach each other, export NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME) before sbatch" >&2
fi
