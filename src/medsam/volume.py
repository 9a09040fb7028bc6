"""3D segmentation by slice-to-slice propagation of 2D box prompts.

MedSAM is a 2D model. A volume is segmented the way the MedSAM/LiteMedSAM 3D inference does it:
segment one *key slice* from the user's box, then walk slice by slice away from it, prompting each
slice with the bounding box of the neighbouring slice's mask (expanded by a margin), until the
object ends. See :func:`segment_volume` for the exact rules and for what differs from the release.

Axis and coordinate conventions
-------------------------------
Volumes are NumPy arrays in the package convention (:mod:`medsam.io.image`): ``(Z, Y, X)``, the
file's voxel index ``(i, j, k)`` reversed, so a voxel is ``volume[k, j, i]``. Colour volumes are
``(Z, Y, X, 3)``.

Prompts are given in the *slicing frame*: the volume with the slicing ``axis`` moved to the front,
``frame = np.moveaxis(volume, axis, 0)`` of shape ``(S, H, W)``. In that frame

* ``z`` (``Box3D.z0/z1``, ``Box2D.slice``) is the index along ``axis``;
* ``y`` is the index along the first of the two remaining axes (image rows, ``H``);
* ``x`` is the index along the last remaining axis (image columns, ``W``).

With the default ``axis=0`` this is exactly the file convention: ``x = i`` (columns, array axis 2),
``y = j`` (rows, array axis 1), ``z = k`` (slices, array axis 0), as in the CVPR 2024 npz
``boxes`` ``[x0, y0, z0, x1, y1, z1]``. Examples for a ``(Z, Y, X)`` volume:

========  ========================  =======  =======  =======
``axis``  slice ``s``               ``z``    ``y``    ``x``
========  ========================  =======  =======  =======
0         axial ``v[k]``            k (Z)    j (Y)    i (X)
1         coronal ``v[:, j]``       j (Y)    k (Z)    i (X)
2         sagittal ``v[:, :, i]``   i (X)    k (Z)    j (Y)
========  ========================  =======  =======  =======

All corners are inclusive voxel indices. "Up" means increasing slice index, "down" decreasing.
The returned label map has the input's spatial shape and axis order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .embedding_cache import EmbeddingCache, embedding_id, set_image_cached
from .intensity import minmax_to_uint8
from .predictor import masks_to_label_map

# The prompts and the per-object walk state live in medsam.volume_prompts; Box2D, Box3D and
# BOX2D_IOU_THRESHOLD stay public here.
from .volume_prompts import BOX2D_IOU_THRESHOLD as BOX2D_IOU_THRESHOLD
from .volume_prompts import (
    Box2D,
    Box3D,
    Clicks2D,
    KeptCrop,
    KeyBoxes,
    KeyMasks,
    Mask2D,
    MaskPrompt,
    Track,
    ZoomWindow,
    as_int,
    as_prompt,
    check_inplane,
    make_tracks,
    next_box,
    prompt_box,
    resolve_clicks,
)

if TYPE_CHECKING:  # pragma: no cover
    from .zoom import ZoomPolicy

__all__ = [
    "Box2D",
    "Box3D",
    "Clicks2D",
    "KeyBoxes",
    "KeyMasks",
    "Mask2D",
    "VolumeSegmentation",
    "merge_propagated",
    "segment_npz_case",
    "segment_volume",
]

# One object's work on a slice: (track, "key" / "up" / "down", (4,) box, mask prompt or None).
_Task = tuple[Track, str, np.ndarray, MaskPrompt | None]


@dataclass
class VolumeSegmentation:
    """Result of :func:`segment_volume`.

    Attributes:
        labels: label map with the input's spatial shape and axis order, uint8 (uint16 with more
            than 255 objects); label ``n + 1`` is the object of ``boxes[n]``, 0 is background.
        slices: per object, the inclusive ``(first, last)`` range of slices (index along ``axis``)
            whose mask was kept, or ``None`` when the key slice's mask was empty.
        scores: per object, ``{slice: predicted IoU}`` for every kept slice.
        key_slices: per object, the key slice (the lowest one of a :class:`KeyBoxes` object).
        stop_reasons: per object, ``(up, down)``, each one of ``"empty"`` (the mask vanished),
            ``"low_iou"`` (predicted IoU below the threshold), ``"box_end"`` (end of a 3D box's
            z-range), ``"volume_end"`` or ``"key_empty"`` (nothing on the key slice); for a
            KeyBoxes object, how the walks beyond its highest (up) and lowest (down) keys ended.
        embeddings_computed: slices run through the image encoder.
        cache_hits: embeddings read from the on-disk :class:`EmbeddingCache`.
        memory_hits: embeddings reused from the in-memory LRU (a slice needed by several objects
            in different sweeps).
        zoomed: per object, True when at least one of its slices was segmented on a magnified
            crop (``zoom``).
        crop_embeddings_computed: crops (one per small box and slice) run through the image
            encoder.
        crop_cache_hits: crop embeddings read from the on-disk :class:`EmbeddingCache`.
    """

    labels: np.ndarray
    slices: list[tuple[int, int] | None]
    scores: list[dict[int, float]]
    key_slices: list[int]
    stop_reasons: list[tuple[str, str]]
    embeddings_computed: int = 0
    cache_hits: int = 0
    memory_hits: int = 0
    zoomed: list[bool] = field(default_factory=list)
    crop_embeddings_computed: int = 0
    crop_cache_hits: int = 0


# ----------------------------------------------------------------------------- internals
class _SliceEmbedder:
    """Puts a slice's embedding into the predictor: in-memory LRU, then disk cache, then encoder."""

    def __init__(self, predictor: Any, frame: np.ndarray, cache: EmbeddingCache | None, capacity: int) -> None:
        self.predictor = predictor
        self.frame = frame
        self.cache = cache
        self.capacity = max(0, int(capacity))
        self.lru: OrderedDict[int, Any] = OrderedDict()
        self.current: int | None = None
        self.computed = 0
        self.cache_hits = 0
        self.memory_hits = 0
        self._fp = embedding_id(predictor) if cache is not None else None

    def activate(self, s: int, keep: bool) -> None:
        """Make the predictor hold slice ``s``; keep its embedding in memory if ``keep``."""
        pred = self.predictor
        if self.current == s:
            pass
        elif s in self.lru:
            pred.set_embedding(self.lru[s], self.frame.shape[1:3])
            self.lru.move_to_end(s)
            self.memory_hits += 1
        elif set_image_cached(pred, np.ascontiguousarray(self.frame[s]), self.cache, self._fp):
            self.cache_hits += 1
        else:
            self.computed += 1
        self.current = s
        if keep and self.capacity:
            if s not in self.lru:
                self.lru[s] = pred.embedding
            while len(self.lru) > self.capacity:
                self.lru.popitem(last=False)
        elif not keep:
            self.lru.pop(s, None)  # never needed again


def _check_zoom(zoom: Any) -> None:
    from .zoom import ZoomPolicy

    if not isinstance(zoom, ZoomPolicy):
        raise TypeError(f"zoom must be a medsam.zoom.ZoomPolicy (or None), got {type(zoom).__name__}")


class _CropSegmenter:
    """Segments small boxes on a magnified crop of a slice, as :func:`medsam.zoom.predict_with_zoom`
    does in 2D: the crop's embedding (through the on-disk cache if given) in a second predictor,
    the box shifted into the crop."""

    def __init__(
        self,
        predictor: Any,
        frame: np.ndarray,
        cache: EmbeddingCache | None,
        policy: ZoomPolicy,
        crop_predictor: Any = None,
    ) -> None:
        if crop_predictor is None:
            from .predictor import Predictor

            crop_predictor = Predictor(
                predictor.model,
                contract=predictor.contract.name,
                precision=getattr(predictor, "precision", "fp32"),
                zoom=False,
            )
        self.predictor = crop_predictor
        self.frame = frame
        self.cache = cache
        self.policy = policy
        self.current: tuple[int, ZoomWindow] | None = None
        self.computed = 0
        self.cache_hits = 0

    def wants(self, box: np.ndarray) -> bool:
        """Whether ``box`` (full-slice coordinates) is small enough to be segmented on a crop."""
        from .zoom import should_zoom

        return should_zoom(box, self.frame.shape[1:3], self.policy)

    def predict(self, s: int, box: np.ndarray) -> tuple[Any, ZoomWindow]:
        """Prediction of ``box`` (full-slice coordinates) on its crop of slice ``s`` and the crop
        window ``(y0, y1, x0, x1)``; masks, scores and logits are in the crop's frame."""
        from .zoom import zoom_window

        window = zoom_window(box, self.frame.shape[1:3], self.policy.context, self.policy.min_side)
        y0, y1, x0, x1 = window
        if self.current != (s, window):
            crop = np.ascontiguousarray(self.frame[s, y0:y1, x0:x1])
            if set_image_cached(self.predictor, crop, self.cache):
                self.cache_hits += 1
            else:
                self.computed += 1
            self.current = (s, window)
        shifted = (box - np.array([x0, y0, x0, y0], dtype=np.float64))[None]
        return self.predictor.predict(boxes=shifted, zoom=False), window


# ----------------------------------------------------------------------------- public API
def segment_volume(
    predictor: Any,
    volume: np.ndarray,
    boxes: Sequence[Box3D | Box2D | Sequence[float]],
    *,
    axis: int = 0,
    key_slices: Sequence[int | None] | None = None,
    iou_threshold: float | None = None,
    box_margin: int = 3,
    use_mask_prompt: bool = False,
    cache: EmbeddingCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_cached_slices: int = 32,
    zoom: ZoomPolicy | None = None,
    crop_predictor: Any = None,
) -> VolumeSegmentation:
    """Segment objects in a volume by propagating 2D box prompts from key slices.

    Args:
        predictor: a :class:`medsam.predictor.Predictor` (or an object with its interface:
            ``set_image``, ``set_embedding``, ``embedding``, ``predict``, ``model``, ``contract``).
        volume: ``(Z, Y, X)`` array, or ``(Z, Y, X, 3)`` colour; intensities already normalised to
            uint8 (e.g. by :mod:`medsam.intensity`). Other dtypes are min-max scaled to
            0..255 once over the whole volume, so that every slice sees the same scaling.
        boxes: one prompt per object: :class:`Box3D`, :class:`Box2D`, :class:`KeyBoxes` (one
            object drawn on several key slices), :class:`Clicks2D` (clicks on a key slice: the
            slice is segmented from them and the object walked from that mask's box, the key
            slice keeping the clicks' mask), :class:`Mask2D` (a mask on a key slice, walked from
            its box, the key slice keeping it), or a sequence ``[x0, y0, z0, x1, y1, z1]`` (a
            Box3D). Coordinates are inclusive indices in the
            slicing frame (module docstring): ``z`` along ``axis``, ``x`` along the last remaining
            axis, ``y`` along the other.
        axis: slicing axis in array order (0, 1, 2 or negative); 0 = axial for ``(Z, Y, X)``.
        key_slices: optional per-object key slice (``None`` entries = default). Default for a
            Box3D: the middle slice ``(z0 + z1) // 2``; for a Box2D its ``slice``.
        iou_threshold: a propagated slice whose predicted IoU is below this ends the walk in that
            direction (that slice's mask is discarded). The key slice is always kept. Default
            (None): 0.5 for :class:`Box2D` objects, whose walk has no other end than the
            object's; no IoU stop for :class:`Box3D` objects, whose z-range bounds the walk (as
            the release's 3D inference, which walks to ``z0`` and ``z1``). On the held-out CT
            case a 0.5 stop inside 3D boxes cost 0.045 DSC (``benchmarks/volume_zoom.py``,
            docs/model-card.md); and the released MedSAM checkpoint's IoU head was never
            trained.
        box_margin: pixels added on each side of the neighbouring mask's bounding box.
        use_mask_prompt: also give the neighbouring slice's low-resolution logits as
            ``mask_input``.
        cache: optional on-disk :class:`medsam.embedding_cache.EmbeddingCache`.
        progress: optional ``progress(done, total)`` callback, called after each slice step;
            ``total`` is the number of (object, slice) pairs the boxes allow and ``done`` counts
            those decided so far (segmented or skipped because the walk stopped); the last call
            has ``done == total``.
        max_cached_slices: in-memory LRU size in embeddings (64x64x256 float32 = 4 MiB each for
            the official models).
        zoom: optional :class:`medsam.zoom.ZoomPolicy`: on every slice, a prompt box that the
            policy calls small is segmented as :func:`medsam.zoom.predict_with_zoom` does in
            2D, on a square crop centred on that box (``context`` x its longest side) magnified
            to the network input: at most one extra embedding per such (object, slice); a
            slice whose objects are all small is never embedded whole. Mask prompts
            (``use_mask_prompt``) pass only between two whole-slice predictions of an object.
        crop_predictor: the predictor that embeds the crops (default: a new one on
            ``predictor.model`` with its contract and precision).

    Returns:
        :class:`VolumeSegmentation`; ``labels`` has the input's spatial shape and axis order.

    Algorithm. For every object the key slice is segmented with its 2D box; then the walk goes
    up (increasing slice index) and then down. Each next slice is prompted with the bounding box
    of the previous slice's mask expanded by ``box_margin`` and clipped to the image (for a
    Box3D also to its in-plane extent plus ``box_margin``). A direction stops when the mask is
    empty or the predicted IoU is below the object's IoU threshold (unlike the release, which fell
    back to the middle box on an empty slice), and never leaves a Box3D's ``z0..z1``; a Box2D may
    run to the volume's ends. Where objects overlap, a voxel goes to the object with the highest
    per-pixel score (probability, or logit for the ``sam`` contract), ties to the lower label.

    Embeddings. All objects advance together: one sweep up over the slices in increasing order,
    then one sweep down, and on each slice all objects that need it are decoded in one batched
    call, so a slice is embedded once for all objects. A slice needed in both sweeps (between two
    objects' key slices) is kept in an in-memory LRU of ``max_cached_slices`` embeddings; it is
    embedded exactly once as long as that span fits (otherwise it is read from ``cache`` if
    given, or recomputed). With ``cache`` every computed embedding is also written to disk, and
    a rerun on the same data, model and contract computes none.
    """
    vol = np.asarray(volume)
    colour = vol.ndim == 4 and vol.shape[-1] == 3
    if not (vol.ndim == 3 or colour):
        raise ValueError(f"expected a (Z, Y, X) or (Z, Y, X, 3) volume, got shape {vol.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2 (or negative), got {axis}")
    axis %= 3
    vol = minmax_to_uint8(vol)  # uint8 is kept; one scaling for the whole volume
    frame = np.moveaxis(vol, axis, 0)  # (S, H, W[, 3]); a view
    S, H, W = frame.shape[:3]
    margin = int(box_margin)
    if margin < 0:
        raise ValueError(f"box_margin must be >= 0, got {box_margin}")

    prompts = [as_prompt(b) for b in boxes]
    n_obj = len(prompts)
    if n_obj > np.iinfo(np.uint16).max:
        raise ValueError(f"too many objects ({n_obj}) for a uint16 label map")
    label_dtype = np.uint8 if n_obj <= 255 else np.uint16
    embedder = _SliceEmbedder(predictor, frame, cache, max_cached_slices)
    walked, clicked = resolve_clicks(prompts, lambda k: embedder.activate(k, True), predictor, S, H, W)
    tracks = make_tracks(walked, key_slices, S, H, W, margin, iou_threshold)
    if zoom is not None:
        _check_zoom(zoom)
        if crop_predictor is predictor:
            raise ValueError("crop_predictor must be a second predictor, not the one that holds the slices")
    cropper = None if zoom is None else _CropSegmenter(predictor, frame, cache, zoom, crop_predictor)
    total = sum(t.hi - t.lo + 1 for t in tracks)
    need_scores = n_obj > 1

    def report() -> None:
        if progress is not None:
            progress(sum(t.resolved for t in tracks), total)

    def run_slice(s: int, tasks: Sequence[_Task], keep: bool) -> None:
        """Decode all tasks on slice s and update the tracks: objects on the whole slice in
        batched calls on its embedding (activated here, kept in memory if ``keep``), small boxes
        (with ``zoom``) one by one on their crops. A task's logits are ``(logits, window)``,
        ``window`` None for whole-slice logits."""
        small = [cropper is not None and cropper.wants(t[2]) for t in tasks]
        whole = [
            (tr, d, box, None if lg is None or lg[1] is not None else lg[0])
            for (tr, d, box, lg), z in zip(tasks, small)
            if not z
        ]
        if whole:
            embedder.activate(s, keep)
        elif not keep:
            embedder.lru.pop(s, None)  # all small: the slice's kept embedding is not needed again
        groups = [[t for t in whole if t[3] is None], [t for t in whole if t[3] is not None]]
        for group in groups:
            if not group:
                continue
            kwargs: dict[str, Any] = {"boxes": np.stack([g[2] for g in group])}
            if group[0][3] is not None:
                kwargs["mask_input"] = np.stack([g[3] for g in group if g[3] is not None])  # all of them
            pred = predictor.predict(**kwargs, zoom=False)
            for i, (tr, direction, _box, _) in enumerate(group):
                _handle(tr, direction, s, pred, i, (0, 0), None)
        for (tr, direction, box, _), z in zip(tasks, small):
            if z:
                assert cropper is not None  # only with zoom is a box small
                pred, window = cropper.predict(s, box)
                tr.zoomed = True
                _handle(tr, direction, s, pred, 0, (window[0], window[2]), window)

    def _handle(
        tr: Track, direction: str, s: int, pred: Any, i: int, offset: tuple[int, int], window: ZoomWindow | None
    ) -> None:
        """Record prompt ``i`` of ``pred``, whose masks lie at ``offset`` (row, column) of the
        slice (the corner of the zoom crop ``window``, or (0, 0) and None), and set the
        object's next prompt."""
        mask = np.asarray(pred.masks[i], dtype=bool)
        score = float(np.asarray(pred.scores[i]).reshape(-1)[0])
        tr.resolved += 1
        rows = np.flatnonzero(mask.any(axis=1))
        empty = rows.size == 0
        if direction == "key":
            if empty:
                tr.reasons = ["key_empty", "key_empty"]
                tr.resolved += (tr.hi - tr.lo + 1) - 1
                return
        else:
            side = 0 if direction == "up" else 1
            reason = "empty" if empty else ("low_iou" if score < tr.iou_stops[side] else "")
            if reason:
                tr.reasons[side] = reason
                tr.resolved += (tr.hi - s) if direction == "up" else (s - tr.lo)
                if direction == "up":
                    tr.up = None
                else:
                    tr.down = None
                return
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        crop = mask[y0 : y1 + 1, x0 : x1 + 1].copy()
        score_crop = None
        if need_scores:
            maps = pred.score_maps(i)
            score_crop = np.asarray(maps[0][y0 : y1 + 1, x0 : x1 + 1], dtype=np.float32).copy()
        oy, ox = offset
        y0, y1, x0, x1 = y0 + oy, y1 + oy, x0 + ox, x1 + ox
        tr.kept[s] = (y0, x0, crop, score_crop)
        tr.scores[s] = score
        logits = (np.asarray(pred.low_res_logits[i], dtype=np.float32).copy(), window) if use_mask_prompt else None
        state = (next_box((x0, y0, x1, y1), tr.limit, margin, H, W), logits)
        if direction in ("key", "up"):
            tr.up = state if s < tr.hi else None
            if s >= tr.hi:
                tr.reasons[0] = tr.end_reasons[0]
        if direction in ("key", "down"):  # from the key slice, the down walk starts in the down sweep
            tr.down = state if s > tr.lo else None
            if s <= tr.lo:
                tr.reasons[1] = tr.end_reasons[1]

    report()
    if tracks:
        keys = sorted({t.key for t in tracks})
        # ---- sweep up: key slices and upward walks, in increasing slice order
        by_key: dict[int, list[Track]] = {}
        for t in tracks:
            by_key.setdefault(t.key, []).append(t)
        for s in range(keys[0], S):
            tasks: list[_Task] = [(t, "key", t.key_box, None) for t in by_key.get(s, [])]
            tasks += [(t, "up", t.up[0], t.up[1]) for t in tracks if t.up is not None and t.key < s]
            if not tasks:
                if s > keys[-1]:
                    break
                continue
            # a slice is needed again in the down sweep if an object with a higher key may reach it
            keep = any(t.key > s and t.lo <= s for t in tracks)
            run_slice(s, tasks, keep)
            report()
        # ---- sweep down: downward walks, in decreasing slice order
        for s in range(keys[-1] - 1, -1, -1):
            tasks = [(t, "down", t.down[0], t.down[1]) for t in tracks if t.down is not None and t.key > s]
            if not tasks:
                if not any(t.down is not None for t in tracks):
                    break
                continue
            run_slice(s, tasks, keep=False)
            report()

    # ---- assemble the label map: overlaps go to the highest score
    labels = np.zeros((S, H, W), dtype=label_dtype)
    per_slice: dict[int, list[tuple[int, KeptCrop]]] = {}
    for t in tracks:
        for s, entry in t.kept.items():
            per_slice.setdefault(s, []).append((t.index + 1, entry))
    for s, entries in per_slice.items():
        out = labels[s]
        if len(entries) == 1:
            lab, (y0, x0, crop, _) = entries[0]
            view = out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            view[crop] = lab
            continue
        best = np.full((H, W), -np.inf, dtype=np.float32)
        for lab, (y0, x0, crop, sc) in sorted(entries, key=lambda e: e[0]):
            assert sc is not None  # several objects: their score crops were kept (need_scores)
            sl = (slice(y0, y0 + crop.shape[0]), slice(x0, x0 + crop.shape[1]))
            take = crop & (sc > best[sl])
            out[sl][take] = lab
            best[sl][take] = sc[take]

    for t in tracks:
        t.resolved = t.hi - t.lo + 1
    report()
    for n, (k, mask) in clicked.items():  # a clicked key slice keeps the clicks' mask
        plane = labels[k]
        plane[plane == n + 1] = 0
        plane[mask & (plane == 0)] = n + 1
    walks: list[list[Track]] = [[] for _ in range(n_obj)]  # an object's walks, by key slice
    for t in tracks:
        walks[t.index].append(t)
    kept = [sorted(s for t in w for s in t.kept) for w in walks]
    return VolumeSegmentation(
        labels=np.moveaxis(labels, 0, axis),
        slices=[(k[0], k[-1]) if k else None for k in kept],
        scores=[dict(sorted((s, v) for t in w for s, v in t.scores.items())) for w in walks],
        key_slices=[w[0].key for w in walks],
        stop_reasons=[(w[-1].reasons[0], w[0].reasons[1]) for w in walks],
        embeddings_computed=embedder.computed,
        cache_hits=embedder.cache_hits,
        memory_hits=embedder.memory_hits,
        zoomed=[any(t.zoomed for t in w) for w in walks],
        crop_embeddings_computed=0 if cropper is None else cropper.computed,
        crop_cache_hits=0 if cropper is None else cropper.cache_hits,
    )


def segment_npz_case(
    predictor: Any,
    case: Any,
    *,
    cache: EmbeddingCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    zoom: ZoomPolicy | None = None,
    **volume_options: Any,
) -> np.ndarray:
    """Segment a CVPR 2024 challenge case (:class:`medsam.io.npz.NpzCase`); returns ``segs``.

    * 2D case (``imgs`` (H, W, 3) or (H, W), ``boxes`` (N, 4) ``[x0, y0, x1, y1]``): one
      ``predict`` call with all boxes, combined by :func:`medsam.predictor.masks_to_label_map`
      (overlaps to the highest score).
    * 3D case (``imgs`` (D, H, W), ``boxes`` (N, 6) ``[x0, y0, z0, x1, y1, z1]``):
      :func:`segment_volume` with one :class:`Box3D` per row (axis 0); ``volume_options``
      (``iou_threshold``, ``box_margin``, ``use_mask_prompt``, ...) are passed on.

    ``zoom`` (a :class:`medsam.zoom.ZoomPolicy`) segments small boxes on a magnified crop: in a
    2D case by :func:`medsam.zoom.predict_with_zoom`, in a 3D case as :func:`segment_volume`
    describes.

    Box corners are inclusive indices. Returns uint8 labels with the spatial shape of ``imgs``,
    label ``n + 1`` for ``boxes[n]`` (0 = background). At most 255 boxes.
    """

    boxes = np.asarray(case.boxes)
    n = int(boxes.shape[0]) if boxes.ndim == 2 else 0
    if n > 255:
        raise ValueError(f"{n} boxes do not fit uint8 segs (at most 255)")
    shape = tuple(case.imgs.shape[:3] if case.is_volume else case.imgs.shape[:2])
    if n == 0:
        return np.zeros(shape, dtype=np.uint8)
    if case.is_volume:
        prompts = [Box3D.from_array(b) for b in boxes]
        result = segment_volume(
            predictor, case.imgs, prompts, cache=cache, progress=progress, zoom=zoom, **volume_options
        )
        return result.labels.astype(np.uint8)
    if volume_options:
        raise TypeError(f"options {sorted(volume_options)} apply to 3D cases only")
    imgs = np.asarray(case.imgs)
    H, W = shape
    prompt = []
    for row in boxes:
        x0, y0, x1, y1 = (as_int(v) for v in np.asarray(row, dtype=np.float64))
        check_inplane(x0, y0, x1, y1, H, W, "box")
        prompt.append(prompt_box(x0, y0, x1, y1, H, W))
    if zoom is not None:
        from .zoom import predict_with_zoom, should_zoom

        _check_zoom(zoom)
        if not all(should_zoom(b, (H, W), zoom) for b in prompt):  # some box needs the whole image
            set_image_cached(predictor, imgs, cache)
        zoomed = predict_with_zoom(predictor, imgs, np.stack(prompt), zoom, score_maps=True)
        labels = zoomed.label_map().astype(np.uint8)
    else:
        set_image_cached(predictor, imgs, cache)
        labels = masks_to_label_map(predictor.predict(boxes=np.stack(prompt), zoom=False)).astype(np.uint8)
    if progress is not None:
        progress(n, n)
    return labels


def merge_propagated(
    current: np.ndarray, predicted: np.ndarray, label: int, keys: int | set[int], replace: bool
) -> np.ndarray:
    """Put ``label`` where ``predicted`` is set, slice by slice, except on the key slice(s).

    Voxels of other labels are kept. Without ``replace`` only slices where ``label`` is absent
    are filled; with it, ``label`` is first removed from every other slice the prediction reaches.
    """
    out = current
    protected = {keys} if isinstance(keys, int) else set(keys)
    for s in np.flatnonzero(predicted.reshape(predicted.shape[0], -1).any(axis=1)):
        if s in protected:
            continue
        plane = out[s]
        has = plane == label
        if has.any() and not replace:
            continue
        plane[has] = 0
        plane[(predicted[s] > 0) & (plane == 0)] = label
    return out
