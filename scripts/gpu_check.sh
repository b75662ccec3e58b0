#!/usr/bin/env bash
# The GPU check of issue 12, item 7: one script, under 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh OUTDIR               # on a machine with one CUDA GPU
#   bash scripts/gpu_check.sh OUTDIR --cpu-dry-run  # the same steps, tiny and on CPU (tests/test_gpu_check.py)
#
# Steps (each logged to OUTDIR/<step>.log, its result JSON to OUTDIR/<step>.json, one line per step in
# OUTDIR/summary.txt; the script goes on after a failed step and exits 1 if any failed):
#   env       torch / CUDA / GPU / triton versions
#   data      digits shards (offline, 1,797 8x8 images)
#   train     `deepspeed --num_gpus 1 launchers/train.py` (NCCL on GPU), GPS K=1, bf16 on GPU, an
#             evaluation every epoch and a DeepSpeed checkpoint per epoch
#   select    `gps-ds select` (one process, the model on the accelerator)
#   eval      `gps-ds eval` of the trained delta, checked against the trainer's own test metric
#   kernels   `pytest -m gpu`: sparse kernels (gather, triton, dense) against dense references on CUDA,
#             fp32 and bf16; then `gps-ds bench kernels --device cuda` (dense vs gather vs triton)
#   bench     `gps-ds bench train --device cuda` on ViT-B/16, autocast bf16: gps-sparse, full, lora, frozen
# Environment: PYTHON (default: the checkout's .venv/bin/python, else python3).
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR [--cpu-dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown option '$arg'" >&2; usage ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
export HF_HUB_OFFLINE=1 MLFLOW_ALLOW_FILE_STORE=true PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$PYTHON"):$PATH"  # this environment's ninja and deepspeed first
GPSDS=("$PYTHON" -m gps_ds.cli)
: > "$OUT/summary.txt"
FAILED=0
T0=$(date +%s)

# step NAME TIMEOUT_S CMD...: stdout -> OUT/NAME.json when it is JSON, else OUT/NAME.out; stderr -> OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local start rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  rc=$?
  if [ -s "$OUT/$name.out" ] && "$PYTHON" -c 'import json,sys; json.load(open(sys.argv[1]))' "$OUT/$name.out" 2>/dev/null; then
    mv "$OUT/$name.out" "$OUT/$name.json"
  fi
  local status=ok
  if [ $rc -ne 0 ]; then status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"; FAILED=1; fi
  echo "$name: $status, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  return $rc
}

if [ $DRY -eq 1 ]; then
  DEVICE=cpu; PRECISION=null; TRAIN_MODEL=test_vit; BENCH_MODEL=test_vit; BENCH_ARGS=(--img-size 32 --batch 2 --steps 1 --warmup 1)
  KERNEL_ARGS=(--batch 1 --tokens 8 --ks 1,2 --reps 1); MB=16
else
  DEVICE=cuda; PRECISION='{"enabled": true}'; TRAIN_MODEL=test_vit; BENCH_MODEL=vit_base_patch16_224
  BENCH_ARGS=(--batch 64 --steps 10 --warmup 3 --amp bf16); KERNEL_ARGS=(--batch 64 --ks 1,2,4,10,32 --reps 20); MB=64
fi

step env 120 "$PYTHON" - "$DEVICE" <<'EOF'
import json, sys
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as err:
    info["triton"] = f"not importable: {err}"
print(json.dumps(info))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: CUDA is not available to torch (use --cpu-dry-run on a CPU machine)")
EOF
[ $? -eq 0 ] || { echo "gpu_check.sh: stopping: no usable device (see $OUT/env.log)" >&2; exit 1; }

DATA=$OUT/data/digits
step data 300 "${GPSDS[@]}" shards digits "$DATA" --quiet --overwrite --json

# one config for train / select / eval: test_vit at 32 px on the digits, GPS K=1, 2 epochs of 4 steps
CFG=$OUT/config.json
"$PYTHON" - "$CFG" "$DATA" "$OUT/run" "$TRAIN_MODEL" "$MB" "$PRECISION" "$DEVICE" <<'EOF'
import json, sys
cfg_path, data, run, model, mb, precision, device = sys.argv[1:]
cfg = {
    "model": {"name": model, "img_size": 32},
    "data": {"train": data, "test": data, "recipe": "digits", "image_size": 32, "workers": 2, "steps_per_epoch": 4},
    "gps": {"k": 1, "loss": "supcon", "max_batches": 2},
    "train": {"method": "gps", "epochs": 2, "lr": 3e-3, "optimizer": "adamw", "weight_decay": 0.05, "log_every": 2},
    "deepspeed": {"train_micro_batch_size_per_gpu": int(mb)},
    "tracking": {"enabled": True, "uri": f"file:{run}-mlruns"},
    "output": {"dir": run, "overwrite": True, "checkpoints": True},
}
if json.loads(precision) is not None:
    cfg["deepspeed"]["bf16"] = json.loads(precision)
json.dump(cfg, open(cfg_path, "w"), indent=1)
EOF

PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step train 300 "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" \
  launchers/train.py --config "$CFG" --json
# the trainer's summary is its last JSON line (the launcher prefixes nothing on stdout of rank 0)
if [ -f "$OUT/train.out" ]; then grep '^{' "$OUT/train.out" | tail -1 > "$OUT/train.json" || true; fi

step select 240 "${GPSDS[@]}" select --config "$CFG" --out "$OUT/mask.safetensors" --json

DELTA=$OUT/run/delta_last.safetensors
[ -f "$OUT/run/delta_best.safetensors" ] && DELTA=$OUT/run/delta_best.safetensors
step eval 240 "${GPSDS[@]}" eval --config "$CFG" --delta "$DELTA" --json

# checks on what train / eval wrote: a checkpoint, per-epoch evaluation, eval == the trainer's test metric
step checks 60 "$PYTHON" - "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
problems = []
train = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else None
ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
if not any((out / "run" / "checkpoints").glob("*")):
    problems.append("no DeepSpeed checkpoint under run/checkpoints")
if train is None:
    problems.append("no trainer summary (train.json)")
elif not train.get("test"):
    problems.append("the trainer reported no test metrics")
if ev is None:
    problems.append("no gps-ds eval result (eval.json)")
elif train and train.get("test"):
    a, b = train["test"]["top1"], ev["top1"]
    if abs(a - b) > 1e-6 * max(1.0, abs(a)) + (0.5 if device == "cuda" else 1e-6):  # bf16 on GPU: <= 0.5 points
        problems.append(f"gps-ds eval top1 {b} differs from the trainer's test top1 {a}")
print(json.dumps({"ok": not problems, "problems": problems,
                  "train_test_top1": train and train.get("test", {}).get("top1"), "eval_top1": ev and ev.get("top1")}))
sys.exit(1 if problems else 0)
EOF

# on CPU every gpu-marked test skips itself (the dry run checks that they are collected and skip cleanly)
step kernels_tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/ -rs
step kernels_bench 240 "${GPSDS[@]}" bench kernels --device "$DEVICE" "${KERNEL_ARGS[@]}" --json \
  --write "$OUT/BENCHMARKS-gpu.md"
step bench_train 420 "${GPSDS[@]}" bench train --device "$DEVICE" --model "$BENCH_MODEL" --k 1 \
  --methods gps-sparse,full,lora,frozen "${BENCH_ARGS[@]}" --json --write "$OUT/BENCHMARKS-gpu.md"

echo "total: $(( $(date +%s) - T0 )) s; results in $OUT (summary.txt, *.json, BENCHMARKS-gpu.md)" | tee -a "$OUT/summary.txt"
exit $FAILED
