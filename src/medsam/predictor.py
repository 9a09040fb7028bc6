"""Embedding once, prompting many times: the 2D predictor.

    predictor = Predictor(model)
    predictor.set_image(image)                       # (H, W) or (H, W, 3), any dtype
    result = predictor.predict(boxes=[[x0, y0, x1, y1], ...])
    result.masks            # (N, H, W) bool
    result.scores           # (N,) predicted IoU
    result.low_res_logits   # (N, 1, L, L) logits (L = 256 for the official models)

Coordinates are pixels of the input image, x to the right and y down; box corners are inclusive
pixel positions as in MedSAM. All N prompts go through the decoder in one batched call.

Small boxes are segmented on a magnified crop (:mod:`medsam.zoom`) when the model's inference
recipe says so: by default for models with a network input of at most 256 px (LiteMedSAM and the
embedded default), never for the 1024 px ones; ``Predictor(model, zoom=False)`` turns it off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import PromptError as PromptError  # re-exported: predictor.PromptError
from .model.sam import DecoderOutput, MedSAMModel
from .preprocess import Contract, ImageGeometry, model_contract
from .preprocess_fast import prepare_image_fast
from .prompt_checks import CheckedPrompts, check_prompts, multimask_mode
from .zoom import ZoomPolicy, lowest_score, resolve_zoom, should_zoom, zoom_window

# Crop embeddings a predictor keeps for zoomed boxes of its current image.
_CROPS_KEPT = 8


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
        low_res_logits: (N, 1 or M, L, L) float32 logits in the network's low-resolution frame
            of the image the object was decoded on: the whole image, or its crop when zoomed.
        geometry: sizes linking the whole image to the network input.
        windows: (N, 4) int64 ``(y0, y1, x0, x1)`` (exclusive ends) of the crop each object was
            segmented on, a row of -1 where it was segmented on the whole image; None when no
            object was zoomed.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    geometry: ImageGeometry
    contract: Contract = field(repr=False)
    windows: np.ndarray | None = None

    @property
    def zoomed(self) -> np.ndarray:
        """(N,) bool: which objects were segmented on a magnified crop."""
        if self.windows is None:
            return np.zeros(len(self.scores), dtype=bool)
        zoomed: np.ndarray = self.windows[:, 0] >= 0
        return zoomed

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
        ``score_maps(i) > contract.threshold``. Outside a zoomed object's crop the score is the
        lowest possible one (:func:`medsam.zoom.lowest_score`).
        """
        logits = torch.from_numpy(self.low_res_logits[index : index + 1])
        if self.windows is None or self.windows[index, 0] < 0:
            return self.contract.mask_scores(logits, self.geometry)[0].numpy()
        y0, y1, x0, x1 = (int(v) for v in self.windows[index])
        crop = self.contract.mask_scores(logits, self.contract.geometry((y1 - y0, x1 - x0)))[0].numpy()
        full = np.full((crop.shape[0], *self.geometry.original_size), lowest_score(self.contract), dtype=np.float32)
        full[:, y0:y1, x0:x1] = crop
        return full


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
        zoom: segment a box that :func:`medsam.zoom.should_zoom` calls small on a magnified crop
            around it (:mod:`medsam.zoom`; one more embedding per distinct crop, the last
            8 kept). ``"auto"`` (default): the model's recipe, :func:`medsam.zoom.recipe_zoom`
            (on for networks of at most 256 px, such as LiteMedSAM and the embedded default);
            ``True``: the default :class:`~medsam.zoom.ZoomPolicy`; ``False``/``None``: never;
            or a policy. :attr:`zoom` holds the resolved policy (None when off).
        mask_threshold: the threshold on the contract's scores that makes a mask; default: the
            one the model was calibrated to (``model.mask_threshold``, kept in its checkpoint),
            else the contract's standard (0.5 on probabilities, 0 on logits). :attr:`contract`
            holds it (``contract.threshold``).
    """

    def __init__(
        self,
        model: PromptableModel,
        contract: str | None = None,
        precision: str | None = None,
        exact_preprocessing: bool = False,
        zoom: ZoomPolicy | bool | str | None = "auto",
        mask_threshold: float | None = None,
    ) -> None:
        chosen = precision or getattr(model, "preferred_precision", "fp32")
        if chosen not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        model.eval()
        self.model = model
        self.precision = resolve_precision(chosen, self.model.device)
        self.exact_preprocessing = exact_preprocessing
        self.contract = model_contract(model, contract, mask_threshold)
        self.zoom: ZoomPolicy | None = resolve_zoom(zoom, self.contract.input_size)
        self.crop_predictor: Predictor | None = None  # made at the first zoomed box
        self._embedding: torch.Tensor | None = None
        self._geometry: ImageGeometry | None = None
        self._pixels: np.ndarray | None = None  # the current image, for zoomed crops
        self._deferred = False  # set_image(defer=True): embedding not computed yet
        self._crops: OrderedDict[tuple[int, int, int, int], torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None or self._deferred

    @property
    def has_pixels(self) -> bool:
        """Whether the current image's pixels are known (zoomed crops need them)."""
        return self._pixels is not None

    @property
    def embedding(self) -> torch.Tensor:
        """(1, C, E, E) embedding of the current image (computed here after a deferred
        :meth:`set_image`)."""
        if self._deferred:
            assert self._pixels is not None
            self._embed_pixels(self._pixels)
        if self._embedding is None:
            raise RuntimeError("call set_image() first")
        return self._embedding

    @property
    def geometry(self) -> ImageGeometry:
        if self._geometry is None:
            raise RuntimeError("call set_image() first")
        return self._geometry

    def set_image(self, image: np.ndarray, defer: bool = False) -> None:
        """Preprocess ``image`` by the contract and compute its embedding (once).

        ``image`` is kept (by reference, not copied) until the next image, for zoomed crops.
        ``defer``: compute the whole image's embedding only when a prompt needs it (a small box
        that is zoomed does not), at the first :meth:`predict` or :attr:`embedding`.
        """
        image = np.asarray(image)
        self.reset_image()
        self._pixels = image
        if defer:
            self._geometry = self.contract.geometry((int(image.shape[0]), int(image.shape[1])))
            self._deferred = True
        else:
            self._embed_pixels(image)

    @torch.inference_mode()
    def _embed_pixels(self, image: np.ndarray) -> None:
        if self.exact_preprocessing:
            x, geom = self.contract.prepare_image(image)
        else:
            x, geom = prepare_image_fast(self.contract, image)
        self._embedding = self.embed(x)
        self._geometry = geom
        self._deferred = False

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

    def set_embedding(
        self, embedding: torch.Tensor, original_size: tuple[int, int], image: np.ndarray | None = None
    ) -> None:
        """Use a precomputed (1, C, E, E) embedding (e.g. from a cache) for an (H, W) image.

        Without the image's pixels (``image``, kept by reference) boxes are not zoomed.
        """
        self.reset_image()
        self._embedding = embedding.to(self.device)
        height, width = original_size
        self._geometry = self.contract.geometry((height, width))
        if image is not None:
            self.attach_pixels(image)

    def attach_pixels(self, image: np.ndarray) -> None:
        """Give the pixels of the image whose embedding is set (for zoomed crops)."""
        image = np.asarray(image)
        if tuple(image.shape[:2]) != self.geometry.original_size:
            raise ValueError(f"image of {image.shape[:2]} does not match the embedded {self.geometry.original_size}")
        self._pixels = image
        self._crops.clear()

    def reset_image(self) -> None:
        self._embedding = None
        self._geometry = None
        self._pixels = None
        self._deferred = False
        self._crops.clear()

    @torch.inference_mode()
    def predict(
        self,
        boxes: np.ndarray | list[Any] | None = None,
        points: np.ndarray | list[Any] | None = None,
        point_labels: np.ndarray | list[Any] | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool | str = False,
        scribbles: Sequence[Any] | None = None,
        zoom: ZoomPolicy | bool | str | None = None,
    ) -> Prediction:
        """Segment N objects of the current image.

        Args:
            boxes: (N, 4) [x0, y0, x1, y1] in input pixels (a single (4,) box is accepted).
            points: (N, P, 2) (x, y) in input pixels ((P, 2) for a single prompt).
            point_labels: (N, P) 1 = foreground, 0 = background, -1 = padding (not a point).
            mask_input: (N, 1, L, L) low-resolution logits, e.g. a previous ``low_res_logits``,
                read in the frame its object is decoded in (its crop when zoomed: give the same
                box again).
            multimask: return three candidate masks per prompt instead of one (SAM's multimask
                tokens 1..3); ``"all"``: four, the single-mask answer (token 0) first and then the
                three, from one decoder pass.
            scribbles: strokes (:class:`medsam.scribbles.Scribble`): a list of them for one
                object, or N lists (one per object); each is given as the points
                :func:`medsam.scribbles.scribbles_to_points` samples along it, after the object's
                ``points``.
            zoom: this call's zoom setting (as the constructor's); None: :attr:`zoom`. An object
                is zoomed when its box is small by the policy and all its points lie inside the
                box's crop; it needs the image's pixels (:meth:`set_image`, or
                :meth:`set_embedding` with ``image``).
        """
        if scribbles is not None:
            from .scribbles import add_scribble_points

            points, point_labels = add_scribble_points(points, point_labels, scribbles, self.geometry.original_size)
        prompts = self._check_prompts(boxes, points, point_labels, mask_input)
        policy = self.zoom if zoom is None else resolve_zoom(zoom, self.contract.input_size)
        windows = self._zoom_windows(prompts, policy)
        if windows is None:
            return self._predict_whole(prompts, multimask)
        return self._predict_zoomed(prompts, windows, multimask)

    def _predict_whole(self, prompts: CheckedPrompts, multimask: bool | str) -> Prediction:
        geom = self.geometry
        out = self._decode_checked(prompts, multimask)
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

    def _zoom_windows(self, prompts: CheckedPrompts, policy: ZoomPolicy | None) -> np.ndarray | None:
        """(N, 4) crop windows (rows of -1 for whole-image objects), or None when none zooms."""
        if policy is None or prompts.boxes is None or self._pixels is None:
            return None
        size = self.geometry.original_size
        windows = np.full((prompts.n, 4), -1, dtype=np.int64)
        for i, box in enumerate(prompts.boxes):
            if not should_zoom(box, size, policy):
                continue
            y0, y1, x0, x1 = zoom_window(box, size, policy.context, policy.min_side)
            if prompts.points is not None and prompts.labels is not None:
                real = prompts.labels[i] != -1
                xy = prompts.points[i][real]
                if ((xy[:, 0] < x0) | (xy[:, 0] > x1) | (xy[:, 1] < y0) | (xy[:, 1] > y1)).any():
                    continue  # a click outside the crop: the object needs the whole image
            windows[i] = (y0, y1, x0, x1)
        return windows if (windows[:, 0] >= 0).any() else None

    def _predict_zoomed(self, prompts: CheckedPrompts, windows: np.ndarray, multimask: bool | str) -> Prediction:
        """Objects with a window on their crop's embedding, the others in one call on the whole
        image; masks pasted into the image (False outside a crop)."""
        geom = self.geometry
        H, W = geom.original_size
        zoomed = windows[:, 0] >= 0
        masks: np.ndarray | None = None
        scores: np.ndarray | None = None
        logits: np.ndarray | None = None

        def put(index: np.ndarray | int, part: Prediction, window: np.ndarray | None) -> None:
            nonlocal masks, scores, logits
            if masks is None:
                masks = np.zeros((prompts.n, *part.masks.shape[1:-2], H, W), dtype=bool)
                scores = np.zeros((prompts.n, *part.scores.shape[1:]), dtype=part.scores.dtype)
                logits = np.zeros((prompts.n, *part.low_res_logits.shape[1:]), dtype=part.low_res_logits.dtype)
            assert scores is not None and logits is not None
            if window is None:
                masks[index], scores[index], logits[index] = part.masks, part.scores, part.low_res_logits
            else:
                y0, y1, x0, x1 = (int(v) for v in window)
                masks[index, ..., y0:y1, x0:x1] = part.masks[0]
                scores[index], logits[index] = part.scores[0], part.low_res_logits[0]

        if (~zoomed).any():
            whole = np.flatnonzero(~zoomed)
            put(whole, self._predict_whole(prompts.select(whole), multimask), None)
        crops = self._crop_predictor()
        for i in np.flatnonzero(zoomed):
            window = windows[i]
            self._set_crop(crops, window)
            y0, _, x0, _ = (int(v) for v in window)
            part = crops._predict_whole(prompts.select(np.array([i])).shifted(x0, y0), multimask)
            put(int(i), part, window)
        assert masks is not None and scores is not None and logits is not None
        return Prediction(masks, scores, logits, geom, self.contract, windows)

    def _crop_predictor(self) -> Predictor:
        if self.crop_predictor is None:
            self.crop_predictor = self._make_crop_predictor()
        return self.crop_predictor

    def _make_crop_predictor(self) -> Predictor:
        """A predictor for zoomed crops: the same model, contract and precision, never zooming."""
        return Predictor(
            self.model,
            contract=self.contract.name,
            precision=self.precision,
            exact_preprocessing=self.exact_preprocessing,
            zoom=False,
            mask_threshold=self.contract.threshold,
        )

    def _set_crop(self, crops: Predictor, window: np.ndarray) -> None:
        """Put the embedding of ``window`` of the current image into ``crops`` (kept per window)."""
        assert self._pixels is not None
        key = (int(window[0]), int(window[1]), int(window[2]), int(window[3]))
        y0, y1, x0, x1 = key
        embedding = self._crops.get(key)
        if embedding is None:
            crops.set_image(np.ascontiguousarray(self._pixels[y0:y1, x0:x1]))
            self._crops[key] = crops.embedding
            while len(self._crops) > _CROPS_KEPT:
                self._crops.popitem(last=False)
        else:
            self._crops.move_to_end(key)
            crops.set_embedding(embedding, (y1 - y0, x1 - x0))

    @torch.inference_mode()
    def decode(
        self,
        boxes: np.ndarray | list[Any] | None = None,
        points: np.ndarray | list[Any] | None = None,
        point_labels: np.ndarray | list[Any] | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool | str = False,
    ) -> DecoderOutput:
        """The decoder's raw answer to N prompts on the whole image (never zoomed), nothing
        upsampled: ``logits`` (N, M, L, L) in the network's low-resolution frame and ``iou``
        (N, M), as tensors on the model's device.

        Prompts are given and checked as in :meth:`predict`; ``contract.mask_scores(logits,
        geometry)`` turns the logits into full-resolution scores. For callers that look at many
        candidates and upsample only the ones they keep (:mod:`medsam.automatic`).
        """
        return self._decode_checked(self._check_prompts(boxes, points, point_labels, mask_input), multimask)

    def _decode_checked(self, prompts: CheckedPrompts, multimask: bool | str) -> DecoderOutput:
        all_masks = multimask_mode(multimask)
        three = bool(multimask) and not all_masks
        box_t, pts_t, mask_t = self._prompts_to_tensors(prompts)
        return self.model.decode(
            self.embedding,
            boxes=box_t,
            points=pts_t,
            mask_input=mask_t,
            multimask_output=three,
            all_masks=all_masks,
        )

    # ---------------------------------------------------------------- checks
    def _check_prompts(
        self,
        boxes: np.ndarray | list[Any] | None,
        points: np.ndarray | list[Any] | None,
        point_labels: np.ndarray | list[Any] | None,
        mask_input: np.ndarray | None,
    ) -> CheckedPrompts:
        return check_prompts(
            boxes, points, point_labels, mask_input, self.geometry.original_size, self.model.mask_input_size
        )

    def _prompts_to_tensors(
        self, prompts: CheckedPrompts
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """Boxes (N, 4), (points (N, P, 2), labels (N, P)) and mask_input (N, 1, L, L) as tensors
        on the model's device, in the network input frame; None where not given."""
        geom = self.geometry
        dev = self.device
        box_t = pts_t = mask_t = None
        if prompts.boxes is not None:
            box_t = torch.as_tensor(self.contract.transform_boxes(prompts.boxes, geom), dtype=torch.float32, device=dev)
        if prompts.points is not None and prompts.labels is not None:
            pts_t = (
                torch.as_tensor(self.contract.transform_coords(prompts.points, geom), dtype=torch.float32, device=dev),
                torch.as_tensor(np.ascontiguousarray(prompts.labels), dtype=torch.int64, device=dev),
            )
        if prompts.mask_input is not None:
            mask_t = torch.as_tensor(np.ascontiguousarray(prompts.mask_input), device=dev)
        return box_t, pts_t, mask_t
