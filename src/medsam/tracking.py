"""Volumes segmented by a SAM2-family model (SAM2, SAM2.1, MedSAM2): memory tracking through the slices.

:func:`track_volume` takes the same volumes and prompts as :func:`medsam.volume.segment_volume`
(:class:`~medsam.volume.Box3D`, :class:`~medsam.volume.Box2D`, the same axis conventions) and
returns the same :class:`~medsam.volume.VolumeSegmentation`, but each object is followed as
MedSAM2's 3D inference follows it: its box on the key slice starts a track, which is propagated
with SAM2's memory (:mod:`medsam.model.sam2_tracking`) towards the last slice, and a second track
started from the same box is propagated towards the first slice. A Box3D's tracks stop at its
z-range, which they treat as the whole video (its length sets the object pointers' distance
scale; MedSAM2's script tracks whatever sub-volume file it is given); a Box2D's run to the
volume's ends. Each slice is run through the image encoder once per direction for all objects
(key slices once). MedSAM2's script also runs under bf16 autocast on its GPU and keeps the
largest connected component of the result; neither is done here (fp32, masks as tracked).

An object boxed on several key slices (:class:`~medsam.volume.KeyBoxes`: a correction, or a
slice drawn again) is prompted on each of them, each decoded on its own as SAM2's video predictor
decodes prompts given on several frames before propagating; as that predictor does, both
directions start at the lowest prompted slice (forward to the end, passing over the other
prompted slices, which keep their own masks; backward to the start), and every tracked slice
attends to the memories of all prompted slices and to the pointers of those behind it.

A voxel goes to the object with the highest mask logit above 0 (ties to the lower label).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PromptError
from .intensity import minmax_to_uint8
from .model.sam2 import SAM2Model
from .model.sam2_tracking import FrameFeatures, FrameOutput, SAM2Tracker, Track, frame_features
from .preprocess import model_contract
from .volume import Box2D, Box3D, Clicks2D, KeyBoxes, KeyMasks, Mask2D, VolumeSegmentation
from .volume_prompts import as_prompt, make_tracks

__all__ = ["track_volume"]


@torch.inference_mode()
def track_volume(
    model: SAM2Model,
    volume: np.ndarray,
    boxes: Sequence[Box3D | Box2D | Sequence[float]],
    *,
    axis: int = 0,
    key_slices: Sequence[int | None] | None = None,
    contract: str | None = None,
    fill_hole_area: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeSegmentation:
    """Segment one object per box in ``volume`` ((Z, Y, X) or (Z, Y, X, 3); non-uint8 data
    min-max scaled to 0-255 once, so window CT first) by SAM2 memory tracking (module docstring).

    ``boxes`` may hold :class:`~medsam.volume.KeyBoxes` (one object on several key slices) and
    :class:`~medsam.volume.Clicks2D` (clicks, with or without a box, on one key slice; one
    foreground click gives the best of SAM2's three masks, as its video predictor does) and
    :class:`~medsam.volume.Mask2D` (a mask on one key slice, taken as that slice's result) or
    :class:`~medsam.volume.KeyMasks` (masks on several key slices of one object).
    ``scores`` hold, per kept slice, the predicted IoU of the mask SAM2 chose; ``stop_reasons``
    are ``"box_end"`` / ``"volume_end"``, or ``"key_empty"`` when the masks of every prompted
    slice are empty; ``key_slices`` name each object's lowest prompted slice.
    ``fill_hole_area``: background holes of at most this many low-resolution pixels are filled
    (SAM2's video predictor's setting is 8; 0 turns it off).
    """
    vol = np.asarray(volume)
    if not (vol.ndim == 3 or (vol.ndim == 4 and vol.shape[-1] == 3)):
        raise ValueError(f"expected a (Z, Y, X) or (Z, Y, X, 3) volume, got shape {vol.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2 (or negative), got {axis}")
    frames = np.moveaxis(minmax_to_uint8(vol), axis % 3, 0)
    S, H, W = frames.shape[:3]
    prompts = [as_prompt(b) for b in boxes]
    plans = _object_plans(prompts, key_slices, S, H, W)
    the_contract = model_contract(model, contract)
    geometry = the_contract.geometry((H, W))
    tracker = SAM2Tracker(model, fill_hole_area=fill_hole_area)
    device = model.device

    computed = 0

    def features(k: int) -> FrameFeatures:
        nonlocal computed
        x, _ = the_contract.prepare_image(frames[k])
        computed += 1
        return frame_features(model, x.to(device))

    n = len(plans)
    logits: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
    scores: list[dict[int, float]] = [{} for _ in range(n)]
    total = sum(p.hi - p.lo + 1 for p in plans)
    done = 0
    key_features = {k: features(k) for k in sorted({k for p in plans for k in p.keys})}
    # Frame numbers within each object's slice range [lo, hi] (a Box3D's range is the volume
    # MedSAM2's script would be given: the pointers' distance scale depends on its length).
    starts: list[dict[bool, Track]] = []
    for i, plan in enumerate(plans):
        prompted: dict[int, FrameOutput] = {}
        for k, spec in plan.keys.items():  # each prompted slice decoded on its own
            if isinstance(spec, np.ndarray):  # a mask, resized to the network input as SAM2's predictor does
                mask = torch.as_tensor(spec, dtype=torch.float32, device=device)[None, None]
                S_in = model.input_size
                mask = F.interpolate(mask, size=(S_in, S_in), mode="bilinear", align_corners=False, antialias=True)
                prompted[k - plan.lo] = tracker.prompt_mask(
                    key_features[k], (mask >= 0.5).float(), k - plan.lo
                ).key_output
            else:
                points, point_labels = spec
                coords = torch.as_tensor(the_contract.transform_coords(points, geometry)[None], dtype=torch.float32)
                labels = torch.as_tensor(point_labels[None], device=device)
                track = tracker.prompt(key_features[k], coords.to(device), labels, k - plan.lo)
                prompted[k - plan.lo] = track.key_output
            logits[i][k] = prompted[k - plan.lo].low_res
            scores[i][k] = prompted[k - plan.lo].iou
            done += 1
        first = min(prompted)  # SAM2's video predictor starts both directions at the first one
        conditioning = prompted if len(prompted) > 1 else {}
        forward = Track(key=first, reverse=False, key_output=prompted[first], conditioning=conditioning)
        backward = Track(key=first, reverse=True, key_output=prompted[first], conditioning=conditioning)
        starts.append({False: forward, True: backward})
    if progress is not None:
        progress(done, total)
    for reverse in (False, True):
        order = range(S - 1, -1, -1) if reverse else range(S)
        for k in order:
            active = [
                i
                for i, p in enumerate(plans)
                if k not in p.keys and (p.lo <= k < p.key if reverse else p.key < k <= p.hi)
            ]
            if not active:
                continue
            feats = key_features[k] if k in key_features else features(k)
            for i in active:
                plan = plans[i]
                out = tracker.step(starts[i][reverse], k - plan.lo, feats, plan.hi - plan.lo + 1)
                logits[i][k] = out.low_res
                scores[i][k] = out.iou
                done += 1
            if progress is not None:
                progress(done, total)
    return _assemble(plans, logits, scores, the_contract, geometry, (S, H, W), axis % 3, computed)


@dataclass(frozen=True)
class _ObjectPlan:
    """One object: its prompted slices (slice -> (points (P, 2), labels (P,)) in image pixels as
    SAM encodes them, box corners labelled 2 and 3; or an (H, W) bool mask; in prompting order),
    its slice range."""

    keys: Mapping[int, tuple[np.ndarray, np.ndarray] | np.ndarray]
    lo: int
    hi: int
    end_reasons: tuple[str, str]

    @property
    def key(self) -> int:
        return min(self.keys)


def _object_plans(
    prompts: Sequence[Any], key_slices: Sequence[int | None] | None, S: int, H: int, W: int
) -> list[_ObjectPlan]:
    if key_slices is not None and len(key_slices) != len(prompts):
        raise PromptError(f"key_slices has {len(key_slices)} entries for {len(prompts)} boxes")

    def corners(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(box, dtype=np.float64).reshape(2, 2), np.array([2, 3])

    plans = []
    for n, p in enumerate(prompts):
        if isinstance(p, (Mask2D, KeyMasks)):
            shown = [p] if isinstance(p, Mask2D) else [Mask2D(m, k) for m, k in zip(p.masks, p.slices)]
            for m in shown:
                m.check(S, H, W, f"object {n}")
            plans.append(_ObjectPlan({m.slice: m.mask for m in shown}, 0, S - 1, ("volume_end", "volume_end")))
            continue
        if isinstance(p, Clicks2D):
            wanted = None if key_slices is None else key_slices[n]
            if wanted is not None and int(wanted) != p.slice:
                raise PromptError(f"box {n}: key_slices[{n}]={wanted} contradicts Clicks2D.slice={p.slice}")
            p.check(S, H, W, f"object {n}")
            plans.append(_ObjectPlan({p.slice: p.network_points(H, W)}, 0, S - 1, ("volume_end", "volume_end")))
            continue
        override = None if key_slices is None else [key_slices[n]]
        walks = make_tracks([p], override, S, H, W, 0, None)
        if isinstance(p, KeyBoxes):  # the walks are one per key slice, in slice order
            keys = {w.key: corners(w.key_box) for w in walks}
            plans.append(_ObjectPlan(keys, 0, S - 1, ("volume_end", "volume_end")))
        else:
            (w,) = walks
            plans.append(_ObjectPlan({w.key: corners(w.key_box)}, w.lo, w.hi, w.end_reasons))
    return plans


def _assemble(
    plans: Sequence[Any],
    logits: list[dict[int, torch.Tensor]],
    scores: list[dict[int, float]],
    contract: Any,
    geometry: Any,
    shape: tuple[int, int, int],
    axis: int,
    computed: int,
) -> VolumeSegmentation:
    S, H, W = shape
    n = len(plans)
    label_dtype = np.uint8 if n <= 255 else np.uint16
    labels = np.zeros((S, H, W), dtype=label_dtype)
    best = np.zeros((S, H, W), dtype=np.float32)
    slices: list[tuple[int, int] | None] = []
    kept_scores: list[dict[int, float]] = []
    reasons: list[tuple[str, str]] = []
    for i, plan in enumerate(plans):
        maps = {k: contract.mask_scores(low, geometry)[0, 0].cpu().numpy() for k, low in logits[i].items()}
        if not any((maps[k] > contract.threshold).any() for k in plan.keys):  # nothing where prompted
            slices.append(None)
            reasons.append(("key_empty", "key_empty"))
            kept_scores.append({})
            continue
        kept: dict[int, float] = {}
        for k, score_map in sorted(maps.items()):
            mask = score_map > contract.threshold
            if not mask.any():
                continue
            kept[k] = scores[i][k]
            win = mask & ((labels[k] == 0) | (score_map > best[k]))
            labels[k][win] = i + 1
            best[k][win] = score_map[win]
        slices.append((min(kept), max(kept)))
        reasons.append(plan.end_reasons)
        kept_scores.append(kept)
    return VolumeSegmentation(
        labels=np.moveaxis(labels, 0, axis),
        slices=slices,
        scores=kept_scores,
        key_slices=[p.key for p in plans],
        stop_reasons=reasons,
        embeddings_computed=computed,
    )
