"""The workbench as several processes over one data folder and one state database.

Real server processes (``python -m medsam serve``) on SQLite and on a PostgreSQL cluster started
from Debian's package for the test: concurrent label writes through both processes lose and
duplicate no version; jobs, their cancellation and uncertainty scores are the same from either
process; ``--workers 2`` answers from two processes; a failed commit leaves the files as they
were; bad ``--database`` / ``--workers`` values are one error line.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_image
from workbench_fixtures import rle_mask

httpx = pytest.importorskip("httpx")
pytest.importorskip("sqlalchemy")

SHAPE = (48, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, MEDSAM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def served(data: Path, *args: str):
    """``medsam serve --data DATA ARGS`` on a free port until its /info answers; yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "medsam", "serve", "--data", str(data), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, f"server exited: {proc.stdout.read() if proc.stdout else ''}"
            assert time.time() - t0 < 120, "server did not start"
            try:
                if httpx.get(url + "/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        Image.fromarray(smooth_image(*SHAPE, seed=seed)).save(d / name)
    return d


def _write_concurrently(urls: list[str], writers: int = 6, writes: int = 5) -> list[int]:
    """``writers`` threads each saving ``writes`` whole label maps of a.png, alternating between
    ``urls``, re-reading the version after each 409; returns the versions the saves were given."""
    given: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        with httpx.Client(timeout=60) as c:
            for k in range(writes):
                value = 1 + (w * writes + k) % 250
                body = {"mask": rle_mask(np.full(SHAPE, value, np.uint8))}
                for attempt in range(200):
                    url = urls[(w + k + attempt) % len(urls)]
                    version = c.get(f"{url}/labels/a.png").json()["version"]
                    r = c.put(f"{url}/labels/a.png/map", json=body, headers={"If-Match": f'"{version}"'})
                    if r.status_code == 200:
                        with lock:
                            given.append(r.json()["version"])
                        break
                    if r.status_code != 409:
                        with lock:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                        return
                else:
                    errors.append("no save after 200 attempts")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return given


def _check_shared_state(urls: list[str], database_url: str, data: Path) -> None:
    from sqlalchemy import create_engine, text

    writers, writes = 6, 5
    given = _write_concurrently(urls, writers, writes)
    n = writers * writes
    assert sorted(given) == list(range(1, n + 1))  # no save lost, none given a version twice
    engine = create_engine(database_url)
    with engine.connect() as conn:
        stored = [
            r[0]
            for r in conn.execute(text("SELECT version FROM label_versions WHERE image_id = 'a.png' ORDER BY version"))
        ]
    engine.dispose()
    assert stored == list(range(1, n + 1))
    for url in urls:  # both processes answer the same record and map
        info = httpx.get(f"{url}/labels/a.png").json()
        assert info["version"] == n and info["history_length"] == n
        m = httpx.get(f"{url}/labels/a.png/map").json()
        assert m["version"] == n and len(m["mask"]["values"]) == 1
    on_disk = np.asarray(Image.open(data / ".medsam" / "labels" / "a.png.png"))
    assert on_disk.shape == SHAPE and len(np.unique(on_disk)) == 1
    assert np.unique(on_disk)[0] == m["mask"]["values"][0]

    # A job submitted to one process is answered, and cancelled, through the other.
    first, second = urls[0], urls[-1]
    job = httpx.post(f"{first}/next/score", json={"image_ids": ["b.png", "c.png"]}).json()
    t0 = time.time()
    while True:
        seen = httpx.get(f"{second}/jobs/{job['id']}")
        assert seen.status_code == 200, seen.text
        if seen.json()["status"] not in ("queued", "running"):
            break
        assert time.time() - t0 < 120
        time.sleep(0.2)
    assert seen.json()["status"] == "done" and seen.json()["result"]["scored"] == 2
    assert [j["id"] for j in httpx.get(f"{first}/jobs").json()] == [j["id"] for j in httpx.get(f"{second}/jobs").json()]
    ranked = httpx.get(f"{second}/next").json()  # scores computed by the first process
    assert ranked["scored"] == 2 and {r["image_id"] for r in ranked["images"][:2]} == {"b.png", "c.png"}

    # A cancel request through the second process stops a job running in the first.
    job = httpx.post(f"{first}/next/score", json={"image_ids": ["b.png", "c.png"] * 2000, "jitters": 8}).json()
    while httpx.get(f"{second}/jobs/{job['id']}").json()["status"] == "queued":
        time.sleep(0.05)
    assert httpx.delete(f"{second}/jobs/{job['id']}").status_code == 200
    t0 = time.time()
    while (status := httpx.get(f"{first}/jobs/{job['id']}").json())["status"] == "running":
        assert time.time() - t0 < 60, "cancel request not seen"
        time.sleep(0.1)
    assert status["status"] == "cancelled" and status["done"] < 4000


def test_two_server_processes_share_one_sqlite_state(data):
    from medsam.server.state_db import default_url

    with served(data) as one, served(data) as two:
        assert httpx.get(f"{one}/info").json()["process_id"] != httpx.get(f"{two}/info").json()["process_id"]
        _check_shared_state([one, two], default_url(data / ".medsam"), data)


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    return found[-1] or None


@pytest.fixture()
def postgresql():
    """A PostgreSQL cluster of Debian's package on a Unix socket in a temporary folder, with a
    database ``medsam``; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's server (Debian package postgresql) is not installed: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="medsam-pg-"))  # pytest's folders are closed to other users
    pgdata, sock = base / "data", base / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        os.chmod(base, 0o755)
    port = _free_port()

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    run(initdb, "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    opts = f"-c listen_addresses='' -k {sock} -p {port} -c fsync=off"
    run(pg_ctl, "-D", str(pgdata), "-o", opts, "-l", str(base / "log"), "-w", "start")
    try:
        run(str(Path(initdb).with_name("createdb")), "-h", str(sock), "-p", str(port), "-U", "postgres", "medsam")
        yield f"postgresql+psycopg://postgres@/medsam?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(pgdata), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_two_server_processes_share_one_postgresql_state(data, postgresql):
    with served(data, "--database", postgresql) as one, served(data, "--database", postgresql) as two:
        _check_shared_state([one, two], postgresql, data)
    assert not (data / ".medsam" / "state.sqlite3").exists()


# ----------------------------------------------------------------------------- --workers
def test_workers_option_runs_processes_on_one_port(data):
    with served(data, "--workers", "2") as url:
        pids = set()
        t0 = time.time()
        while len(pids) < 2 and time.time() - t0 < 60:
            with httpx.Client(timeout=10) as c:  # a new connection each time
                pids.add(c.get(f"{url}/info").json()["process_id"])
        assert len(pids) == 2
        given = _write_concurrently([url], writers=4, writes=3)
        assert sorted(given) == list(range(1, 13))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--database", "oracle://x"], "unsupported state database 'oracle'"),
        (["--database", "postgresql+psycopg://nobody@/x?host=/nonexistent"], "cannot open the state database"),
        (["--encoder-url", "ftp://x"], "the encoder URL must be http(s)"),
        (["--encoder-url", "http://127.0.0.1:9"], "cannot be reached"),
    ],
)
def test_bad_serve_options_are_one_error_line(data, args, message):
    r = subprocess.run(
        [sys.executable, "-m", "medsam", "serve", "--data", str(data), "--port", str(_free_port()), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


# ----------------------------------------------------------------------------- failed commit
def test_a_failed_commit_leaves_label_file_and_sidecar_as_they_were(data, monkeypatch):
    from sqlalchemy.engine import RootTransaction

    from medsam.io import read_image
    from medsam.server.labels import LabelStore

    store = LabelStore(data / ".medsam" / "labels", data)
    image = read_image(data / "a.png")
    store.save("a.png", image, np.full(SHAPE, 3, np.uint8), 0, {"action": "map"})
    path = data / ".medsam" / "labels" / "a.png.png"
    before = path.read_bytes(), (path.parent / "a.png.png.json").read_bytes()

    def failing_commit(self):
        raise OSError("disk full")

    monkeypatch.setattr(RootTransaction, "commit", failing_commit)
    with pytest.raises(OSError, match="disk full"):
        store.save("a.png", image, np.full(SHAPE, 5, np.uint8), 1, {"action": "map"})
    monkeypatch.undo()
    assert (path.read_bytes(), (path.parent / "a.png.png.json").read_bytes()) == before
    assert store.version("a.png") == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png.png", "a.png.png.json"]
    assert store.read("a.png", image)[1].max() == 3


# ----------------------------------------------------------------------------- training and the served model
def test_served_model_and_training_jobs_are_shared_by_two_apps_on_one_database(data):
    import json

    import torch

    from conftest import seeded_tiny_model
    from medsam.embedding_cache import model_fingerprint
    from medsam.server import create_app
    from medsam.server.training_job import TrainingJob
    from medsam.weights import save_model
    from workbench_fixtures import client

    trained = seeded_tiny_model()
    with torch.no_grad():
        next(trained.parameters()).add_(0.5)
    job_dir = data / ".medsam" / "models" / "abcdefabcdef"
    job_dir.mkdir(parents=True)
    save_model(trained, job_dir / "model.safetensors")
    (job_dir / "training.json").write_text(json.dumps({"id": "abcdefabcdef", "mode": "decoder", "steps": 1}))

    one = create_app(data, model=seeded_tiny_model())
    two = create_app(data, model=seeded_tiny_model(), serve_startup_model=False)
    with client(one) as c1, client(two) as c2:
        startup_fp = c2.get("/info").json()["model"]["fingerprint"]
        assert c1.post("/train/models/select", json={"model_id": "abcdefabcdef"}).status_code == 200
        assert c2.get("/train/models").json()["served"] == "abcdefabcdef"
        assert c2.get("/info").json()["model"]["fingerprint"] == model_fingerprint(trained) != startup_fp
        assert c2.post("/train/models/select", json={"model_id": "startup"}).status_code == 200
        assert c1.get("/info").json()["model"]["fingerprint"] == startup_fp

        # A job the other process runs: listed, a second one refused, cancelled through this one.
        shared = two.state.workbench.training.shared
        job = TrainingJob(mode="decoder", steps=2, lr=1e-4)
        job.state = "running"
        assert shared.claim(job.id, job.created, job.info()) is None
        assert shared.publish(job.id, job.state, job.info()) is False
        r = c1.post("/train", json={"mode": "decoder", "steps": 2})
        assert r.status_code == 409 and job.id in r.json()["detail"]
        assert c1.post("/train/models/select", json={"model_id": "abcdefabcdef"}).status_code == 409
        listed = c1.get("/train/jobs").json()
        assert [(j["id"], j["state"]) for j in listed] == [(job.id, "running")]
        assert c1.delete(f"/train/jobs/{job.id}").status_code == 200
        assert shared.publish(job.id, job.state, job.info()) is True  # the runner sees the request


# ----------------------------------------------------------------------------- the encoder as a service
def test_encoder_service_serves_workbenches_and_refuses_bad_input(data, tmp_path):
    import shutil as sh

    import torch
    from safetensors.numpy import save as save_arrays

    from conftest import seeded_tiny_model
    from medsam.server import create_app
    from medsam.server.encoder_service import create_encoder_app
    from workbench_fixtures import client, live_server

    token = "encoder-token-123"
    other = tmp_path / "other"
    sh.copytree(data, other)
    box = {"image_id": "a.png", "box": {"x0": 10, "y0": 8, "x1": 50, "y1": 40}}
    with live_server(create_encoder_app(seeded_tiny_model(), token=token)) as url:
        remote = create_app(data, model=seeded_tiny_model(), encoder_url=url, encoder_token=token)
        with client(remote) as c, client(create_app(other, model=seeded_tiny_model())) as local:
            got, want = c.post("/segment", json=box), local.post("/segment", json=box)
            assert got.status_code == want.status_code == 200, got.text
            assert got.json()["embedding_source"] == "computed"
            for key in ("mask", "area", "score", "bbox"):
                assert got.json()[key] == want.json()[key], key
            assert remote.state.workbench.engine.remote_encoder.calls == 1
            assert c.post("/segment", json=box).json()["embedding_source"] == "memory"  # cached as its own

        # A workbench whose model has another encoder refuses the service's embeddings.
        changed = seeded_tiny_model()
        with torch.no_grad():
            next(changed.image_encoder.parameters()).add_(1.0)
        with client(create_app(other, model=changed, encoder_url=url, encoder_token=token)) as c:
            r = c.post("/segment", json=box)
            assert r.status_code == 502 and "serves another encoder" in r.json()["detail"]
        with client(create_app(other, model=seeded_tiny_model(), encoder_url=url, encoder_token="wrong-token")) as c:
            r = c.post("/segment", json={**box, "image_id": "b.png"})  # not in its cache yet
            assert r.status_code == 502 and "401" in r.json()["detail"]

        # The service answers bad requests with 4xx and stays up.
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.post(f"{url}/encode", content=b"junk", headers=auth).status_code == 422
        wrong = save_arrays({"image": np.zeros((4, 4), np.float32)})
        assert httpx.post(f"{url}/encode", content=wrong, headers=auth).status_code == 422
        huge = save_arrays({"image": np.zeros((5000, 5000), np.uint8)})
        assert httpx.post(f"{url}/encode", content=huge, headers=auth).status_code == 413
        assert httpx.post(f"{url}/encode", content=b"x", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.post(f"{url}/encode", content=save_arrays({"image": np.zeros((30, 20), np.uint8)}), headers=auth)
        assert ok.status_code == 200 and ok.headers["x-medsam-embedding-id"]
        assert httpx.get(f"{url}/encoder", headers=auth).json()["contract"]


def test_encoder_service_command_refuses_a_public_address_without_token():
    r = subprocess.run(
        [sys.executable, "-m", "medsam", "serve-encoder", "--host", "0.0.0.0", "--port", str(_free_port())],
        env={k: v for k, v in _env().items() if k != "MEDSAM_ENCODER_TOKEN"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "medsam: error: binding to a non-loopback address needs --token (or MEDSAM_ENCODER_TOKEN)"
    ], r.stderr
