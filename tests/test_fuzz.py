"""Fuzzing, as a standing part of the suite: every parser and decoder of outside data, and the
whole OpenAPI of the workbench.

The rule for the decoders (Hypothesis): any input either decodes to a well-formed result or is
refused with the module's own error (a ValueError kind); nothing else escapes. The rule for the
server (Schemathesis, in-process): no 5xx, the server still answers after each request, and a
refused request (4xx) changes nothing on disk.

``MEDSAM_FUZZ_EXAMPLES`` sets the examples per property and per API operation and mode (default
12, seed fixed, so ``make test`` is quick and repeatable); ``make fuzz`` runs a large budget with
fresh seeds (see docs/security.md).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsam.corpus.schema import INT_COLUMNS, MANIFEST_COLUMNS

EXAMPLES = int(os.environ.get("MEDSAM_FUZZ_EXAMPLES", "12"))
FRESH = bool(os.environ.get("MEDSAM_FUZZ_FRESH"))  # make fuzz: new random cases every run
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not FRESH, database=None, suppress_health_check=list(HealthCheck)
)

ints = st.integers(min_value=-(2**70), max_value=2**70)
floats = st.floats(allow_nan=True, allow_infinity=True)


# ----------------------------------------------------------------------------- RLE masks
@FUZZ
@given(
    values=st.lists(ints, max_size=6),
    counts=st.lists(ints, max_size=6),
    shape=st.lists(st.integers(-3, 40), min_size=1, max_size=3),
)
def test_rle_decode_refuses_or_decodes(values, counts, shape):
    from medsam.server.encoding import rle_decode

    try:
        out = rle_decode(values, counts, shape)
    except ValueError:
        return
    assert out.shape == tuple(shape) and out.dtype == np.uint8
    assert out.size == sum(counts)


@FUZZ
@given(st.lists(st.integers(0, 255), min_size=1, max_size=200), st.integers(1, 20))
def test_rle_round_trip(flat, width):
    from medsam.server.encoding import rle_decode, rle_encode

    arr = np.array(flat[: len(flat) // width * width] or flat[:1], dtype=np.uint8)
    arr = arr.reshape(-1, width) if arr.size % width == 0 else arr.reshape(1, -1)
    values, counts = rle_encode(arr)
    assert (rle_decode(values, counts, arr.shape) == arr).all()


# ----------------------------------------------------------------------------- prompts
@FUZZ
@given(
    st.lists(st.lists(floats, min_size=4, max_size=4), min_size=1, max_size=4), st.integers(1, 300), st.integers(1, 300)
)
def test_boxes_are_clipped_or_refused(boxes, h, w):
    from medsam.prompt_checks import PromptError, clip_boxes, validate_boxes

    try:
        clipped, _ = clip_boxes(np.array(boxes), (h, w))
    except PromptError:
        return
    validate_boxes(clipped, (h, w))  # what clipping keeps is a valid prompt


@FUZZ
@given(
    st.lists(st.lists(floats, min_size=4, max_size=4), min_size=1, max_size=4), st.integers(1, 300), st.integers(1, 300)
)
def test_volume_boxes_are_clipped_to_pixel_indices_or_refused(boxes, h, w):
    from medsam.prompt_checks import PromptError, clip_boxes

    try:
        clipped, _ = clip_boxes(np.array(boxes), (h, w), inclusive=True)
    except PromptError:
        return
    x0, y0, x1, y1 = clipped.T  # what a volume's walk accepts (volume_prompts: inclusive indices)
    assert ((x0 >= 0) & (x0 <= x1) & (x1 <= w - 1) & (y0 >= 0) & (y0 <= y1) & (y1 <= h - 1)).all()


@FUZZ
@given(
    st.lists(st.tuples(st.lists(st.tuples(floats, floats), max_size=6), st.booleans()), max_size=4),
    st.integers(1, 300),
    st.integers(1, 300),
)
def test_scribbles_become_points_inside_the_image_or_are_refused(strokes, h, w):
    from medsam.predictor import PromptError
    from medsam.scribbles import Scribble, add_scribble_points

    try:
        objects = [Scribble(p, positive=pos) for p, pos in strokes]
        pts, labels = add_scribble_points(None, None, objects, (h, w))
    except PromptError:
        return
    if pts is None:  # no stroke at all
        assert not strokes
        return
    pts, labels = np.asarray(pts, dtype=float), np.asarray(labels)
    assert pts.ndim == 3 and labels.shape == pts.shape[:2] and np.isfinite(pts).all()
    real = labels != -1
    x, y = pts[..., 0][real], pts[..., 1][real]
    assert (x >= 0).all() and (x <= w).all() and (y >= 0).all() and (y <= h).all()


@FUZZ
@given(floats, floats)
def test_display_windows_are_uint8_or_refused(level, width):
    from medsam.intensity import Window

    raw = np.linspace(-2000, 3000, 50, dtype=np.float32)
    raw[:3] = [np.nan, np.inf, -np.inf]
    try:
        out = Window(level, width).to_uint8(raw, nonfinite="saturate")
    except ValueError:
        return
    assert out.dtype == np.uint8 and out.shape == raw.shape
    assert out[0] == 0 and out[1] == 255 and out[2] == 0


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12),
            lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
            max_leaves=25,
        ).map(json.dumps),
    ),
    st.sampled_from([".json", ".csv"]),
)
def test_folder_prompts_files_parse_or_are_refused(tmp_path_factory, text, suffix):
    from medsam.batch import CasePrompts, PromptsError, read_prompts

    folder = tmp_path_factory.mktemp("prompts")
    path = folder / f"prompts{suffix}"
    path.write_text(text)
    try:
        cases = read_prompts(path, folder / "images")
    except PromptsError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for case in cases:
        assert isinstance(case, CasePrompts) and not case.image.startswith("/") and ".." not in case.image.split("/")
        assert all(len(b) in (4, 6) and all(math.isfinite(v) for v in b) for b in case.boxes)
        assert not (case.auto and case.boxes)


@FUZZ
@given(st.text(max_size=30))
def test_cli_argument_types(text):
    import argparse

    from medsam.cli.evaluate import label_map
    from medsam.cli.options import ct_window, finite_float, positive_int
    from medsam.cli.prepare import _shard

    valid = {  # what an accepted value must satisfy
        ct_window: lambda v: isinstance(v, str) or (math.isfinite(v[0]) and math.isfinite(v[1]) and v[1] > 0),
        finite_float: math.isfinite,
        positive_int: lambda v: v >= 1,
        label_map: lambda v: bool(v) and all(a >= 0 and b >= 0 for a, b in v.items()),
        _shard: lambda v: 0 <= v[0] < v[1],
    }
    for parse, ok in valid.items():
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert ok(value), (parse.__name__, text, value)


# ----------------------------------------------------------------------------- config overrides
_KEYS = st.sampled_from(
    [
        "train.lr",
        "train.max_steps",
        "data.batch_size",
        "data.corpus",
        "model.name",
        "train.nope",
        "x",
        "train",
        "data.augment.zoom_prob",
        "",
    ]
)
_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "1e999", "[1,2", "{a: b}", "null", "true", "0x10", "1e-4"]),
)


@FUZZ
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=4), st.lists(st.text(max_size=10), max_size=2))
def test_config_overrides_parse_or_refuse(tmp_path_factory, pairs, junk):
    from medsam.train.config import ConfigError, dump_config, load_config

    overrides = [f"{k}={v}" for k, v in pairs] + junk
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"  # an accepted config reads back the same
    path.write_text(dump_config(cfg))
    assert load_config(path).to_dict() == cfg.to_dict()


# ----------------------------------------------------------------------------- files
def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


_ARRAYS = st.one_of(
    st.builds(
        lambda s, d: np.zeros(s, dtype=d),
        st.lists(st.integers(0, 5), max_size=4).map(tuple),
        st.sampled_from([np.uint8, np.int16, np.float32, np.float64, bool]),
    ),
    st.lists(floats, max_size=8).map(lambda v: np.array(v)),
    st.text(max_size=5).map(lambda t: np.array(t)),
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["imgs", "boxes", "spacing", "gts", "other"]), _ARRAYS, max_size=4),
    st.sampled_from(["2DBox_x.npz", "3DBox_x.npz"]),
)
def test_npz_cases_read_or_refuse(tmp_path_factory, arrays, name):
    from medsam.io import ImageReadError, read_npz_case

    path = tmp_path_factory.mktemp("npz") / name
    path.write_bytes(_npz_bytes(arrays))
    try:
        case = read_npz_case(path)
    except (ImageReadError, ValueError):
        return
    assert case.n_boxes >= 0


@FUZZ
@given(st.binary(max_size=200))
def test_npz_garbage_bytes_refused(tmp_path_factory, blob):
    from medsam.io import ImageReadError, read_npz_case

    path = tmp_path_factory.mktemp("npzb") / "2DBox_g.npz"
    path.write_bytes(blob)
    with pytest.raises((ImageReadError, ValueError)):
        read_npz_case(path)


_COLUMNS = [*MANIFEST_COLUMNS, "extra"]


@FUZZ
@given(
    st.lists(st.sampled_from(_COLUMNS), max_size=len(_COLUMNS), unique=True),
    st.lists(st.lists(st.text(max_size=6), min_size=0, max_size=16), max_size=3),
)
def test_corpus_manifests_read_or_refuse(tmp_path_factory, header, rows):
    import csv

    from medsam.corpus import CorpusError, read_manifest

    root = tmp_path_factory.mktemp("corpus")
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    try:
        rows = read_manifest(root)
    except (CorpusError, ValueError):
        return
    for row in rows:  # every accepted row is typed as the schema says
        assert all(isinstance(getattr(row, c), int) for c in INT_COLUMNS), row
        assert all(isinstance(getattr(row, c), str) for c in MANIFEST_COLUMNS if c not in INT_COLUMNS), row


def _safetensors_bytes(metadata: dict, tensors: dict) -> bytes:
    header = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        raw = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@FUZZ
@given(
    st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["medsam_config", "format", "x"]),
            st.one_of(
                st.text(max_size=20),
                st.sampled_from(
                    [
                        '{"config": {"name": "x"}}',
                        '{"contract": "nope"}',
                        "[]",
                        "{",
                        '{"config": {"encoder": "vit", "embed_dim": -1}}',
                    ]
                ),
            ),
            max_size=2,
        ),
    ),
    st.dictionaries(
        st.sampled_from(["image_encoder.pos_embed", "mask_decoder.iou_token.weight", "w"]),
        st.builds(np.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple)),
        max_size=2,
    ),
)
def test_checkpoint_metadata_loads_or_is_refused(tmp_path_factory, metadata, tensors):
    from medsam.weights import CheckpointError, load_model

    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    path.write_bytes(_safetensors_bytes(metadata, tensors))
    with pytest.raises(CheckpointError):
        load_model(path, device="cpu")


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["m.pth", "m.pt", "m.safetensors", "m.bin"]))
def test_checkpoint_garbage_is_refused(tmp_path_factory, blob, name):
    from medsam.weights import CheckpointError, load_model

    path = tmp_path_factory.mktemp("ckb") / name
    if blob[:2] == b"PK":  # a zip: make it a zip checkpoint with a broken pickle inside
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", blob)
        blob = buf.getvalue()
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_model(path, device="cpu")


# ----------------------------------------------------------------------------- the workbench API
schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")


BASE = "http://testserver"  # the Host schemathesis's in-process client sends


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the data folder but the derived caches and lock files: path -> (size, mtime)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".medsam/cache/", ".medsam/locks/")):
            st_ = p.stat()
            out[rel] = (st_.st_size, st_.st_mtime_ns)
    return out


def _quiesce(wb, timeout: float = 60.0) -> None:
    """Wait until no background job (embeddings, propagation, scoring, training) runs."""
    t0 = time.time()
    while any(j.active for j in wb.jobs.all()) or wb.training.active_job() is not None:
        assert time.time() - t0 < timeout, "background jobs did not finish"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    import SimpleITK as sitk
    import torch
    from PIL import Image

    from conftest import smooth_image
    from medsam.model import build_model
    from medsam.server import create_app

    root = tmp_path_factory.mktemp("fuzz") / "data"
    root.mkdir()
    Image.fromarray(smooth_image(48, 56, seed=1)).save(root / "a.png")
    vol = np.stack([smooth_image(32, 40, seed=2 + s) for s in range(4)]).astype(np.int16) * 4 - 500
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(root / "vol.nii.gz"))
    torch.manual_seed(0)
    app = create_app(
        root, model=build_model("vit_tiny").eval(), max_upload_bytes=1 << 20, allowed_hosts=("testserver",)
    )
    wb = app.state.workbench
    wb.training.python = "/bin/false"  # a training job's child fails at once: no CPU spent training
    return app, root


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: op.label)


def test_every_operation_is_fuzzed_and_the_server_never_errs(fuzz_app):
    """Schemathesis over the whole OpenAPI, positive and negative cases per operation; real image
    ids are swapped into generated ids and bodies half of the time, so cases reach the model."""
    from fastapi.testclient import TestClient
    from schemathesis import GenerationMode

    app, root = fuzz_app
    wb = app.state.workbench
    ids = ["a.png", "vol.nii.gz"]
    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    client = TestClient(app, base_url=BASE)  # the probe; schemathesis runs the app's lifespan
    operations = _operations(app)
    assert len(operations) >= 20
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode)

            @FUZZ
            @given(case=strategy, use_real=st.booleans(), which=st.sampled_from(ids))
            def run(case, use_real, which):
                if use_real:
                    if isinstance(case.path_parameters, dict) and "image_id" in case.path_parameters:
                        case.path_parameters["image_id"] = which
                    if isinstance(case.body, dict) and "image_id" in case.body:
                        case.body["image_id"] = which
                    for key in ("image", "label"):  # the MONAI Label routes' query parameters
                        if isinstance(case.query, dict) and key in case.query:
                            case.query[key] = which
                _quiesce(wb)
                before = _snapshot(root)
                response = case.call()
                by_status = counts.setdefault(op.label, {})
                by_status[str(response.status_code)] = by_status.get(str(response.status_code), 0) + 1
                where = f"{case.method} {case.formatted_path} {str(case.body)[:200]!r}"
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} for {where}: {response.text[:300]}")
                assert client.get("/info").status_code == 200, f"server stopped answering after {where}"
                if 400 <= response.status_code < 500:
                    _quiesce(wb)
                    after = _snapshot(root)
                    if after != before:
                        changed = sorted(set(after.items()) ^ set(before.items()))
                        failures.append(f"refused {response.status_code} changed {changed[:4]} for {where}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                # No invalid request exists for an operation without parameters or body.
                assert mode == GenerationMode.NEGATIVE, op.label
    _quiesce(wb)
    report = os.environ.get("MEDSAM_FUZZ_REPORT")
    if report:
        Path(report).write_text(
            json.dumps({"examples_setting": EXAMPLES, "cases": counts, "failures": failures}, indent=1)
        )
    assert not failures, "\n".join(failures[:20])
    assert set(counts) == {op.label for op in operations}


# ----------------------------------------------------------------------------- the encoder service
_ENCODER_APP: list = []


def _encoder_client():
    from fastapi.testclient import TestClient

    from conftest import seeded_tiny_model
    from medsam.server.encoder_service import create_encoder_app

    if not _ENCODER_APP:
        _ENCODER_APP.append(TestClient(create_encoder_app(seeded_tiny_model(), max_pixels=64 * 64)))
    return _ENCODER_APP[0]


@FUZZ
@given(st.binary(max_size=3000))
def test_encoder_service_refuses_any_garbage_body(blob):
    r = _encoder_client().post("/encode", content=blob)
    assert r.status_code in (413, 422), r.text


@FUZZ
@given(
    st.sampled_from(["uint8", "float32", "int16", "bool"]),
    st.lists(st.integers(0, 80), min_size=0, max_size=4),
    st.sampled_from(["image", "img", "embedding"]),
)
def test_encoder_service_encodes_uint8_images_and_refuses_the_rest(dtype, shape, name):
    from safetensors.numpy import save

    array = np.zeros(tuple(shape), dtype=dtype)
    body = save({name: array})
    r = _encoder_client().post("/encode", content=body)
    good = (
        name == "image"
        and dtype == "uint8"
        and (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3))
        and min(shape[:2] or [0]) > 0
    )
    if len(body) > 64 * 64 * 3 + (1 << 16) or (good and shape[0] * shape[1] > 64 * 64):
        assert r.status_code == 413, r.text  # the body, or the image, over the service's limit
    else:
        assert r.status_code == (200 if good else 422), (dtype, shape, name, r.text)


# ----------------------------------------------------------------------------- shard indexes
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(json_values, json_values, st.text(max_size=40))
def test_shard_folders_read_or_refuse(tmp_path_factory, index, record, rel):
    from medsam.corpus import CorpusError
    from medsam.corpus.shards import SHARDS_FORMAT, ShardedCorpus

    folder = tmp_path_factory.mktemp("shards")
    (folder / "shards").mkdir()
    shards = [{"name": "000000", "sha256": "x", "bytes": 4, "samples": 1, "cases": [["d", "c", "h"]]}]
    for content in (
        index,
        {"format": SHARDS_FORMAT, "version": 1, "shards": index},
        {"format": SHARDS_FORMAT, "shards": shards},
    ):
        (folder / "shards.json").write_text(json.dumps(content))
        (folder / "shards" / "000000.tar").write_bytes(b"abcd")
        (folder / "shards" / "000000.tar.json").write_text(json.dumps(record))
        try:
            corpus = ShardedCorpus(folder)
            for path in (rel, "cases/d/c/slices/0000.npz"):
                data = corpus.read_bytes(path)
                assert isinstance(data, bytes)
        except CorpusError:
            pass
