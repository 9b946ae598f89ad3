#!/usr/bin/env bash
# The GPU-only checks in one call (about 6 minutes on one H200):
#   1. a DeepSpeed ZeRO-2 `iv2 fit` of the tiny stage-2 config in bf16 (40 steps, 2 validation batches);
#   2. the l14 stage-2 bf16 step, eager and compiled, through SDPA and flash-attn when it is installed,
#      with its MFU against the card's data-sheet dense bf16 peak and a measured bf16 matmul
#      (benchmarks/gpu_check.py).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (default: $OUT, else ./gpu_check_out)
#        bash benchmarks/gpu_check.sh --dry-run     (CPU: tiny preset, no fit; tests the path)
# Packages the GPU machine lacks (deepspeed, jsonargparse, av, ...) may be carried as wheels in .whl/
# (see docs/benchmarks.md, "GPU check"); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"

export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then  # this machine's own packages; the carried wheels are for the GPU machine
  PYTHONPATH="$PWD:${PYTHONPATH:-}" "$PY" -m benchmarks.gpu_check --dry-run --steps 1 --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
status=0


{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT_DIR/env.txt"

echo "== 1. DeepSpeed ZeRO-2 tiny stage-2 fit (bf16) =="
rm -rf /tmp/gpu_check_zero2
timeout 240 "$PY" -m iv2_lightning fit \
  --config configs/stage2/tiny.yaml --config configs/strategy/deepspeed_zero2.yaml \
  --trainer.devices 1 --trainer.max_steps 40 --trainer.limit_val_batches 2 \
  --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/gpu_check_zero2 \
  --data.init_args.num_workers 4 2>&1 | tee "$OUT_DIR/zero2_fit.log"
fit_rc=${PIPESTATUS[0]}
echo "zero2 fit exit status: $fit_rc" | tee -a "$OUT_DIR/zero2_fit.log"
[ "$fit_rc" = 0 ] || status=1
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT_DIR/zero2_fit.log"
# the fit's logged scalars: first and last training loss, last validation figures
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
files = sorted(glob.glob("/tmp/gpu_check_zero2/**/events.out.tfevents.*", recursive=True))
if not files:
    print("zero2 fit: no event file written")
for f in files:
    acc = EventAccumulator(f)
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        ev = acc.Scalars(tag)
        if tag.startswith(("train/loss", "val/")):
            print(f"{tag}: first {ev[0].value:.4f} (step {ev[0].step}), last {ev[-1].value:.4f} (step {ev[-1].step})")
EOF
ls -R /tmp/gpu_check_zero2 | grep -E "ckpt|checkpoint" | head -5 | tee -a "$OUT_DIR/zero2_fit.log"

echo "== 2. l14 stage-2 bf16 step: eager/compiled x SDPA/flash-attn =="
timeout 420 "$PY" -m benchmarks.gpu_check --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
