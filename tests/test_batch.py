"""Folder runs (medsam.batch, ``medsam segment DIR --prompts FILE -o OUTDIR``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_image
from medsam.batch import CasePrompts, PromptsError, case_output, every_file, read_prompts, segment_folder
from medsam.cli import main

# These tests exercise the folder run, not the model: the fast untrained small default (conftest).
pytestmark = pytest.mark.usefixtures("small_default_model")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(smooth_image(80, 100, seed=1)).save(d / "a.png")
    Image.fromarray(smooth_image(64, 64, seed=2)).save(d / "b.png")
    (d / "broken.png").write_bytes(b"not a png")
    vol = np.stack([smooth_image(48, 56, seed=s) for s in range(4)])
    np.savez_compressed(d / "case.npz", imgs=vol, boxes=np.array([[5, 5, 1, 30, 30, 3]]))
    return d


def test_prompts_json_and_csv(tmp_path, folder):
    j = tmp_path / "p.json"
    j.write_text(
        json.dumps({"a.png": {"boxes": [[1, 2, 30, 40]]}, "vol/x.nii.gz": {"boxes": [[1, 2, 3, 4]], "slice": 2}})
    )
    assert read_prompts(j, folder) == [
        CasePrompts("a.png", ((1.0, 2.0, 30.0, 40.0),)),
        CasePrompts("vol/x.nii.gz", ((1.0, 2.0, 3.0, 4.0),), 2),
    ]
    j.write_text(json.dumps({"a.png": {"boxes": [[1, 2, 30, 40]]}, "*": "auto"}))
    assert [(c.image, c.auto, c.boxes != ()) for c in read_prompts(j, folder)] == [
        ("a.png", False, True),
        ("b.png", True, False),
        ("broken.png", True, False),
        ("case.npz", False, False),  # an npz case keeps its own boxes
    ]
    c = tmp_path / "p.csv"
    c.write_text("image,box,slice\na.png,1 2 30 40,\na.png,5 5 9 9,\nb.png,auto,\nv.nii,1 2 3 4 5 6,\n")
    assert read_prompts(c, folder) == [
        CasePrompts("a.png", ((1.0, 2.0, 30.0, 40.0), (5.0, 5.0, 9.0, 9.0))),
        CasePrompts("b.png", auto=True),
        CasePrompts("v.nii", ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0),)),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.json", "[1, 2]", "expected an object"),
        ("p.json", '{"a.png": {"boxes": [[1, 2, 3]]}}', "4 or 6 finite numbers"),
        ("p.json", '{"a.png": {"boxes": [[1, 2, 3, NaN]]}}', "4 or 6 finite numbers"),
        ("p.json", '{"../etc/passwd": "auto"}', "stay inside"),
        ("p.json", '{"a.png": {"boxes": [], "slice": "x"}}', "slice must be an integer"),
        ("p.json", '{"*": {"boxes": []}}', 'may only map to "auto"'),
        ("p.json", "{", "not valid JSON"),
        ("p.csv", "img,box\n", "the columns image, box"),
        ("p.csv", "image,box\na.png,auto\na.png,1 2 3 4\n", "both auto and boxes"),
        ("p.csv", "image,box\na.png,1 2 three 4\n", "line 2"),
        ("p.txt", "", "must be .json or .csv"),
    ],
)
def test_bad_prompts_files_say_what_is_wrong(tmp_path, folder, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptsError, match=message):
        read_prompts(path, folder)


def test_folder_run_reports_the_broken_case_finishes_the_rest_and_resumes(tmp_path, folder, capsys):
    from medsam.segment import segment_file

    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "image,box,slice\na.png,10 10 60 50,\na.png,20 5 40 30,\nbroken.png,5 5 20 20,\nmissing.png,1 1 9 9,\n"
    )
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--prompts", str(prompts), "-o", str(out), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "2 done" not in captured.out and "1 done, 0 skipped (done before), 2 failed" in captured.out
    assert "failed: broken.png" in captured.err and "failed: missing.png" in captured.err
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["image"], r["status"]) for r in rows] == [
        ("a.png", "done"),
        ("broken.png", "failed"),
        ("missing.png", "failed"),
    ]
    assert rows[0]["objects"] == "2" and "FileNotFoundError" in rows[2]["error"]
    # the same result as one file at a time
    single = segment_file(folder / "a.png", tmp_path / "single.png", [[10, 10, 60, 50], [20, 5, 40, 30]])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), single.labels)
    # a re-run skips what is done and retries what failed
    before = (out / "a.png").stat().st_mtime_ns
    assert main(["segment", str(folder), "--prompts", str(prompts), "-o", str(out), "--no-progress"]) == 1
    assert (out / "a.png").stat().st_mtime_ns == before
    assert "0 done, 1 skipped (done before), 2 failed" in capsys.readouterr().out


def test_auto_on_a_folder_and_npz_cases(tmp_path, folder):
    """``--auto`` with an output folder runs every file; npz cases keep their own boxes."""
    from medsam.automatic import AutoOptions
    from medsam.segment import SegmentOptions

    (folder / "broken.png").unlink()
    cases = every_file(folder)
    options = SegmentOptions(auto=AutoOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0))
    rows = segment_folder(folder, cases, tmp_path / "o", options)
    assert [(r.image, r.status) for r in rows] == [("a.png", "done"), ("b.png", "done"), ("case.npz", "done")]
    assert (tmp_path / "o" / "case.npz").is_file() and (tmp_path / "o" / "a.scores.json").is_file()
    report = json.loads((tmp_path / "o" / "a.scores.json").read_text())
    assert report["mode"] == "auto"


def test_folder_arguments_are_checked_before_the_model(tmp_path, folder, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text('{"a.png": "auto"}')
    base = ["segment", str(folder), "--prompts", str(prompts)]
    assert main([*base, "-o", str(tmp_path / "x.png")]) == 2
    assert main([*base, "-o", str(tmp_path / "o"), "--box", "1", "1", "5", "5"]) == 2
    assert main(["segment", str(folder / "a.png"), "--prompts", str(prompts), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "names a file" in err[0] and "--box applies to one file" in err[1]
    assert not (tmp_path / "o").exists()


def test_output_names():
    from pathlib import Path

    root = Path("/o")
    assert case_output(root, "x.nii.gz", Path("/i")) == root / "x.nii.gz"
    assert case_output(root, "scan.jpeg", Path("/i")) == root / "scan.png"
    assert case_output(root, "stack.tif", Path("/i")) == root / "stack.tif"  # a TIFF may be a volume
    assert case_output(root, "series_1", Path("/i")) == root / "series_1.nii.gz"
    assert case_output(root, "c.npz", Path("/i")) == root / "c.npz"
    assert case_output(root, "sub/a.png", Path("/i")) == root / "sub" / "a.png"  # relative paths kept


def test_outputs_never_replace_inputs_or_each_other(tmp_path, folder, capsys):
    Image.fromarray(smooth_image(40, 40, seed=3)).save(folder / "a.jpg")  # a.png and a.jpg -> a.png
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"b.png": "auto"}))
    assert main(["segment", str(folder), "--prompts", str(prompts), "-o", str(folder)]) == 2
    prompts.write_text(json.dumps({"a.png": "auto", "a.jpg": "auto"}))
    assert main(["segment", str(folder), "--prompts", str(prompts), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "must not be the input folder" in err[0] and "would both be written" in err[1]
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "a.png", "b.png", "broken.png", "case.npz"]


def test_cache_makes_a_rerun_read_the_embeddings(tmp_path):
    import nibabel as nib

    vol = np.stack([smooth_image(48, 56, seed=s) for s in range(5)])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4)), path)
    args = ["segment", str(path), "--box", "5", "5", "1", "40", "30", "3", "--cache", str(tmp_path / "cache")]
    assert main([*args, "-o", str(tmp_path / "a.nii.gz")]) == 0
    first = json.loads((tmp_path / "a.scores.json").read_text())
    assert main([*args, "--box", "10", "10", "0", "30", "40", "4", "-o", str(tmp_path / "b.nii.gz")]) == 0
    second = json.loads((tmp_path / "b.scores.json").read_text())
    assert first["embeddings_computed"] == 3 and second["embeddings_computed"] == 2  # slices 0 and 4 are new
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5
