"""Tests of corpus curation (``medsam prepare``) on tiny real fixtures (tests/data/curation).

The fixtures are crops of TotalSegmentator's reference CT and MR with the
model's own labels (pseudo-labels); see tests/data/curation/README.txt.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam.cli import main as cli_main
from medsam.corpus import MANIFEST_COLUMNS
from medsam.corpus import write as corpus_mod
from medsam.curate import prepare as prep_mod
from medsam.curate.dataset_spec import DatasetSpec, SpecError, assign_splits, load_specs
from medsam.curate.prepare import prepare
from medsam.intensity import normalize_image
from medsam.io import read_image

FIX = Path(__file__).parent / "data" / "curation"
CT_IMG = FIX / "ct/images/example_ct_crop.nii.gz"
CT_LAB = FIX / "ct/labels/example_ct_crop_seg.nii.gz"
MR_IMG = FIX / "mr/images/example_mr_sm_ds.nii.gz"
MR_LAB = FIX / "mr/labels/example_mr_sm_ds_seg.nii.gz"


def ct_spec(images=FIX / "ct/images", labels=FIX / "ct/labels", **kw) -> DatasetSpec:
    d = dict(
        name="ct",
        modality="CT",
        images=str(images),
        labels=str(labels),
        label_suffix="_seg",
        window="soft_tissue",
        label_names="header",
        min_component_3d=20,
        min_component_2d=5,
        label_source="pseudo",
    )
    d.update(kw)
    return DatasetSpec.from_dict(d)


def mr_spec(**kw) -> DatasetSpec:
    d = dict(
        name="mr",
        modality="MR",
        images=str(FIX / "mr/images"),
        labels=str(FIX / "mr/labels"),
        label_suffix="_seg",
        label_names="header",
        min_component_3d=10,
        min_component_2d=3,
        label_source="pseudo",
    )
    d.update(kw)
    return DatasetSpec.from_dict(d)


def run(specs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(specs, out, **kw)


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def make_cases(root: Path, n: int, prefix: str = "case") -> tuple[Path, Path]:
    """``n`` cases that are links to the CT fixture, named <prefix>00, <prefix>01, ..."""
    img_dir, lab_dir = root / "images", root / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (img_dir / f"{prefix}{k:02d}.nii.gz").symlink_to(CT_IMG)
        (lab_dir / f"{prefix}{k:02d}_seg.nii.gz").symlink_to(CT_LAB)
    return img_dir, lab_dir


def write_like(arr: np.ndarray, like: Path, dest: Path) -> Path:
    """Write a (Z, Y, X) array with the geometry of the NIfTI ``like``."""
    ref = sitk.ReadImage(str(like))
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(dest))
    return dest


# --------------------------------------------------------------------------- specs
def test_spec_yaml_defaults_relative_paths_and_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    y = tmp_path / "d.yaml"
    y.write_text("name: ds1\nmodality: mri\nimages: imgs\nlabels: imgs\nlabel_names: {1: liver, '2': kidney}\n")
    (spec,) = load_specs(y)
    assert spec.modality == "MR" and spec.images == str(tmp_path / "imgs")
    assert (spec.min_component_3d, spec.min_component_2d, spec.slice_axis) == (1000, 100, 0)
    assert spec.split == (0.8, 0.1, 0.1) and spec.seed == 0 and spec.window is None
    assert spec.label_names == {1: "liver", 2: "kidney"}
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    ct = DatasetSpec.from_dict({"name": "c", "modality": "CT", "images": "a", "labels": "b"})
    assert ct.window == "soft_tissue" and ct.window_level_width() == (40, 400)

    bad = {
        "window": "window: lung",  # MR has no window
        "split": "split: [0.5, 0.5, 0.5]",
        "label_names": "label_names: {x: liver}",
        "min_component_2d": "min_component_2d: -1",
        "slice_axis": "slice_axis: 3",
        "min_compnent_3d": "min_compnent_3d: 5",  # typo -> unknown field
        "split_overrides": "split_overrides: {a: holdout}",
        "label_alignment": "label_alignment: loose",
    }
    for field, line in bad.items():
        y.write_text(f"name: ds1\nmodality: MR\nimages: imgs\nlabels: imgs\n{line}\n")
        with pytest.raises(SpecError, match=field):
            load_specs(y)
    y.write_text("name: ../x\nmodality: MR\nimages: a\nlabels: b\n")
    with pytest.raises(SpecError, match="'name'"):
        load_specs(y)
    y.write_text("name: x\nmodality: photo\nimages: a\nlabels: b\n")
    with pytest.raises(SpecError, match="'modality'"):
        load_specs(y)


def test_case_matching_by_suffix(tmp_path):
    img_dir, lab_dir = tmp_path / "i", tmp_path / "l"
    img_dir.mkdir(), lab_dir.mkdir()
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nrrd", "notes.txt"):
        (img_dir / name).write_bytes(b"")
    (img_dir / "d_0000").mkdir()  # a DICOM series folder
    for name in ("a.nii.gz", "c.nrrd", "d.nii.gz", "e.nii.gz", ".hidden.nii.gz"):
        (lab_dir / name).write_bytes(b"")
    spec = DatasetSpec.from_dict(
        {"name": "x", "modality": "CT", "images": str(img_dir), "labels": str(lab_dir), "image_suffix": "_0000"}
    )
    cases, problems = spec.find_cases()
    assert [c.case for c in cases] == ["a", "c", "d"]
    assert cases[0].image.name == "a_0000.nii.gz" and cases[2].image.name == "d_0000"
    assert [(p[0], p[1].split()[1]) for p in problems] == [("b", "label"), ("e", "image")]


# --------------------------------------------------------------------------- values
def test_ct_window_matches_hand_computation(tmp_path):
    rep = run([ct_spec()], tmp_path / "out")
    assert rep.ok and rep.corpus_cases == 1
    rows = read_manifest(tmp_path / "out")
    hu = np.asarray(nib.load(str(CT_IMG)).dataobj)  # file order (i, j, k): array[k, j, i]
    lab_file = np.asarray(nib.load(str(CT_LAB)).dataobj)
    lo, hi = 40 - 400 / 2, 40 + 400 / 2
    row = rows[len(rows) // 2]
    k = int(row["slice"])
    with np.load(tmp_path / "out" / row["path"]) as z:
        img, lab, spacing = z["image"], z["label"], z["spacing"]
    assert img.dtype == np.uint8 and img.shape == (int(row["height"]), int(row["width"]))
    np.testing.assert_array_equal(spacing, [3.0, 3.0])
    assert spacing.dtype == np.float64
    # three voxels: one inside the window, one below it, one above it (if the slice has them)
    sl = hu[:, :, k].T  # (row j, col i)
    picks = [np.argwhere((sl > lo + 10) & (sl < hi - 10))[0]]
    picks += [np.argwhere(sl < lo)[0]] if (sl < lo).any() else []
    picks += [np.argwhere(sl > hi)[0]] if (sl > hi).any() else []
    for r, c in picks:
        v = float(hu[c, r, k])
        expected = int((min(max(v, lo), hi) - lo) * 255.0 / (hi - lo))  # truncation, as MedSAM
        assert img[r, c] == expected, (r, c, v)
    # the label is the file's label where it survived the clean-up
    kept = lab > 0
    np.testing.assert_array_equal(lab[kept], lab_file[:, :, k].T[kept])


def test_percentile_per_slice_equals_whole_volume_recipe(tmp_path):
    run([mr_spec()], tmp_path / "out")
    vol = read_image(MR_IMG).array
    expected = normalize_image(vol, "MR")
    rec = json.loads((tmp_path / "out/cases/mr/example_mr_sm_ds/case.json").read_text())
    assert rec["normalization"]["recipe"] == "percentile"
    assert rec["slice_spacing_rc"] == [6.0, 6.0] and rec["geometry"]["spacing_zyx"] == [3.0, 6.0, 6.0]
    for s in rec["slices"]:
        with np.load(tmp_path / "out/cases/mr/example_mr_sm_ds" / s["file"]) as z:
            np.testing.assert_array_equal(z["image"], expected[s["slice"]])


# --------------------------------------------------------------------------- labels
def test_small_components_removed_in_3d_then_2d(tmp_path):
    lab = read_image(CT_LAB).array.copy()  # (24, 48, 64)
    lab[2:5, 2:5, 2:5] = 99  # 27-voxel island: below min_component_3d = 50
    lab[10:13, 30:38, 40:48] = 98  # 3 slices x 64 px = 192 voxels: kept in 3D
    lab[13, 30:32, 40:42] = 98  # 4 px on slice 13, touching slice 12: kept in 3D, removed in 2D (< 20)
    d = tmp_path / "src"
    (d / "images").mkdir(parents=True)
    (d / "images/isl.nii.gz").symlink_to(CT_IMG)
    write_like(lab, CT_LAB, d / "labels/isl_seg.nii.gz")
    spec = ct_spec(
        images=d / "images",
        labels=d / "labels",
        label_names={98: "column", 99: "island"},
        min_component_3d=50,
        min_component_2d=20,
    )
    rep = run([spec], tmp_path / "out")
    assert rep.ok
    rows = read_manifest(tmp_path / "out")
    assert not [r for r in rows if r["label"] == "99"]
    col = [r for r in rows if r["label"] == "98"]
    assert sorted(int(r["slice"]) for r in col) == [10, 11, 12]
    assert {r["area"] for r in col} == {"64"} and {r["label_name"] for r in col} == {"column"}
    assert {(r["x0"], r["y0"], r["x1"], r["y1"]) for r in col} == {("40", "30", "47", "37")}
    for p in (tmp_path / "out/cases/ct/isl/slices").glob("*.npz"):
        with np.load(p) as z:
            assert not (z["label"] == 99).any()
            if p.stem == "0013":
                assert not (z["label"] == 98).any()
    rec = json.loads((tmp_path / "out/cases/ct/isl/case.json").read_text())
    assert rec["curation"]["removed_3d"]["99"] == [1, 27]
    assert rec["curation"]["removed_2d"]["98"] == [1, 4]
    assert "99" not in rec["label_names"]


def test_keep_drop_and_instance_split(tmp_path):
    lab = read_image(CT_LAB).array.copy()
    lab[5:8, 5:10, 5:10] = 120
    lab[5:8, 30:35, 50:55] = 120  # two separate lesions
    d = tmp_path / "src"
    (d / "images").mkdir(parents=True)
    (d / "images/inst.nii.gz").symlink_to(CT_IMG)
    write_like(lab, CT_LAB, d / "labels/inst_seg.nii.gz")
    spec = ct_spec(
        images=d / "images",
        labels=d / "labels",
        label_names={5: "liver", 120: "lesion"},
        keep_labels=[5, 120, 2],
        drop_labels=[2],
        instance_labels=[120],
        min_component_3d=10,
    )
    run([spec], tmp_path / "out")
    rows = read_manifest(tmp_path / "out")
    assert {r["label"] for r in rows} == {"5", "121", "122"}
    assert {r["label"]: r["label_name"] for r in rows} == {"5": "liver", "121": "lesion_1", "122": "lesion_2"}
    boxes = {r["label"]: (int(r["x0"]), int(r["y0"])) for r in rows if r["label"] != "5"}
    assert boxes == {"121": (5, 5), "122": (50, 30)}


def test_manifest_boxes_equal_label_boxes_in_npz(tmp_path):
    out = tmp_path / "out"
    run([ct_spec(), mr_spec()], out)
    with open(out / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == MANIFEST_COLUMNS
    rows = read_manifest(out)
    assert rows and {r["dataset"] for r in rows} == {"ct", "mr"}
    assert {r["modality"] for r in rows} == {"CT", "MR"}
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    n_npz = sum(1 for _ in (out / "cases").rglob("*.npz"))
    assert len(by_path) == n_npz
    for path, rs in by_path.items():
        with np.load(out / path) as z:
            assert set(z.files) == {"image", "label", "spacing"}
            lab = z["label"]
            assert lab.dtype in (np.uint8, np.uint16) and z["image"].shape == lab.shape
        assert sorted(int(r["label"]) for r in rs) == sorted(int(v) for v in np.unique(lab) if v)
        for r in rs:
            m = lab == int(r["label"])
            ys, xs = np.nonzero(m)
            assert (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert int(r["area"]) == m.sum()
            assert (int(r["height"]), int(r["width"])) == lab.shape
        assert path.endswith(f"/slices/{int(rs[0]['slice']):04d}.npz")
    # names from the NIfTI header table (TotalSegmentator classes)
    assert {r["label_name"] for r in rows if r["dataset"] == "ct" and r["label"] == "5"} == {"liver"}
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["format"] == "medsam-corpus" and corpus["version"] == 1
    assert [d["name"] for d in corpus["datasets"]] == ["ct", "mr"]
    assert {d["label_source"] for d in corpus["datasets"]} == {"pseudo"}
    with open(out / "summary.csv", newline="") as f:
        summ = list(csv.DictReader(f))
    liver = next(s for s in summ if s["dataset"] == "ct" and s["label"] == "5")
    ct_liver = [r for r in rows if r["dataset"] == "ct" and r["label"] == "5"]
    assert int(liver["objects"]) == len(ct_liver) and int(liver["voxels"]) == sum(int(r["area"]) for r in ct_liver)
    assert liver["label_source"] == "pseudo" and liver["cases"] == "1"


def test_slice_axis_1(tmp_path):
    run([ct_spec(slice_axis=1)], tmp_path / "out")
    rows = read_manifest(tmp_path / "out")
    assert {(r["height"], r["width"]) for r in rows} == {("24", "64")}  # (Z, X) slices of (24, 48, 64)
    with np.load(tmp_path / "out" / rows[0]["path"]) as z:
        np.testing.assert_array_equal(z["spacing"], [3.0, 3.0])


# --------------------------------------------------------------------------- splits
def _splits(out: Path) -> dict[str, str]:
    return {r["case"]: r["split"] for r in read_manifest(out)}


def test_split_by_case_deterministic_and_shard_independent(tmp_path):
    img, lab = make_cases(tmp_path / "src", 10)
    spec = ct_spec(images=img, labels=lab, seed=7)
    full = tmp_path / "full"
    run([spec], full)
    rows = read_manifest(full)
    case_split: dict[str, set] = {}
    for r in rows:
        case_split.setdefault(r["case"], set()).add(r["split"])
    assert all(len(s) == 1 for s in case_split.values())  # no case in two splits
    splits = _splits(full)
    assert sorted(splits.values()).count("train") == 8 and list(splits.values()).count("test") == 1
    assert splits == assign_splits([f"case{k:02d}" for k in range(10)], (0.8, 0.1, 0.1), 7)

    run([spec], tmp_path / "again")
    assert _splits(tmp_path / "again") == splits  # deterministic with the seed
    other = []
    for seed in (1, 2, 3):
        run([ct_spec(images=img, labels=lab, seed=seed)], tmp_path / f"s{seed}")
        other.append(_splits(tmp_path / f"s{seed}"))
    assert any(o != splits for o in other)  # the seed matters

    # three shards on three "machines", merged by copying cases/ and --merge-only
    merged = tmp_path / "merged"
    for i in range(3):
        rep = run([spec], tmp_path / f"shard{i}", shard=(i, 3), workers=2 if i == 0 else 1)
        assert rep.n_cases == len(range(i, 10, 3))
        shutil.copytree(tmp_path / f"shard{i}/cases", merged / "cases", dirs_exist_ok=True)
    rep = prepare([], merged, merge_only=True, progress=False)
    assert rep.corpus_cases == 10 and not rep.warnings
    assert read_manifest(merged) == rows

    # overrides
    ov = ct_spec(images=img, labels=lab, seed=7, split_overrides={"case00": "test", "case01": "val"})
    run([ov], tmp_path / "ov")
    s = _splits(tmp_path / "ov")
    assert s["case00"] == "test" and s["case01"] == "val"
    with pytest.raises(SpecError, match="split_overrides"):
        run([ct_spec(images=img, labels=lab, split_overrides={"nope": "test"})], tmp_path / "bad")


# --------------------------------------------------------------------------- resume / errors
def test_resume_after_interruption(tmp_path, monkeypatch):
    img, lab = make_cases(tmp_path / "src", 3)
    spec = ct_spec(images=img, labels=lab)
    out = tmp_path / "out"
    real_save = corpus_mod._save_slice
    calls = {"n": 0}

    def flaky_save(path, *a, **k):
        if ".case01." in str(path):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # the run is killed half-way through case01
        return real_save(path, *a, **k)

    monkeypatch.setattr(corpus_mod, "_save_slice", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        run([spec], out)
    assert (out / "cases/ct/case00/case.json").is_file()
    assert not (out / "cases/ct/case01").exists()  # a half-written case never looks finished
    assert not list((out / "cases/ct").glob(".case01*"))
    assert not (out / "manifest.csv").exists()
    mtime = (out / "cases/ct/case00/case.json").stat().st_mtime_ns
    npz_mtime = (out / "cases/ct/case00/slices").iterdir().__next__().stat().st_mtime_ns

    monkeypatch.setattr(corpus_mod, "_save_slice", real_save)
    done = []
    real_process = prep_mod._process_case

    def counting(task):
        done.append(task.case)
        return real_process(task)

    monkeypatch.setattr(prep_mod, "_process_case", counting)
    rep = run([spec], out)
    assert done == ["case01", "case02"] and rep.n_skipped == 1 and rep.n_processed == 2 and rep.ok
    assert (out / "cases/ct/case00/case.json").stat().st_mtime_ns == mtime
    assert (out / "cases/ct/case00/slices").iterdir().__next__().stat().st_mtime_ns == npz_mtime
    rows = read_manifest(out)
    fresh = tmp_path / "fresh"
    run([spec], fresh)
    assert rows == read_manifest(fresh)

    # nothing left to do; a change of processing settings redoes the cases
    done.clear()
    assert run([spec], out).n_skipped == 3 and done == []
    run([ct_spec(images=img, labels=lab, min_component_2d=6)], out)
    assert done == ["case00", "case01", "case02"]


def test_exception_mid_case_is_reported_then_resumed(tmp_path, monkeypatch):
    img, lab = make_cases(tmp_path / "src", 2)
    spec = ct_spec(images=img, labels=lab)
    out = tmp_path / "out"
    real_save = corpus_mod._save_slice

    def failing(path, *a, **k):
        if ".case01." in str(path):
            raise OSError("disk full")
        return real_save(path, *a, **k)

    monkeypatch.setattr(corpus_mod, "_save_slice", failing)
    rep = run([spec], out)
    assert rep.n_failed == 1 and rep.errors[0].case == "case01" and rep.errors[0].stage == "write"
    assert "disk full" in rep.errors[0].error
    assert not (out / "cases/ct/case01").exists() and not list((out / "cases/ct").glob(".case01*"))
    assert {r["case"] for r in read_manifest(out)} == {"case00"}
    monkeypatch.setattr(corpus_mod, "_save_slice", real_save)
    rep = run([spec], out)
    assert rep.ok and rep.n_processed == 1
    assert {r["case"] for r in read_manifest(out)} == {"case00", "case01"}
    assert len((out / "errors.csv").read_text().strip().splitlines()) == 1  # header only


def test_broken_cases_reported_and_skipped(tmp_path):
    img, lab = make_cases(tmp_path / "src", 2)
    ref = read_image(CT_LAB).array
    # geometry mismatch: label one slice short
    (img / "short.nii.gz").symlink_to(CT_IMG)
    nib.save(nib.load(str(CT_LAB)).slicer[:, :, :-1], str(lab / "short_seg.nii.gz"))
    # corrupt image
    (img / "corrupt.nii.gz").write_bytes(CT_IMG.read_bytes()[:5000])
    (lab / "corrupt_seg.nii.gz").symlink_to(CT_LAB)
    # 4D image
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), str(img / "fourd.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), str(lab / "fourd_seg.nii.gz"))
    # an image without a label
    (img / "lonely.nii.gz").symlink_to(CT_IMG)
    assert ref.any()
    spec = ct_spec(images=img, labels=lab)
    out = tmp_path / "out"
    rep = run([spec], out, workers=2)
    assert rep.n_processed == 2 and rep.n_failed == 3 and not rep.ok
    stages = {e.case: e.stage for e in rep.errors}
    assert stages == {"short": "geometry", "corrupt": "read image", "fourd": "read image", "lonely": "match"}
    with open(out / "errors.csv", newline="") as f:
        errs = {r["case"]: r for r in csv.DictReader(f)}
    assert set(errs) == set(stages) and "geometry" in errs["short"]["error"]
    assert "4D" in errs["fourd"]["error"]
    assert {r["case"] for r in read_manifest(out)} == {"case00", "case01"}
    # the CLI says so with exit code 1
    y = tmp_path / "spec.yaml"
    y.write_text(json.dumps({**spec.to_dict(), "spec_file": None}))
    assert cli_main(["prepare", str(y), "-o", str(out), "--no-progress", "--workers", "1"]) == 1


def test_label_alignment_reorient(tmp_path):
    """A label holding the same voxel grid with the row axis reversed (as in the DICOM demo case)."""
    lab_img = sitk.ReadImage(str(CT_LAB))
    arr = sitk.GetArrayFromImage(lab_img)[:, ::-1, :].copy()
    flipped = sitk.GetImageFromArray(arr)
    flipped.SetSpacing(lab_img.GetSpacing())
    d = np.array(lab_img.GetDirection()).reshape(3, 3)
    last_row = lab_img.TransformIndexToPhysicalPoint((0, lab_img.GetSize()[1] - 1, 0))
    d[:, 1] *= -1
    flipped.SetDirection(d.ravel().tolist())
    flipped.SetOrigin(last_row)
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    (src / "images/example_ct_crop.nii.gz").symlink_to(CT_IMG)
    sitk.WriteImage(flipped, str(src / "labels/example_ct_crop_seg.nii.gz"))
    strict = run([ct_spec(images=src / "images", labels=src / "labels", label_names={})], tmp_path / "strict")
    assert strict.n_failed == 1 and strict.errors[0].stage == "geometry"
    run(
        [ct_spec(images=src / "images", labels=src / "labels", label_names={}, label_alignment="reorient")],
        tmp_path / "re",
    )
    run([ct_spec(label_names={})], tmp_path / "ref")
    assert read_manifest(tmp_path / "re") == read_manifest(tmp_path / "ref")
    rec = json.loads((tmp_path / "re/cases/ct/example_ct_crop/case.json").read_text())
    assert rec["label_alignment"] == "reoriented"


def test_parallel_workers_give_the_same_corpus(tmp_path):
    run([ct_spec(), mr_spec()], tmp_path / "one", workers=1)
    run([ct_spec(), mr_spec()], tmp_path / "two", workers=2)
    assert read_manifest(tmp_path / "one") == read_manifest(tmp_path / "two")


# --------------------------------------------------------------------------- CLI
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli_main(["prepare", str(tmp_path / "missing.yaml"), "-o", out]) == 2
    assert "missing.yaml" in _one_error_line(capsys)

    y = tmp_path / "bad.yaml"
    y.write_text(f"name: ds\nmodality: MR\nimages: {FIX / 'mr/images'}\nlabels: {FIX / 'mr/labels'}\nwindow: lung\n")
    assert cli_main(["prepare", str(y), "-o", out]) == 2
    assert "'window'" in _one_error_line(capsys)

    y.write_text("name: ds\nmodality: MR\nimages: [unclosed\n")
    assert cli_main(["prepare", str(y), "-o", out]) == 2
    assert "YAML" in _one_error_line(capsys)

    y.write_text(f"name: ds\nmodality: MR\nimages: {tmp_path / 'nowhere'}\nlabels: {FIX / 'mr/labels'}\n")
    assert cli_main(["prepare", str(y), "-o", out]) == 2
    assert "'images'" in _one_error_line(capsys)

    good = tmp_path / "good.yaml"
    good.write_text(
        f"name: mr\nmodality: MR\nimages: {FIX / 'mr/images'}\nlabels: {FIX / 'mr/labels'}\nlabel_suffix: _seg\n"
        "min_component_3d: 10\nmin_component_2d: 3\n"
    )
    for argv, needle in [
        (["prepare", str(good)], "-o OUT"),
        (["prepare", "-o", out], "SPEC.yaml"),
        (["prepare", str(good), "-o", out, "--shard", "3/2"], "--shard"),
        (["prepare", str(good), "-o", out, "--shard", "x"], "--shard"),
        (["prepare", str(good), "-o", out, "--workers", "0"], "--workers"),
    ]:
        assert cli_main(argv) == 2, argv
        assert needle in _one_error_line(capsys)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.tex").write_text("x")
    assert cli_main(["prepare", str(good), "-o", str(taken)]) == 2
    assert "not empty" in _one_error_line(capsys)
    assert (taken / "thesis.tex").read_text() == "x" and len(list(taken.iterdir())) == 1

    assert cli_main(["prepare", str(good), "-o", out, "--no-progress", "--workers", "1"]) == 0
    assert "1 case(s) curated" in capsys.readouterr().out
    assert cli_main(["prepare", "-o", out, "--merge-only", "--no-progress"]) == 0
    assert len(read_manifest(Path(out))) > 0


def test_2d_colour_image_with_png_mask(tmp_path):
    from PIL import Image

    from conftest import smooth_image

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    rgb = smooth_image(40, 56, seed=1, channels=3)
    Image.fromarray(rgb).save(src / "images/frame1.png")
    mask = np.zeros((40, 56), np.uint8)
    mask[5:25, 10:30] = 1
    mask[30:32, 40:42] = 2  # 4 px: below min_component_2d
    Image.fromarray(mask).save(src / "labels/frame1.png")
    spec = DatasetSpec.from_dict(
        {
            "name": "endo",
            "modality": "Endoscopy",
            "images": str(src / "images"),
            "labels": str(src / "labels"),
            "min_component_2d": 10,
            "label_names": {1: "polyp"},
        }
    )
    rep = run([spec], tmp_path / "out")
    assert rep.ok
    (row,) = read_manifest(tmp_path / "out")
    assert (row["slice"], row["label_name"], row["x0"], row["y0"], row["x1"], row["y1"], row["area"]) == (
        "0",
        "polyp",
        "10",
        "5",
        "29",
        "24",
        "400",
    )
    assert row["path"] == "cases/endo/frame1/slices/0000.npz"
    with np.load(tmp_path / "out" / row["path"]) as z:
        np.testing.assert_array_equal(z["image"], rgb)  # uint8 colour kept as is
        np.testing.assert_array_equal(z["spacing"], [1.0, 1.0])


def test_demo_sources_offline_and_checksums(tmp_path):
    from medsam.curate.dataset_spec import nifti_label_names
    from medsam.curate.demo_corpus import TOTALSEGMENTATOR, DemoSourceError, fetch_archive, find_mricron

    with pytest.raises(DemoSourceError, match="offline"):
        fetch_archive(TOTALSEGMENTATOR, tmp_path, offline=True)
    (tmp_path / TOTALSEGMENTATOR.filename).write_bytes(b"not the sdist")  # corrupt cache entry
    with pytest.raises(DemoSourceError, match="offline"):
        fetch_archive(TOTALSEGMENTATOR, tmp_path, offline=True)
    folder, why = find_mricron(tmp_path / "no-such-dir")
    assert folder is None and "mricron-data" in why
    names = nifti_label_names(CT_LAB)  # TotalSegmentator's label table in the header extension
    assert len(names) == 117 and names[5] == "liver" and names[117] == "costal_cartilages"
    assert nifti_label_names(CT_IMG) == {}
