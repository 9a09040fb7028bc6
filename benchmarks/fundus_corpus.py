"""A one-split corpus of the two retinal images bundled with scikit-image, for lesions on a modality
the embedded default never trained on (fundus photography and fluorescein angiography).

The images have no labels: each is stored with its field of view as the one structure (label 1,
``field_of_view``: pixels above 8 % of the image's maximum, largest piece), so that
``medsam prepare-lesions OUT -o LESIONS`` can paste synthetic lesions into it and score models on
them. ``retina.jpg`` (1411 x 1411 RGB) is reduced to its green channel (the contrast channel of
fundus photography) at 512 x 512; ``microaneurysms.png`` (102 x 102, grey) is kept as it is.

    python benchmarks/fundus_corpus.py -o FUNDUS
    medsam prepare-lesions FUNDUS -o LESIONS --variants 20
    medsam benchmark --corpus LESIONS -o bench/fundus/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def field_of_view(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8: 1 on the largest piece of pixels above 8 % of the maximum, else 0."""
    from scipy import ndimage

    pieces, n = ndimage.label(image > 0.08 * float(image.max()))
    if n == 0:
        raise ValueError("the image is dark everywhere")
    sizes = ndimage.sum_labels(np.ones_like(pieces), pieces, index=np.arange(1, n + 1))
    fov = pieces == int(np.argmax(sizes)) + 1
    return ndimage.binary_fill_holes(fov).astype(np.uint8)


def fundus_images() -> dict[str, np.ndarray]:
    """The two images as (H, W) uint8, by case name."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    retina = Image.open(folder / "retina.jpg").convert("RGB").split()[1].resize((512, 512), Image.BILINEAR)
    micro = Image.open(folder / "microaneurysms.png").convert("L")
    return {"retina": np.asarray(retina), "microaneurysms": np.asarray(micro)}


def write_fundus_corpus(out: str | Path) -> dict:
    from medsam.corpus.write import index_corpus, write_case

    out = Path(out)
    for case, image in fundus_images().items():
        write_case(
            out,
            "skimage_fundus",
            case,
            [(0, image, field_of_view(image))],
            (1.0, 1.0),  # no physical spacing is known: NSD is in pixels
            {
                "modality": "fundus",
                "split": "test",
                "label_names": {"1": "field_of_view"},
                "label_source": "threshold (field of view), a host for synthetic lesions only",
                "source": f"scikit-image {__import__('skimage').__version__} bundled data",
            },
        )
    return index_corpus(out, [{"name": "skimage_fundus", "label_source": "threshold"}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="corpus folder")
    print(write_fundus_corpus(parser.parse_args().out))


if __name__ == "__main__":
    main()
