"""Native 3D segmentation from clicks with SAM-Med3D, following its published inference.

The steps, with the contract its weights were trained with (:class:`SamMed3DConfig`):

1. resample the volume to ``spacing_mm`` isotropic voxels: linear interpolation, the voxel type
   kept, on a grid centred on the original one with ``floor(n * spacing / spacing_mm)`` voxels
   per axis;
2. reorient it to RAS+ (flips and transposes only);
3. crop (or zero-pad) an ``img_size``^3 cube centred on the bounding box of the positive clicks'
   voxels carried through steps 1-2 as a label (nearest neighbour), as the published pipeline
   centres its crop on its label: the first index is ``floor((lo + hi - size) / 2)`` per axis,
   ``hi`` exclusive;
4. z-score the cube over its voxels > 0 (float32, unbiased standard deviation);
5. decode the clicks one after another: step n sees clicks 1..n and the low-resolution logits
   of step n - 1 as its mask prompt (zeros at the first step);
6. upsample the last logits trilinearly to the cube, keep ``sigmoid > 0.5``, and resample that
   cube back onto the input's grid with nearest-neighbour interpolation.

The published code does steps 1-4 with torchio, which runs on SimpleITK and nibabel. Both are
already dependencies here, so the same grids are computed directly rather than adding torchio
and its six further dependencies at run time. The tests compare the results with torchio.

Coordinates: a click is a voxel index (i, j, k) of the input file, which is ``array[k, j, i]``
of :class:`medsam.io.MedicalImage`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .io.image import MedicalImage
from .model.sam_med3d import SamMed3DModel

# LPS (ITK) <-> RAS (nibabel) for the first two physical axes.
_FLIP = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class VoxelClick:
    """One click: the voxel index (i, j, k) of the input file, foreground or background."""

    index: tuple[int, int, int]
    positive: bool = True


@dataclass(frozen=True)
class CropGrid:
    """The network's cube in the RAS-canonical, resampled volume.

    ``begin``: index of the cube's first voxel (negative where the cube overhangs and is
    zero-padded); ``affine``: index (i, j, k, 1) of the cube -> RAS mm.
    """

    begin: tuple[int, ...]
    affine: np.ndarray


@dataclass(frozen=True)
class CubeWindow:
    """One decoded cube: ``begin`` in the canonical resampled volume, ``clicks`` (N, 3) cube
    indices decoded in order with ``labels`` (N,) 1 / 0."""

    begin: tuple[int, ...]
    clicks: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Native3DResult:
    """``mask``: (Z, Y, X) uint8 on the input's grid; ``cube``: (S, S, S) the network's
    normalised input; ``cube_mask``: (S, S, S) in the crop;
    ``low_res_logits``: (1, 1, 4E, 4E, 4E) of the last click; ``clicks_in_cube``: (N, 3) click
    indices in the cube, in the order decoded; ``windows``: every cube decoded, the first one
    first (more than one with ``sliding_window``)."""

    mask: np.ndarray
    cube: torch.Tensor
    cube_mask: np.ndarray
    low_res_logits: torch.Tensor
    grid: CropGrid
    windows: tuple[CubeWindow, ...]

    @property
    def clicks_in_cube(self) -> np.ndarray:
        return self.windows[0].clicks


def resample_isotropic(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` on a grid of ``spacing_mm`` voxels with the same centre and direction, linear
    interpolation, the voxel type kept (integers truncate, as ITK casts)."""
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    old_size = np.asarray(image.GetSize())
    last = np.asarray(image.TransformIndexToPhysicalPoint((old_size - 1).tolist()), dtype=float)
    centre = (last + np.asarray(image.GetOrigin(), dtype=float)) / 2
    size = np.floor(old_size * old_spacing / spacing_mm)
    size[old_size == 1] = 1
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = centre - direction @ ((size - 1) / 2 * spacing_mm)
    reference = sitk.Image(size.astype(int).tolist(), image.GetPixelID())
    reference.SetDirection(image.GetDirection())
    reference.SetSpacing([float(spacing_mm)] * 3)
    reference.SetOrigin(origin.tolist())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """Index (i, j, k, 1) -> RAS mm of a SimpleITK image."""
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine[:3, :3] = _FLIP @ direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    affine[:3, 3] = _FLIP @ np.asarray(image.GetOrigin(), dtype=float)
    return affine


def to_canonical(array_ijk: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An (i, j, k) array and its RAS affine reoriented to RAS+ (nibabel's closest canonical)."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    canonical = nio.apply_orientation(array_ijk, transform)
    return np.ascontiguousarray(canonical), affine @ nio.inv_ornt_aff(transform, array_ijk.shape)


def canonical_array(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image as an (i, j, k) array reoriented to RAS+, and its RAS affine."""
    return to_canonical(sitk.GetArrayFromImage(image).transpose(), _ras_affine(image))


def labels_on_grid(labels: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """A label image resampled (nearest neighbour) onto ``grid``'s voxels."""
    return sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def cube_begin(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """First index per axis of a ``size`` cube centred on the box [lo, hi) (hi exclusive),
    half a voxel towards lower indices where the centre and the size differ in parity."""
    begin: np.ndarray = (lo + hi - size) // 2
    return begin


def crop_or_pad(volume: np.ndarray, begin: Sequence[int], size: int) -> np.ndarray:
    """The ``size``^3 cube of ``volume`` starting at ``begin`` (may be negative or overhang),
    zeros outside the volume."""
    cube = np.zeros((size,) * 3, dtype=volume.dtype)
    vol, cub = _cube_slices(begin, size, volume.shape)
    if all(v.stop > v.start for v in vol):
        cube[cub] = volume[vol]
    return cube


def zscore_foreground(cube: np.ndarray) -> torch.Tensor:
    """(S, S, S) -> float32 tensor z-scored over its voxels > 0 (unbiased std)."""
    values = torch.from_numpy(np.ascontiguousarray(cube))
    x = values.float()
    inside = x[values > 0]
    if inside.numel() < 2:
        raise ValueError("the crop around the clicks has no voxels above 0 to normalise by")
    mean, std = inside.mean(), inside.std()
    if not torch.isfinite(std) or std == 0:
        raise ValueError("the crop around the clicks is constant above 0: nothing to normalise")
    return (x - mean) / std


@torch.inference_mode()
def decode_clicks(
    model: SamMed3DModel, embedding: torch.Tensor, clicks: np.ndarray, labels: np.ndarray
) -> torch.Tensor:
    """SAM-Med3D's iterative decoding: (N, 3) cube indices with N labels (1 / 0) -> the last
    step's (1, 1, 4E, 4E, 4E) logits."""
    device = embedding.device
    low = torch.zeros((1, 1, *(model.mask_input_size,) * 3), device=device)
    for n in range(1, len(clicks) + 1):
        points = torch.as_tensor(clicks[:n], dtype=torch.float32, device=device)[None]
        point_labels = torch.as_tensor(labels[:n], dtype=torch.int64, device=device)[None]
        low = model.decode(embedding, (points, point_labels), mask_input=low).logits
    return low


def _indices_in_canonical(
    image: sitk.Image, resampled: sitk.Image, canonical_affine: np.ndarray, clicks: Sequence[VoxelClick]
) -> np.ndarray:
    """(N, 3) voxel indices of the clicks in the resampled, canonical volume (nearest voxel)."""
    to_canonical_index = np.linalg.inv(canonical_affine) @ _ras_affine(resampled)
    out = []
    for click in clicks:
        point = image.TransformIndexToPhysicalPoint([int(v) for v in click.index])
        index = np.asarray(resampled.TransformPhysicalPointToContinuousIndex(point), dtype=float)
        index = np.clip(np.floor(index + 0.5), 0, np.asarray(resampled.GetSize()) - 1)
        out.append(np.rint(to_canonical_index @ np.append(index, 1.0))[:3])
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _positive_click_box(
    image: MedicalImage, resampled: sitk.Image, clicks: Sequence[VoxelClick]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Bounding box [lo, hi) in the resampled, canonical volume of the positive clicks' voxels
    marked as a label and resampled with nearest neighbour; (None, None) if none survives."""
    from .io._sitk import to_sitk

    marks = np.zeros(image.spatial_shape, dtype=np.uint8)
    for click in clicks:
        if click.positive:
            i, j, k = click.index
            marks[k, j, i] = 1
    canonical, _ = canonical_array(labels_on_grid(to_sitk(marks, image), resampled))
    where = np.argwhere(canonical)
    if len(where) == 0:
        return None, None
    return where.min(axis=0), where.max(axis=0) + 1


def check_clicks(clicks: Sequence[VoxelClick], shape_zyx: Sequence[int]) -> None:
    """Refuse no clicks, no positive click, or a click outside the (Z, Y, X) volume."""
    if not clicks:
        raise ValueError("give at least one click (--point I J K)")
    if not any(c.positive for c in clicks):
        raise ValueError("give at least one positive click (--point I J K): it places the crop")
    extent = (shape_zyx[2], shape_zyx[1], shape_zyx[0])
    for click in clicks:
        if len(click.index) != 3 or any(not 0 <= v < n for v, n in zip(click.index, extent, strict=True)):
            raise ValueError(f"click {tuple(click.index)} is outside the volume (i, j, k < {extent})")


def segment_clicks_3d(
    model: SamMed3DModel,
    image: MedicalImage,
    clicks: Sequence[VoxelClick],
    *,
    sliding_window: bool = False,
    max_windows: int = 8,
) -> Native3DResult:
    """Segment one object of a volume from its clicks (in the order given) with SAM-Med3D.

    ``sliding_window``: where the mask reaches a face of the cube and the volume goes on, decode
    the cube shifted by half its side across that face too (at most ``max_windows`` cubes in
    all), each from a positive click at the deepest voxel of the mask so far inside it plus the
    user's clicks that fall in it; overlapping cubes' logits are averaged. Off, the published
    single-cube inference. For several calls on one volume, :class:`Native3DPredictor`.
    """
    predictor = Native3DPredictor(model)
    predictor.set_volume(image)
    return predictor.predict(clicks, sliding_window=sliding_window, max_windows=max_windows)


class Native3DPredictor:
    """SAM-Med3D on one volume, prompted many times, as :class:`medsam.predictor.Predictor` is on
    an image: :meth:`set_volume` resamples and reorients the volume once; :meth:`predict` segments
    from clicks (:func:`segment_clicks_3d`'s steps), embedding each cube once: the embeddings of
    the last ``cubes_in_memory`` cubes are kept, keyed by the cube's first index, so clicks that
    keep the crop where it was cost the decoder only.

    Attributes:
        encoder_calls: cubes embedded so far.
    """

    def __init__(self, model: SamMed3DModel, cubes_in_memory: int = 8) -> None:
        self.model = model
        self.capacity = max(1, int(cubes_in_memory))
        self.encoder_calls = 0
        self._image: MedicalImage | None = None
        self._embeddings: dict[tuple[int, ...], torch.Tensor] = {}

    def set_volume(self, image: MedicalImage) -> None:
        """Resample ``image`` to the model's spacing and reorient it to RAS (once per volume)."""
        if not image.is_volume or image.is_color:
            raise ValueError("SAM-Med3D segments grey volumes; the input is not one")
        from .io._sitk import to_sitk

        self._image = image
        self._original = to_sitk(image.array, image)
        self._resampled = resample_isotropic(self._original, self.model.config.spacing_mm)
        self._volume, self._affine = canonical_array(self._resampled)
        self._embeddings = {}

    def embed(self, begin: tuple[int, ...], cube: torch.Tensor) -> torch.Tensor:
        """The embedding of the normalised cube that starts at ``begin`` (cached)."""
        found = self._embeddings.pop(begin, None)
        if found is None:
            with torch.inference_mode():
                found = self.model.embed_image(cube.to(self.model.device)[None, None])
            self.encoder_calls += 1
        self._embeddings[begin] = found  # most recent last
        while len(self._embeddings) > self.capacity:
            self._embeddings.pop(next(iter(self._embeddings)))
        return found

    def predict(
        self, clicks: Sequence[VoxelClick], *, sliding_window: bool = False, max_windows: int = 8
    ) -> Native3DResult:
        """Segment one object from its clicks (see :func:`segment_clicks_3d`)."""
        image = self._image
        if image is None:
            raise RuntimeError("call set_volume() first")
        check_clicks(clicks, image.spatial_shape)
        if max_windows < 1:
            raise ValueError("max_windows must be at least 1")
        model, volume, affine, original = self.model, self._volume, self._affine, self._original
        size = model.config.img_size
        indices = _indices_in_canonical(original, self._resampled, affine, clicks)
        lo, hi = _positive_click_box(image, self._resampled, clicks)
        if lo is None or hi is None:  # the clicks' voxels fell between the resampled grid's voxels
            positive = indices[[c.positive for c in clicks]]
            lo, hi = positive.min(axis=0), positive.max(axis=0) + 1
        begin = cube_begin(lo, hi, size)
        labels = np.asarray([1 if c.positive else 0 for c in clicks])
        inside = _in_cube(indices, begin, size)
        if not inside[labels == 1].any():
            raise ValueError(
                f"the positive clicks lie further apart than the model's {size}-voxel crop "
                f"({size * model.config.spacing_mm:g} mm): give the clicks of one object within one crop"
            )
        if not inside.all():
            import warnings

            warnings.warn(
                f"{int((~inside).sum())} click(s) lie outside the first {size}^3 crop: only crops that hold "
                "them use them (--sliding-window)",
                stacklevel=3,
            )
        first = CubeWindow(begin=tuple(int(v) for v in begin), clicks=indices[inside] - begin, labels=labels[inside])
        cube, low, logits = decode_window(model, volume, first, self.embed)
        cube_mask = (torch.sigmoid(logits) > 0.5).to(torch.uint8).numpy()
        grid_affine = affine.copy()
        grid_affine[:3, 3] = (affine @ np.append(begin, 1.0))[:3]
        windows = [first]
        if sliding_window:
            canonical_mask, windows = _slide(model, volume, first, logits, indices, labels, max_windows, self.embed)
            mask = _back_to_input(canonical_mask, affine, original)
        else:
            mask = _back_to_input(cube_mask, grid_affine, original)
        return Native3DResult(
            mask=mask,
            cube=cube,
            cube_mask=cube_mask,
            low_res_logits=low,
            grid=CropGrid(begin=first.begin, affine=grid_affine),
            windows=tuple(windows),
        )


def decode_window(
    model: SamMed3DModel,
    volume: np.ndarray,
    window: CubeWindow,
    embed: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cube of the canonical volume: its normalised input (S, S, S), the last step's
    low-resolution logits (1, 1, 4E, 4E, 4E) and those logits upsampled to (S, S, S), on the CPU.
    ``embed(begin, cube)`` gives the cube's embedding (default: the model's encoder, every time)."""
    size = model.config.img_size
    cube = zscore_foreground(crop_or_pad(volume, window.begin, size))
    with torch.inference_mode():
        if embed is None:
            embedding = model.embed_image(cube.to(model.device)[None, None])
        else:
            embedding = embed(window.begin, cube)
        low = decode_clicks(model, embedding, window.clicks, window.labels)
        full = F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)
    return cube, low.cpu(), full[0, 0].cpu()


def _in_cube(indices: np.ndarray, begin: Sequence[int] | np.ndarray, size: int) -> np.ndarray:
    """(N,) whether each of the (N, 3) voxel indices lies in the cube starting at ``begin``."""
    lo = np.asarray(begin)
    inside: np.ndarray = np.all((indices >= lo) & (indices < lo + size), axis=1)
    return inside


def _cube_slices(begin: Sequence[int], size: int, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(volume slices, cube slices) of the part of the cube at ``begin`` inside the volume."""
    vol, cub = [], []
    for b, n in zip(begin, shape, strict=True):
        lo, hi = max(b, 0), min(b + size, n)
        vol.append(slice(lo, hi))
        cub.append(slice(lo - b, hi - b))
    return tuple(vol), tuple(cub)


def _neighbours(begin: Sequence[int], cube_mask: np.ndarray, shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Cubes shifted by half a side across each face the mask reaches where the volume goes on."""
    size = cube_mask.shape[0]
    out = []
    for axis in range(3):
        for side, step in ((0, -1), (size - 1, 1)):
            face = np.take(cube_mask, side, axis=axis)
            beyond = begin[axis] > 0 if step < 0 else begin[axis] + size < shape[axis]
            if face.any() and beyond:
                moved = list(begin)
                moved[axis] += step * (size // 2)
                out.append(tuple(moved))
    return out


def _slide(
    model: SamMed3DModel,
    volume: np.ndarray,
    first: CubeWindow,
    first_logits: torch.Tensor,
    indices: np.ndarray,
    labels: np.ndarray,
    max_windows: int,
    embed: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, list[CubeWindow]]:
    """The sliding-window growth of :func:`segment_clicks_3d` -> (canonical volume mask, cubes)."""
    from collections import deque

    from scipy import ndimage

    size = model.config.img_size
    total = np.zeros(volume.shape, dtype=np.float32)
    count = np.zeros(volume.shape, dtype=np.float32)

    def add(window: CubeWindow, logits: torch.Tensor) -> np.ndarray:
        vol, cub = _cube_slices(window.begin, size, volume.shape)
        total[vol] += logits.numpy()[cub]
        count[vol] += 1
        return (logits > 0).numpy()

    windows = [first]
    queue = deque(_neighbours(first.begin, add(first, first_logits), volume.shape))
    seen = {first.begin}
    while queue and len(windows) < max_windows:
        begin = queue.popleft()
        if begin in seen:
            continue
        seen.add(begin)
        vol, cub = _cube_slices(begin, size, volume.shape)
        known = total[vol] > 0  # the mean logit so far is positive (0 where no cube reached)
        if not known.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(known, 1))[1:-1, 1:-1, 1:-1]
        seed = np.asarray(np.unravel_index(int(np.argmax(depth)), depth.shape)) + [c.start for c in cub]
        inside = _in_cube(indices, begin, size)
        window = CubeWindow(
            begin=begin,
            clicks=np.vstack([seed[None], indices[inside] - begin]).astype(np.int64),
            labels=np.concatenate([[1], labels[inside]]).astype(np.int64),
        )
        _, _, logits = decode_window(model, volume, window, embed)
        windows.append(window)
        queue.extend(_neighbours(begin, add(window, logits), volume.shape))
    mean = torch.from_numpy(total / np.maximum(count, 1))
    return ((torch.sigmoid(mean) > 0.5) & torch.from_numpy(count > 0)).to(torch.uint8).numpy(), windows


def _back_to_input(cube_mask: np.ndarray, cube_affine: np.ndarray, original: sitk.Image) -> np.ndarray:
    """A mask in (i, j, k) order with its RAS affine (a cube, or the whole canonical volume)
    resampled (nearest neighbour) onto the input's grid -> (Z, Y, X) uint8."""
    spacing = np.linalg.norm(cube_affine[:3, :3], axis=0)
    cube = sitk.GetImageFromArray(np.ascontiguousarray(cube_mask.transpose()))
    cube.SetSpacing(spacing.tolist())
    cube.SetDirection((_FLIP @ (cube_affine[:3, :3] / spacing[None, :])).reshape(-1).tolist())
    cube.SetOrigin((_FLIP @ cube_affine[:3, 3]).tolist())
    back = sitk.Resample(cube, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back)
