#!/usr/bin/env bash
# The prepared GPU check of inference (run through the device tool from the repository root, with
# the segment-anything wheel carried in .gpu/): CUDA correctness and timings of the ViT-B
# encoder (every attention variant of medsam.model.image_encoder), decoder, LiteMedSAM, a
# 100-slice volume, image-to-embedding with preprocessing, and bf16 mask agreement, against the reference in the same process.
# Writes into $OUT (gpu_results.json and logs); docs/performance.md's GPU section cites them.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/segment_anything-*.whl >/dev/null 2>&1
export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
{ nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/gpu.txt" 2>&1
timeout 300 python3 benchmarks/gpu_check.py --out "$OUT" --parts inference > "$OUT/inference.log" 2>&1
echo "inference exit $? after $(( $(date +%s) - start )) s"
timeout 150 python3 benchmarks/run.py --device cuda --only volume --repeats 5 > "$OUT/volume.log" 2>&1
echo "volume exit $? after $(( $(date +%s) - start )) s"
timeout 120 python3 benchmarks/run.py --device cuda --only image --repeats 10 > "$OUT/image.log" 2>&1
echo "image exit $? after $(( $(date +%s) - start )) s"
timeout 120 python3 benchmarks/run.py --device cuda --only agreement > "$OUT/agreement.log" 2>&1
echo "agreement exit $? after $(( $(date +%s) - start )) s"
for group in encoder decoder; do
  timeout 100 python3 benchmarks/run.py --device cuda --only $group --repeats 10 > "$OUT/$group.log" 2>&1
  echo "$group exit $? after $(( $(date +%s) - start )) s"
done
tail -4 "$OUT/encoder.log"; tail -2 "$OUT/decoder.log"; tail -3 "$OUT/volume.log"; tail -2 "$OUT/image.log"; grep -A3 mask_agreement "$OUT/agreement.log"
