"""One prepared GPU session: CUDA correctness and timings, ViT-B bf16 training steps, and the
demo model's training run. Results go to $OUT (JSON + logs) so they can be written into the docs.

    python benchmarks/gpu_check.py --out $OUT [--train-config configs/demo_lite.yaml --corpus DIR --init CKPT]

Every part is time-boxed and failures in one part are recorded without stopping the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn, repeats=10, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def cuda_inference(results: dict) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import medsam
    from reference_sam import build_reference

    dev = torch.device("cuda")
    results["device_name"] = torch.cuda.get_device_name(0)
    results["torch"] = torch.__version__
    ref = build_reference("vit_b", seed=0).to(dev)
    path = Path("/tmp/vit_b_random.pth")
    torch.save(ref.state_dict(), path)
    model = medsam.load_model(path, device="cuda")
    x = torch.randn(1, 3, 1024, 1024, device=dev)
    with torch.inference_mode():
        a = ref.image_encoder(x)
        b = model.image_encoder(x)
        results["embedding_rel_err_fp32"] = float((a - b).norm() / a.norm())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c = model.image_encoder(x).float()
        results["embedding_rel_err_bf16_vs_ref_fp32"] = float((a - c).norm() / a.norm())
        enc = {}
        enc["ref_fp32"] = timed(lambda: ref.image_encoder(x))
        enc["ours_fp32"] = timed(lambda: model.image_encoder(x))

        def ref_bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref.image_encoder(x)

        def ours_bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model.image_encoder(x)

        enc["ref_bf16_autocast"] = timed(ref_bf16)
        enc["ours_bf16_autocast"] = timed(ours_bf16)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.image_encoder(x)
        torch.cuda.synchronize()
        enc["ours_fp32_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ref.image_encoder(x)
        torch.cuda.synchronize()
        enc["ref_fp32_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        results["encoder_seconds"] = enc

        # Decoder: 1 and 16 boxes, recipe post-processing to a 512 x 512 image.
        emb = torch.randn(1, 256, 64, 64, device=dev)
        H = W = 512
        rng = np.random.default_rng(0)
        dec = {}
        for n in (1, 16):
            x0 = rng.integers(0, 300, n)
            y0 = rng.integers(0, 300, n)
            boxes = np.stack([x0, y0, x0 + 150, y0 + 150], 1).astype(np.float64)

            def ref_dec():
                bt = torch.as_tensor(boxes / np.array([W, H, W, H]) * 1024, dtype=torch.float, device=dev)[:, None]
                sp, de = ref.prompt_encoder(points=None, boxes=bt, masks=None)
                logits, _ = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sp, de, False)
                prob = F.interpolate(torch.sigmoid(logits), size=(H, W), mode="bilinear", align_corners=False)
                return (prob > 0.5).cpu().numpy()

            predictor = medsam.Predictor(model)
            predictor.set_embedding(emb, (H, W))
            dec[f"ref_{n}"] = timed(ref_dec)
            dec[f"ours_{n}"] = timed(lambda: predictor.predict(boxes=boxes).masks)
            ours = predictor.predict(boxes=boxes)
            bt = torch.as_tensor(boxes / np.array([W, H, W, H]) * 1024, dtype=torch.float, device=dev)[:, None]
            sp, de = ref.prompt_encoder(points=None, boxes=bt, masks=None)
            logits, _ = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sp, de, False)
            dec[f"logits_rel_err_{n}"] = float(np.linalg.norm(ours.low_res_logits - logits.cpu().numpy()) / np.linalg.norm(logits.cpu().numpy()))
        results["decoder_seconds"] = dec

        lite = medsam.build_model("lite").to(dev).eval()
        xl = torch.randn(1, 3, 256, 256, device=dev)
        results["lite_encoder_seconds"] = timed(lambda: lite.image_encoder(xl))


def vit_b_training_steps(results: dict, steps: int = 8, batch: int = 8) -> None:
    """A few bf16 full fine-tuning steps of ViT-B (MedSAM's recipe) on random data."""
    import torch

    import medsam
    from medsam.train.losses import SegmentationLoss  # noqa: F401  (the project's loss)

    dev = torch.device("cuda")
    model = medsam.build_model("vit_b").to(dev).train()
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    x = torch.randn(batch, 3, 1024, 1024, device=dev)
    boxes = torch.tensor([[100.0, 100.0, 600.0, 700.0]] * batch, device=dev)
    target = torch.zeros(batch, 1, 1024, 1024, device=dev)
    target[:, :, 100:700, 100:600] = 1
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = model.image_encoder(x)
            out = model.decode(emb, boxes=boxes)
            logits = torch.nn.functional.interpolate(out.logits.float(), size=(1024, 1024), mode="bilinear", align_corners=False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    results["vit_b_train"] = {
        "batch": batch,
        "precision": "bf16 autocast",
        "step_seconds_median": sorted(times[2:])[len(times[2:]) // 2],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-config", default=None)
    parser.add_argument("--train-overrides", nargs="*", default=[])
    parser.add_argument("--parts", default="inference,vit_b_train,demo_train")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    parts = args.parts.split(",")
    for name, fn in (("inference", cuda_inference), ("vit_b_train", vit_b_training_steps)):
        if name in parts:
            start = time.time()
            try:
                fn(results)
            except Exception:
                results[f"{name}_error"] = traceback.format_exc()
            results[f"{name}_wall_seconds"] = time.time() - start
            (out / "gpu_results.json").write_text(json.dumps(results, indent=2))
            print(json.dumps(results, indent=2), flush=True)
    if "demo_train" in parts and args.train_config:
        start = time.time()
        try:
            from medsam.train.config import load_config
            from medsam.train.loop import train

            cfg = load_config(args.train_config, args.train_overrides)
            summary = train(cfg)
            results["demo_train"] = str(summary)
        except Exception:
            results["demo_train_error"] = traceback.format_exc()
        results["demo_train_wall_seconds"] = time.time() - start
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if "error" in k}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
