"""What a hostile or careless user meets: malformed requests answered with 4xx by a workbench
that keeps running, one-line errors from the command line, and long runs that end cleanly with
their children (docs/security.md lists each promise and its test here)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conftest import smooth_image
from medsam.cli import main
from medsam.server import create_app
from medsam.server.encoding import rle_decode
from workbench_fixtures import TOKEN, client, rle_mask

PYTHON = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ----------------------------------------------------------------------------- RLE decoding
def test_rle_counts_that_wrap_int64_are_refused_not_written_out_of_bounds():
    n = 6
    with pytest.raises(ValueError, match="counts"):
        rle_decode([0, 0, 0], [2**63 - 1, 2**63 - 1, n + 2], (2, 3))
    with pytest.raises(ValueError):
        rle_decode([0, 1], [2**64, n], (2, 3))
    with pytest.raises(ValueError, match="values"):
        rle_decode([2**70], [n], (2, 3))
    with pytest.raises(ValueError):
        rle_decode([0], [n], (-2, -3))
    assert (rle_decode([0, 7], [4, 2], (2, 3)) == [[0, 0, 0], [0, 7, 7]]).all()


_SEGV_PROBE = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    from fastapi.testclient import TestClient
    from medsam.model import build_model
    from medsam.server import create_app
    root = sys.argv[1]
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(root + "/x.png")
    torch.manual_seed(0)
    app = create_app(root, model=build_model("vit_tiny").eval())
    with TestClient(app, base_url="http://127.0.0.1") as c:
        body = {"mask": {"shape": [16, 20], "values": [0, 0, 0],
                         "counts": [2**63 - 1, 2**63 - 1, 16 * 20 + 2]}}
        codes = [c.put("/labels/x.png/map", json=body, headers={"If-Match": '"0"'}).status_code,
                 c.put("/labels/x.png/slices/0", json=body, headers={"If-Match": '"0"'}).status_code,
                 c.get("/info").status_code]
    print(codes)
    """
)


def test_wrapping_rle_request_gets_422_and_the_server_lives(tmp_path):
    """RLE counts that wrap int64 get 422 and the process lives (run in a child: an unchecked
    decode would write out of bounds and kill it)."""
    proc = subprocess.run(
        [PYTHON, "-c", _SEGV_PROBE, str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "[422, 422, 200]"
    assert not (tmp_path / ".medsam" / "labels" / "x.png.png").exists()


# ----------------------------------------------------------------------------- 4xx, not 500
def test_out_of_range_and_non_finite_values_get_422(data, model):
    with client(create_app(data, model=model)) as c:
        huge = {"mask": {"shape": [64, 80], "values": [2**70], "counts": [64 * 80]}}
        assert c.put("/labels/a.png/map", json=huge, headers={"If-Match": '"0"'}).status_code == 422
        for query in ("level=nan&width=100", "level=0&width=inf", "level=0&width=nan", "level=-inf&width=5"):
            assert c.get(f"/images/vol.nii.gz/slices/1.png?{query}").status_code == 422, query
        r = c.post("/train", content=b'{"lr": NaN}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "lr"
        r = c.post(
            "/segment",
            content=b'{"image_id": "a.png", "box": [1, 2, NaN, 30]}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422
        r = c.post(
            "/segment",
            content=b'{"image_id": "a.png", "box": {"x0": 1, "y0": 2, "x1": Infinity, "y1": 3}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422
        assert c.get("/info").status_code == 200
        assert not (data / ".medsam" / "labels" / "a.png.png").exists()


def test_box_as_json_list_is_accepted_and_documented(data, model):
    with client(create_app(data, model=model)) as c:
        as_list = c.post("/segment", json={"image_id": "a.png", "box": [10, 10, 50, 40], "zoom": False})
        as_dict = c.post(
            "/segment", json={"image_id": "a.png", "box": {"x0": 10, "y0": 10, "x1": 50, "y1": 40}, "zoom": False}
        )
        assert as_list.status_code == as_dict.status_code == 200
        assert as_list.json()["mask"] == as_dict.json()["mask"]
        assert c.post("/segment", json={"image_id": "a.png", "box": [10, 10, 50]}).status_code == 422
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        (ref,) = [f["$ref"] for f in schemas["SegmentRequest"]["properties"]["box"]["anyOf"] if "$ref" in f]
        forms = schemas[ref.rsplit("/", 1)[1]]["anyOf"]
        (as_array,) = [f for f in forms if f.get("type") == "array"]
        (as_object,) = [f for f in forms if f.get("type") == "object"]
        assert as_array["minItems"] == as_array["maxItems"] == 4
        assert set(as_object["properties"]) == {"x0", "y0", "x1", "y1"}


def test_bearer_scheme_is_case_insensitive(data, model):
    with client(create_app(data, model=model, token=TOKEN)) as c:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert c.get("/images", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200, scheme
        assert c.get("/images", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get("/images", headers={"Authorization": f"bearer {TOKEN}x"}).status_code == 401
        assert c.get("/images", headers={"Authorization": "bearer"}).status_code == 401


# ----------------------------------------------------------------------------- label file names
def test_ids_that_shared_a_label_file_get_their_own(data, model):
    Image.fromarray(smooth_image(64, 80, seed=5)).save(data / "a.png.png")  # beside a.png
    with client(create_app(data, model=model)) as c:
        for image_id, value in (("a.png", 1), ("a.png.png", 2)):
            body = {"mask": rle_mask(np.full((64, 80), value, np.uint8))}
            r = c.put(f"/labels/{image_id}/map", json=body, headers={"If-Match": '"0"'})
            assert r.status_code == 200, r.text
        for image_id, value in (("a.png", 1), ("a.png.png", 2)):
            got = c.get(f"/labels/{image_id}/map").json()
            assert got["version"] == 1 and got["mask"]["values"] == [value]
        files = {c.get(f"/labels/{i}").json()["file"] for i in ("a.png", "a.png.png")}
        assert len(files) == 2


def _old_layout_store(data: Path) -> Path:
    """A labels folder as the earlier layout wrote it: the suffix left off when the id ended so."""
    from medsam.io import read_image, write_mask
    from medsam.server.labels import LabelStore

    labels_dir = data / ".medsam" / "labels"
    store = LabelStore(labels_dir, data)
    entries = {
        "a.png": ("a.png", "png", 1),
        "vol.nii.gz": ("vol.nii.gz", "nifti", 2),
        "sub/b.png": ("sub/b.png", "png", 3),
        "c.jpg": ("c.jpg.png", "png", 4),
    }
    Image.fromarray(smooth_image(30, 20, seed=7)).save(data / "c.jpg")
    for image_id, (file, fmt, value) in entries.items():
        image = read_image(data / image_id)
        path = labels_dir / file
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mask(np.full(image.spatial_shape, value, np.uint8), image, path)
        side = {
            "format": 1,
            "image_id": image_id,
            "version": 3,
            "label_file": file,
            "label_format": fmt,
            "labels": [{"value": value, "name": f"l{value}", "color": "#112233"}],
            "history": [{"version": 3}],
        }
        store.sidecar_path(path).write_text(json.dumps(side))
    return labels_dir


def test_migration_of_a_datastore_in_layout_1(data, model):
    labels_dir = _old_layout_store(data)
    assert not (labels_dir / "layout.json").exists()
    with client(create_app(data, model=model)) as c:
        for image_id, value in (("a.png", 1), ("vol.nii.gz", 2), ("sub/b.png", 3), ("c.jpg", 4)):
            info = c.get(f"/labels/{image_id}").json()
            assert info["version"] == 3 and info["labels"][0]["value"] == value, (image_id, info)
            assert c.get(f"/labels/{image_id}/map").json()["mask"]["values"] == [value]
        assert info["file"] == ".medsam/labels/c.jpg.png"
    assert json.loads((labels_dir / "layout.json").read_text()) == {"layout": 2}
    names = sorted(p.relative_to(labels_dir).as_posix() for p in labels_dir.rglob("*") if p.is_file())
    assert names == [
        "a.png.png",
        "a.png.png.json",
        "c.jpg.png",
        "c.jpg.png.json",
        "layout.json",
        "sub/b.png.png",
        "sub/b.png.png.json",
        "vol.nii.gz.nii.gz",
        "vol.nii.gz.nii.gz.json",
    ]


def test_migration_cut_short_is_completed_by_the_next_start(data, model):
    from medsam.server.labels import LabelStore

    labels_dir = _old_layout_store(data)
    store = LabelStore(labels_dir, data)
    # As if killed after the new sidecar of a.png was written but before its label file moved:
    side = json.loads((labels_dir / "a.png.json").read_text())
    (labels_dir / "a.png.png.json").write_text(json.dumps({**side, "label_file": "a.png.png"}))
    assert store.migrate() == 3  # a.png, vol.nii.gz, sub/b.png (c.jpg.png stays)
    assert store.migrate() == 0  # done: layout.json written
    assert store.read("a.png", __import__("medsam").io.read_image(data / "a.png"))[1].max() == 1


# ----------------------------------------------------------------------------- decoded size
def _nifti_bomb(path: Path, shape=(1000, 1000, 600)) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.write(b"\0" * (1 << 20))
    return path


def test_upload_refused_by_the_size_its_header_declares(data, model, tmp_path):
    bomb = _nifti_bomb(tmp_path / "bomb.nii.gz")
    with client(create_app(data, model=model)) as c:
        r = c.post(
            "/images?name=bomb.nii.gz", content=bomb.read_bytes(), headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 413 and "600,000,000 voxels" in r.json()["detail"]
        assert not (data / "bomb.nii.gz").exists()
        assert list((data / ".medsam" / "uploads").iterdir()) == []
    small = tmp_path / "small.png"
    Image.fromarray(smooth_image(40, 50, seed=1)).save(small)
    with client(create_app(data, model=model, max_image_voxels=40 * 50 - 1)) as c:
        r = c.post(
            "/images?name=small.png", content=small.read_bytes(), headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 413
    # A bomb placed in the folder by hand is refused when read, before decompressing.
    os.replace(bomb, data / "placed.nii.gz")
    with client(create_app(data, model=model)) as c:
        r = c.get("/images/placed.nii.gz")
        assert r.status_code == 422 and "voxels" in r.json()["detail"]


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def png(tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray(smooth_image(80, 100, seed=3)).save(path)
    return path


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("medsam: error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def _malicious_pickle(path: Path) -> Path:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps({"model": Boom()}))
    return path


def test_refused_checkpoints_give_one_line_and_status_2(tmp_path, capsys):
    evil = _malicious_pickle(tmp_path / "evil.pt")
    text = tmp_path / "notes.pth"
    text.write_text("just some text\n")
    assert main(["export", str(evil), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "refused to unpickle" in _one_error(capsys)
    assert main(["info", str(text)]) == 2
    line = _one_error(capsys)
    assert "not a readable PyTorch checkpoint" in line and "weights_only" not in line
    assert not (tmp_path / "m.safetensors").exists()


def test_resume_from_a_malicious_checkpoint_is_one_line(tmp_path, capsys):
    evil = _malicious_pickle(tmp_path / "evil.pt")
    from medsam.train.synthetic import write_synthetic_corpus
    from test_train_loop import micro_overrides

    corpus = write_synthetic_corpus(tmp_path / "corpus", cases={"train": 1, "val": 1}, slices_per_case=2, size=64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    overrides = micro_overrides(corpus, tmp_path / "run", "train.max_steps=1", f"train.resume={evil}")
    code = main(["train", str(cfg), *overrides])
    assert code == 2
    assert "refused to unpickle" in _one_error(capsys)


def test_unknown_output_format_refused_before_the_model_loads(tmp_path, png, capsys, monkeypatch):
    import medsam.weights

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(medsam.weights, "load_model", no_model)
    assert main(["segment", str(png), "--box", "1", "1", "30", "30", "-o", str(tmp_path / "x.xyz")]) == 2
    assert "unknown mask format" in _one_error(capsys)
    assert (
        main(
            [
                "segment",
                str(png),
                "--box",
                "1",
                "1",
                "30",
                "30",
                "-o",
                str(tmp_path / "x.png"),
                "--overlay",
                str(tmp_path / "o.jpg"),
            ]
        )
        == 2
    )
    assert "PNG" in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.png"]


def test_overhanging_box_is_clipped_with_a_warning(tmp_path, png, capsys, small_default_model):
    out = tmp_path / "m.png"
    assert main(["segment", str(png), "--box", "-5", "10", "130", "50", "--no-zoom", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "medsam: warning: box 1 [-5, 10, 130, 50] overhangs the image edge; clipped to [0, 10, 100, 50]" in err
    assert json.loads((tmp_path / "m.scores.json").read_text())["boxes"] == [[0, 10, 100, 50]]
    assert main(["segment", str(png), "--box", "150", "10", "160", "50", "-o", str(tmp_path / "n.png")]) == 2
    assert "outside the image" in _one_error(capsys)


def test_overhanging_volume_box_is_clipped_to_the_last_pixel(tmp_path, capsys, small_default_model):
    vol = np.random.default_rng(0).normal(size=(4, 24, 28)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol.T, np.eye(4)), tmp_path / "v.nii.gz")
    out = tmp_path / "seg.nii.gz"
    args = [
        "segment",
        str(tmp_path / "v.nii.gz"),
        "--box",
        "-3",
        "2",
        "1",
        "40",
        "20",
        "9",
        "--no-zoom",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "box 1 [-3, 2, 40, 20] overhangs the image edge; clipped to [0, 2, 27, 20]" in err
    assert "z-range [1, 9] overhangs the volume; clipped to [1, 3]" in err
    assert nib.load(out).shape == (28, 24, 4)
    assert main([*args[:3], "30", "2", "0", "40", "20", "3", *args[9:]]) == 2
    assert "outside the image" in _one_error(capsys)


def test_all_nan_volume_is_refused_and_some_nan_warned(tmp_path, capsys, small_default_model):
    import SimpleITK as sitk

    vol = np.full((4, 24, 28), np.nan, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "nan.nrrd"))
    nib.save(nib.Nifti1Image(vol.T, np.eye(4)), tmp_path / "nan.nii.gz")  # ITK reads these NaN as 0
    out = tmp_path / "seg.nii.gz"
    for name, expected in (("nan.nrrd", "no finite value"), ("nan.nii.gz", "constant")):
        assert main(["segment", str(tmp_path / name), "--box", "2", "2", "0", "20", "20", "3", "-o", str(out)]) == 2
        assert expected in _one_error(capsys)
        assert not out.exists()
    vol = np.random.default_rng(0).normal(size=(4, 24, 28)).astype(np.float32)
    vol[1, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "some.nrrd"))
    assert (
        main(
            [
                "segment",
                str(tmp_path / "some.nrrd"),
                "--box",
                "2",
                "2",
                "0",
                "20",
                "20",
                "3",
                "--iou-threshold=-1e9",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "medsam: warning: 1 of 2688 voxels are NaN" in capsys.readouterr().err


def test_2d_nifti_mask_keeps_sform_code_and_slice_spacing(tmp_path, small_default_model):
    affine = np.diag([0.7, 0.8, 5.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    src = nib.Nifti1Image(smooth_image(40, 30, seed=2).T.astype(np.float32), affine)
    src.set_sform(affine, code=2)
    src.set_qform(affine, code=1)
    nib.save(src, tmp_path / "two.nii.gz")
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(tmp_path / "two.nii.gz"), "--box", "2", "2", "20", "30", "-o", str(out)]) == 0
    written = nib.load(out)
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert written.header["pixdim"][1:4] == pytest.approx((0.7, 0.8, 5.0))
    assert written.shape[:2] == (30, 40)


def test_evaluate_refuses_label_ids_that_share_nothing_or_maps_them(tmp_path, capsys):
    gt = np.zeros((20, 20), np.uint8)
    gt[2:10, 2:10] = 3
    pred = np.zeros((20, 20), np.uint8)
    pred[2:10, 3:10] = 1
    Image.fromarray(gt).save(tmp_path / "gt.png")
    Image.fromarray(pred).save(tmp_path / "pred.png")
    out = tmp_path / "scores.csv"
    assert (
        main(["evaluate", "--pred", str(tmp_path / "pred.png"), "--gt", str(tmp_path / "gt.png"), "-o", str(out)]) == 2
    )
    assert "share nothing" in _one_error(capsys)
    assert not out.exists()
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred.png"),
                "--gt",
                str(tmp_path / "gt.png"),
                "--label-map",
                "1=3",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "DSC 0.93" in capsys.readouterr().out  # 2 * 56 / (56 + 64)


def test_serve_on_every_interface_names_an_address_that_answers(capsys):
    from medsam.cli.serve import _shown_address, allowed_hosts

    hosts = allowed_hosts("0.0.0.0", ["annot.example.org"])
    shown = _shown_address("0.0.0.0", hosts)
    assert shown not in ("0.0.0.0", "[::]") and shown.strip("[]") in hosts
    assert "annot.example.org" in hosts and "localhost" in hosts and "0.0.0.0" not in hosts
    assert allowed_hosts("10.1.2.3", []) == ("127.0.0.1", "localhost", "::1", "10.1.2.3")


def test_argument_errors_answer_without_importing_torch(tmp_path):
    code = (
        "import sys\nfrom medsam.cli import main\n"
        f"rc = main(['segment', {str(tmp_path / 'nope.png')!r}, '--box', '1', '1', '5', '5', '-o', 'x.png'])\n"
        "rc2 = main(['segment', 'a.png', '--box', '1', '2', '3'])\n"
        "print(rc, rc2, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.stdout.split() == ["2", "2", "False"], proc.stderr
    assert proc.stderr.count("medsam: error:") == 2


# ----------------------------------------------------------------------------- processes
def _children_of(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.add(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        kids = _children_of(todo.pop())
        found |= kids
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_curation_workers_die_with_a_killed_parent(tmp_path):
    import SimpleITK as sitk

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):  # enough work that the pool is still busy when the parent dies
        vol = rng.normal(0, 50, (40, 160, 160)).astype(np.int16)
        vol[8:32, 30:120, 30:120] += 300
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(images / f"c{i}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray((vol > 150).astype(np.uint8)), str(labels / f"c{i}.nii.gz"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: ds\nmodality: CT\nimages: {images}\nlabels: {labels}\n")
    proc = subprocess.Popen(
        [PYTHON, "-m", "medsam", "prepare", str(spec), "-o", str(tmp_path / "out"), "--workers", "2", "--no-progress"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    family: set[int] = set()
    while time.time() < deadline and len(family) < 3 and proc.poll() is None:
        family = _descendants(proc.pid)
        time.sleep(0.05)
    assert len(family) >= 3, (family, proc.poll())  # the forkserver and two workers (and helpers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    assert not any(_alive(p) for p in family), [p for p in family if _alive(p)]


def test_sigterm_ends_a_run_with_one_line_and_no_output(tmp_path):
    script = tmp_path / "slow_segment.py"
    script.write_text(
        textwrap.dedent(f"""
        import time, medsam.segment as s
        from medsam.cli import main
        orig = s.write_outputs
        def slow(*a, **k):
            print("writing", flush=True)
            time.sleep(30)
            return orig(*a, **k)
        s.write_outputs = slow
        import medsam.default_model as d
        d.bundled_checkpoint = lambda: None
        raise SystemExit(main(["segment", {str(tmp_path / "in.png")!r}, "--box", "2", "2", "30", "30",
                               "-o", {str(tmp_path / "out" / "m.png")!r}]))
        """)
    )
    Image.fromarray(smooth_image(40, 40, seed=1)).save(tmp_path / "in.png")
    proc = subprocess.Popen([PYTHON, str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = [ln for ln in err.splitlines() if ln.startswith("medsam:") and not ln.startswith("medsam: warning")]
    assert lines == ["medsam: stopped by SIGTERM"] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_an_id_with_an_over_long_file_name_is_refused_not_500(data, model):
    """A path segment over 255 bytes (the file system's limit for a name) is refused with 400."""
    long_name = "0" * 30 + "\u0080" * 120 + ".png"  # 274 bytes in UTF-8, under the 1024-character limit
    with client(create_app(data, model=model)) as c:
        for path in (f"/images/{long_name}", f"/images/{long_name}/embeddings", f"/labels/{long_name}"):
            assert c.get(path).status_code == 400, path
        assert c.get("/images/a.png").status_code == 200
