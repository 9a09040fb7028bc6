"""Cut the bundled demo samples out of the demo corpus (medsam prepare-demo output).

Usage: python make_demo_samples.py CORPUS OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def case_json(dataset, case):
    return json.loads((corpus / "cases" / dataset / case / "case.json").read_text())


def load(dataset, case, k):
    with np.load(corpus / "cases" / dataset / case / "slices" / f"{k:04d}.npz") as d:
        return d["image"], d["label"], tuple(float(s) for s in d["spacing"])


samples = []
# --- CT slice (held-out test case, another scanner) -----------------------------------
ct = case_json("totalseg_ct", "example_ct_dicom")
img, lab, sp = load("totalseg_ct", "example_ct_dicom", 3)
Image.fromarray(img).save(out / "ct_slice.png", optimize=True)
Image.fromarray(lab.astype(np.uint8)).save(out / "ct_slice_label.png", optimize=True)
names_ct = {int(k): v for k, v in ct["label_names"].items()}
present = sorted(int(v) for v in np.unique(lab) if v)
samples.append(
    {
        "name": "ct_slice",
        "kind": "2d",
        "image": "ct_slice.png",
        "label": "ct_slice_label.png",
        "modality": "CT",
        "spacing_rc": list(sp),
        "label_names": {str(k): names_ct[k] for k in present},
        "structures": ["liver", "spleen", "stomach", "aorta", "inferior_vena_cava"],
        "source": "TotalSegmentator 2.18.0 example_ct_dicom (Siemens Biograph40 mCT), axial slice 3 of 20, "
        "soft-tissue window (level 40, width 400 HU) to uint8; labels from example_seg_dicom.nii.gz",
        "corpus_case": "totalseg_ct/example_ct_dicom",
        "corpus_split": ct["split"],
        "label_source": "pseudo",
    }
)
# --- MR slice (TotalSegmentator example MR; in the fine-tuning train split) -------------
mr = case_json("totalseg_mr", "example_mr_sm")
img, lab, sp = load("totalseg_mr", "example_mr_sm", 9)
Image.fromarray(img).save(out / "mr_slice.png", optimize=True)
Image.fromarray(lab.astype(np.uint8)).save(out / "mr_slice_label.png", optimize=True)
names_mr = {int(k): v for k, v in mr["label_names"].items()}
present = sorted(int(v) for v in np.unique(lab) if v)
samples.append(
    {
        "name": "mr_slice",
        "kind": "2d",
        "image": "mr_slice.png",
        "label": "mr_slice_label.png",
        "modality": "MR",
        "spacing_rc": list(sp),
        "label_names": {str(k): names_mr[k] for k in present},
        "structures": ["liver", "spleen", "kidney_right", "kidney_left", "aorta"],
        "source": "TotalSegmentator 2.18.0 example_mr_sm.nii.gz (abdominal MR, 3 mm), axial slice 9 of 20, "
        "0.5/99.5 percentiles of the volume to uint8; labels from example_seg_mr.nii.gz",
        "corpus_case": "totalseg_mr/example_mr_sm",
        "corpus_split": mr["split"],
        "label_source": "pseudo",
    }
)
# --- CT volume: 12 slices of example_ct_dicom, rows cropped to the body -----------------
import SimpleITK as sitk

k0, k1, r0, r1 = 8, 20, 150, 500
vol = np.stack([load("totalseg_ct", "example_ct_dicom", k)[0] for k in range(k0, k1)])[:, r0:r1]
lv = np.stack([load("totalseg_ct", "example_ct_dicom", k)[1] for k in range(k0, k1)])[:, r0:r1].astype(np.uint8)
g = ct["geometry"]
spacing = np.array(g["spacing_xyz"])
origin = np.array(g["origin"])
D = np.array(g["direction"])
new_origin = origin + D @ (spacing * np.array([0, r0, k0]))


def write(arr, path):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(spacing))
    im.SetOrigin(tuple(new_origin))
    im.SetDirection(tuple(D.reshape(-1)))
    w = sitk.ImageFileWriter()
    w.SetFileName(str(path))
    w.SetUseCompression(True)
    w.Execute(im)


write(vol, out / "ct_volume.nii.gz")
write(lv, out / "ct_volume_label.nii.gz")
present = sorted(int(v) for v in np.unique(lv) if v)
samples.append(
    {
        "name": "ct_volume",
        "kind": "3d",
        "image": "ct_volume.nii.gz",
        "label": "ct_volume_label.nii.gz",
        "modality": "CT",
        "spacing_zyx": [float(spacing[2]), float(spacing[1]), float(spacing[0])],
        "label_names": {str(k): names_ct[k] for k in present},
        "structures": ["liver", "spleen", "aorta"],
        "source": f"TotalSegmentator 2.18.0 example_ct_dicom, axial slices {k0}-{k1 - 1} of 20, rows {r0}-{r1 - 1} "
        "of 512 (the body), soft-tissue window to uint8, geometry (spacing, origin, direction) of the "
        "DICOM series shifted to the crop; labels from example_seg_dicom.nii.gz",
        "corpus_case": "totalseg_ct/example_ct_dicom",
        "corpus_split": ct["split"],
        "label_source": "pseudo",
    }
)
(out / "samples.json").write_text(
    json.dumps({"format": "medsam-demo-samples", "version": 1, "samples": samples}, indent=1)
)
for p in sorted(out.iterdir()):
    print(p.name, p.stat().st_size)
