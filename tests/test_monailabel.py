"""The MONAI Label-compatible API driven by the real clients' code, unmodified: the client module
3D Slicer's MONAILabel extension uses (``MONAILabelLib/client.py``, shipped inside the
``monailabel`` wheel under ``monailabel/plugins/slicer``) and MONAI Label's own Python client
(``monailabel.client``). The Makefile installs the wheel without its dependencies; both are test
oracles only. The server runs in a thread (uvicorn) on the embedded default model.

Independent checks: result files are read back with SimpleITK (what Slicer reads them with) and
compared with the phantom organ; a slice's result equals the workbench's own ``/segment`` answer
for the same box; a saved label is what the workbench then serves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pytest

from workbench_fixtures import live_server, write_synthetic_ct

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart", reason="python-multipart (the serve extra) is needed for forms")
requests = pytest.importorskip("requests")

TOKEN = "monailabel-test-token"
SLICER_CLIENT = Path(sysconfig.get_paths()["data"]) / "monailabel/plugins/slicer/MONAILabel/MONAILabelLib/client.py"


def _load_slicer_client():
    if not SLICER_CLIENT.is_file():
        pytest.skip(f"the monailabel wheel's Slicer plugin is not installed ({SLICER_CLIENT}); run make venv")
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", SLICER_CLIENT)
    module = importlib.util.module_from_spec(spec)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client imports cgi
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slicer():
    return _load_slicer_client()


@pytest.fixture(scope="module")
def python_client():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from monailabel.client import client as module
    except ImportError:
        pytest.skip("monailabel (MONAI Label's Python client) is not installed; run make venv")
    return module


@pytest.fixture(scope="module")
def default_model():
    import medsam

    return medsam.load_model(device="cpu")


def _write_ct(folder: Path):
    return write_synthetic_ct(folder)


@pytest.fixture
def served(tmp_path, default_model):
    from medsam.server import create_app

    data = tmp_path / "data"
    data.mkdir()
    organ = _write_ct(data)
    from PIL import Image

    from conftest import smooth_image

    Image.fromarray(smooth_image(64, 80, seed=1)).save(data / "a.png")
    app = create_app(data, model=default_model)
    with live_server(app) as url:
        yield url + "/monailabel", data, organ


@pytest.fixture
def served_with_token(tmp_path, default_model):
    from medsam.server import create_app

    data = tmp_path / "data"
    data.mkdir()
    organ = _write_ct(data)
    app = create_app(data, model=default_model, token=TOKEN)
    with live_server(app) as url:
        yield url + "/monailabel", data, organ


def _read(path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _same_geometry(a, b) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def organ_roi(organ: np.ndarray, margin: int = 3) -> list[int]:
    """The organ's box as Slicer sends a region of interest: [i0, i1, j0, j1, k0, k1]."""
    zs, ys, xs = np.nonzero(organ)
    return [
        int(xs.min()) - margin,
        int(xs.max()) + margin,
        int(ys.min()) - margin,
        int(ys.max()) + margin,
        int(zs.min()),
        int(zs.max()),
    ]


def test_info_datastore_and_next_sample_with_slicer_client(served, slicer, tmp_path):
    url, data, _ = served
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="slicer-user")
    assert client.auth_enabled() is False
    info = client.info()
    assert info["models"]["medsam"]["type"] == "deepgrow" and info["models"]["medsam"]["dimension"] == 2
    assert info["models"]["medsam_3d"]["dimension"] == 3
    assert "roi" in info["models"]["medsam_3d"]["prompts"]
    assert set(info["strategies"]) >= {"first", "random", "uncertainty"}
    assert info["datastore"] == {"total": 2, "completed": 0, "label_tags": {}}
    store = client.datastore()
    assert set(store["objects"]) == {"a.png", "ct.nii.gz"}
    assert store["objects"]["ct.nii.gz"]["image"]["ext"] == ".nii.gz"
    sample = client.next_sample("first", {})
    assert sample["id"] == "a.png" and sample["name"] == "a.png"
    # the Slicer module downloads the image from this URL (SampleData.downloadFromURL)
    got = requests.get(f"{url}/datastore/image?image={quote_plus('ct.nii.gz')}", timeout=30)
    assert got.status_code == 200 and got.content == (data / "ct.nii.gz").read_bytes()
    with pytest.raises(slicer.MONAILabelClientException):
        client.next_sample("nonexistent", {})


def test_infer_from_click_and_from_roi_with_slicer_client(served, slicer, tmp_path):
    url, data, organ = served
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="slicer-user")
    image, _ = _read(data / "ct.nii.gz")
    k = organ.shape[0] // 2
    ys, xs = np.nonzero(organ[k])
    click = [int(np.median(xs)), int(np.median(ys)), k]  # IJK as Slicer's getControlPointsXYZ gives
    # what the Slicer module sends for a 2D deepgrow model with one foreground click
    params = {"label": "liver", "foreground": [click], "background": [], "slice": k}
    params.update(result_extension=".nrrd", result_dtype="uint8")  # MONAILabelLogic.infer adds these
    result_file, answer = client.infer("medsam", "ct.nii.gz", params)
    assert result_file.endswith(".nrrd") and answer["label_names"] == {"liver": 1}
    result, labels = _read(result_file)
    _same_geometry(result, image)
    assert labels[np.arange(labels.shape[0]) != k].sum() == 0
    # [i, j, k] is x = i, y = j on slice k: the workbench's own /segment with that point agrees
    point = {"x": click[0], "y": click[1], "positive": True}
    assert np.array_equal(labels[k] > 0, own_mask(url, k, points=[point]))
    click_mask = labels[k] > 0
    assert click_mask.any()

    # a region of interest on the 2D model: the slice's mask equals the workbench's own /segment
    roi = organ_roi(organ)
    result_file, answer = client.infer("medsam", "ct.nii.gz", {"label": "liver", "roi": roi, "slice": k})
    _, labels = _read(result_file)
    box = {"x0": roi[0], "y0": roi[2], "x1": roi[1], "y1": roi[3]}
    assert np.array_equal(labels[k] > 0, own_mask(url, k, box=box))
    assert dice(labels[k] > 0, organ[k]) > 0.8  # the organ, not its transpose: i is x, j is y

    # the 3D model from the same region: the object through its slices, never beyond them
    result_file, answer = client.infer("medsam_3d", "ct.nii.gz", {"label": "liver", "roi": roi})
    result, labels = _read(result_file)
    _same_geometry(result, image)
    assert answer["key_slice"] == (roi[4] + roi[5]) // 2
    assert labels[: roi[4]].sum() == 0 and labels[roi[5] + 1 :].sum() == 0
    assert dice(labels > 0, organ) > 0.6

    # the 3D model from clicks alone: the clicked slice keeps the click's mask, the others come
    # from propagating its box, in one run of slices around it
    result_file, answer = client.infer("medsam_3d", "ct.nii.gz", {"label": "liver", "foreground": [click]})
    _, labels = _read(result_file)
    assert answer["key_slice"] == k and np.array_equal(labels[k] > 0, click_mask)
    filled = np.flatnonzero((labels > 0).reshape(labels.shape[0], -1).any(axis=1))
    assert k in filled and np.array_equal(filled, np.arange(filled[0], filled[-1] + 1))


def own_mask(url: str, k: int, **prompt) -> np.ndarray:
    """The workbench's own ``/segment`` answer on slice ``k`` of ct.nii.gz."""
    import base64
    from io import BytesIO

    from PIL import Image

    body = {"image_id": "ct.nii.gz", "slice_index": k, "encoding": "png", **prompt}
    own = requests.post(url.rsplit("/monailabel", 1)[0] + "/segment", json=body, timeout=60)
    assert own.status_code == 200, own.text
    return np.asarray(Image.open(BytesIO(base64.b64decode(own.json()["png_base64"])))) > 0


def _label_like(image_path: Path, array: np.ndarray, out: Path, spacing=None) -> Path:
    """A labelmap with the image's geometry, as Slicer exports one (NRRD)."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(image_path))
    lab = sitk.GetImageFromArray(array.astype(np.uint8))
    lab.CopyInformation(ref)
    if spacing is not None:
        lab.SetSpacing(spacing)
    sitk.WriteImage(lab, str(out))
    return out


def test_save_label_is_the_workbench_label(served, slicer, tmp_path):
    from medsam.io import read_image

    url, data, organ = served
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="slicer-user")
    painted = organ.astype(np.uint8) * 2
    label_file = _label_like(data / "ct.nii.gz", painted, tmp_path / "painted.nrrd")
    # MONAILabelLogic.save_label(image, label, params) as the module's "Submit Label" calls it
    saved = client.save_label("ct.nii.gz", str(label_file), params={"label_info": [{"name": "liver", "idx": 2}]})
    assert saved == {"image": "ct.nii.gz", "label": "ct.nii.gz", "tag": "final", "version": 1}

    # the workbench serves it: version 1, the names, the voxels; provenance names the client
    base = url.rsplit("/monailabel", 1)[0]
    meta = requests.get(f"{base}/labels/ct.nii.gz", timeout=30).json()
    assert meta["version"] == 1
    assert {"value": 2, "name": "liver"}.items() <= next(d for d in meta["labels"] if d["value"] == 2).items()
    stored = read_image(data / ".medsam" / "labels" / "ct.nii.gz.nii.gz")
    assert np.array_equal(stored.array, painted)
    side = json.loads((data / ".medsam" / "labels" / "ct.nii.gz.nii.gz.json").read_text())
    assert side["history"][-1]["action"] == "monailabel-save" and side["history"][-1]["client_id"] == "slicer-user"

    # and MONAI Label clients see it: datastore listing, counts, Slicer's "original" download
    store = client.datastore()
    original = store["objects"]["ct.nii.gz"]["labels"]["original"]["info"]
    assert original["params"]["label_names"]["liver"] == 2
    assert client.info()["datastore"]["completed"] == 1
    downloaded = client.download_label("ct.nii.gz", "original")
    _, back = _read(downloaded)
    assert np.array_equal(back, painted)
    assert client.next_sample("first", {})["id"] == "a.png"  # the labelled volume is not offered

    # a label of another geometry is refused (422) and changes nothing; the server stays up
    wrong = _label_like(data / "ct.nii.gz", painted, tmp_path / "wrong.nrrd", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(slicer.MONAILabelClientException) as err:
        client.save_label("ct.nii.gz", str(wrong), params={})
    assert "422" in err.value.msg and "spacing" in err.value.msg
    assert requests.get(f"{base}/labels/ct.nii.gz", timeout=30).json()["version"] == 1
    shape = _label_like(data / "ct.nii.gz", painted, tmp_path / "ok.nrrd")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(painted[:3]), str(tmp_path / "short.nrrd"))
    with pytest.raises(slicer.MONAILabelClientException):
        client.save_label("ct.nii.gz", str(tmp_path / "short.nrrd"), params={})
    assert client.save_label("ct.nii.gz", str(shape), params={})["version"] == 2


def test_monailabel_python_client(served, python_client, tmp_path):
    url, data, organ = served
    client = python_client.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="py")
    # upload a new image under a chosen id; it is a workbench image at once
    _write_ct(tmp_path)
    up = client.upload_image(str(tmp_path / "ct.nii.gz"), image_id="case7")
    assert up == {"image": "case7.nii.gz"} and (data / "case7.nii.gz").is_file()
    roi = organ_roi(organ)
    result_file, answer = client.infer("medsam", "case7.nii.gz", {"roi": roi, "label": "organ"})
    _, labels = _read(result_file)
    assert answer["slice"] == (roi[4] + roi[5]) // 2
    assert dice(labels[answer["slice"]] > 0, organ[answer["slice"]]) > 0.6
    saved = client.save_label(
        "case7.nii.gz", result_file, tag="final", params={"label_info": [{"name": "organ", "idx": 1}]}
    )
    assert saved["version"] == 1
    assert client.datastore()["objects"]["case7.nii.gz"]["labels"]["final"]["info"]["version"] == 1
    assert client.train_status(check_if_running=True) is False
    with pytest.raises(python_client.MONAILabelClientException) as err:
        client.train_start("medsam", {"mode": ["decoder", "lora"], "steps": 2})  # too few labels
    assert "422" in err.value.msg
    assert client.next_sample("uncertainty", {})["id"] in ("a.png", "ct.nii.gz")


def test_token_login_as_slicer_does(served_with_token, slicer, tmp_path):
    url, _, _ = served_with_token
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.auth_enabled() is True
    with pytest.raises(slicer.MONAILabelClientException):
        client.info()  # 401 without the token
    with pytest.raises(slicer.MONAILabelClientException):
        client.auth_token("someone", "not-the-token")
    client.update_auth(client.auth_token("someone", TOKEN))
    assert client.auth_valid_token() is True
    assert client.info()["models"]["medsam"]["dimension"] == 2


def test_bad_requests_get_4xx_and_the_server_stays_up(served, slicer, tmp_path):
    url, _, _ = served
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path))
    bad = [
        ("medsam", "ct.nii.gz", {"foreground": [[500, 1, 1]]}),  # outside the image
        ("medsam", "ct.nii.gz", {"foreground": [[1, 2]], "slice": 99}),
        ("medsam", "ct.nii.gz", {"roi": [1, 2, 3]}),
        ("medsam", "ct.nii.gz", {"roi": [1e400, 2, 3, 4, 5, 6]}),
        ("medsam", "ct.nii.gz", {"foreground": "x"}),
        ("medsam", "ct.nii.gz", {}),  # no prompt
        ("medsam", "ct.nii.gz", {"roi": [0, 9, 0, 9, 0, 1], "result_extension": ".exe"}),
        ("nope", "ct.nii.gz", {"roi": [0, 9, 0, 9, 0, 1]}),
        ("medsam", "../etc/passwd", {"roi": [0, 9, 0, 9, 0, 1]}),
        ("medsam", "missing.nii.gz", {"roi": [0, 9, 0, 9, 0, 1]}),
    ]
    for model, image, params in bad:
        with pytest.raises(slicer.MONAILabelClientException) as err:
            client.infer(model, image, params)
        status = int(err.value.msg.split("Status: ")[1].split(";")[0])
        assert 400 <= status < 500, (params, err.value.msg)
    for body, ctype in ((b"--x\r\ngarbage", "multipart/form-data; boundary=x"), (b"[1, 2]", "application/json")):
        r = requests.post(f"{url}/infer/medsam?image=ct.nii.gz", data=body, headers={"content-type": ctype}, timeout=9)
        assert 400 <= r.status_code < 500
    r = requests.put(
        f"{url}/datastore/label?image=ct.nii.gz", files={"label": ("x.nrrd", b"NRRD0004\nnot")}, timeout=30
    )
    assert r.status_code == 422
    r = requests.put(f"{url}/datastore/label?image=ct.nii.gz", files={"label": ("x.exe", b"MZ")}, timeout=30)
    assert r.status_code == 415
    assert client.info()["datastore"]["total"] == 2


def test_infer_params_parse_or_refuse_fuzz():
    """Any JSON params either parse into prompts inside the image or are refused with
    ParamsRefused: nothing else escapes (the route turns it into 422)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from medsam.server.monailabel_protocol import ParamsRefused, parse_infer_params, plan_slice

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True), st.text(max_size=5))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=7), max_leaves=20)
    keys = st.sampled_from(["foreground", "background", "roi", "slice", "label", "result_extension", "other"])
    shape = (5, 40, 60)

    @settings(max_examples=int(os.environ.get("MEDSAM_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True)
    @given(st.dictionaries(keys, values, max_size=6))
    def check(params):
        try:
            prompt = parse_infer_params(params, shape, "label 1")
        except ParamsRefused:
            return
        for c in prompt.clicks:
            assert 0 <= c.x < 60 and 0 <= c.y < 40 and 0 <= c.z < 5
        if prompt.roi is not None:
            x0, y0, z0, x1, y1, z1 = prompt.roi
            assert 0 <= x0 <= x1 < 60 and 0 <= y0 <= y1 < 40 and 0 <= z0 <= z1 < 5
        try:
            index, box, points = plan_slice(prompt)
        except ParamsRefused:
            return
        assert 0 <= index < 5 and (box is not None or any(p[2] for p in points))

    check()


def test_dicom_series_is_handed_out_as_one_nifti(served, slicer, tmp_path):
    """A DICOM series folder is one image id; Slicer downloads it as a NIfTI whose voxels and
    affine are the series' (checked with pydicom's values and nibabel's reading)."""
    import nibabel as nib

    from test_io_dicom import _slice_values, _write_series

    url, data, _ = served
    _write_series(data / "series", 4)
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.datastore()["objects"]["series"]["image"] == {"ext": ".nii.gz", "info": {"name": "series.nii.gz"}}
    r = requests.get(f"{url}/datastore/image?image=series", timeout=30)
    assert r.status_code == 200 and 'filename="series.nii.gz"' in r.headers["content-disposition"]
    (tmp_path / "series.nii.gz").write_bytes(r.content)
    nifti = nib.load(tmp_path / "series.nii.gz")
    values = np.asarray(nifti.dataobj)
    for k in range(4):  # NIfTI [i, j, k] = DICOM column, row, slice; HU = stored - 1024
        assert np.array_equal(values[:, :, k].T, _slice_values(k) - 1024)
    assert np.allclose(nifti.affine[:3, 3], (50.0, 60.0, 10.0))  # LPS origin (-50, -60, 10) in RAS
    assert np.allclose(np.abs(np.diag(nifti.affine)[:3]), (0.9, 0.7, 2.5))


def test_train_stats_report_the_latest_scored_job():
    from types import SimpleNamespace

    from medsam.server.routers.monailabel import train_stats

    jobs = [
        SimpleNamespace(after={"dsc": 0.71, "nsd": 0.8}, id="a", finished="t1"),
        SimpleNamespace(after={"dsc": 0.83, "nsd": 0.9}, id="b", finished="t2"),
        SimpleNamespace(after=None, id="c", finished=None),  # running, or failed before scoring
    ]
    assert train_stats(jobs) == {"medsam": {"best_metric": 0.83, "id": "b", "finished": "t2"}}
    assert train_stats(jobs[2:]) == {}


def test_a_local_volume_through_a_session_as_slicer_does(served, slicer, tmp_path):
    """A volume opened from the user's disk: Slicer opens a session with it, infers with the
    session id, and on Submit Label uploads it under its node name (no suffix) and saves the label."""
    url, data, organ = served
    client = slicer.MONAILabelClient(url, tmpdir=str(tmp_path), client_id="slicer-user")
    local = tmp_path / "local"
    local.mkdir()
    _write_ct(local)
    volume_file = local / "ct.nii.gz"
    session = client.create_session(str(volume_file))
    sid = session["session_id"]
    assert client.get_session(sid)["name"] == "ct.nii.gz"
    k = organ.shape[0] // 2
    params = {"label": "liver", "roi": organ_roi(organ), "slice": k}
    result_file, _ = client.infer("medsam", "localct", params, session_id=sid)
    _, labels = _read(result_file)
    assert dice(labels[k] > 0, organ[k]) > 0.8
    assert "localct.nii.gz" not in client.datastore()["objects"]  # a session is not a datastore image

    # Submit Label: MONAILabelWidget.onUploadImage(image_id=node name), then save_label(node name)
    assert client.upload_image(str(volume_file), image_id="localct") == {"image": "localct.nii.gz"}
    saved = client.save_label("localct", result_file, params={"label_info": [{"name": "liver", "idx": 1}]})
    assert saved["image"] == "localct.nii.gz" and saved["version"] == 1
    assert client.infer("medsam", "localct", params)[1]["slice"] == k  # the suffix-less id resolves
    assert client.remove_session(sid)["session_id"] == sid
    with pytest.raises(slicer.MONAILabelClientException):
        client.get_session(sid)
    with pytest.raises(slicer.MONAILabelClientException):
        client.infer("medsam", "localct", params, session_id=sid)
    assert not (data / ".medsam" / "sessions" / sid).exists()
