#!/usr/bin/env bash
# The one prepared GPU session (run through the device tool from the repository root, with .gpu/
# carried: the demo corpus, lite_medsam.pth and the segment-anything wheel). Trains the embedded
# default model (configs/demo_lite.yaml) under a time limit, exports it to fp16 safetensors, and
# scores it on the held-out split with `medsam benchmark` (plain and zoomed). Writes into $OUT.
#   TRAIN_SECONDS=390 bash benchmarks/gpu_session.sh [extra config overrides, e.g. data.clicks=3
#       data.augment.zoom_prob=0.5 data.augment.lesion_prob=0.5
#       data.augment.lesion_kinds=[tumour,cyst,nodule,mass] train.max_steps=1800]
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl >/dev/null 2>&1
export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
timeout "$TRAIN_SECONDS" python3 -m medsam train configs/demo_lite.yaml \
  data.corpus=.gpu/corpus model.checkpoint=.gpu/lite_medsam.pth output.dir=/tmp/run \
  train.progress=false data.workers=14 "$@" > "$OUT/train.log" 2>&1
echo "train exit $? after $(( $(date +%s) - start )) s" >> "$OUT/train.log"
cp /tmp/run/metrics.csv /tmp/run/config.yaml "$OUT/" 2>/dev/null
ckpt=/tmp/run/best.pt; [ -f "$ckpt" ] || ckpt=/tmp/run/latest.pt
python3 - "$ckpt" "$OUT" <<'PY' >> "$OUT/train.log" 2>&1
import sys, os
from medsam.train.export import export_checkpoint
from medsam.weights import load_model, save_model
ckpt, out = sys.argv[1], sys.argv[2]
export_checkpoint(ckpt, "/tmp/demo_fp32.safetensors")
model = load_model("/tmp/demo_fp32.safetensors", device="cpu").half()
save_model(model, f"{out}/demo_model.safetensors", extra={"source_checkpoint": os.path.basename(ckpt)})
print("exported", ckpt, os.path.getsize(f"{out}/demo_model.safetensors"), "bytes")
PY
# Quick held-out signal on the GPU (the model card's numbers are re-measured on the CPU).
for zoom in "--no-zoom" ""; do
  name=zoom; [ -n "$zoom" ] && name=plain
  timeout 60 python3 -m medsam benchmark --corpus .gpu/corpus --split test \
    --checkpoint "$OUT/demo_model.safetensors" --device cuda --no-plot $zoom \
    -o "/tmp/bench_$name" > "$OUT/bench_$name.log" 2>&1
  cp "/tmp/bench_$name/summary.md" "$OUT/bench_${name}_summary.md" 2>/dev/null
done
echo "done after $(( $(date +%s) - start )) s"
