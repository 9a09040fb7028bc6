"""The folder layout of labelled volumes the volume trainers read (``med3d.volumes``,
``clips.volumes``): ``images/`` and ``labels/`` (or nnU-Net's ``imagesTr/`` and ``labelsTr/``)
holding files of the same names."""

from __future__ import annotations

from pathlib import Path


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, label) files of ``folder``'s ``images``/``labels`` (or ``imagesTr``/``labelsTr``),
    matched by name (an image's nnU-Net ``_0000`` channel suffix is ignored)."""
    from ..io.formats import format_of

    root = Path(folder)
    for images_name, labels_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        images, labels = root / images_name, root / labels_name
        if images.is_dir() and labels.is_dir():
            break
    else:
        raise ValueError(f"{root}: no images/ and labels/ (or imagesTr/ and labelsTr/) folders")
    by_name = {p.name: p for p in labels.iterdir() if p.is_file() and format_of(p) is not None}
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.is_file() and format_of(p) is not None):
        key = image.name.replace("_0000.", ".")
        if key in by_name:
            pairs.append((image, by_name[key]))
    if not pairs:
        raise ValueError(f"{root}: no image has a label file of the same name")
    return pairs
