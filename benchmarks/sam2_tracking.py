"""Tracking speed of the SAM2 family against the reference ``sam2==1.1.0``, in the same run.

MedSAM2's 3D inference on the bundled real CT volume (12 slices of 350 x 512, one object boxed on
slice 6): the box on the key slice, propagation forward, a reset, the same box, propagation
backward, for SAM2.1 Hiera-T at 512 px (the MedSAM2 configuration) with seeded random weights
saved in the official format. The reference is driven through its video predictor with the
frames already preprocessed (its own frame loading reads JPEG folders); ours through
``medsam.tracking.track_volume`` with preprocessing included. Timings alternate between the two,
``--repeats`` times, and report the median; ``--background-load N`` measures again while N busy
processes hold cores. Masks are compared too (the share of voxels where the two label maps agree).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sam2_tracking.py [--repeats 3] [--background-load 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--background-load", type=int, default=0, metavar="N")
    args = parser.parse_args()

    import torch
    from PIL import Image

    import medsam
    from medsam.io import read_image
    from medsam.tracking import track_volume
    from medsam.volume import Box2D
    from reference_sam2 import build_reference_medsam2_tracker
    from run import idle_and_loaded

    reference = build_reference_medsam2_tracker()  # hole filling off on both sides
    tmp = Path(tempfile.mkdtemp())
    torch.save({"model": reference.state_dict()}, tmp / "MedSAM2_latest.pt")
    model = medsam.load_model(tmp / "MedSAM2_latest.pt", device="cpu")

    samples = Path(medsam.__path__[0]) / "data" / "samples"
    volume = read_image(samples / "ct_volume.nii.gz").array
    labels = read_image(samples / "ct_volume_label.nii.gz").array
    key = volume.shape[0] // 2
    ys, xs = np.nonzero(labels[key] == int(np.unique(labels[key])[1]))
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    Z, H, W = volume.shape
    frames_dir = tmp / "frames"
    frames_dir.mkdir()
    for z in range(Z):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames_dir / f"{z:05d}.jpg")
    contract = medsam.preprocess.get_contract("medsam2", 512)

    def run_reference() -> np.ndarray:
        images = torch.cat([contract.prepare_image(volume[z])[0] for z in range(Z)])
        state = reference.init_state(str(frames_dir))
        state.update(images=images, video_height=H, video_width=W, cached_features={})
        out = np.zeros(volume.shape, np.uint8)
        with torch.inference_mode():
            for reverse in (False, True):
                reference.reset_state(state)
                reference.add_new_points_or_box(state, frame_idx=key, obj_id=1, box=np.array(box, np.float32))
                for frame, _ids, logits in reference.propagate_in_video(state, reverse=reverse):
                    out[frame] = (logits[0, 0] > 0).numpy()
        return out

    def run_ours() -> np.ndarray:
        return track_volume(model, volume, [Box2D(*box, slice=key)], fill_hole_area=0).labels

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, volume {volume.shape}, key slice {key}")
    print(f"one object, {Z} slices per run, both directions from the key slice")
    for state in idle_and_loaded(args.background_load) if args.background_load else ["idle"]:
        times: dict[str, list[float]] = {"reference": [], "medsam": []}
        masks = {}
        run_ours()  # warm-up of both (first-call costs)
        run_reference()
        for _ in range(args.repeats):
            for name, fn in (("reference", run_reference), ("medsam", run_ours)):
                t0 = time.perf_counter()
                masks[name] = fn()
                times[name].append(time.perf_counter() - t0)
        ref_s, ours_s = statistics.median(times["reference"]), statistics.median(times["medsam"])
        agree = float(((masks["reference"] > 0) == (masks["medsam"] > 0)).mean())
        print(
            f"{state:7s} reference {ref_s:6.2f} s ({Z / ref_s:5.2f} slices/s)   medsam {ours_s:6.2f} s "
            f"({Z / ours_s:5.2f} slices/s)   ratio {ref_s / ours_s:4.2f}x   voxels agreeing {agree:.5f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
