"""One prepared GPU session: CUDA correctness and timings, ViT-B bf16 training steps, and the
demo model's training run. Results go to $OUT (JSON + logs) so they can be written into the docs.

    python benchmarks/gpu_check.py --out $OUT [--train-config configs/demo_lite.yaml --corpus DIR --init CKPT]

Every part is time-boxed and failures in one part are recorded without stopping the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


# --device cpu (with --repeats 1 --warmup 0) runs every part's code on a CPU, to check the script
# before a GPU session; its numbers mean nothing.
DEVICE = "cuda"
REPEATS, WARMUP = 10, 3


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=None, warmup=None):
    repeats = REPEATS if repeats is None else repeats
    warmup = WARMUP if warmup is None else warmup
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def peak_extra_mib(fn) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it."""
    import torch

    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_inference(results: dict) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import medsam
    from reference_sam import build_reference

    dev = torch.device(DEVICE)
    results["device_name"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE
    results["torch"] = torch.__version__
    ref = build_reference("vit_b", seed=0).to(dev)
    path = Path("/tmp/vit_b_random.pth")
    torch.save(ref.state_dict(), path)
    model = medsam.load_model(path, device=DEVICE)
    x = torch.randn(1, 3, 1024, 1024, device=dev)
    with torch.inference_mode():
        a = ref.image_encoder(x)
        b = model.image_encoder(x)
        results["embedding_rel_err_fp32"] = float((a - b).norm() / a.norm())
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            c = model.image_encoder(x).float()
        results["embedding_rel_err_bf16_vs_ref_fp32"] = float((a - c).norm() / a.norm())
        enc = {}
        enc["ref_fp32"] = timed(lambda: ref.image_encoder(x))

        def under_bf16(fn):
            def run():
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    return fn(x)

            return run

        enc["ref_bf16_autocast"] = timed(under_bf16(ref.image_encoder))
        enc["ref_fp32_peak_extra_mib"] = peak_extra_mib(lambda: ref.image_encoder(x))
        # Chunk sizes of the global attention at GPU inference (medsam.model.image_encoder's
        # _CUDA_INFERENCE_BIAS_ELEMENTS): 13 chunks of 2**24 bias elements, 4 of 2**26, or one.
        from medsam.model import image_encoder as ie

        default = ie._CUDA_INFERENCE_BIAS_ELEMENTS
        variants = {}
        for log2 in (24, 26, 28):
            ie._CUDA_INFERENCE_BIAS_ELEMENTS = 1 << log2
            row = {}
            try:
                b = model.image_encoder(x)
                row["rel_err_fp32"] = float((a - b).norm() / a.norm())
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    c = model.image_encoder(x).float()
                row["rel_err_bf16_vs_ref_fp32"] = float((a - c).norm() / a.norm())
                row["fp32"] = timed(lambda: model.image_encoder(x))
                row["bf16_autocast"] = timed(under_bf16(model.image_encoder))
                row["fp32_peak_extra_mib"] = peak_extra_mib(lambda: model.image_encoder(x))
                row["bf16_peak_extra_mib"] = peak_extra_mib(under_bf16(model.image_encoder))
            except Exception:
                row["error"] = traceback.format_exc()
            variants[f"bias_chunk_2^{log2}"] = row
            print(log2, row, flush=True)
        ie._CUDA_INFERENCE_BIAS_ELEMENTS = default
        enc["variants"] = variants
        enc["default_bias_chunk"] = default
        enc["ours_fp32"] = timed(lambda: model.image_encoder(x))
        enc["ours_fp32_peak_extra_mib"] = peak_extra_mib(lambda: model.image_encoder(x))
        enc["ours_bf16_autocast"] = timed(under_bf16(model.image_encoder))
        # A whole set_image (preprocessing of a 512 x 512 uint8 image included).
        image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
        predictor = medsam.Predictor(model, zoom=False)
        enc["ours_set_image_512"] = timed(lambda: predictor.set_image(image))
        from medsam.preprocess_fast import prepare_image_fast

        enc["ours_prepare_512"] = timed(lambda: prepare_image_fast(predictor.contract, image))
        # Where the fp32 embedding's time goes, each side: the top operators by device time.
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
        for name, fn in (("ours", lambda: model.image_encoder(x)), ("ref", lambda: ref.image_encoder(x))):
            with profile(activities=activities) as prof:
                for _ in range(3):
                    fn()
                sync()
            results[f"encoder_profile_{name}"] = prof.key_averages().table(sort_by=key, row_limit=20)
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

            predictor = medsam.Predictor(model, zoom=False)
            predictor.set_embedding(emb, (H, W))
            dec[f"ref_{n}"] = timed(ref_dec)
            dec[f"ours_{n}"] = timed(lambda: predictor.predict(boxes=boxes).masks)
            ours = predictor.predict(boxes=boxes)
            bt = torch.as_tensor(boxes / np.array([W, H, W, H]) * 1024, dtype=torch.float, device=dev)[:, None]
            sp, de = ref.prompt_encoder(points=None, boxes=bt, masks=None)
            logits, _ = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sp, de, False)
            dec[f"logits_rel_err_{n}"] = float(
                np.linalg.norm(ours.low_res_logits - logits.cpu().numpy()) / np.linalg.norm(logits.cpu().numpy())
            )
        results["decoder_seconds"] = dec

        def ref_dec_one():
            bt = torch.as_tensor(boxes[:1] / np.array([W, H, W, H]) * 1024, dtype=torch.float, device=dev)[:, None]
            sp, de = ref.prompt_encoder(points=None, boxes=bt, masks=None)
            logits, _ = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sp, de, False)
            prob = F.interpolate(torch.sigmoid(logits), size=(H, W), mode="bilinear", align_corners=False)
            return (prob > 0.5).cpu().numpy()

        # Where the time of one box goes (launch-bound on a GPU): the top operators of each side.
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        for name, fn in (("ours", lambda: predictor.predict(boxes=boxes[:1]).masks), ("ref", ref_dec_one)):
            fn()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    fn()
                sync()
            results[f"decoder_profile_{name}"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)

        lite = medsam.build_model("lite").to(dev).eval()
        xl = torch.randn(1, 3, 256, 256, device=dev)
        results["lite_encoder_seconds"] = timed(lambda: lite.image_encoder(xl))


def vit_b_training_steps(results: dict, steps: int = 8, batch: int = 8) -> None:
    """A few bf16 full fine-tuning steps of ViT-B (MedSAM's recipe) on random data."""
    import torch

    import medsam

    dev = torch.device(DEVICE)
    model = medsam.build_model("vit_b").to(dev).train()
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    x = torch.randn(batch, 3, 1024, 1024, device=dev)
    boxes = torch.tensor([[100.0, 100.0, 600.0, 700.0]] * batch, device=dev)
    target = torch.zeros(batch, 1, 1024, 1024, device=dev)
    target[:, :, 100:700, 100:600] = 1
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _step in range(steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            emb = model.image_encoder(x)
            out = model.decode(emb, boxes=boxes)
            logits = torch.nn.functional.interpolate(
                out.logits.float(), size=(1024, 1024), mode="bilinear", align_corners=False
            )
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    results["vit_b_train"] = {
        "batch": batch,
        "precision": "bf16 autocast",
        "step_seconds_median": sorted(times[2:])[len(times[2:]) // 2],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan"),
        "final_loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-config", default=None)
    parser.add_argument("--train-overrides", nargs="*", default=[])
    parser.add_argument("--parts", default="inference,vit_b_train,demo_train")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    global DEVICE, REPEATS, WARMUP
    DEVICE, REPEATS, WARMUP = args.device, args.repeats, args.warmup
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
