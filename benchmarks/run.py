"""Speed, memory and agreement of medsam against the reference ``segment-anything==1.0``.

Both run in the same invocation on the same (seeded random) ViT-B weights; each timing runs in a
fresh child process so that peak memory (ru_maxrss) belongs to that measurement alone. The table
prints ratios (reference time / medsam time), which are what to compare across machines:
absolute times moved by up to 20 % between processes on the project's 2-core machines.

    .venv/bin/python benchmarks/run.py                 # everything (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --only encoder  # one group: encoder, image, decoder, lite, volume, auto, sam_med3d
    .venv/bin/python benchmarks/run.py --device cuda   # on a GPU
    .venv/bin/python benchmarks/run.py --background-load 1   # idle and loaded side by side

``--background-load N`` measures every case twice, idle and while N busy processes (a pure
Python loop each) hold cores, and adds the cases a user meets end to end: ``medsam segment`` on a
512 px PNG (process start to file written), a 100-slice volume, and the workbench with 1 and 4
clients. medsam runs with its default thread policy (:mod:`medsam.cpu_threads`: the free cores,
sleeping waits), measured beside one thread (the targets compare loaded times with the idle
one-thread time); the reference runs as a user runs it (torch's defaults: every core).

Peak extra memory = peak RSS during the first (warm-up) call minus RSS just before it (CPU: timed
calls run without the sampling thread, which would take a core from the compute threads), or
torch.cuda.max_memory_allocated above the resident weights (CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's RSS every 2 ms in a thread; ``peak`` is the highest seen (MiB)."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            self._stop.wait(0.002)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _weights_file(tmp: Path) -> Path:
    import torch

    from reference_sam import build_reference

    path = tmp / "vit_b_random.pth"
    if not path.exists():
        torch.save(build_reference("vit_b", seed=0).state_dict(), path)
    return path


# ------------------------------------------------------------------ children
def _timed_calls(run, repeats: int, sync) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after one warm-up call (``sync`` waits for
    the device)."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    return times


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def _apply_policy(policy: str) -> None:
    """Threads of this child, before torch is imported: ``policy`` (medsam.cpu_threads, what the
    command line does), ``one`` (1 thread) or ``default`` (OMP_NUM_THREADS as given, else every
    core: the reference as a user runs it)."""
    if policy == "policy":
        for name in THREAD_VARIABLES:
            os.environ.pop(name, None)
        from medsam.cpu_threads import prepare

        prepare()
    elif policy == "one":
        os.environ["OMP_NUM_THREADS"] = "1"


def child(case: str, weights: str, device: str, repeats: int) -> dict:
    """Run one measurement in this (fresh) process and return its numbers."""
    policy = os.environ.get("MEDSAM_BENCH_POLICY", "default")
    _apply_policy(policy)
    import numpy as np
    import torch

    if policy == "default":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2))))
    dev = torch.device(device)
    impl, what, *rest = case.split(":")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if what == "med3d":
        # SAM-Med3D's image encoder on one 128^3 crop: medim==0.1.2 (the published network)
        # against medsam's, both seeded random (speed does not depend on the weights)
        torch.manual_seed(0)
        if impl == "ref":
            from medim.models.sam_med3d import build_sam3D_vit_b_ori

            encoder3d = build_sam3D_vit_b_ori().to(dev).eval().image_encoder
        else:
            from medsam.model.sam_med3d import SamMed3DConfig, SamMed3DModel

            encoder3d = SamMed3DModel(SamMed3DConfig()).to(dev).eval().image_encoder
        crop = torch.randn(1, 1, 128, 128, 128, device=dev)
        rss0 = _rss_mib()
        with PeakRSS() as peak, torch.inference_mode():
            encoder3d(crop)
        with torch.inference_mode():
            seconds = _timed_calls(lambda: encoder3d(crop), repeats, sync)
        return {"seconds": seconds, "peak_extra_mib": peak.peak - rss0}
    if impl == "ref":
        from reference_sam import import_reference

        sa = import_reference()
        model = sa.sam_model_registry["vit_b"]()
        model.load_state_dict(torch.load(weights, weights_only=True))
        model = model.to(dev).eval()
        encoder = model.image_encoder
    else:
        import medsam

        if what == "lite":
            torch.manual_seed(0)
            model = medsam.build_model("lite").to(dev).eval()
        else:
            model = medsam.load_model(weights, device=device)
        encoder = model.image_encoder
    precision = rest[0] if rest else "fp32"
    times = []
    if what in ("encoder", "lite"):
        size = 256 if what == "lite" else 1024
        x = torch.randn(1, 3, size, size, device=dev)
        ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else None
        with torch.inference_mode():

            def run():
                if ctx:
                    with ctx():
                        return encoder(x)
                return encoder(x)

            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base_gpu = torch.cuda.memory_allocated()
            rss0 = _rss_mib()  # before the first call: memory kept by the allocator counts too
            # Memory is sampled during the warm-up call only: the sampling thread would take a
            # core from the two compute threads during the timed calls.
            with PeakRSS() as peak:
                run()
                sync()
            for _ in range(repeats):
                t = time.perf_counter()
                run()
                sync()
                times.append(time.perf_counter() - t)
        if dev.type == "cuda":
            extra = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        else:
            extra = peak.peak - rss0
        return {"seconds": times, "peak_extra_mib": extra}
    if what == "image":
        # Image to embedding, preprocessing included: the bundled 512 x 512 CT slice through the
        # release's recipe (skimage bicubic resize, uint8, min-max) and the reference encoder, or
        # through Predictor.set_image.
        from PIL import Image

        from medsam.demo import bundled_samples

        sample = next(s for s in bundled_samples() if s.name == "ct_slice")
        img = np.asarray(Image.open(sample.image))
        if impl == "ref":
            from skimage.transform import resize

            def run():
                rgb = np.repeat(img[:, :, None], 3, -1) if img.ndim == 2 else img
                r = resize(rgb, (1024, 1024), order=3, preserve_range=True, mode="constant", anti_aliasing=True)
                r = r.astype(np.uint8).astype(np.float64)
                r = (r - r.min()) / np.clip(r.max() - r.min(), 1e-8, None)
                t = torch.tensor(r, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0).to(dev)
                return encoder(t)
        else:
            predictor = medsam.Predictor(model)

            def run():
                predictor.set_image(img)

        with torch.inference_mode():
            return {"seconds": _timed_calls(run, repeats, sync)}
    if what == "embedded":  # the embedded default model as a user gets it: Predictor.set_image / predict
        from PIL import Image

        from medsam.demo import bundled_samples

        sample = next(s for s in bundled_samples() if s.name == "ct_slice")
        img = np.asarray(Image.open(sample.image))
        predictor = medsam.Predictor(medsam.load_model(device=device))
        if rest[0] == "set_image":

            def run():
                predictor.set_image(img)
        else:
            predictor.set_image(img)
            box = np.array([[150, 180, 300, 330]], float)

            def run():
                predictor.predict(boxes=box)

        with torch.inference_mode():
            return {
                "seconds": _timed_calls(run, repeats, sync),
                "precision": predictor.precision,
                "threads": torch.get_num_threads(),
            }
    if what == "decoder":
        n = int(rest[0])
        H, W = 512, 512
        rng = np.random.default_rng(0)
        x0 = rng.integers(0, 300, n)
        y0 = rng.integers(0, 300, n)
        boxes = np.stack([x0, y0, x0 + rng.integers(50, 200, n), y0 + rng.integers(50, 200, n)], 1).astype(np.float64)
        emb = torch.randn(1, 256, 64, 64, device=dev)
        if impl == "ref":
            # The MedSAM recipe's decode step: prompt encoder, decoder, sigmoid, resize to (H, W).
            import torch.nn.functional as F

            def run():
                with torch.inference_mode():
                    b = torch.as_tensor(boxes / np.array([W, H, W, H]) * 1024, dtype=torch.float, device=dev)[:, None]
                    sp, de = model.prompt_encoder(points=None, boxes=b, masks=None)
                    logits, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sp, de, False)
                    prob = F.interpolate(torch.sigmoid(logits), size=(H, W), mode="bilinear", align_corners=False)
                    return (prob > 0.5).cpu().numpy()
        else:
            predictor = medsam.Predictor(model)
            predictor.set_embedding(emb, (H, W))

            def run():
                return predictor.predict(boxes=boxes).masks

        return {"seconds": _timed_calls(run, repeats, sync)}
    if what == "auto":
        # Automatic mode (SAM's everything mode) on the 512 x 512 CT slice with an n x n click grid,
        # every candidate kept by the filters (IoU and stability thresholds 0) so that upsampling,
        # boxes and suppression of all 3 n^2 masks are timed, not only the decoder.
        from PIL import Image

        from medsam.demo import bundled_samples

        n = int(rest[0])
        sample = next(s for s in bundled_samples() if s.name == "ct_slice")
        rgb = np.repeat(np.asarray(Image.open(sample.image))[:, :, None], 3, axis=2)
        settings = dict(points_per_side=n, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        if impl == "ref":
            from reference_sam import import_reference

            generator = import_reference().SamAutomaticMaskGenerator(model, **settings)

            def run():
                return generator.generate(rgb)
        else:
            from medsam.automatic import AutoOptions, generate_masks

            predictor = medsam.Predictor(medsam.load_model(weights, device=device, contract="sam"))
            options = AutoOptions(**settings)

            def run():
                return generate_masks(predictor, rgb, options)

        rss0 = _rss_mib()
        with PeakRSS() as peak, torch.inference_mode():
            found = run()
        with torch.inference_mode():
            times = _timed_calls(run, repeats - 1, sync) if repeats > 1 else []
        return {"seconds": times or [float("nan")], "peak_extra_mib": peak.peak - rss0, "masks": len(found)}
    if what == "volume":
        from medsam.volume import Box3D, segment_volume

        torch.manual_seed(0)
        if rest and rest[0] == "lite":
            model = medsam.build_model("lite").to(dev).eval()
        elif rest and rest[0] == "default":
            model = medsam.load_model(device=device)  # the embedded default, its default precision
        predictor = medsam.Predictor(model)
        rng = np.random.default_rng(0)
        vol = (rng.random((100, 512, 512)) * 255).astype(np.uint8)
        boxes = [Box3D(100, 100, 0, 300, 300, 99), Box3D(200, 150, 10, 400, 350, 90), Box3D(50, 300, 20, 250, 480, 80)]
        t = time.perf_counter()
        res = segment_volume(predictor, vol, boxes, iou_threshold=-1e9)
        dt = time.perf_counter() - t
        return {"seconds": [dt], "embeddings": res.embeddings_computed, "slices": 100}
    raise ValueError(case)


def run_child(case: str, weights: Path, device: str, repeats: int, policy: str = "default") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        case,
        "--weights",
        str(weights),
        "--device",
        device,
        "--repeats",
        str(repeats),
    ]
    env = {**os.environ, "MEDSAM_BENCH_POLICY": policy}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ----------------------------------------------------------------- agreement
def agreement(weights: Path, device: str) -> dict:
    """Embedding error vs the reference and bf16-vs-fp32 mask agreement on real images."""
    import numpy as np
    import torch
    from PIL import Image

    import medsam
    from medsam.demo import bundled_samples
    from reference_sam import import_reference

    sa = import_reference()
    ref = sa.sam_model_registry["vit_b"]()
    ref.load_state_dict(torch.load(weights, weights_only=True))
    ref = ref.to(device).eval()
    model = medsam.load_model(weights, device=device)
    x = torch.randn(1, 3, 1024, 1024, device=device)
    with torch.inference_mode():
        a, b = ref.image_encoder(x), model.image_encoder(x)
    result = {"embedding_rel_err_fp32": float((a - b).norm() / a.norm())}
    samples = [s for s in bundled_samples() if s.kind == "2d"]
    agree, rel = {}, {}
    for label, m in (("vit_b_random", model), ("default_lite_trained", medsam.load_model(device=device))):
        fp32 = medsam.Predictor(m)
        bf16 = medsam.Predictor(m, precision="bf16")
        for sample in samples:
            # the bundled slices are uint8 PNGs, already windowed (read without medsam.io, whose
            # SimpleITK and pydicom a bare GPU machine may lack)
            pixels = np.asarray(Image.open(sample.image))
            fp32.set_image(pixels)
            bf16.set_image(pixels)
            key = f"{label}/{sample.name}"
            rel[key] = float((fp32.embedding - bf16.embedding).norm() / fp32.embedding.norm())
            H, W = pixels.shape[:2]
            rng = np.random.default_rng(1)
            x0 = rng.integers(0, W // 2, 16)
            y0 = rng.integers(0, H // 2, 16)
            boxes = np.stack([x0, y0, x0 + W // 3, y0 + H // 3], 1)
            m1 = fp32.predict(boxes=boxes).masks
            m2 = bf16.predict(boxes=boxes).masks
            agree[key] = float((m1 == m2).mean())
    result["bf16_embedding_rel_err"] = rel
    result["bf16_mask_agreement"] = agree
    return result


# --------------------------------------------------------------- under load
class BackgroundLoad:
    """``n`` busy processes (a pure Python loop each, the lightest load that holds a core) for
    the duration of a ``with`` block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BackgroundLoad:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0.0)  # let them take their cores
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def idle_and_loaded(load: int):
    """Yields "idle", then "loaded" while ``load`` busy processes run."""
    for state, procs in (("idle", 0), ("loaded", load)):
        with BackgroundLoad(procs):
            yield state


def _user_env() -> dict:
    """The environment a user's shell has: no thread settings (the command line chooses)."""
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}


def segment_end_to_end(repeats: int) -> list[float]:
    """Seconds of ``medsam segment`` on the bundled 512 px CT slice with one box, process start
    to mask written (each run a fresh process, as a user runs it)."""
    from medsam.demo import bundled_samples

    sample = next(s for s in bundled_samples() if s.name == "ct_slice")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            cmd = [
                sys.executable,
                "-m",
                "medsam",
                "segment",
                str(sample.image),
                "--box",
                "150",
                "180",
                "300",
                "330",
                "-o",
                str(Path(tmp) / f"m{i}.png"),
            ]
            t = time.perf_counter()
            subprocess.run(cmd, env=_user_env(), check=True, capture_output=True)
            if i:  # the first run warms the file cache
                times.append(time.perf_counter() - t)
    return times


def workbench(clients: int, seconds: float) -> dict:
    """benchmarks/server_load.py against a fresh ``medsam serve`` on a synthetic CT volume."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "server_load.py"),
            "--serve",
            tmp,
            "--synthetic",
            "--clients",
            str(clients),
            "--duration",
            str(seconds),
            "--json",
        ]
        out = subprocess.run(cmd, env=_user_env(), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"server_load failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout[out.stdout.index("{") :])


def load_report(weights: Path, device: str, repeats: int, load: int, only: str | None) -> None:
    """Every case idle and under ``load`` busy processes, side by side (see the module docstring)."""
    cases = [
        # (label, reference case or None, medsam case, repeats)
        ("ViT-B embedding fp32", "ref:encoder", "ours:encoder", repeats),
        ("ViT-B embedding bf16 (ref: fp32)", "ref:encoder", "ours:encoder:bf16", repeats),
        ("embedded default: set_image 512 px CT", None, "ours:embedded:set_image", repeats * 3),
        ("decode 1 box + upsample to 512x512", "ref:decoder:1", "ours:decoder:1", repeats * 5),
        ("embedded default: predict 1 box", None, "ours:embedded:predict", repeats * 5),
    ]
    rows = []
    for label, ref_case, case, n in cases:
        if only and only not in case:
            continue
        row = {"what": label}
        for state in idle_and_loaded(load):
            if ref_case:
                row[f"ref {state}"] = median(run_child(ref_case, weights, device, n, "default")["seconds"])
            row[f"ours {state}"] = median(run_child(case, weights, device, n, "policy")["seconds"])
            row[f"1 thread {state}"] = median(run_child(case, weights, device, n, "one")["seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    extras = []
    if not only or only == "e2e":
        for state in idle_and_loaded(load):
            seconds = segment_end_to_end(repeats)
            extras.append(
                (
                    f"medsam segment 2D, 1 box, process start to mask ({state})",
                    f"median {median(seconds):.2f} s ({min(seconds):.2f}-{max(seconds):.2f} s)",
                )
            )
    if not only or only == "volume":
        for state in idle_and_loaded(load):
            v = run_child("ours:volume:default", weights, device, 1, "policy")
            extras.append(
                (
                    f"volume 100x512x512, 3 objects, embedded default ({state})",
                    f"{v['slices'] / v['seconds'][0]:.2f} slices/s ({v['seconds'][0]:.1f} s)",
                )
            )
    if not only or only == "server":
        for state in idle_and_loaded(load):
            for clients in (1, 4):
                r = workbench(clients, 10.0)
                lat = r["latency_ms"]
                extras.append(
                    (
                        f"workbench /segment, {clients} client(s) ({state})",
                        f"{r['throughput_rps']} req/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, {r['errors']} errors",
                    )
                )
    print()
    print(f"background load: {load} busy process(es); medsam: default thread policy; ref: torch defaults")
    head = f"{'what':42s} {'ref idle':>9s} {'ours idle':>9s} {'ratio':>6s} {'ref load':>9s} {'ours load':>9s} {'ratio':>6s} {'1thr idle':>9s} {'load/1thr':>9s}"
    print(head)
    for r in rows:
        f = lambda k: f"{r[k]:9.3f}" if k in r else f"{'':9s}"
        ratio = lambda a, b: f"{r[a] / r[b]:5.2f}x" if a in r and b in r else f"{'':6s}"
        print(
            f"{r['what']:42s} {f('ref idle')} {f('ours idle')} {ratio('ref idle', 'ours idle')} {f('ref loaded')} "
            f"{f('ours loaded')} {ratio('ref loaded', 'ours loaded')} {f('1 thread idle')} "
            f"{r['ours loaded'] / r['1 thread idle']:8.2f}x"
        )
    for name, value in extras:
        print(f"{name:70s} {value}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        default=None,
        help="encoder, image, decoder, lite, auto, sam_med3d, volume, agreement "
        "(with --background-load: a case name part such as encoder, embedded, decoder, e2e, volume, server)",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="measure idle and with N busy processes, side by side (see the module docstring)",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.weights, args.device, args.repeats)))
        return 0
    import torch

    tmp = Path(tempfile.gettempdir()) / "medsam-bench"
    tmp.mkdir(exist_ok=True)
    weights = _weights_file(tmp)
    if args.background_load:
        print(f"torch {torch.__version__}, cores {os.cpu_count()}, device {args.device}")
        load_report(weights, args.device, args.repeats, args.background_load, args.only)
        return 0
    groups = (
        [args.only]
        if args.only
        else ["encoder", "image", "decoder", "lite", "auto", "sam_med3d", "volume", "agreement"]
    )
    rows = []
    print(f"torch {torch.__version__}, threads {os.environ.get('OMP_NUM_THREADS', '2')}, device {args.device}")
    if "encoder" in groups:
        ref = run_child("ref:encoder", weights, args.device, args.repeats)
        ours = run_child("ours:encoder", weights, args.device, args.repeats)
        ref_bf = run_child("ref:encoder:bf16", weights, args.device, args.repeats)
        ours_bf = run_child("ours:encoder:bf16", weights, args.device, args.repeats)
        r = median(ref["seconds"])
        rows.append(("ViT-B embedding fp32", r, median(ours["seconds"]), ref["peak_extra_mib"], ours["peak_extra_mib"]))
        rows.append(
            (
                "ViT-B embedding bf16 (ref fp32 as base)",
                r,
                median(ours_bf["seconds"]),
                ref["peak_extra_mib"],
                ours_bf["peak_extra_mib"],
            )
        )
        rows.append(
            (
                "ViT-B embedding bf16 (ref bf16 autocast)",
                median(ref_bf["seconds"]),
                median(ours_bf["seconds"]),
                ref_bf["peak_extra_mib"],
                ours_bf["peak_extra_mib"],
            )
        )
    if "image" in groups:
        ref = run_child("ref:image", weights, args.device, args.repeats)
        ours = run_child("ours:image", weights, args.device, args.repeats)
        rows.append(
            (
                "512x512 CT slice to embedding (preprocessing incl.)",
                median(ref["seconds"]),
                median(ours["seconds"]),
                None,
                None,
            )
        )
    if "decoder" in groups:
        for n in (1, 16):
            ref = run_child(f"ref:decoder:{n}", weights, args.device, args.repeats * 3)
            ours = run_child(f"ours:decoder:{n}", weights, args.device, args.repeats * 3)
            rows.append(
                (
                    f"decode {n} box(es) + upsample to 512x512",
                    median(ref["seconds"]),
                    median(ours["seconds"]),
                    None,
                    None,
                )
            )
    if "lite" in groups:
        ref = run_child("ref:encoder", weights, args.device, args.repeats)
        lite = run_child("ours:lite", weights, args.device, args.repeats * 3)
        rows.append(
            (
                "lite (TinyViT 256) vs reference ViT-B embedding",
                median(ref["seconds"]),
                median(lite["seconds"]),
                ref["peak_extra_mib"],
                lite["peak_extra_mib"],
            )
        )
    if "auto" in groups:
        # one warm-up (memory) and one timed run each: the reference needs minutes at 16 x 16
        ref = run_child("ref:auto:16", weights, args.device, 2)
        ours = run_child("ours:auto:16", weights, args.device, 2)
        if ref["masks"] != ours["masks"]:
            print(f"warning: automatic mode found {ours['masks']} masks, the reference {ref['masks']}")
        rows.append(
            (
                f"automatic mode, 16x16 clicks, 512 px ({ours['masks']} masks)",
                median(ref["seconds"]),
                median(ours["seconds"]),
                ref["peak_extra_mib"],
                ours["peak_extra_mib"],
            )
        )
    if "sam_med3d" in groups:
        ref = run_child("ref:med3d", weights, args.device, args.repeats)
        ours = run_child("ours:med3d", weights, args.device, args.repeats)
        rows.append(
            (
                "SAM-Med3D encoder, 128^3 crop (ref: medim 0.1.2)",
                median(ref["seconds"]),
                median(ours["seconds"]),
                ref["peak_extra_mib"],
                ours["peak_extra_mib"],
            )
        )
    print()
    print(f"{'what':52s} {'ref s':>8s} {'medsam s':>9s} {'ratio':>7s} {'ref MiB':>8s} {'ours MiB':>9s}")
    for name, r, o, rm, om in rows:
        fm = lambda v: f"{v:8.0f}" if v is not None else f"{'':8s}"
        print(f"{name:52s} {r:8.3f} {o:9.3f} {r / o:6.2f}x {fm(rm)} {fm(om)} ")
    if "volume" in groups:
        # ViT-B would take ~10 minutes for 100 slices on 2 cores: measured on a GPU only
        for kind in ("lite",) if args.device == "cpu" else ("lite", "vit_b"):
            case = "ours:volume" + (":lite" if kind == "lite" else "")
            v = run_child(case, weights, args.device, 1)
            print(
                f"volume 100x512x512, 3 objects, {kind}: {v['slices'] / v['seconds'][0]:.2f} slices/s, "
                f"{v['embeddings']} embeddings computed ({v['seconds'][0]:.1f} s)"
            )
    if "agreement" in groups:
        print(json.dumps(agreement(weights, args.device), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
