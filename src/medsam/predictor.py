"""Embedding once, prompting many times: the 2D predictor.

    predictor = Predictor(model)
    predictor.set_image(image)                       # (H, W) or (H, W, 3), any dtype
    result = predictor.predict(boxes=[[x0, y0, x1, y1], ...])
    result.masks            # (N, H, W) bool
    result.scores           # (N,) predicted IoU
    result.low_res_logits   # (N, 1, L, L) logits (L = 256 for the official models)

Coordinates are pixels of the input image, x to the right and y down; box corners are inclusive
pixel positions as in MedSAM. All N prompts go through the decoder in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import PromptError
from .model.sam import DecoderOutput, MedSAMModel
from .preprocess import Contract, ImageGeometry, get_contract
from .preprocess_fast import prepare_image_fast


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU with AVX512-BF16 or AMX tiles."""
    if torch.device(device).type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"`` for a requested precision (``"auto"``: bf16 where native)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@dataclass
class Prediction:
    """Masks for N prompts.

    Attributes:
        masks: (N, H, W) bool, or (N, M, H, W) when ``multimask`` was requested (M = 3, or 4
            for ``multimask="all"``).
        scores: (N,) predicted IoU, or (N, M).
        low_res_logits: (N, 1 or M, L, L) float32 logits in the network's low-resolution frame.
        geometry: sizes linking the image to the network input.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    geometry: ImageGeometry
    contract: Contract = field(repr=False)

    def best(self) -> np.ndarray:
        """(N, H, W) masks: the highest-scoring candidate when multimask, else the masks."""
        if self.masks.ndim == 3:
            return self.masks
        idx = self.scores.argmax(axis=1)
        best: np.ndarray = self.masks[np.arange(len(idx)), idx]
        return best

    def score_maps(self, index: int) -> np.ndarray:
        """Full-resolution per-pixel scores of prompt ``index``: (M, H, W) float32.

        Probabilities for the ``medsam``/``lite`` contracts, logits for ``sam``; the mask is
        ``score_maps(i) > contract.threshold``.
        """
        logits = torch.from_numpy(self.low_res_logits[index : index + 1])
        return self.contract.mask_scores(logits, self.geometry)[0].numpy()


def masks_to_label_map(prediction: Prediction) -> np.ndarray:
    """Combine N objects into one (H, W) label map with labels 1..N (0 = background).

    A pixel inside several masks goes to the object with the highest score (probability or logit)
    there, not to the last prompt. With multimask predictions the best mask per prompt is used.
    Memory stays O(H * W): objects are processed one at a time.
    """
    H, W = prediction.geometry.original_size
    labels = np.zeros((H, W), dtype=np.uint16 if len(prediction.scores) > 255 else np.uint8)
    best_score = np.full((H, W), -np.inf, dtype=np.float32)
    threshold = prediction.contract.threshold
    multi = prediction.masks.ndim == 4
    for i in range(len(prediction.scores)):
        maps = prediction.score_maps(i)
        score = maps[int(prediction.scores[i].argmax())] if multi else maps[0]
        take = (score > threshold) & (score > best_score)
        labels[take] = i + 1
        best_score[take] = score[take]
    return labels


class PromptableModel(Protocol):
    """What :class:`Predictor` needs of a model: :class:`medsam.model.MedSAMModel` (SAM, MedSAM,
    LiteMedSAM) and :class:`medsam.model.sam2.SAM2Model` (SAM2, SAM2.1, MedSAM2) in PyTorch, or
    :class:`medsam.export.runtime.OnnxModel` for an ONNX export run by onnxruntime.

    ``embed_image``: (B, 3, S, S) preprocessed images -> (B, C, E, E) embeddings (C = 256, or the
    1024 channels of SAM2's packed features); ``decode``: prompts in network-input coordinates ->
    :class:`~medsam.model.sam.DecoderOutput`, as :meth:`MedSAMModel.decode`.
    """

    contract: str

    @property
    def input_size(self) -> int: ...

    @property
    def mask_input_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def eval(self) -> Any: ...

    def embed_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        all_masks: bool = False,
    ) -> DecoderOutput: ...


class Predictor:
    """Holds one image embedding and answers prompts on it.

    Args:
        model: a loaded :class:`MedSAMModel` (or any :class:`PromptableModel`).
        contract: override the model's preprocessing contract by name.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``; default: the model's
            ``preferred_precision`` (``"auto"`` for the embedded default model, ``"fp32"`` for
            every checkpoint loaded by name). ``"bf16"`` runs the image encoder in bfloat16: a
            TinyViT encoder on the CPU through a bfloat16 copy of its weights
            (:meth:`MedSAMModel.encoder_in`), anything else under autocast. ``"auto"`` is
            ``"bf16"`` on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), else
            ``"fp32"``. The decoder always runs in fp32; the embedding is returned as fp32;
            :attr:`precision` holds the resolved value.
        exact_preprocessing: prepare images with the contract's reference code
            (:meth:`Contract.prepare_image`, scikit-image's resize for ``medsam``) instead of
            :func:`medsam.preprocess_fast.prepare_image_fast`, which equals it up to a rare
            one-grey-level rounding difference and is 10-40x faster once its per-size operators
            are built (~0.3 s at the first image of each size). Embedding caches
            (:mod:`medsam.embedding_cache`) do not tell the two apart.
    """

    def __init__(
        self,
        model: PromptableModel,
        contract: str | None = None,
        precision: str | None = None,
        exact_preprocessing: bool = False,
    ) -> None:
        chosen = precision or getattr(model, "preferred_precision", "fp32")
        if chosen not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        model.eval()
        self.model = model
        self.precision = resolve_precision(chosen, self.model.device)
        self.exact_preprocessing = exact_preprocessing
        self.contract = get_contract(contract or model.contract, model.input_size)
        self._embedding: torch.Tensor | None = None
        self._geometry: ImageGeometry | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def embedding(self) -> torch.Tensor:
        """(1, C, E, E) embedding of the current image."""
        if self._embedding is None:
            raise RuntimeError("call set_image() first")
        return self._embedding

    @property
    def geometry(self) -> ImageGeometry:
        if self._geometry is None:
            raise RuntimeError("call set_image() first")
        return self._geometry

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Preprocess ``image`` by the contract and compute its embedding (once)."""
        if self.exact_preprocessing:
            x, geom = self.contract.prepare_image(image)
        else:
            x, geom = prepare_image_fast(self.contract, image)
        self._embedding = self.embed(x)
        self._geometry = geom

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, C, E, E) fp32 embeddings, at this precision."""
        x = x.to(self.device)
        model = self.model
        if (
            self.precision == "bf16"
            and self.device.type == "cpu"
            and isinstance(model, MedSAMModel)
            and model.config.encoder == "tiny_vit"
        ):
            # The TinyViT's tiled CPU path in bfloat16 (autocast would take the plain forward).
            embedding: torch.Tensor = model.encoder_in(torch.bfloat16)(x.to(torch.bfloat16))
            return embedding.float()
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                return self.model.embed_image(x).float()
        return self.model.embed_image(x)

    def set_embedding(self, embedding: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Use a precomputed (1, C, E, E) embedding (e.g. from a cache) for an (H, W) image."""
        self._embedding = embedding.to(self.device)
        height, width = original_size
        self._geometry = self.contract.geometry((height, width))

    def reset_image(self) -> None:
        self._embedding = None
        self._geometry = None

    @torch.inference_mode()
    def predict(
        self,
        boxes: np.ndarray | list[Any] | None = None,
        points: np.ndarray | list[Any] | None = None,
        point_labels: np.ndarray | list[Any] | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool | str = False,
        scribbles: Sequence[Any] | None = None,
    ) -> Prediction:
        """Segment N objects of the current image.

        Args:
            boxes: (N, 4) [x0, y0, x1, y1] in input pixels (a single (4,) box is accepted).
            points: (N, P, 2) (x, y) in input pixels ((P, 2) for a single prompt).
            point_labels: (N, P) 1 = foreground, 0 = background, -1 = padding (not a point).
            mask_input: (N, 1, L, L) low-resolution logits, e.g. a previous ``low_res_logits``.
            multimask: return three candidate masks per prompt instead of one (SAM's multimask
                tokens 1..3); ``"all"``: four, the single-mask answer (token 0) first and then the
                three, from one decoder pass.
            scribbles: strokes (:class:`medsam.scribbles.Scribble`): a list of them for one
                object, or N lists (one per object); each is given as the points
                :func:`medsam.scribbles.scribbles_to_points` samples along it, after the object's
                ``points``.
        """
        if scribbles is not None:
            from .scribbles import add_scribble_points

            points, point_labels = add_scribble_points(points, point_labels, scribbles, self.geometry.original_size)
        geom = self.geometry
        out = self.decode(boxes, points, point_labels, mask_input, multimask)
        logits = out.logits.float()
        n = len(logits)
        masks = np.empty((n, logits.shape[1], *geom.original_size), dtype=bool)
        # Upsample a few prompts at a time so memory stays bounded for large images.
        chunk = max(1, int(64e6 // (logits.shape[1] * geom.original_size[0] * geom.original_size[1] * 4)))
        for i in range(0, n, chunk):
            # Upsampled and thresholded where the logits are (a GPU does it in microseconds);
            # only the boolean masks travel to the host.
            scores = self.contract.mask_scores(logits[i : i + chunk], geom)
            masks[i : i + chunk] = (scores > self.contract.threshold).cpu().numpy()
        iou = out.iou.float().cpu().numpy()
        if not multimask:
            masks, iou = masks[:, 0], iou[:, 0]
        limit = getattr(self.model, "low_res_logit_limit", None)  # SAM2: as its image predictor
        if limit is not None:
            logits = logits.clamp(-limit, limit)
        return Prediction(masks, iou, logits.cpu().numpy(), geom, self.contract)

    @torch.inference_mode()
    def decode(
        self,
        boxes: np.ndarray | list[Any] | None = None,
        points: np.ndarray | list[Any] | None = None,
        point_labels: np.ndarray | list[Any] | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool | str = False,
    ) -> DecoderOutput:
        """The decoder's raw answer to N prompts, nothing upsampled: ``logits`` (N, M, L, L) in
        the network's low-resolution frame and ``iou`` (N, M), as tensors on the model's device.

        Prompts are given and checked as in :meth:`predict`; ``contract.mask_scores(logits,
        geometry)`` turns the logits into full-resolution scores. For callers that look at many
        candidates and upsample only the ones they keep (:mod:`medsam.automatic`).
        """
        all_masks = multimask_mode(multimask)
        three = bool(multimask) and not all_masks
        _, box_t, pts_t, mask_t = self._prompts_to_tensors(boxes, points, point_labels, mask_input)
        return self.model.decode(
            self.embedding,
            boxes=box_t,
            points=pts_t,
            mask_input=mask_t,
            multimask_output=three,
            all_masks=all_masks,
        )

    # ---------------------------------------------------------------- checks
    def _prompts_to_tensors(
        self,
        boxes: np.ndarray | list[Any] | None,
        points: np.ndarray | list[Any] | None,
        point_labels: np.ndarray | list[Any] | None,
        mask_input: np.ndarray | None,
    ) -> tuple[int, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """Checked prompts as tensors on the model's device, each expanded to the N objects:
        (N, boxes (N, 4), (points (N, P, 2), labels (N, P)), mask_input (N, 1, L, L)), in the
        network input frame; ``None`` where that kind of prompt was not given."""
        geom = self.geometry
        H, W = geom.original_size
        counts: list[int] = []
        box_t: torch.Tensor | None = None
        pts_t: tuple[torch.Tensor, torch.Tensor] | None = None
        mask_t: torch.Tensor | None = None
        dev = self.device
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64)
            if b.ndim == 1:
                b = b[None]
            if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
                raise PromptError(f"boxes must have shape (N, 4), got {np.asarray(boxes).shape}")
            validate_boxes(b, (H, W))
            counts.append(len(b))
            box_t = torch.as_tensor(self.contract.transform_boxes(b, geom), dtype=torch.float32, device=dev)
        if points is not None:
            p = np.asarray(points, dtype=np.float64)
            if p.ndim == 2:
                p = p[None]
            if point_labels is None:
                raise PromptError("point_labels are required with points (1 = foreground, 0 = background)")
            lab = np.asarray(point_labels)
            if lab.ndim == 1:
                lab = lab[None]
            if p.ndim != 3 or p.shape[2] != 2 or lab.shape != p.shape[:2]:
                raise PromptError(f"points must be (N, P, 2) with labels (N, P); got {p.shape} and {lab.shape}")
            if not np.isfinite(p).all():
                raise PromptError("points contain NaN or infinite values")
            if (p[..., 0] < 0).any() or (p[..., 0] > W).any() or (p[..., 1] < 0).any() or (p[..., 1] > H).any():
                raise PromptError(f"a point lies outside the {W}x{H} image")
            if not np.isin(lab, (-1, 0, 1)).all():
                raise PromptError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
            if boxes is None and mask_input is None and (lab == -1).all(axis=1).any():
                raise PromptError("a prompt has only padding points (label -1) and no box or mask")
            counts.append(len(p))
            pts_t = (
                torch.as_tensor(self.contract.transform_coords(p, geom), dtype=torch.float32, device=dev),
                torch.as_tensor(lab, dtype=torch.int64, device=dev),
            )
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            L = self.model.mask_input_size
            if m.ndim == 2:  # (L, L): one prompt
                m = m[None, None]
            elif m.ndim == 3:  # (N, L, L)
                m = m[:, None]
            if m.ndim != 4 or m.shape[1:] != (1, L, L):
                raise PromptError(f"mask_input must be (N, 1, {L}, {L}) logits, got {np.asarray(mask_input).shape}")
            if not np.isfinite(m).all():
                raise PromptError("mask_input contains NaN or infinite values")
            counts.append(len(m))
            mask_t = torch.as_tensor(m, device=dev)
        if not counts:
            raise PromptError("give at least one prompt: boxes, points or mask_input")
        n = max(counts)
        if any(c not in (1, n) for c in counts):
            raise PromptError(f"prompt counts do not match: {counts}")
        if box_t is not None and len(box_t) != n:
            box_t = box_t.expand(n, -1)
        if pts_t is not None and len(pts_t[0]) != n:
            pts_t = (pts_t[0].expand(n, -1, -1), pts_t[1].expand(n, -1))
        if mask_t is not None and len(mask_t) != n:
            mask_t = mask_t.expand(n, -1, -1, -1)
        return n, box_t, pts_t, mask_t


def multimask_mode(multimask: object) -> bool:
    """Whether ``multimask`` asks for all four masks ("all"); other strings are refused, any
    other value counts by its truth (True, np.True_, 1: the three alternatives)."""
    if isinstance(multimask, str):
        if multimask != "all":
            raise ValueError(f"multimask must be True, False or 'all', got {multimask!r}")
        return True
    return False


def validate_boxes(boxes: np.ndarray, size: tuple[int, int]) -> None:
    """Check (N, 4) boxes [x0, y0, x1, y1] against an image of (H, W); raise PromptError.

    Corners are inclusive pixel positions; a corner may also sit on the far edge (x = W, y = H)
    for users who give exclusive ends.
    """
    H, W = size
    if not np.isfinite(boxes).all():
        raise PromptError("boxes contain NaN or infinite values")
    for x0, y0, x1, y1 in boxes:
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty: need x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the image (width {W}, height {H})")


def clip_boxes(boxes: np.ndarray, size: tuple[int, int], inclusive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) boxes [x0, y0, x1, y1] to an (H, W) image, as a drawn box that crosses the
    image edge is meant: returns ``(clipped boxes, (N,) bool: which ones changed)``.

    Corners are clipped to ``[0, W]`` x ``[0, H]`` (the far edge allowed, as in
    :func:`validate_boxes`), or with ``inclusive`` to the pixel indices ``[0, W - 1]`` x
    ``[0, H - 1]`` (a volume's boxes, :mod:`medsam.volume`, where ``x1 == x0`` is one pixel).
    Raises :class:`PromptError` for NaN or infinite values and for a box that is empty, or lies
    wholly outside the image.
    """
    H, W = size
    far_x, far_y = (W - 1, H - 1) if inclusive else (W, H)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise PromptError("boxes contain NaN or infinite values")
    clipped = b.copy()
    clipped[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, far_x)
    clipped[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, far_y)
    for original, (x0, y0, x1, y1) in zip(b, clipped):
        ox0, oy0, ox1, oy1 = original
        outside = ox0 > far_x or oy0 > far_y or ox1 < 0 or oy1 < 0
        empty = (x1 < x0 or y1 < y0) if inclusive else (x1 <= x0 or y1 <= y0)
        if outside or empty:
            where = "lies outside the image" if (ox1 > ox0 and oy1 > oy0) else "is empty"
            need = "x1 >= x0 and y1 >= y0" if inclusive else "x1 > x0 and y1 > y0"
            raise PromptError(
                f"box [{', '.join(f'{v:g}' for v in original)}] {where} (width {W}, height {H}): need {need} inside it"
            )
    return clipped, (clipped != b).any(axis=1)
