"""The annotation workbench server (``medsam serve``) through FastAPI's TestClient.

Small synthetic images in tmp_path and the tiny ``vit_tiny`` model; every test makes its own
data folder. Needs the ``serve`` extra (FastAPI, uvicorn, httpx); skipped without it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from conftest import seeded_tiny_model, smooth_image
from medsam.io import read_image
from medsam.server import create_app
from medsam.server.encoding import rle_decode
from workbench_fixtures import BASE, TOKEN, client, rle_mask


def wait_job(c: TestClient, job: dict, timeout: float = 60.0) -> dict:
    t0 = time.time()
    while job["status"] in ("queued", "running"):
        assert time.time() - t0 < timeout, job
        time.sleep(0.05)
        job = c.get(f"/jobs/{job['id']}").json()
    return job


# ----------------------------------------------------------------------------- images
def test_list_and_get_images(data, model):
    with client(create_app(data, model=model)) as c:
        listing = c.get("/images").json()
        assert [i["id"] for i in listing["images"]] == ["a.png", "sub/b.png", "vol.nii.gz"]
        assert {i["status"] for i in listing["images"]} == {"unlabelled"}
        meta = c.get("/images/vol.nii.gz").json()
        assert meta["shape"] == [5, 40, 48] and meta["axes"] == "ZYX" and meta["n_slices"] == 5
        assert meta["slice_shape"] == [40, 48]
        assert meta["spacing_xyz"] == pytest.approx([0.8, 0.9, 2.5])
        assert meta["spacing_zyx"] == pytest.approx([2.5, 0.9, 0.8])
        assert meta["origin"] == pytest.approx([10.0, -20.0, 30.0])
        assert "soft_tissue" in meta["window_presets"]
        two_d = c.get("/images/sub/b.png").json()
        assert two_d["axes"] == "YX" and two_d["n_slices"] == 1
        for query in ("window=soft_tissue", "window=auto", "level=0&width=800", "window=minmax"):
            r = c.get(f"/images/vol.nii.gz/slices/2.png?{query}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get("/images/vol.nii.gz/slices/5.png").status_code == 404
        assert c.get("/images/vol.nii.gz/slices/1.png?window=nope").status_code == 422
        assert c.get("/images/missing.png").status_code == 404
        schema = c.get("/openapi.json").json()
        for path in ("/images", "/segment", "/propagate", "/next", "/labels/{image_id}"):
            assert path in schema["paths"], path


def test_segment_box_2d_and_volume(data, model):
    with client(create_app(data, model=model)) as c:
        r = c.post(
            "/segment", json={"image_id": "a.png", "box": {"x0": 10, "y0": 8, "x1": 50, "y1": 40}, "encoding": "both"}
        )
        assert r.status_code == 200, r.text
        out = r.json()
        mask = rle_decode(out["mask"]["values"], out["mask"]["counts"], tuple(out["mask"]["shape"]))
        assert mask.shape == (64, 80) and int(mask.sum()) == out["area"]
        assert out["embedding_source"] == "computed" and out["png_base64"]
        # a refinement click on the same slice reuses the embedding and the previous logits
        r2 = c.post(
            "/segment",
            json={
                "image_id": "a.png",
                "points": [{"x": 20, "y": 20, "positive": False}],
                "box": {"x0": 10, "y0": 8, "x1": 50, "y1": 40},
                "previous": out["logits_handle"],
            },
        )
        assert r2.status_code == 200 and r2.json()["embedding_source"] == "memory"
        # volume: slice 3
        r3 = c.post(
            "/segment", json={"image_id": "vol.nii.gz", "slice_index": 3, "box": {"x0": 5, "y0": 5, "x1": 30, "y1": 25}}
        )
        assert r3.status_code == 200 and r3.json()["mask"]["shape"] == [40, 48]
        # refused prompts
        bad = [
            {"image_id": "vol.nii.gz", "slice_index": 9, "box": {"x0": 1, "y0": 1, "x1": 5, "y1": 5}},
            {"image_id": "a.png", "box": {"x0": 10, "y0": 8, "x1": 500, "y1": 40}},
            {"image_id": "a.png"},
            {"image_id": "vol.nii.gz", "slice_index": 2, "previous": out["logits_handle"]},
            {"image_id": "a.png", "previous": "no-such-handle"},
        ]
        for body in bad:
            assert c.post("/segment", json=body).status_code == 422, body
        assert c.post("/segment", json={"image_id": "a.png", "box": {"x0": 1}}).status_code == 422
        only_points = c.post(
            "/segment", json={"image_id": "a.png", "points": [{"x": 30, "y": 20}, {"x": 5, "y": 5, "positive": False}]}
        )
        assert only_points.status_code == 200 and only_points.json()["embedding_source"] == "memory"


def test_segment_with_scribbles(data, model):
    """A stroke reaches the model as the points medsam.scribbles samples along it: the same mask as
    sending those points; a stroke leaving the slice is refused; provenance keeps the stroke."""
    from medsam.scribbles import Scribble, scribbles_to_points

    with client(create_app(data, model=model)) as c:
        box = {"x0": 10, "y0": 8, "x1": 50, "y1": 40}
        stroke = [{"x": 15, "y": 12}, {"x": 45, "y": 12}, {"x": 45, "y": 35}]
        r = c.post(
            "/segment",
            json={
                "image_id": "a.png",
                "box": box,
                "points": [{"x": 20, "y": 30, "positive": False}],
                "scribbles": [{"points": stroke}],
            },
        )
        assert r.status_code == 200, r.text
        pts, labs = scribbles_to_points([Scribble([[v["x"], v["y"]] for v in stroke])])
        same = c.post(
            "/segment",
            json={
                "image_id": "a.png",
                "box": box,
                "points": [
                    {"x": 20, "y": 30, "positive": False},
                    *({"x": x, "y": y, "positive": bool(lab)} for (x, y), lab in zip(pts.tolist(), labs)),
                ],
            },
        )
        assert same.status_code == 200 and len(pts) == 4
        assert r.json()["mask"] == same.json()["mask"] and r.json()["score"] == same.json()["score"]
        only = c.post("/segment", json={"image_id": "a.png", "scribbles": [{"points": stroke[:1], "positive": True}]})
        assert only.status_code == 200, only.text
        for bad in ([{"points": [{"x": 5, "y": 5}, {"x": 500, "y": 5}]}], [{"points": []}]):
            assert c.post("/segment", json={"image_id": "a.png", "scribbles": bad}).status_code == 422
        body = {
            "mask": rle_mask(np.ones((64, 80), np.uint8)),
            "definitions": [{"value": 1, "name": "x", "color": "#aa3300"}],
            "provenance": {"prompts": [{"box": box, "scribbles": [{"points": stroke, "positive": False}], "label": 1}]},
        }
        assert c.put("/labels/a.png/map", json={**body, "expected_version": 0}).status_code == 200
        side = json.loads((data / ".medsam" / "labels" / "a.png.png.json").read_text())
        assert side["history"][0]["prompts"][0]["scribbles"] == [{"points": stroke, "positive": False}]


def test_segment_zoom_and_candidates(data, model):
    """A small box is segmented on its crop (medsam.zoom's window): the same mask as
    predict_with_zoom on the image; zoom=false gives the whole-slice prediction; candidates are the
    decoder's multimask masks; a click outside the crop takes the whole slice; the crop's logits
    handle is not used on another frame."""
    from medsam.io import read_image
    from medsam.predictor import Predictor
    from medsam.zoom import ZoomPolicy, predict_with_zoom, zoom_window

    image = read_image(data / "a.png").array  # uint8 (64, 80): the model input as it is
    box = [20, 22, 27, 29]  # 8 px: a 32 px crop (min_side) of an 80 px wide image
    oracle = Predictor(model, zoom=False)  # zooms only where asked, as the server's engine
    zoomed = predict_with_zoom(oracle, image, np.asarray([box], float), ZoomPolicy())
    assert zoomed.zoomed.tolist() == [True]
    y0, y1, x0, x1 = zoom_window(box, image.shape[:2], 3.0, 32)
    oracle.set_image(image)
    plain = oracle.predict(boxes=box)
    with client(create_app(data, model=model)) as c:

        def ask(**extra):
            r = c.post("/segment", json={"image_id": "a.png", "box": dict(zip(("x0", "y0", "x1", "y1"), box)), **extra})
            assert r.status_code == 200, r.text
            out = r.json()
            return out, rle_decode(out["mask"]["values"], out["mask"]["counts"], (64, 80)).astype(bool)

        out, mask = ask(candidates=True)
        assert out["zoom_window"] == {"x0": x0, "y0": y0, "x1": x1 - 1, "y1": y1 - 1}
        cache = data / ".medsam" / "cache"
        assert not cache.exists() or not [f for f in cache.rglob("*") if f.is_file()]  # crops: memory only
        np.testing.assert_array_equal(mask, zoomed.masks[0])
        assert out["score"] == pytest.approx(float(zoomed.scores[0]), abs=1e-6)
        assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
        oracle.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
        multi = oracle.predict(boxes=[box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0], multimask=True)
        assert len(out["candidates"]) == 3
        for j, cand in enumerate(out["candidates"]):
            got = rle_decode(cand["mask"]["values"], cand["mask"]["counts"], (64, 80)).astype(bool)
            np.testing.assert_array_equal(got[y0:y1, x0:x1], multi.masks[0, j])
            assert cand["score"] == pytest.approx(float(multi.scores[0, j]), abs=1e-6) and cand["area"] == got.sum()
            got[y0:y1, x0:x1] = False
            assert not got.any()  # nothing outside the crop
        # a correction inside the crop stays on it, with the crop's logits as mask prompt
        crop_box = [box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]
        first = oracle.predict(boxes=crop_box)
        want = oracle.predict(
            boxes=crop_box, points=[[24 - x0, 25 - y0]], point_labels=[1], mask_input=first.low_res_logits[:, :1]
        )
        inside, inside_mask = ask(points=[{"x": 24, "y": 25}], previous=out["logits_handle"])
        assert inside["zoom_window"] == out["zoom_window"] and inside["embedding_source"] == "memory"
        np.testing.assert_array_equal(inside_mask[y0:y1, x0:x1], want.masks[0])
        assert inside["score"] == pytest.approx(float(want.scores[0]), abs=1e-6)
        # the handle alone cannot prompt the whole slice
        r = c.post("/segment", json={"image_id": "a.png", "previous": out["logits_handle"]})
        assert r.status_code == 422 and "crop" in r.json()["detail"]
        # zoom off: the whole-slice prediction; a click outside the crop: the whole slice too
        off, mask_off = ask(zoom=False)
        assert off["zoom_window"] is None and off["candidates"] == []
        np.testing.assert_array_equal(mask_off, plain.masks[0])
        outside, outside_mask = ask(points=[{"x": 70, "y": 60, "positive": False}], previous=out["logits_handle"])
        assert outside["zoom_window"] is None
        oracle.set_image(image)  # the whole slice, without the crop's logits
        want = oracle.predict(boxes=box, points=[[70, 60]], point_labels=[0])
        np.testing.assert_array_equal(outside_mask, want.masks[0])
        # the crop's ends are exclusive: a click on its first column past the end is outside it
        edge, _ = ask(points=[{"x": x1, "y": 25}])
        assert edge["zoom_window"] is None
        last, _ = ask(points=[{"x": x1 - 1, "y": 25}])
        assert last["zoom_window"] == out["zoom_window"]
        # a box outside the slice is refused before any crop is taken
        bad = c.post("/segment", json={"image_id": "a.png", "box": {"x0": 70, "y0": 50, "x1": 90, "y1": 60}})
        assert bad.status_code == 422 and "outside the image" in bad.json()["detail"]


# ----------------------------------------------------------------------------- security
def test_path_traversal_refused(data, model):
    (data / "link.png").symlink_to(data.parent / "outside" / "secret.png")
    (data / "linkdir").symlink_to(data.parent / "outside", target_is_directory=True)
    (data / "inner.png").symlink_to(data / "a.png")  # a symlink inside is fine
    with client(create_app(data, model=model)) as c:
        ids = [i["id"] for i in c.get("/images").json()["images"]]
        assert "link.png" not in ids and not any(i.startswith("linkdir") for i in ids)
        assert "inner.png" in ids
        attempts = [
            "..%2Foutside%2Fsecret.png",
            "%2E%2E/outside/secret.png",
            "sub/..%2F..%2Foutside%2Fsecret.png",
            "%2Fetc%2Fpasswd",
            "%2F" + str(data.parent / "outside" / "secret.png").lstrip("/").replace("/", "%2F"),
            "link.png",
            "linkdir/secret.png",
            ".medsam/labels/a.png.png",
            "a.png%00.png",
            "sub%5C..%5C..%5Coutside%5Csecret.png",
        ]
        for a in attempts:
            for url in (f"/images/{a}", f"/images/{a}/slices/0.png", f"/labels/{a}", f"/images/{a}/embeddings"):
                r = c.get(url)
                assert r.status_code in (400, 404), (url, r.status_code)
                assert b"PNG" not in r.content
        for image_id in (
            "../outside/secret.png",
            "/etc/passwd",
            str(data.parent / "outside" / "secret.png"),
            "link.png",
            "linkdir/secret.png",
            "sub/../../outside/secret.png",
            "./a.png",
        ):
            r = c.post("/segment", json={"image_id": image_id, "box": {"x0": 1, "y0": 1, "x1": 9, "y1": 9}})
            assert r.status_code == 400, (image_id, r.status_code)
            if image_id == "./a.png":
                continue  # the HTTP client itself normalises /./ in URLs
            r = c.put(
                f"/labels/{image_id}/slices/0", json={"mask": rle_mask(np.zeros((32, 32)))}, headers={"If-Match": '"0"'}
            )
            assert r.status_code in (400, 404), (image_id, r.status_code, r.text)
        # nothing was written outside
        assert sorted(p.name for p in (data.parent / "outside").iterdir()) == ["secret.png"]


def test_uploads_limited_in_size_and_type(data, model, tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_image(32, 40, seed=5)).save(buf, format="PNG")
    png = buf.getvalue()
    with client(create_app(data, model=model, max_upload_bytes=len(png) + 10)) as c:
        c.headers["Content-Type"] = "application/octet-stream"
        r = c.post("/images?name=new.png", content=png)
        assert r.status_code == 201 and r.json()["id"] == "new.png"
        assert (data / "new.png").read_bytes() == png
        assert c.get("/images/new.png").json()["shape"] == [32, 40]
        assert c.post("/images?name=new.png", content=png).status_code == 409  # no overwrite
        big = png + b"\0" * 100
        assert c.post("/images?name=big.png", content=big).status_code == 413
        # without Content-Length (chunked): stopped while streaming
        assert c.post("/images?name=big2.png", content=iter([big[:50], big[50:]])).status_code == 413
        assert c.post("/images?name=evil.exe", content=b"MZ").status_code == 415
        assert c.post("/images?name=notes.txt", content=b"hello").status_code == 415
        assert c.post("/images?name=fake.png", content=b"not a png at all").status_code == 422
        assert c.post("/images?name=../escape.png", content=png).status_code == 400
        assert c.post("/images?name=sub/x.png", content=png).status_code == 422
        assert c.post("/images?name=.hidden.png", content=png).status_code == 400
        # a form post (e.g. cross-site, text/plain) is not an upload
        assert c.post("/images?name=form.png", content=png, headers={"Content-Type": "text/plain"}).status_code == 415
        assert not (data / "big.png").exists() and not (data / "fake.png").exists()
        assert not (data.parent / "escape.png").exists()
        # JSON bodies are capped too (the limit plus 1 MiB)
        huge = c.post(
            "/segment",
            content=b"{" + b" " * (len(png) + (1 << 20) + 10) + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert huge.status_code == 413
        staging = data / ".medsam" / "uploads"
        assert not staging.exists() or list(staging.iterdir()) == []


def test_token_required_when_set(data, model):
    app = create_app(data, model=model, token=TOKEN)
    with client(app) as c:
        assert c.get("/images").status_code == 401
        assert c.get("/images", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/images", headers={"Authorization": TOKEN}).status_code == 401
        assert c.get("/openapi.json").status_code == 401
        assert (
            c.post("/segment", json={"image_id": "a.png", "box": {"x0": 1, "y0": 1, "x1": 9, "y1": 9}}).status_code
            == 401
        )
        assert c.post("/images?name=x.png", content=b"x").status_code == 401
        ok = c.get("/images", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["count"] == 3
        page = c.get("/")  # the page shell carries no data
        assert page.status_code == 200 and b"MedSAM workbench" in page.content
        assert c.get("/static/app.js").status_code == 200
    with pytest.raises(ValueError):
        create_app(data, model=model, token="short")


def test_host_header_and_cross_site_requests_checked(data, model):
    with client(create_app(data, model=model)) as c:
        assert c.get("/images", headers={"Host": "evil.example"}).status_code == 400
        assert c.get("/images", headers={"Host": "localhost:8000"}).status_code == 200
        body = {"image_id": "a.png", "box": {"x0": 1, "y0": 1, "x1": 9, "y1": 9}}
        assert c.post("/segment", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.post("/segment", json=body, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert c.post("/images/a.png/embeddings", headers={"Origin": "http://evil.example"}).status_code == 403
        # the same JSON sent as a cross-site "simple" text/plain request is not parsed
        assert c.post("/segment", content=json.dumps(body), headers={"Content-Type": "text/plain"}).status_code == 422
        assert c.post("/segment", json=body, headers={"Origin": BASE}).status_code == 200
        r = c.get("/")
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


# ----------------------------------------------------------------------------- labels
def test_label_versions_and_conflicts(data, model):
    with client(create_app(data, model=model)) as c:
        info = c.get("/labels/vol.nii.gz")
        assert info.status_code == 200 and info.json()["version"] == 0 and info.headers["etag"] == '"0"'
        plane = np.zeros((40, 48), np.uint8)
        plane[10:20, 12:30] = 2
        body = {
            "mask": rle_mask(plane),
            "definitions": [{"value": 2, "name": "liver", "color": "#aa3300"}],
            "provenance": {
                "prompts": [{"box": {"x0": 12, "y0": 10, "x1": 29, "y1": 19}, "score": 0.9, "label": 2}],
                "edits": [{"tool": "brush", "label": 2, "pixels": 14, "radius": 3}],
            },
        }
        assert c.put("/labels/vol.nii.gz/slices/2", json=body).status_code == 428  # no version named
        r = c.put("/labels/vol.nii.gz/slices/2", json=body, headers={"If-Match": '"0"'})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1 and r.headers["etag"] == '"1"'
        assert r.json()["labels"] == [{"value": 2, "name": "liver", "color": "#aa3300"}]
        # a second tab still at version 0 cannot overwrite
        r = c.put("/labels/vol.nii.gz/slices/3", json=body, headers={"If-Match": '"0"'})
        assert r.status_code == 409 and r.headers["etag"] == '"1"'
        # values without a definition are refused
        bad = plane.copy()
        bad[0, 0] = 7
        r = c.put("/labels/vol.nii.gz/slices/2", json={**body, "mask": rle_mask(bad)}, headers={"If-Match": '"1"'})
        assert r.status_code == 422
        r = c.put(
            "/labels/vol.nii.gz/slices/2",
            json={"mask": {"shape": [40, 48], "values": [0], "counts": [5]}},
            headers={"If-Match": '"1"'},
        )
        assert r.status_code == 422
        # the saved file: NIfTI with the image's exact geometry
        path = data / ".medsam" / "labels" / "vol.nii.gz.nii.gz"
        image, saved = read_image(data / "vol.nii.gz"), read_image(path)
        assert (
            saved.array.shape == (5, 40, 48)
            and (saved.array[2] == plane).all()
            and saved.array[[0, 1, 3, 4]].sum() == 0
        )
        assert np.allclose(saved.spacing, image.spacing) and np.allclose(saved.origin, image.origin)
        assert np.allclose(saved.direction, image.direction)
        side = json.loads((path.parent / "vol.nii.gz.nii.gz.json").read_text())
        assert side["version"] == 1 and side["image_id"] == "vol.nii.gz"
        assert side["model"]["fingerprint"] and side["history"][0]["prompts"][0]["score"] == 0.9
        assert side["history"][0]["edits"][0]["tool"] == "brush" and side["history"][0]["slice"] == 2
        got = c.get("/labels/vol.nii.gz/slices/2").json()
        assert (rle_decode(got["mask"]["values"], got["mask"]["counts"], (40, 48)) == plane).all()
        full = c.get("/labels/vol.nii.gz/map").json()
        assert full["mask"]["shape"] == [5, 40, 48] and full["version"] == 1
        assert [i["status"] for i in c.get("/images").json()["images"]] == ["unlabelled", "unlabelled", "labelled"]
        # a 2D picture gets a PNG label
        r = c.put("/labels/sub/b.png/map", json={"mask": rle_mask(np.eye(48, dtype=np.uint8)), "expected_version": 0})
        assert r.status_code == 200 and r.json()["file"] == ".medsam/labels/sub/b.png.png"
        assert (read_image(data / ".medsam" / "labels" / "sub" / "b.png.png").array == np.eye(48)).all()


def test_concurrent_writes_one_wins(data, model):
    app = create_app(data, model=model)
    with client(app) as c:
        masks = []
        for i in range(6):
            m = np.zeros((64, 80), np.uint8)
            m[5 + i : 30 + i, 10 : 40 + i] = 1
            masks.append(m)
        barrier = threading.Barrier(len(masks))

        def write(m):
            barrier.wait()
            return c.put("/labels/a.png/slices/0", json={"mask": rle_mask(m)}, headers={"If-Match": '"0"'})

        with ThreadPoolExecutor(len(masks)) as pool:
            results = list(pool.map(write, masks))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] + [409] * (len(masks) - 1), codes
        winner = masks[[r.status_code for r in results].index(200)]
        saved = read_image(data / ".medsam" / "labels" / "a.png.png").array
        assert (saved == winner).all()
        assert c.get("/labels/a.png").json()["version"] == 1
        leftovers = [p.name for p in (data / ".medsam" / "labels").iterdir() if p.name.startswith(".")]
        assert leftovers == []


def test_restart_keeps_labels_and_embeddings(data):
    model1 = seeded_tiny_model()
    box = {"x0": 10, "y0": 8, "x1": 50, "y1": 40}
    vbox = {"x0": 5, "y0": 5, "x1": 30, "y1": 25}
    with client(create_app(data, model=model1)) as c:
        out = c.post("/segment", json={"image_id": "a.png", "box": box}).json()
        assert out["embedding_source"] == "computed"
        assert (
            c.post("/segment", json={"image_id": "vol.nii.gz", "slice_index": 1, "box": vbox}).json()[
                "embedding_source"
            ]
            == "computed"
        )
        r = c.put("/labels/a.png/slices/0", json={"mask": out["mask"]}, headers={"If-Match": '"0"'})
        assert r.status_code == 200
        assert c.get("/info").json()["encoder_calls"] == 2

    # "restart": a new process would load the same weights into a new model object
    model2 = seeded_tiny_model()
    calls = []
    original = model2.embed_image
    model2.embed_image = lambda x: (calls.append(1), original(x))[1]
    with client(create_app(data, model=model2)) as c:
        info = c.get("/labels/a.png").json()
        assert info["version"] == 1 and info["exists"]
        got = c.get("/labels/a.png/slices/0").json()
        assert got["mask"] == out["mask"]
        again = c.post("/segment", json={"image_id": "a.png", "box": box}).json()
        assert again["embedding_source"] == "disk" and again["mask"] == out["mask"]
        assert (
            c.post("/segment", json={"image_id": "vol.nii.gz", "slice_index": 1, "box": vbox}).json()[
                "embedding_source"
            ]
            == "disk"
        )
        assert calls == [] and c.get("/info").json()["encoder_calls"] == 0
        # and editing continues from the stored version
        assert (
            c.put("/labels/a.png/slices/0", json={"mask": out["mask"]}, headers={"If-Match": '"1"'}).status_code == 200
        )


# ----------------------------------------------------------------------------- jobs
def test_embeddings_warm_then_propagate(data, model):
    with client(create_app(data, model=model)) as c:
        st = c.get("/images/vol.nii.gz/embeddings").json()
        assert st["n_slices"] == 5 and st["cached_slices"] == 0 and st["job"] is None
        job = wait_job(c, c.post("/images/vol.nii.gz/embeddings").json())
        assert job["status"] == "done" and job["result"]["computed"] == 5 and job["done"] == 5
        assert c.get("/images/vol.nii.gz/embeddings").json()["cached_slices"] == 5

        # propagation needs a saved mask on the key slice
        body = {"image_id": "vol.nii.gz", "slice_index": 2, "label": 1, "expected_version": 0, "iou_threshold": 0.0}
        assert c.post("/propagate", json=body).status_code == 422
        plane = np.zeros((40, 48), np.uint8)
        plane[8:30, 10:36] = 1
        r = c.put("/labels/vol.nii.gz/slices/2", json={"mask": rle_mask(plane)}, headers={"If-Match": '"0"'})
        assert r.status_code == 200
        assert c.post("/propagate", json=body).status_code == 409  # stale version
        job = wait_job(c, c.post("/propagate", json={**body, "expected_version": 1}).json())
        assert job["status"] == "done", job
        assert job["result"]["version"] == 2 and job["result"]["embeddings_computed"] == 0  # all warmed
        saved = read_image(data / ".medsam" / "labels" / "vol.nii.gz.nii.gz").array
        assert (saved[2] == plane).all()  # the key slice is kept as accepted
        first, last = job["result"]["slices"]
        assert first <= 2 <= last
        side = json.loads((data / ".medsam" / "labels" / "vol.nii.gz.nii.gz.json").read_text())
        assert side["history"][-1]["action"] == "propagate"
        assert (
            c.post(
                "/propagate", json={**body, "image_id": "a.png", "slice_index": 0, "expected_version": 0}
            ).status_code
            == 422
        )


def test_a_corrected_slice_becomes_a_key_and_the_object_re_propagates(data, model):
    """key_slices: each key's saved mask gives a box, the object is walked from all keys
    (medsam.volume.KeyBoxes, as segment_volume gives it), and no key slice is overwritten."""
    from medsam.predictor import Predictor
    from medsam.volume import KeyBoxes, segment_volume

    with client(create_app(data, model=model)) as c:
        a = np.zeros((40, 48), np.uint8)
        a[8:30, 10:36] = 1
        b = np.zeros((40, 48), np.uint8)
        b[12:24, 14:30] = 1
        assert (
            c.put("/labels/vol.nii.gz/slices/0", json={"mask": rle_mask(a)}, headers={"If-Match": '"0"'}).status_code
            == 200
        )
        assert (
            c.put("/labels/vol.nii.gz/slices/4", json={"mask": rle_mask(b)}, headers={"If-Match": '"1"'}).status_code
            == 200
        )
        body = {"image_id": "vol.nii.gz", "slice_index": 0, "label": 1, "expected_version": 2, "iou_threshold": 0.0}
        for bad in ([7], [3]):  # out of range; no mask saved there
            assert c.post("/propagate", json={**body, "key_slices": bad}).status_code == 422
        job = wait_job(c, c.post("/propagate", json={**body, "key_slices": [4], "replace": True}).json())
        assert job["status"] == "done", job
        saved = read_image(data / ".medsam" / "labels" / "vol.nii.gz.nii.gz").array
        assert (saved[0] == a).all() and (saved[4] == b).all()  # both keys kept as accepted
        loaded_input = c.app.state.workbench.load("vol.nii.gz").model_input
        expected = segment_volume(
            Predictor(model), loaded_input, [KeyBoxes(((10, 8, 35, 29), (14, 12, 29, 23)), (0, 4))], iou_threshold=0.0
        ).labels
        np.testing.assert_array_equal(saved[1:4], expected[1:4])
        side = json.loads((data / ".medsam" / "labels" / "vol.nii.gz.nii.gz.json").read_text())
        assert [p["slice"] for p in side["history"][-1]["prompts"]] == [0, 4]


def test_auto_proposes_every_object_of_a_slice(data, model):
    """POST /auto: a job whose result is medsam.automatic.generate_masks on the slice's model input."""
    from medsam.automatic import AutoOptions, generate_masks, instance_label_map
    from medsam.predictor import Predictor

    body = {"image_id": "vol.nii.gz", "slice_index": 3, "prompt": "points", "points_per_side": 4}
    body |= {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    with client(create_app(data, model=model)) as c:
        for bad in ({"slice_index": 9}, {"prompt": "scribbles"}, {"points_per_side": 0}, {"pred_iou_thresh": 2}):
            assert c.post("/auto", json={**body, **bad}).status_code == 422, bad
        job = wait_job(c, c.post("/auto", json=body).json())
        assert job["status"] == "done", job
        result = job["result"]
        picture = c.app.state.workbench.load("vol.nii.gz").model_slice(3)
        options = AutoOptions(prompt="points", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        expected = generate_masks(Predictor(model), picture, options)
        assert expected and len(result["objects"]) == len(expected)
        np.testing.assert_array_equal(
            rle_decode(result["mask"]["values"], result["mask"]["counts"], result["mask"]["shape"]),
            instance_label_map(expected, picture.shape[:2]),
        )
        assert result["objects"][0]["bbox"] == expected[0].bbox
        assert c.get("/labels/vol.nii.gz").json()["version"] == 0  # nothing saved


def test_export_dicom_seg_and_rtstruct(data, model):
    hd = pytest.importorskip("highdicom")
    import pydicom

    from test_io_dicom import _write_series
    from test_io_rtstruct import rasterise_rtstruct

    _write_series(data / "séries", 4, seed=1)  # a name beyond latin-1 goes into Content-Disposition
    with client(create_app(data, model=model)) as c:
        ids = [im["id"] for im in c.get("/images").json()["images"]]
        assert "séries" in ids
        assert c.get("/labels/séries/export", params={"format": "rtstruct"}).status_code == 422  # empty
        labels = np.zeros((4, 6, 8), np.uint8)
        labels[1:3, 1:5, 2:7] = 1
        labels[2, 4:6, 0:3] = 2
        defs = [{"value": 1, "name": "liver", "color": "#ff0000"}, {"value": 2, "name": "lesion", "color": "#00ff00"}]
        r = c.put("/labels/séries/map", json={"mask": rle_mask(labels), "definitions": defs, "expected_version": 0})
        assert r.status_code == 200, r.text
        image = read_image(data / "séries")
        rt = c.get("/labels/séries/export", params={"format": "rtstruct"})
        assert rt.status_code == 200 and rt.headers["content-type"] == "application/dicom"
        assert "filename*=UTF-8''s%C3%A9ries.rtstruct.v1.dcm" in rt.headers["content-disposition"]
        (data.parent / "rt.dcm").write_bytes(rt.content)
        back = rasterise_rtstruct(data.parent / "rt.dcm", image)
        np.testing.assert_array_equal(back["liver"], labels == 1)
        np.testing.assert_array_equal(back["lesion"], labels == 2)
        colours = [list(item.ROIDisplayColor) for item in pydicom.dcmread(data.parent / "rt.dcm").ROIContourSequence]
        assert colours == [[255, 0, 0], [0, 255, 0]]  # the label definitions' colours
        seg = c.get("/labels/séries/export", params={"format": "dicom-seg"})
        (data.parent / "seg.dcm").write_bytes(seg.content)
        read = hd.seg.segread(data.parent / "seg.dcm")
        assert [s.SegmentLabel for s in read.SegmentSequence] == ["liver", "lesion"]
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in image.source_files]
        pixels = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
        np.testing.assert_array_equal(pixels, labels)
        assert c.get("/labels/vol.nii.gz/export", params={"format": "rtstruct"}).status_code == 422  # not DICOM
        assert c.get("/labels/séries/export", params={"format": "png"}).status_code == 422


def test_prompts_are_answered_while_a_volume_propagates(data, model, monkeypatch):
    """Propagation runs on its own predictor without the interactive lock: a /segment request made
    while a propagation is stopped inside segment_volume is answered, and the propagation then
    finishes with the same result as alone."""
    import threading

    import medsam.volume

    real = medsam.volume.segment_volume
    inside, answered = threading.Event(), threading.Event()
    released = []

    def paused(*args, **kwargs):
        inside.set()
        released.append(answered.wait(10))  # by the test once its prompt was answered, else times out
        return real(*args, **kwargs)

    app = create_app(data, model=model)
    with client(app) as c:
        plane = np.zeros((40, 48), np.uint8)
        plane[8:30, 10:36] = 1
        r = c.put("/labels/vol.nii.gz/slices/2", json={"mask": rle_mask(plane)}, headers={"If-Match": '"0"'})
        assert r.status_code == 200
        body = {"image_id": "vol.nii.gz", "slice_index": 2, "label": 1, "expected_version": 1, "iou_threshold": 0.0}
        served = c.get("/info").json()["model"]["fingerprint"]
        alone = wait_job(c, c.post("/propagate", json=body).json())
        assert alone["status"] == "done", alone
        c.put("/labels/vol.nii.gz/slices/2", json={"mask": rle_mask(plane)}, headers={"If-Match": '"2"'})
        monkeypatch.setattr(medsam.volume, "segment_volume", paused)
        job = c.post("/propagate", json={**body, "expected_version": 3}).json()
        assert inside.wait(30)
        r = c.post(
            "/segment", json={"image_id": "vol.nii.gz", "slice_index": 1, "box": {"x0": 5, "y0": 5, "x1": 30, "y1": 25}}
        )
        # another model is served from now on (as after a training job), mid-propagation
        other = seeded_tiny_model()
        torch.nn.init.normal_(other.mask_decoder.iou_token.weight)
        app.state.workbench.engine.switch_model(other, None)
        answered.set()
        assert r.status_code == 200, r.text
        job = wait_job(c, job)
        assert job["status"] == "done", job
        assert released == [True]  # the prompt did not wait for the propagation
        now = c.get("/info").json()["model"]["fingerprint"]
        side = json.loads((data / ".medsam" / "labels" / "vol.nii.gz.nii.gz.json").read_text())
        assert now != served and side["history"][-1]["model"]["fingerprint"] == served  # the model that ran
        assert job["result"]["slices"] == alone["result"]["slices"]
        assert job["result"]["embeddings_computed"] == 0  # the first run cached every slice


def test_next_ranks_unlabelled_by_uncertainty(data, model):
    with client(create_app(data, model=model)) as c:
        c.put("/labels/sub/b.png/slices/0", json={"mask": rle_mask(np.zeros((48, 48)))}, headers={"If-Match": '"0"'})
        before = c.get("/next").json()
        assert before["scored"] == 0 and before["unscored"] == 2
        job = wait_job(c, c.post("/next/score", json={"jitters": 4}).json())
        assert job["status"] == "done" and job["result"]["scored"] == 2
        ranked = c.get("/next").json()
        assert "jitter" in ranked["method"] and ranked["scored"] == 2
        ids = [r["image_id"] for r in ranked["images"]]
        assert sorted(ids) == ["a.png", "vol.nii.gz"]  # the labelled image is left out
        u = [r["uncertainty"] for r in ranked["images"]]
        assert u == sorted(u, reverse=True) and all(0.0 <= x <= 1.0 for x in u)
        assert ranked["images"][[r["image_id"] for r in ranked["images"]].index("vol.nii.gz")]["slice_index"] == 2
        # stored: a restarted server still knows the scores
    with client(create_app(data, model=model)) as c:
        assert c.get("/next").json()["scored"] == 2


def test_cli_serve_refuses_public_bind_without_token(data, monkeypatch, capsys):
    import argparse

    from medsam.cli import main
    from medsam.cli import serve as cli_serve

    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    monkeypatch.delenv("MEDSAM_TOKEN", raising=False)
    args = parser.parse_args(["serve", "--data", str(data), "--host", "0.0.0.0"])
    assert args.host == "0.0.0.0" and args.port == 8000 and args.func is cli_serve.run
    assert main(["serve", "--data", str(data), "--host", "0.0.0.0"]) == 2
    assert "needs --token" in capsys.readouterr().err
    defaults = parser.parse_args(["serve", "--data", str(data)])
    assert defaults.host == "127.0.0.1" and defaults.token is None
