"""``medsam demo``: segment the bundled real samples with the embedded default model.

The samples live in ``medsam/data/samples/`` (see the README there and ``samples.json``): a CT
slice and a 12-slice CT volume from TotalSegmentator's ``example_ct_dicom`` (a held-out test case
of the default model, from a scanner it never saw in training) and an abdominal MR slice from
TotalSegmentator's ``example_mr_sm`` (a case of the training split). Each carries its label map,
which are TotalSegmentator *pseudo-labels* (model outputs, not manual annotations). A sample may
name synthetic ``lesions`` (with a ``lesion_seed``): they are pasted into its image inside its
labelled structures (:func:`medsam.train.lesions.paste_lesions`) and are its reference instead.

For a few named structures per sample, the box prompt is the bounding box of the structure in the
label map (2D boxes on slices, 3D boxes on the volume); the images go through the same path as
``medsam segment`` (:func:`medsam.segment.segment_file`, and :func:`medsam.volume.segment_volume`
for the volume). The demo writes the masks, overlay pictures (reference | prediction) and
``report.md`` with each object's DSC and NSD (2 mm) against the sample's label.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

NSD_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Sample:
    """One bundled sample (an entry of ``samples.json``)."""

    name: str
    kind: str  # "2d" or "3d"
    image: Path
    label: Path
    modality: str
    spacing: tuple[float, ...]  # array order: (row, col) or (z, y, x), mm
    label_names: dict[int, str]
    structures: tuple[str, ...]
    source: str
    split: str
    lesions: tuple[str, ...] = ()  # synthetic lesions pasted into the image (see _lesion_sample)
    lesion_seed: int = 0


def samples_dir() -> Path:
    return Path(str(resources.files("medsam") / "data" / "samples"))


def bundled_samples(names: Sequence[str] | None = None) -> list[Sample]:
    """The bundled samples (all, or those named), from ``medsam/data/samples/samples.json``."""
    folder = samples_dir()
    index = folder / "samples.json"
    if not index.is_file():
        raise FileNotFoundError(f"the demo samples are missing from this installation: {index}")
    entries = json.loads(index.read_text())["samples"]
    known = [e["name"] for e in entries]
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown demo sample(s) {', '.join(unknown)}; known: {', '.join(known)}")
        entries = [e for e in entries if e["name"] in names]
    samples = []
    for e in entries:
        spacing = e.get("spacing_rc") or e.get("spacing_zyx")
        lesions = tuple(e.get("lesions", ()))
        if lesions:  # the label file holds the host structures; the reference is the lesions
            e = {**e, "label_names": {str(k): kind for k, kind in enumerate(lesions, start=1)}, "structures": lesions}
        samples.append(
            Sample(
                name=e["name"],
                kind=e["kind"],
                image=folder / e["image"],
                label=folder / e["label"],
                modality=e["modality"],
                spacing=tuple(float(s) for s in spacing),
                label_names={int(k): v for k, v in e["label_names"].items()},
                structures=tuple(e["structures"]),
                source=e["source"],
                split=e.get("corpus_split", ""),
                lesions=lesions,
                lesion_seed=int(e.get("lesion_seed", 0)),
            )
        )
    return samples


def label_boxes(label: np.ndarray, ids: Sequence[int]) -> list[list[int]]:
    """Inclusive bounding boxes of label ids: [x0, y0, x1, y1] (2D) or [x0, y0, z0, x1, y1, z1] (3D)."""
    boxes = []
    for i in ids:
        idx = np.nonzero(label == i)
        if label.ndim == 2:
            ys, xs = idx
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
        else:
            zs, ys, xs = idx
            boxes.append([int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max())])
    return boxes


def _hex(label: int) -> str:
    from .overlay import PALETTE

    r, g, b = (int(c) for c in PALETTE[(label - 1) % len(PALETTE)])
    return f"#{r:02x}{g:02x}{b:02x}"


def _side_by_side(pictures: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    h = max(p.shape[0] for p in pictures)
    parts = []
    for i, p in enumerate(pictures):
        if p.shape[0] < h:
            p = np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
        parts.append(p)
        if i < len(pictures) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def _stack(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    parts = []
    for i, r in enumerate(rows):
        parts.append(np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255))
        if i < len(rows) - 1:
            parts.append(np.full((gap, w, 3), 255, np.uint8))
    return np.concatenate(parts, axis=0)


def _comparison_picture(image: np.ndarray, reference: np.ndarray, predicted: np.ndarray, boxes) -> np.ndarray:
    """Reference (left) | prediction (right), both with the prompt boxes; small images enlarged."""
    from .overlay import render_overlay
    from .preprocess import to_rgb_uint8

    rgb = to_rgb_uint8(image)
    factor = max(1, int(np.ceil(256 / min(rgb.shape[:2]))))
    big = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)
    scaled_boxes = (
        None
        if boxes is None
        else [[x0 * factor, y0 * factor, (x1 + 1) * factor - 1, (y1 + 1) * factor - 1] for x0, y0, x1, y1 in boxes]
    )
    left = render_overlay(big(rgb), big(reference), scaled_boxes)
    right = render_overlay(big(rgb), big(predicted), scaled_boxes)
    return _side_by_side([left, right])


def _score_objects(sample: Sample, reference: np.ndarray, predicted: np.ndarray, ids, names) -> list[dict]:
    from .metrics import dice_score, normalized_surface_dice

    rows = []
    for n, (i, name) in enumerate(zip(ids, names), start=1):
        gt = reference == i
        pred = predicted == n
        rows.append(
            {
                "label": n,
                "structure": name,
                "reference_px": int(gt.sum()),
                "predicted_px": int(pred.sum()),
                "dsc": dice_score(pred, gt),
                "nsd": normalized_surface_dice(pred, gt, sample.spacing, NSD_TOLERANCE_MM),
            }
        )
    return rows


def _lesion_sample(sample: Sample, out: Path) -> tuple[Path, np.ndarray]:
    """A 2D sample with its synthetic lesions pasted in (:func:`medsam.train.lesions.paste_lesions`,
    inside the sample's labelled structures, from its ``lesion_seed``): the image written to
    ``out`` as PNG, and the lesion label map (``k + 1`` for ``sample.lesions[k]``)."""
    from .io import read_image
    from .overlay import save_png
    from .train.lesions import paste_lesions

    image = np.asarray(read_image(sample.image).array)
    hosts = np.asarray(read_image(sample.label).array)
    image, lesions = paste_lesions(image, hosts, np.random.default_rng(sample.lesion_seed), sample.lesions)
    return save_png(image, out / f"{sample.name}_image.png"), lesions


def _run_sample(sample: Sample, model, out: Path, log, zoom=None) -> dict:
    from .io import read_image
    from .overlay import save_png
    from .segment import segment_file

    source = sample.image
    if sample.lesions:
        source, reference = _lesion_sample(sample, out)
    else:
        reference = np.asarray(read_image(sample.label).array)
    by_name = {v: k for k, v in sample.label_names.items()}
    chosen = [s for s in sample.structures if s in by_name and (reference == by_name[s]).any()]
    if not chosen:
        raise ValueError(f"sample {sample.name}: none of {', '.join(sample.structures)} is in its label")
    ids = [by_name[s] for s in chosen]
    boxes = label_boxes(reference, ids)
    suffix = ".png" if sample.kind == "2d" else ".nii.gz"
    start = time.perf_counter()
    result = segment_file(
        source,
        out / f"{sample.name}_mask{suffix}",
        boxes,
        model=model,
        scores_path=out / f"{sample.name}_mask.scores.json",
        zoom=zoom if sample.kind == "2d" else None,
        log=log,
    )
    seconds = time.perf_counter() - start
    predicted = result.labels  # label n = the n-th box (one box: 0/1)
    objects = _score_objects(sample, reference, predicted, ids, chosen)
    # Reference relabelled 1..N in prompt order, so both sides of the picture share colours.
    ref_n = np.zeros(reference.shape, np.uint8)
    for n, i in enumerate(ids, start=1):
        ref_n[reference == i] = n
    image = np.asarray(read_image(source).array)
    picture_path = out / f"{sample.name}_overlay.png"
    if sample.kind == "2d":
        picture = _comparison_picture(image, ref_n, predicted, boxes)
        for o, b in zip(objects, boxes):
            o["box"] = b
        reference_is = "the synthetic lesions' own masks" if sample.lesions else "pseudo-label"
        note = f"left: reference ({reference_is}), right: prediction; boxes: the prompts"
    else:
        Z = image.shape[0]
        shown = sorted({Z // 6, Z // 2, (5 * Z) // 6})
        rows = []
        for k in shown:
            rows.append(_comparison_picture(image[k], ref_n[k], predicted[k], None))
        picture = _stack(rows)
        for o, b in zip(objects, boxes):
            o["box"] = b
        note = (
            f"axial slices {', '.join(str(k) for k in shown)} of {Z} (top to bottom); left: reference "
            "(pseudo-label), right: prediction propagated from the 3D boxes' middle slices"
        )
    save_png(picture, picture_path)
    log(
        f"{sample.name}: {len(ids)} objects, mean DSC {np.mean([o['dsc'] for o in objects]):.3f}, "
        f"{seconds:.1f} s -> {result.mask_path}"
    )
    return {
        "sample": sample,
        "objects": objects,
        "seconds": seconds,
        "mask": result.mask_path,
        "scores": result.scores_path,
        "picture": picture_path,
        "note": note,
    }


def run_demo(
    output_dir: str | Path,
    log: Callable[[str], None] = print,
    samples: Sequence[str] | None = None,
    model=None,
    zoom: bool = True,
) -> Path:
    """Segment the bundled samples (all, or those named) and write ``report.md``; returns its path.

    ``zoom``: segment small boxes of the 2D samples on a magnified crop (:mod:`medsam.zoom`,
    default policy), as the model card's headline results do.
    """
    from .default_model import UNTRAINED_WARNING
    from .segment import load_reporting

    total_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = bundled_samples(samples)
    if model is None:
        model = load_reporting(None, None, None, log)
    untrained = bool(getattr(model, "is_untrained_default", False))
    policy = None
    if zoom:
        from .zoom import ZoomPolicy

        policy = ZoomPolicy()
    results = [_run_sample(s, model, out, log, policy) for s in chosen]
    total = time.perf_counter() - total_start

    import torch

    lines = ["# medsam demo", ""]
    if untrained:
        lines += [f"**{UNTRAINED_WARNING}**", ""]
    lines += [
        f"Model: the embedded default (`{model.config.name}`, contract `{model.contract}`)"
        + ("" if untrained else ": LiteMedSAM fine-tuned on the demo corpus; see docs/model-card.md")
        + ".",
        f"Run: {total:.1f} s in all on {torch.get_num_threads()} CPU thread(s) of the torch "
        f"{torch.__version__} build, model loading included.",
        "",
        "Prompts are the bounding boxes of each structure in the sample's label map (3D boxes on the "
        "volume)"
        + (
            f"; on the 2D samples, boxes whose {policy.context:g}x crop is at most half the image are "
            "segmented on that magnified crop (`medsam.zoom`)"
            if policy
            else ""
        )
        + ". Scores compare the prediction with that label map: DSC, and NSD at "
        f"{NSD_TOLERANCE_MM:g} mm with the sample's spacing. **The label maps are TotalSegmentator "
        "pseudo-labels (the outputs of another model), not manual annotations;** a sample with "
        "synthetic lesions is scored against the lesions' own masks.",
        "",
    ]
    for r in results:
        s: Sample = r["sample"]
        held_out = "held-out test case" if s.split == "test" else f"case of the `{s.split}` split (seen in fine-tuning)"
        lines += [
            f"## {s.name} ({s.modality}, {s.kind.upper()})",
            "",
            f"{s.source}. In the demo corpus: {held_out}.",
            "",
            f"![{s.name}]({r['picture'].name})",
            "",
            f"*{r['note']}.*",
            "",
            "| colour | structure | box | reference px | predicted px | DSC | NSD |",
            "|---|---|---|---|---|---|---|",
        ]
        for o in r["objects"]:
            lines.append(
                f"| {_hex(o['label'])} | {o['structure']} | {o['box']} | {o['reference_px']} | "
                f"{o['predicted_px']} | {o['dsc']:.3f} | {o['nsd']:.3f} |"
            )
        mean_dsc = float(np.mean([o["dsc"] for o in r["objects"]]))
        lines += [
            "",
            f"Mean DSC {mean_dsc:.3f}; {r['seconds']:.1f} s; mask `{r['mask'].name}`, scores `{r['scores'].name}`.",
            "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    log(f"demo results in {out.resolve()} ({total:.1f} s)")
    return report
