"""Weights by name (medsam.hub) against a local HTTP server that serves byte ranges and can cut a
download short; never the network."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from medsam import hub
from medsam.weights import CheckpointError, load_model, save_model


class _Server:
    """Serves ``files`` (name -> bytes) with Range support; ``cut_after`` bytes ends the first
    response of a file early (a dropped connection). Records the Range headers it saw."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut_after: int | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                wanted = self.headers.get("Range")
                server.ranges.append(wanted)
                start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body = body[: server.cut_after]
                    server.cut_after = None
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A tiny real checkpoint served as the file of a registry entry without a known checksum,
    the cache in tmp_path, and the server as the mirror."""
    from conftest import seeded_tiny_model

    path = save_model(seeded_tiny_model(), tmp_path / "src" / "tiny.safetensors")
    payload = path.read_bytes()
    server = _Server({"tiny.safetensors": payload, "blob.bin": bytes(range(256)) * 4096})
    monkeypatch.setenv("MEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDSAM_MODELS_MIRROR", server.url)
    monkeypatch.delenv("MEDSAM_OFFLINE", raising=False)
    entries = {
        "tiny_test": hub.RegistryEntry("tiny_test", "tiny.safetensors", "https://example.invalid/x", "test", "-"),
        "blob_known": hub.RegistryEntry(
            "blob_known",
            "blob.bin",
            "https://example.invalid/y",
            "test",
            "-",
            sha256=hashlib.sha256(bytes(range(256)) * 4096).hexdigest(),
        ),
        "blob_wrong": hub.RegistryEntry("blob_wrong", "blob.bin", "https://example.invalid/z", "test", "-", "0" * 64),
    }
    monkeypatch.setattr(hub, "REGISTRY", {**hub.REGISTRY, **entries})
    yield server, payload
    server.close()


def test_a_named_model_is_fetched_pinned_and_then_loaded_from_the_cache_offline(served, tmp_path):
    server, payload = served
    model = load_model("tiny_test", device="cpu")
    assert model.config.name == "vit_tiny"
    cached = tmp_path / "cache" / "tiny.safetensors"
    assert cached.read_bytes() == payload
    pin = (tmp_path / "cache" / "tiny_test.sha256").read_text().split()[0]
    assert pin == hashlib.sha256(payload).hexdigest()
    server.close()  # no network from here on
    again = load_model("tiny_test", device="cpu")
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the pinned checksum guards the cached file from now on
    cached.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model("tiny_test", device="cpu")


def test_a_download_cut_short_continues_where_it_stopped(served, tmp_path):
    server, _ = served
    server.cut_after = 300_000
    with pytest.raises(hub.HubError, match="run again to continue"):
        hub.fetch("blob_known", progress=False)
    part = tmp_path / "cache" / "blob.bin.part"
    assert part.stat().st_size == 300_000
    assert not (tmp_path / "cache" / "blob.bin").exists()
    path = hub.fetch("blob_known", progress=False)
    assert path.read_bytes() == bytes(range(256)) * 4096
    assert server.ranges == [None, "bytes=300000-"]
    assert not part.exists()


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(served, tmp_path):
    with pytest.raises(hub.HubError, match="does not match"):
        hub.fetch("blob_wrong", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_mode_only_looks_in_the_cache(served, monkeypatch):
    server, _ = served
    monkeypatch.setenv("MEDSAM_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="offline"):
        hub.fetch("blob_known")
    assert server.ranges == []
    monkeypatch.delenv("MEDSAM_OFFLINE")
    hub.fetch("blob_known", progress=False)
    assert hub.fetch("blob_known", offline=True) == hub.cache_dir() / "blob.bin"


def test_unknown_names_and_models_without_a_link_say_what_to_do(served, monkeypatch):
    with pytest.raises(hub.HubError, match="unknown model name"):
        hub.fetch("medsam_vit_z")
    monkeypatch.delenv("MEDSAM_MODELS_MIRROR")
    with pytest.raises(CheckpointError, match="Google Drive"):
        load_model("medsam_vit_b")


def test_medsam_models_lists_and_refuses_unknown_names(served):
    run = subprocess.run([sys.executable, "-m", "medsam", "models"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "sam_vit_b" in run.stdout and "sam_med3d_turbo" in run.stdout and "MedSAM2_latest" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "medsam", "models", "fetch", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model name" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_checked_cached_file_is_not_hashed_again_until_it_changes(served, tmp_path, monkeypatch):
    _, payload = served
    path = hub.fetch("tiny_test", progress=False)
    hub.cached_path("tiny_test")  # the first check of the cached file leaves its stamp
    assert (
        json.loads((tmp_path / "cache" / "tiny_test.verified").read_text())["sha256"]
        == hashlib.sha256(payload).hexdigest()
    )
    hashed = []
    real = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert hub.cached_path("tiny_test") == path and hashed == []
    # the same bytes written again (same size and content): the stamp no longer matches, so the
    # file is read, passes and is stamped again
    path.write_bytes(payload)
    assert hub.cached_path("tiny_test") == path and hashed == [path]
    # a change of one byte that keeps the size and the modification time is still caught
    stat = path.stat()
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(hub.HubError, match="does not match"):
        hub.cached_path("tiny_test")
