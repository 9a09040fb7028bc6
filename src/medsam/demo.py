"""``medsam demo``: segment sample images with the embedded default model and write a report.

Samples: real images that ship inside installed dependencies (pydicom's ``CT_small.dcm``, a
128 x 128 CT slice; scikit-image's ``retina.jpg`` fundus photograph is used when present). The
report is Markdown with an overlay picture per sample and each object's score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    boxes: list[list[float]]
    modality: str | None
    output_suffix: str


def bundled_samples() -> list[Sample]:
    """The sample images that can be found in this installation."""
    samples = []
    try:
        from pydicom.data import get_testdata_file

        ct = get_testdata_file("CT_small.dcm")
        if ct:
            samples.append(Sample("ct_small", Path(ct), [[30, 40, 95, 100]], "CT", ".nii.gz"))
    except Exception:  # pydicom's test data are optional
        pass
    try:
        import skimage

        retina = Path(skimage.__file__).parent / "data" / "retina.jpg"
        if retina.is_file():
            samples.append(Sample("retina", retina, [[650, 500, 1000, 900]], None, ".png"))
    except Exception:
        pass
    return samples


def run_demo(output_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Segment every bundled sample; returns the path of the Markdown report."""
    from .default_model import UNTRAINED_WARNING
    from .segment import _load, segment_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _load(None, None, None, log)
    untrained = bool(getattr(model, "is_untrained_default", False))
    lines = ["# medsam demo", ""]
    if untrained:
        lines += [f"**{UNTRAINED_WARNING}**", ""]
    lines += [f"Model: `{model.config.name}`, contract `{model.contract}`.", ""]
    samples = bundled_samples()
    if not samples:
        raise FileNotFoundError("no sample images found (pydicom's and scikit-image's data are missing)")
    for sample in samples:
        start = time.perf_counter()
        result = segment_file(
            sample.path, out / f"{sample.name}_mask{sample.output_suffix}", sample.boxes, model=model,
            overlay_path=out / f"{sample.name}_overlay.png", modality=sample.modality,
        )
        seconds = time.perf_counter() - start
        lines += [
            f"## {sample.name}",
            "",
            f"Input `{sample.path}`, box {sample.boxes[0]}, predicted IoU {result.scores[0]:.3f}, "
            f"{int((result.labels > 0).sum())} pixels in the mask, {seconds:.2f} s.",
            "",
            f"![{sample.name}]({result.overlay_path.name})",
            "",
        ]
        log(f"{sample.name}: mask -> {result.mask_path}")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
