"""Corrective clicks placed where a mask is most wrong, as an annotator (or a simulated one) does.

The rule (the interactive-segmentation benchmarks' and ``benchmarks/simulated_annotator.py``'s):
among the missed region (object pixels outside the mask) and the false region (mask pixels outside
the object), click the pixel deepest inside either (largest Euclidean distance to its border, the
image border counting as outside): a positive click in a missed region, a negative one in a false
region. Training with ``data.click_source: errors`` places its clicks by the same rule on the
model's own predictions, so the click sequences it learns from are the ones it will be given.

Coordinates are pixel indices, x to the right and y down.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .error_regions import deepest_error


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int] | None:
    """(x, y, label) of the next corrective click for an (H, W) bool prediction against the (H, W)
    bool ground truth, label 1 (positive) or 0 (negative), at the deepest error pixel
    (:func:`deepest_error`); None when the mask is perfect."""
    error = deepest_error(pred, gt)
    if error is None:
        return None
    _, (y, x), missed = error
    return x, y, int(missed)


def add_error_clicks(
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: dict,
    target: torch.Tensor,
    rounds: int,
    strokes: bool = False,
) -> dict:
    """``rounds`` corrective clicks (or strokes) from the model's own errors, for training.

    Each round runs ``forward(**inputs)`` without gradients on the prompts so far, thresholds its
    (B, 1, L, L) low-resolution logits at 0, compares them with ``target`` ((B, 1, S, S), the
    object in the network input frame; resized to L x L by nearest neighbour when L != S) and
    appends one click per sample by :func:`next_click`, mapped to the input frame (pixel centres
    scaled by S / L). A sample whose prediction is already perfect gets a padding point (label
    -1, SAM's "not a point"). Returns a copy of ``inputs`` whose ``points`` (B, P + rounds, 2)
    and ``point_labels`` (B, P + rounds) carry the clicks after any points it had.

    With ``strokes`` each round is instead a corrective scribble
    (:func:`medsam.scribbles.next_scribble`) given as the points
    :func:`medsam.scribbles.sample_stroke` takes along it (spacing in network input pixels): up to
    :data:`~medsam.scribbles.DEFAULT_MAX_POINTS` (w) points per round, padded with label -1, so
    ``points`` grows by ``rounds * w``.
    """
    from .scribbles import DEFAULT_MAX_POINTS, DEFAULT_SPACING, next_scribble, sample_stroke

    width = DEFAULT_MAX_POINTS if strokes else 1
    inputs = dict(inputs)
    S = target.shape[-1]
    gt_full = target.bool()
    for _ in range(rounds):
        with torch.no_grad():
            logits, _ = forward(**inputs)
        L = logits.shape[-1]
        gt = gt_full if L == S else F.interpolate(gt_full.float(), size=(L, L), mode="nearest-exact").bool()
        pred = (logits.detach().float() > 0).cpu().numpy()[:, 0]
        truth = gt.cpu().numpy()[:, 0]
        coords = np.zeros((len(pred), width, 2), dtype=np.float32)
        labels = np.full((len(pred), width), -1, dtype=np.int64)
        for i in range(len(pred)):
            if strokes:
                stroke = next_scribble(pred[i], truth[i])
                if stroke is not None:
                    pts = sample_stroke(stroke.vertices, DEFAULT_SPACING * L / S, width)
                    coords[i, : len(pts)] = (pts + 0.5) * S / L - 0.5
                    labels[i, : len(pts)] = 1 if stroke.positive else 0
                continue
            click = next_click(pred[i], truth[i])
            if click is not None:
                x, y, label = click
                coords[i, 0] = ((x + 0.5) * S / L - 0.5, (y + 0.5) * S / L - 0.5)
                labels[i, 0] = label
        device = logits.device
        pts = torch.from_numpy(coords).to(device)
        labs = torch.from_numpy(labels).to(device)
        if inputs.get("points") is not None:
            pts = torch.cat([inputs["points"], pts.to(inputs["points"].dtype)], dim=1)
            labs = torch.cat([inputs["point_labels"], labs.to(inputs["point_labels"].dtype)], dim=1)
        inputs["points"], inputs["point_labels"] = pts, labs
    return inputs
