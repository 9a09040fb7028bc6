"""Clicks as prompts on the command line and in volumes: ``--point`` / ``--negative-point`` on a 2D
image (with or without one box) equal the predictor given the same clicks, and on a volume
(``Clicks2D``) the key slice keeps the clicks' mask while the rest is walked from its box. The
predictor's clicks are checked against segment-anything in test_predictor.py; tracking from clicks
against sam2's video predictor in test_sam2_tracking.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_image
from medsam.cli import main


@pytest.fixture
def model(small_default_model):
    """The model the command loads: the untrained small default (deterministic)."""
    import medsam

    return medsam.load_model(device="cpu")


def test_clicks_on_a_2d_image_equal_the_predictor(tmp_path, model):
    from medsam.predictor import Predictor

    picture = smooth_image(64, 80, seed=3)
    Image.fromarray(picture).save(tmp_path / "a.png")
    predictor = Predictor(model)
    predictor.set_image(picture)
    cases = [
        (["--point", "30", "20"], {"points": [[[30, 20]]], "point_labels": [[1]]}),
        (
            ["--point", "30", "20", "--negative-point", "50", "40", "--box", "10", "5", "60", "50"],
            {"points": [[[30, 20], [50, 40]]], "point_labels": [[1, 0]], "boxes": [[10, 5, 60, 50]]},
        ),
    ]
    for n, (args, prompt) in enumerate(cases):
        out = tmp_path / f"m{n}.png"
        assert main(["segment", str(tmp_path / "a.png"), *args, "--no-zoom", "-o", str(out)]) == 0
        expected = predictor.predict(**{k: np.asarray(v, dtype=np.float64) for k, v in prompt.items()}).masks[0]
        assert 0 < expected.sum() < expected.size  # a mask that tells the prompts apart
        assert np.array_equal(np.asarray(Image.open(out)) > 0, expected)


def test_clicks_refused_with_one_line(tmp_path, model, capsys):
    Image.fromarray(smooth_image(64, 80, seed=3)).save(tmp_path / "a.png")
    for args, message in (
        (["--point", "30", "20", "--box", "1", "1", "9", "9", "--box", "2", "2", "8", "8"], "at most one box"),
        (["--negative-point", "30", "20"], "foreground click"),
        (["--point", "300", "20"], "outside the 80 x 64 image"),
    ):
        assert main(["segment", str(tmp_path / "a.png"), *args, "-o", str(tmp_path / "m.png")]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.png").exists()


def test_clicks_on_a_volume_keep_their_mask_on_the_key_slice(model):
    from medsam.predictor import Predictor
    from medsam.volume import Box2D, Clicks2D, segment_volume

    volume = np.stack([smooth_image(48, 56, seed=10 + s) for s in range(5)])
    clicks = Clicks2D(((20.0, 18.0), (40.0, 30.0)), (1, 0), slice=2)
    result = segment_volume(Predictor(model), volume, [clicks], iou_threshold=-1.0)
    reference = Predictor(model)
    reference.set_image(volume[2])
    key_mask = reference.predict(
        points=np.array([[[20.0, 18.0], [40.0, 30.0]]]), point_labels=np.array([[1, 0]])
    ).masks[0]
    assert np.array_equal(result.labels[2] > 0, key_mask)
    rows, cols = np.flatnonzero(key_mask.any(axis=1)), np.flatnonzero(key_mask.any(axis=0))
    walked = segment_volume(
        Predictor(model), volume, [Box2D(cols[0], rows[0], cols[-1], rows[-1], slice=2)], iou_threshold=-1.0
    )
    others = np.arange(5) != 2
    assert np.array_equal(result.labels[others], walked.labels[others])


def test_clicks_on_a_volume_from_the_command_line(tmp_path, model):
    import nibabel as nib

    volume = np.stack([smooth_image(48, 56, seed=10 + s) for s in range(5)]).astype(np.int16)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.eye(4)), tmp_path / "v.nii.gz")
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(tmp_path / "v.nii.gz"), "--point", "20", "18", "--slice", "2", "-o", str(out)]
    assert main(args) == 0
    assert (np.asarray(nib.load(out).dataobj)[:, :, 2] > 0).any()
    assert main(args[:-4] + ["-o", str(out)]) != 0  # clicks on a volume need --slice


def test_a_mask_on_a_volume_is_kept_and_walked_from_its_box(model):
    from medsam.predictor import Predictor
    from medsam.volume import Box2D, Mask2D, segment_volume

    volume = np.stack([smooth_image(48, 56, seed=10 + s) for s in range(5)])
    mask = np.zeros((48, 56), bool)
    mask[10:30, 12:40] = True
    mask[15:20, 20:25] = False  # a hole the box walk would not reproduce
    result = segment_volume(Predictor(model), volume, [Mask2D(mask, 2)], iou_threshold=-1.0)
    assert np.array_equal(result.labels[2] > 0, mask)
    walked = segment_volume(Predictor(model), volume, [Box2D(12, 10, 39, 29, slice=2)], iou_threshold=-1.0)
    others = np.arange(5) != 2
    assert np.array_equal(result.labels[others], walked.labels[others])
