"""Bounded load test of the workbench's ``/segment`` route on 127.0.0.1.

Against a running server (``medsam serve --data DIR``)::

    python benchmarks/server_load.py --url http://127.0.0.1:8000 [--token T] --clients 4 --duration 20

or let the script start one (a separate process, stopped at the end) on a folder, optionally
after writing a synthetic CT volume into it::

    python benchmarks/server_load.py --serve /tmp/wb-bench --synthetic --clients 4 --duration 20 [--workers 2]

Each client keeps one HTTP connection and sends ``/segment`` requests back to back for
``--duration`` seconds: a box around the slice centre, jittered per request, on one slice (the
embedding is computed once, before timing, so this measures the interactive prompt path), or on
random slices with ``--vary-slices`` (embedding path included). Prints the latency distribution
(p50/p90/p95/p99/max), throughput and errors. ``--candidates`` asks for the three alternative masks
too, as the workbench page does. Only loopback URLs are accepted; at most 16 clients
and 300 seconds. Standard library only (plus medsam for ``--synthetic``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

MAX_CLIENTS = 16
MAX_SECONDS = 300


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        try:
            self.conn.request(method, path, body=data, headers=self.headers)
            res = self.conn.getresponse()
            return res.status, res.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            raise

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, payload = self.request(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {payload[:200]!r}")
        return json.loads(payload)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def write_synthetic(folder: Path) -> None:
    """A 16 x 256 x 256 CT-like volume (HU) with a bright ellipsoid, as synthetic_ct.nii.gz."""
    import numpy as np
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    Z, H, W = 16, 256, 256
    z, y, x = np.mgrid[0:Z, 0:H, 0:W].astype(np.float32)
    vol = np.full((Z, H, W), -1000.0, np.float32)
    vol[((y - H / 2) / (H * 0.45)) ** 2 + ((x - W / 2) / (W * 0.45)) ** 2 <= 1] = 40
    organ = ((z - Z / 2) / (Z * 0.45)) ** 2 + ((y - H * 0.45) / (H * 0.2)) ** 2 + (
        (x - W * 0.42) / (W * 0.18)
    ) ** 2 <= 1
    vol[organ] = 160
    vol += np.random.default_rng(0).normal(0, 12, vol.shape)
    img = sitk.GetImageFromArray(np.round(vol).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(folder / "synthetic_ct.nii.gz"))


def start_server(folder: Path, token: str | None, workers: int = 1) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "medsam", "serve", "--data", str(folder), "--port", str(port)]
    cmd += ["--workers", str(workers)]
    env = dict(os.environ)
    if token:
        env["MEDSAM_TOKEN"] = token
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not start within 120 s")


def run(args) -> dict:
    probe = Client(args.url, args.token)
    image_id = args.image or (probe.json("GET", "/images")["images"] or [{}])[0].get("id")
    if not image_id:
        raise SystemExit("the server has no images")
    meta = probe.json("GET", f"/images/{quote(image_id)}")
    H, W = meta["slice_shape"]
    n_slices = meta["n_slices"]
    key = n_slices // 2 if args.slice is None else args.slice

    def body(rng: random.Random, slice_index: int) -> dict:
        cx, cy, half_w, half_h = W / 2, H / 2, W / 4, H / 4
        j = lambda v: v * (1 + rng.uniform(-0.1, 0.1))
        return {
            "image_id": image_id,
            "slice_index": slice_index,
            "encoding": "rle",
            "candidates": args.candidates,
            "box": {
                "x0": max(0.0, j(cx - half_w)),
                "y0": max(0.0, j(cy - half_h)),
                "x1": min(W - 1.0, j(cx + half_w)),
                "y1": min(H - 1.0, j(cy + half_h)),
            },
        }

    t0 = time.perf_counter()
    first = probe.json("POST", "/segment", body(random.Random(0), key))
    warm_ms = (time.perf_counter() - t0) * 1e3

    latencies: list[float] = []
    errors: list[str] = []
    sources: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + args.duration

    def worker(n: int) -> None:
        c = Client(args.url, args.token)
        rng = random.Random(1000 + n)
        while time.perf_counter() < deadline:
            k = rng.randrange(n_slices) if args.vary_slices else key
            t = time.perf_counter()
            try:
                status, payload = c.request("POST", "/segment", body(rng, k))
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    if status == 200:
                        latencies.append(ms)
                        src = json.loads(payload)["embedding_source"]
                        sources[src] = sources.get(src, 0) + 1
                    else:
                        errors.append(f"HTTP {status}")
            except Exception as exc:  # counted, the load goes on
                with lock:
                    errors.append(type(exc).__name__)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "url": args.url,
        "image": image_id,
        "slice_shape": [H, W],
        "clients": args.clients,
        "duration_s": round(elapsed, 2),
        "vary_slices": bool(args.vary_slices),
        "candidates": bool(args.candidates),
        "first_request_ms": round(warm_ms, 1),
        "first_request_source": first["embedding_source"],
        "requests": len(lat),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "throughput_rps": round(len(lat) / elapsed, 2) if elapsed else 0.0,
        "latency_ms": {
            "p50": round(percentile(lat, 50), 1),
            "p90": round(percentile(lat, 90), 1),
            "p95": round(percentile(lat, 95), 1),
            "p99": round(percentile(lat, 99), 1),
            "max": round(lat[-1], 1) if lat else None,
            "mean": round(statistics.fmean(lat), 1) if lat else None,
        },
        "embedding_sources": sources,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    p.add_argument("--serve", type=Path, default=None, metavar="DIR", help="start a server on DIR instead")
    p.add_argument("--synthetic", action="store_true", help="with --serve: write a synthetic CT volume into DIR first")
    p.add_argument("--token", default=os.environ.get("MEDSAM_TOKEN"))
    p.add_argument("--image", default=None, help="image id (default: the first listed)")
    p.add_argument("--slice", type=int, default=None, help="slice index (default: the middle slice)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--vary-slices", action="store_true", help="random slices (embedding path included)")
    p.add_argument(
        "--candidates", action="store_true", help="ask for the three alternative masks too, as the workbench page does"
    )
    p.add_argument("--workers", type=int, default=1, help="with --serve: server processes (medsam serve --workers)")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_SECONDS:
        p.error(f"--duration must be in (0, {MAX_SECONDS}]")
    proc = None
    if args.serve is not None:
        if args.synthetic:
            write_synthetic(args.serve)
        proc, args.url = start_server(args.serve, args.token, args.workers)
    elif urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("only loopback servers are load-tested (127.0.0.1, localhost, ::1)")
    try:
        result = run(args)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        lat = result["latency_ms"]
        print(
            f"server {result['url']}  image {result['image']} ({result['slice_shape'][0]}x{result['slice_shape'][1]} slices)"
        )
        print(f"first request {result['first_request_ms']} ms ({result['first_request_source']} embedding)")
        print(
            f"{result['clients']} clients{' (with the 3 alternative masks)' if result['candidates'] else ''}, "
            f"{result['duration_s']} s: {result['requests']} requests, "
            f"{result['errors']} errors, {result['throughput_rps']} req/s"
        )
        print(
            f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}  "
            f"mean {lat['mean']}"
        )
        print(f"embedding sources: {result['embedding_sources']}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
