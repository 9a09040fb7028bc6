"""The workbench's training job (``POST /train``) through FastAPI's TestClient.

Accepted labels on small synthetic images (PNGs and a NIfTI volume), the tiny ``vit_tiny`` model
of the other server tests, a few optimiser steps of ``medsam train`` in a child process. The
"after" score is checked against a Dice computed here by hand from the new checkpoint's
predictions on the held-out images (model input fetched as the server's ``auto`` PNG, masks
from :class:`medsam.predictor.Predictor`, Dice with numpy). 20-40 s on 2 shared cores.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from conftest import seeded_tiny_model
from medsam.embedding_cache import encoder_fingerprint
from medsam.server import create_app
from medsam.server.accepted_corpus import holdout_fraction_of, split_images
from medsam.server.encoding import rle_decode
from medsam.server.training_job import restore_encoder
from workbench_fixtures import TOKEN, client, rle_mask

N_PNG = 6


@pytest.fixture
def model():
    return seeded_tiny_model()  # a fresh one per test: a training job switches the served model


def _shapes(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright ellipse (label 1) on the left and a rectangle (label 2) on the right."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.uint8)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.2, 0.3) * w
    ry, rx = rng.uniform(0.12, 0.2) * h, rng.uniform(0.1, 0.15) * w
    label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    y0, x0 = int(rng.uniform(0.1, 0.5) * h), int(rng.uniform(0.55, 0.7) * w)
    label[y0 : y0 + int(0.3 * h), x0 : x0 + int(0.2 * w)] = 2
    image = rng.normal(60, 15, (h, w)) + 110 * (label == 1) + 80 * (label == 2)
    return np.clip(image, 0, 255).astype(np.uint8), label


@pytest.fixture
def data(tmp_path):
    """PNGs img0..img5 and a CT-like volume, with their true label maps (accepted by the tests)."""
    import SimpleITK as sitk
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(N_PNG):
        image, label = _shapes(rng, 64, 64)
        Image.fromarray(image).save(root / f"img{i}.png")
        truth[f"img{i}.png"] = label
    vol, lab = np.zeros((4, 48, 56), np.int16), np.zeros((4, 48, 56), np.uint8)
    for k in (1, 2):  # two annotated slices; 0 and 3 stay unlabelled
        image, label = _shapes(rng, 48, 56)
        vol[k], lab[k] = image.astype(np.int16) * 4 - 500, label
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(img, str(root / "vol.nii.gz"))
    truth["vol.nii.gz"] = lab
    return root, truth


def accept(c: TestClient, image_id: str, labels: np.ndarray) -> None:
    r = c.put(f"/labels/{image_id}/map", json={"mask": rle_mask(labels)}, headers={"If-Match": '"0"'})
    assert r.status_code == 200, r.text


def wait_training(c: TestClient, job: dict, timeout: float = 600.0) -> dict:
    t0 = time.time()
    while job["state"] in ("queued", "running"):
        assert time.time() - t0 < timeout, job
        time.sleep(0.1)
        job = c.get(f"/train/jobs/{job['id']}").json()
    return job


def model_input_slice(c: TestClient, image_id: str, k: int) -> np.ndarray:
    """What the model sees on slice k: the server's 'auto' window is exactly the model input."""
    from PIL import Image

    r = c.get(f"/images/{image_id}/slices/{k}.png?window=auto")
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)))


def hand_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def predict_box(predictor, image: np.ndarray, gt: np.ndarray):
    ys, xs = np.nonzero(gt)
    predictor.set_image(image)
    pred = predictor.predict(boxes=[[xs.min(), ys.min(), xs.max(), ys.max()]])
    return pred.masks[0], float(pred.scores[0])


# ----------------------------------------------------------------------------- split
def test_split_is_a_stable_hash_with_at_least_one_held_out():
    ids = [f"case{i:03d}.png" for i in range(200)]
    train, held = split_images(ids)
    assert set(train) | set(held) == set(ids) and not set(train) & set(held)
    assert held == sorted(i for i in ids if holdout_fraction_of(i) < 0.2)
    assert 20 < len(held) < 60
    # adding images never moves an existing one
    train2, held2 = split_images(ids + [f"new{i}.png" for i in range(50)])
    assert set(held) <= set(held2) and set(train) <= set(train2)
    for pair in (["a.png", "b.png"], ["x/1.png", "x/2.png"]):
        t, h = split_images(pair)
        assert len(t) == 1 and len(h) == 1


def test_decoder_only_keeps_the_encoder_batchnorm_statistics():
    """TinyViT (LiteMedSAM) has BatchNorm: a decoder-only model gets its base's encoder back."""
    from medsam.model import build_model

    torch.manual_seed(0)
    base = build_model("lite").eval()
    new = build_model("lite").eval()
    new.load_state_dict(base.state_dict())
    with torch.no_grad():
        new.mask_decoder.iou_prediction_head.layers[0].weight.add_(0.5)  # the decoder was trained
        bn = next(m for m in new.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_mean.add_(1.0)  # ... and the run drifted a BatchNorm statistic
    assert encoder_fingerprint(new) != encoder_fingerprint(base)
    changed = restore_encoder(base, new)
    assert changed and all("running_mean" in k for k in changed)
    assert encoder_fingerprint(new) == encoder_fingerprint(base)
    assert not torch.equal(
        new.mask_decoder.iou_prediction_head.layers[0].weight, base.mask_decoder.iou_prediction_head.layers[0].weight
    )
    assert restore_encoder(base, new) == []


# ----------------------------------------------------------------------------- the job
def test_training_job_scores_switches_and_switches_back(data, model):
    root, truth = data
    from medsam.predictor import Predictor
    from medsam.weights import load_model

    old_predictor = Predictor(seeded_tiny_model())  # the same weights as the served model, independently built
    with client(create_app(root, model=model, train_threads=1)) as c:
        for image_id, labels in truth.items():
            accept(c, image_id, labels)
        info0 = c.get("/info").json()["model"]
        models0 = c.get("/train/models").json()
        assert models0["served"] == "startup" and [m["id"] for m in models0["models"]] == ["startup"]
        assert models0["models"][0]["fingerprint"] == info0["fingerprint"]

        _, held_expected = split_images(list(truth))
        probe = held_expected[0]  # embed one slice before: decoder-only training keeps its embedding
        gt_probe = truth[probe] if truth[probe].ndim == 2 else truth[probe][1]
        k_probe = 0 if truth[probe].ndim == 2 else 1
        ys, xs = np.nonzero(gt_probe == 1)
        box = {"x0": int(xs.min()), "y0": int(ys.min()), "x1": int(xs.max()), "y1": int(ys.max())}
        seg0 = c.post("/segment", json={"image_id": probe, "slice_index": k_probe, "box": box}).json()
        assert seg0["embedding_source"] == "computed"

        r = c.post("/train", json={"mode": "decoder", "steps": 3, "lr": 1e-5})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] in ("queued", "running") and job["mode"] == "decoder" and job["model_before"] == "startup"
        # one job at a time; no model switch while it runs; bad parameters are refused
        second = c.post("/train", json={"steps": 3})
        assert second.status_code == 409 and "running" in second.json()["detail"]
        assert c.post("/train/models/select", json={"model_id": "startup"}).status_code == 409
        for bad in ({"steps": 0}, {"steps": 100000}, {"lr": 0}, {"lr": 0.5}, {"mode": "full"}, {"epochs": 3}):
            assert c.post("/train", json=bad).status_code == 422, bad

        job = wait_training(c, job)
        assert job["state"] == "done", job["error"]
        assert job["phase"] == "finished" and job["progress"] == 1.0 and job["step"] == 3
        assert job["switched"] and job["model_after"] == job["id"]
        assert any("finished at step 3" in line for line in job["log_tail"])
        assert sorted(job["heldout_images"]) == held_expected
        assert sorted(job["train_images"] + job["heldout_images"]) == sorted(truth)
        assert job["before"]["n_objects"] == job["heldout_objects"] == len(job["objects"]) > 0

        # the model switched: new fingerprint and checkpoint, listed with its scores
        info1 = c.get("/info").json()["model"]
        assert info1["fingerprint"] != info0["fingerprint"]
        models1 = c.get("/train/models").json()
        assert models1["served"] == job["id"] and not models1["training"]
        entry = next(m for m in models1["models"] if m["id"] == job["id"])
        assert entry["served"] and entry["parent"] == "startup" and entry["fingerprint"] == info1["fingerprint"]
        assert entry["after"] == job["after"] and entry["before"] == job["before"]
        ckpt = root / entry["checkpoint"]
        assert ckpt.is_file() and ckpt.parent == root / ".medsam" / "models" / job["id"]
        assert info1["checkpoint"] == str(ckpt)
        assert not (ckpt.parent / "run" / "latest.pt").exists() and not (ckpt.parent / "base.safetensors").exists()
        assert (ckpt.parent / "corpus" / "manifest.csv").is_file()

        # "before" and "after" recomputed here: Predictor + hand Dice on the held-out objects
        new_model = load_model(ckpt, device="cpu")
        new_predictor = Predictor(new_model)
        dice_new, dice_old = [], []
        for obj in job["objects"]:
            image = model_input_slice(c, obj["image_id"], obj["slice_index"])
            full = truth[obj["image_id"]]
            gt = (full if full.ndim == 2 else full[obj["slice_index"]]) == obj["label"]
            m_new, _ = predict_box(new_predictor, image, gt)
            m_old, _ = predict_box(old_predictor, image, gt)
            dice_new.append(hand_dice(m_new, gt))
            dice_old.append(hand_dice(m_old, gt))
            assert obj["dsc_after"] == pytest.approx(dice_new[-1], abs=1e-12)
        assert job["after"]["dsc"] == pytest.approx(np.mean(dice_new), abs=1e-12)
        assert job["before"]["dsc"] == pytest.approx(np.mean(dice_old), abs=1e-12)
        assert job["after"]["dsc"] > 0.0 and 0.0 <= job["after"]["nsd"] <= 1.0

        # a segmentation request now uses the new model, and the embedding was kept (same encoder)
        assert encoder_fingerprint(new_model) == encoder_fingerprint(model)
        seg1 = c.post("/segment", json={"image_id": probe, "slice_index": k_probe, "box": box}).json()
        assert seg1["embedding_source"] in ("memory", "disk")
        probe_image = model_input_slice(c, probe, k_probe)
        m_new, s_new = predict_box(new_predictor, probe_image, gt_probe == 1)
        m_old, s_old = predict_box(old_predictor, probe_image, gt_probe == 1)
        assert seg1["score"] == pytest.approx(s_new, abs=1e-5) and abs(s_new - s_old) > 1e-6
        mask1 = rle_decode(seg1["mask"]["values"], seg1["mask"]["counts"], tuple(seg1["mask"]["shape"]))
        np.testing.assert_array_equal(mask1.astype(bool), m_new)
        # a label saved now records the new model in its provenance
        assert c.get(f"/labels/{probe}").json()["model"]["fingerprint"] == info0["fingerprint"]
        r = c.put(f"/labels/{probe}/map", json={"mask": rle_mask(truth[probe])}, headers={"If-Match": '"1"'})
        assert r.status_code == 200 and r.json()["model"]["fingerprint"] == info1["fingerprint"]

        # switch back: the startup model again, bit for bit
        back = c.post("/train/models/select", json={"model_id": "startup"})
        assert back.status_code == 200 and back.json()["served"] == "startup"
        assert c.get("/info").json()["model"]["fingerprint"] == info0["fingerprint"]
        seg2 = c.post("/segment", json={"image_id": probe, "slice_index": k_probe, "box": box}).json()
        assert seg2["score"] == pytest.approx(seg0["score"], abs=1e-6) and seg2["embedding_source"] != "computed"
        assert c.post("/train/models/select", json={"model_id": "0123456789ab"}).status_code == 404
        assert c.post("/train/models/select", json={"model_id": "../etc"}).status_code == 422
        # ... and forward again, loaded from its file
        fwd = c.post("/train/models/select", json={"model_id": job["id"]})
        assert fwd.status_code == 200 and fwd.json()["served"] == job["id"]
        assert c.get("/info").json()["model"]["fingerprint"] == info1["fingerprint"]

        schema = c.get("/openapi.json").json()
        for path in ("/train", "/train/jobs/{job_id}", "/train/models", "/train/models/select"):
            assert path in schema["paths"], path
        for name in ("TrainRequest", "TrainJobStatus", "ModelList", "HeldoutScores"):
            assert name in schema["components"]["schemas"], name

    # a restarted server serves its startup model and still lists the trained one
    with client(create_app(root, model=seeded_tiny_model())) as c:
        listed = c.get("/train/models").json()
        assert listed["served"] == "startup" and job["id"] in [m["id"] for m in listed["models"]]


def test_too_few_accepted_labels_refused(data, model):
    root, truth = data
    with client(create_app(root, model=model)) as c:
        r = c.post("/train", json={})
        assert r.status_code == 422 and "too few accepted labels" in r.json()["detail"]
        accept(c, "img0.png", truth["img0.png"])
        r = c.post("/train")
        assert r.status_code == 422 and "found 1" in r.json()["detail"]
        assert c.get("/train/jobs").json() == []
        # an accepted but empty map does not count as an object: the job says so and fails
        accept(c, "img1.png", np.zeros((64, 64), np.uint8))
        job = wait_training(c, c.post("/train").json())
        assert job["state"] == "failed" and job["error_status"] == 422 and "found 1" in job["error"]
        assert c.get("/train/models").json()["served"] == "startup"


def test_failed_job_reports_and_keeps_the_model(data, model):
    root, truth = data
    with client(create_app(root, model=model, token=TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for image_id in ("img0.png", "img1.png", "img2.png"):
            accept(c, image_id, truth[image_id])
        before = c.get("/info").json()["model"]
        label_file = root / c.get("/labels/img1.png").json()["file"]
        label_file.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        job = wait_training(c, c.post("/train", json={"steps": 2}).json())
        assert job["state"] == "failed" and job["error_status"] == 422
        assert "img1.png" in job["error"] and job["error"] in "\n".join(job["log_tail"])
        assert not job["switched"] and job["after"] is None
        assert c.get("/info").json()["model"] == before
        models = c.get("/train/models").json()
        assert models["served"] == "startup" and len(models["models"]) == 1
        assert not (root / ".medsam" / "models" / job["id"] / "model.safetensors").exists()
        assert c.get("/train/jobs/nope").status_code == 404
        # a damaged model folder is listed with what can be read, and refused when selected
        bad = root / ".medsam" / "models" / "aaaaaaaaaaaa"
        bad.mkdir(parents=True)
        (bad / "training.json").write_text('{"id": "aaaaaaaaaaaa", "mode": 3, "before": "x"}')
        (bad / "model.safetensors").write_bytes(b"junk")
        listed = c.get("/train/models").json()["models"]
        assert [m["id"] for m in listed] == ["startup", "aaaaaaaaaaaa"] and listed[1]["mode"] is None
        r = c.post("/train/models/select", json={"model_id": "aaaaaaaaaaaa"})
        assert r.status_code == 500 and "cannot load" in r.json()["detail"]
        assert c.get("/info").json()["model"] == before
    # the token guards the training routes like every other
    with client(create_app(root, model=model, token=TOKEN)) as c:
        assert c.post("/train", json={}).status_code == 401
        assert c.get("/train/models").status_code == 401


def test_lora_job_changes_the_encoder_and_cancel_keeps_the_model(data, model):
    root, truth = data
    with client(create_app(root, model=model, train_threads=1)) as c:
        for image_id in ("img0.png", "img1.png", "img2.png", "img3.png"):
            accept(c, image_id, truth[image_id])
        fp0 = c.get("/info").json()["model"]["fingerprint"]

        # cancelled while it runs: state cancelled, nothing served, nothing listed
        job = c.post("/train", json={"steps": 50}).json()
        t0 = time.time()
        while c.get(f"/train/jobs/{job['id']}").json()["phase"] != "training":
            assert time.time() - t0 < 300
            time.sleep(0.05)
        assert c.delete(f"/train/jobs/{job['id']}").status_code == 200
        job = wait_training(c, job)
        assert job["state"] == "cancelled" and not job["switched"]
        assert c.get("/info").json()["model"]["fingerprint"] == fp0
        assert [m["id"] for m in c.get("/train/models").json()["models"]] == ["startup"]

        seg0 = c.post("/segment", json={"image_id": "img0.png", "box": {"x0": 4, "y0": 4, "x1": 30, "y1": 40}}).json()
        job = wait_training(c, c.post("/train", json={"mode": "lora", "steps": 2, "lr": 1e-4}).json())
        assert job["state"] == "done", job["error"]
        assert job["mode"] == "lora" and job["switched"]
        assert c.get("/info").json()["model"]["fingerprint"] != fp0
        # the encoder changed: embeddings of the old encoder are never served to the new one
        seg1 = c.post("/segment", json={"image_id": "img0.png", "box": {"x0": 4, "y0": 4, "x1": 30, "y1": 40}}).json()
        assert seg0["embedding_source"] == "computed" and seg1["embedding_source"] == "computed"
