#!/usr/bin/env bash
# The one prepared GPU session (run through the device tool from the repository root, with .gpu/
# carried: the demo corpus, lite_medsam.pth and the segment-anything wheel). Writes into $OUT.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl >/dev/null 2>&1
export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRAIN_SECONDS=${TRAIN_SECONDS:-110}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
timeout "$TRAIN_SECONDS" python3 -m medsam.cli_train train configs/demo_lite.yaml \
  data.corpus=.gpu/corpus model.checkpoint=.gpu/lite_medsam.pth output.dir=/tmp/run \
  train.progress=false "$@" > "$OUT/train.log" 2>&1
echo "train exit $?" >> "$OUT/train.log"
cp /tmp/run/metrics.csv "$OUT/" 2>/dev/null
ckpt=/tmp/run/best.pt; [ -f "$ckpt" ] || ckpt=/tmp/run/latest.pt
python3 - "$ckpt" "$OUT" <<'PY' >> "$OUT/train.log" 2>&1
import sys, torch, os
from medsam.train.export import export_checkpoint
from medsam.weights import load_model, save_model
ckpt, out = sys.argv[1], sys.argv[2]
path = export_checkpoint(ckpt, "/tmp/demo_fp32.safetensors")
model = load_model("/tmp/demo_fp32.safetensors", device="cpu").half()
save_model(model, "/tmp/demo_model.safetensors", extra={"source_checkpoint": os.path.basename(ckpt)})
data = open("/tmp/demo_model.safetensors", "rb").read()
half = len(data) // 2 + 1
open(f"{out}/demo_model.part0", "wb").write(data[:half])
open(f"{out}/demo_model.part1", "wb").write(data[half:])
print("exported", ckpt, len(data), "bytes")
PY
timeout 60 python3 benchmarks/gpu_check.py --out "$OUT" --parts inference > "$OUT/inference.log" 2>&1
echo done
