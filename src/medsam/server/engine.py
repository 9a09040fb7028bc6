"""``SegmentationEngine``: the model behind the workbench, and what the routes ask of it.

One :class:`medsam.predictor.Predictor` serves every interactive request; a lock serialises its
use (one model, one set of weights in memory). Propagation runs on a predictor of its own over
the same model, without that lock, so prompts are answered meanwhile. Slice embeddings come from, in this order:

1. an in-memory LRU (``embeddings_in_memory`` entries, keyed like the disk cache);
2. the on-disk :class:`medsam.embedding_cache.EmbeddingCache` in ``DATA/.medsam/cache`` (keys
   are signatures of slice bytes, image-encoder weights, contract and package version, so a
   restarted server reuses them and never uses a stale one);
3. the image encoder (counted in :attr:`SegmentationEngine.encoder_calls`), whose result is
   stored in both.

Propagation uses :func:`medsam.volume.segment_volume` with the same disk cache and the same
slice arrays (the datastore's uint8 model input), so warmed slices are reused there too.

The served model can be replaced (:meth:`SegmentationEngine.switch_model`, used when a training
job finishes or a model is selected). Embeddings are keyed by the *encoder*'s fingerprint and precision
(:func:`medsam.embedding_cache.embedding_id`), so after a decoder-only fine-tune every
cached embedding (memory and disk) stays valid, and after a change of the encoder none of them is
ever looked up again. :meth:`SegmentationEngine.fingerprint` (the whole model) still identifies
the model for provenance and active-learning scores.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cpu_threads import adapt as adapt_threads
from ..embedding_cache import EmbeddingCache, embedding_id, model_fingerprint, slice_key
from ..io.checksum import sha256_file
from .datastore import LoadedImage
from .encoder_service import RemoteEncoder

__all__ = ["PromptRefused", "SegmentOutcome", "SegmentationEngine"]

_MAX_HANDLES = 128
_CROPS_IN_MEMORY = 8  # embeddings of zoomed crops kept (memory only)


class PromptRefused(ValueError):
    """A prompt the model cannot take (outside the slice, empty, unknown logits handle)."""


@dataclass
class SegmentOutcome:
    mask: np.ndarray  # (H, W) bool
    score: float
    handle: str
    source: str  # "memory" | "disk" | "computed"
    elapsed_ms: float
    window: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) of a zoomed crop
    # the decoder's three multimask proposals when asked: ((H, W) bool, predicted IoU)
    candidates: list[tuple[np.ndarray, float]] = field(default_factory=list)


class SegmentationEngine:
    """The model, its embeddings and the prompt -> mask calls (see the module docstring).

    Args:
        model: a loaded :class:`medsam.model.sam.MedSAMModel`, or a zero-argument callable that
            loads one (called on first use, so creating the app does no work).
        cache_dir: folder of the on-disk embedding cache.
        checkpoint: the checkpoint file the model was loaded from, for provenance (its sha256 is
            computed once, lazily).
        embeddings_in_memory: size of the in-memory embedding LRU.
        remote_encoder: an encoder service that computes the embeddings this engine's own
            encoder would (:mod:`medsam.server.encoder_service`); None: the model's encoder.
    """

    def __init__(
        self,
        model: Any,
        cache_dir: Path,
        checkpoint: Path | None = None,
        embeddings_in_memory: int = 64,
        remote_encoder: RemoteEncoder | None = None,
    ) -> None:
        self._model_or_loader = model
        self.remote_encoder = remote_encoder
        self._model = model if isinstance(model, torch.nn.Module) else None
        self.cache = EmbeddingCache(cache_dir)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.capacity = max(1, int(embeddings_in_memory))
        self.lock = threading.RLock()
        self._predictor = None
        self._current_key: str | None = None
        self._lru: OrderedDict[str, Any] = OrderedDict()
        self._crop_lru: OrderedDict[str, Any] = OrderedDict()  # zoomed crops' embeddings
        # handle -> (image id, slice, low-res logits (1, 1, L, L), crop window or None)
        self._handles: OrderedDict[str, tuple[str, int, np.ndarray, tuple | None]] = OrderedDict()
        self._model_info: dict | None = None
        self.encoder_calls = 0
        self.cache_hits = 0
        self.memory_hits = 0

    # ------------------------------------------------------------------ model
    @property
    def predictor(self):
        with self.lock:
            if self._predictor is None:
                from ..predictor import Predictor

                if self._model is None:
                    self._model = self._model_or_loader()
                self._predictor = Predictor(self._model, zoom=False)
            return self._predictor

    @property
    def model(self):
        return self.predictor.model

    def model_info(self) -> dict:
        """Name, checkpoint path and sha256, weight fingerprint, contract (for provenance) of the
        model served now (computed once per model, under :attr:`lock`, so a model switch in
        between cannot leave the previous model's description behind)."""
        with self.lock:
            if self._model_info is None:
                model = self.model
                ckpt = self.checkpoint
                self._model_info = {
                    "name": getattr(getattr(model, "config", None), "name", type(model).__name__),
                    "contract": self.predictor.contract.name,
                    "checkpoint": str(ckpt) if ckpt else None,
                    "checkpoint_sha256": sha256_file(ckpt) if ckpt and ckpt.is_file() else None,
                    "fingerprint": model_fingerprint(model),
                    "untrained_default": bool(getattr(model, "is_untrained_default", False)),
                }
            return dict(self._model_info)

    def fingerprint(self) -> str:
        """SHA-256 of the whole served model's weights (provenance, active-learning scores)."""
        return model_fingerprint(self.model)

    def embedding_fingerprint(self) -> str:
        """What embeddings are keyed by: the image encoder (see the module docstring)."""
        return embedding_id(self.predictor)

    def switch_model(self, model: Any, checkpoint: Path | None) -> None:
        """Serve ``model`` (a loaded model, put in eval mode) from now on.

        Done under :attr:`lock`, so a request runs wholly with the old or the new model. The
        embedding LRU is kept (its keys name the encoder, so entries of another encoder are
        simply never hit); the logits handles are dropped, since they came from the previous
        decoder. ``checkpoint`` is the file the model was loaded from (provenance).
        """
        from ..predictor import Predictor

        with self.lock:
            self._model_or_loader = model
            self._model = model
            self._predictor = Predictor(model, zoom=False)
            self._current_key = None
            self._handles.clear()
            self.checkpoint = Path(checkpoint) if checkpoint else None
            self._model_info = None

    # ------------------------------------------------------------------ embeddings
    def key_of(self, loaded: LoadedImage, index: int) -> str:
        pred = self.predictor
        return slice_key(self.embedding_fingerprint(), pred.contract, loaded.model_slice(index))

    def cached_slices(self, loaded: LoadedImage) -> int:
        """How many slices of ``loaded`` have an embedding in the disk cache."""
        fp = self.embedding_fingerprint()
        contract = self.predictor.contract
        return sum(slice_key(fp, contract, loaded.model_slice(k)) in self.cache for k in range(loaded.n_slices))

    def _activate(
        self, loaded: LoadedImage, index: int, remember: bool = True, window: tuple[int, int, int, int] | None = None
    ) -> str:
        """Make the predictor hold slice ``index``'s embedding, or that of its crop ``window``
        (y0, y1, x0, x1) for a zoomed prompt; returns where it came from. Call with :attr:`lock`
        held. Crops (one per box, rarely seen again once the object is done) are kept in a small
        in-memory LRU of their own, never on disk and never displacing warmed slices."""
        pred = self.predictor
        image = loaded.model_slice(index)
        if window is not None:
            y0, y1, x0, x1 = window
            image = np.ascontiguousarray(image[y0:y1, x0:x1])
        key = slice_key(self.embedding_fingerprint(), pred.contract, image)
        size = tuple(image.shape[:2])
        if key == self._current_key and pred.is_image_set:
            self.memory_hits += 1
            return "memory"
        lru, capacity = (self._lru, self.capacity) if window is None else (self._crop_lru, _CROPS_IN_MEMORY)
        emb = lru.get(key)
        if emb is not None:
            lru.move_to_end(key)
            pred.set_embedding(emb, size)
            self.memory_hits += 1
            source = "memory"
        else:
            emb = self.cache.get(key) if window is None else None
            if emb is not None:
                pred.set_embedding(emb, size)
                self.cache_hits += 1
                source = "disk"
            else:
                if self.remote_encoder is None:
                    pred.set_image(image)
                else:
                    pred.set_embedding(self._remote_embedding(image), size)
                self.encoder_calls += 1
                if window is None:
                    self.cache.put(
                        key,
                        pred.embedding,
                        {
                            "model": self.embedding_fingerprint(),
                            "contract": pred.contract.name,
                            "input_size": pred.contract.input_size,
                            "shape": str(list(image.shape)),
                        },
                    )
                source = "computed"
            if remember:
                lru[key] = pred.embedding
                while len(lru) > capacity:
                    lru.popitem(last=False)
        self._current_key = key
        return source

    def _remote_embedding(self, image: np.ndarray) -> torch.Tensor:
        """``image``'s embedding from the encoder service, checked to be this model's encoder's."""
        from .encoder_service import EncoderServiceError, check_servable

        assert self.remote_encoder is not None
        try:
            check_servable(self.model)
        except ValueError as exc:
            raise EncoderServiceError(str(exc)) from None
        return self.remote_encoder.encode(image, self.embedding_fingerprint())

    def warm(
        self,
        loaded: LoadedImage,
        slices: list[int],
        progress: Callable[[int, int], None],
        cancelled: Callable[[], bool],
    ) -> dict:
        """Embed ``slices`` into the disk cache (the lock is released between slices, so
        interactive requests interleave). Returns counts by source."""
        counts = {"computed": 0, "disk": 0, "memory": 0}
        for n, k in enumerate(slices):
            if cancelled():
                break
            adapt_threads(background=True)
            with self.lock:
                key = slice_key(self.embedding_fingerprint(), self.predictor.contract, loaded.model_slice(k))
                if key in self.cache:
                    counts["disk"] += 1
                else:
                    counts[self._activate(loaded, k, remember=False)] += 1
            progress(n + 1, len(slices))
        return counts

    # ------------------------------------------------------------------ prompts
    def segment(
        self,
        loaded: LoadedImage,
        index: int,
        box: tuple[float, float, float, float] | None,
        points: list[tuple[float, float, bool]],
        previous: str | None,
        scribbles: Sequence[tuple[Sequence[tuple[float, float]], bool]] = (),
        zoom: bool = False,
        candidates: bool = False,
    ) -> SegmentOutcome:
        """One mask for the prompts on slice ``index``; raises :class:`PromptRefused`.

        ``scribbles``: strokes as (vertices [(x, y), ...], positive), given as points along them.
        ``zoom``: a box that :func:`medsam.zoom.should_zoom` calls small (default
        :class:`~medsam.zoom.ZoomPolicy`) is segmented on its crop, every prompt shifted into it
        and the mask pasted back, unless a point or stroke lies outside the crop (then on the
        whole slice); a ``previous`` handle is used as mask prompt only in the frame (crop or
        whole slice) it came from. ``candidates``: also the decoder's three multimask proposals
        (the same decoder pass).
        """
        from ..prompt_checks import PromptError, validate_boxes
        from ..scribbles import Scribble
        from ..zoom import ZoomPolicy, should_zoom, zoom_window

        t0 = time.perf_counter()
        loaded.check_slice(index)
        entry = None
        if previous is not None:
            entry = self._handles.get(previous)
            if entry is None:
                raise PromptRefused("unknown or expired logits handle; segment again without 'previous'")
            if entry[0] != loaded.image_id or entry[1] != index:
                raise PromptRefused("the logits handle belongs to another image or slice")
        if box is None and not points and not scribbles and entry is None:
            raise PromptRefused("give a box, points, scribbles or a previous logits handle")
        try:
            strokes = [Scribble(np.asarray(v, dtype=np.float64), bool(pos)) for v, pos in scribbles]
        except PromptError as exc:
            raise PromptRefused(str(exc)) from None
        size = tuple(loaded.model_slice(index).shape[:2])
        if box is not None:  # checked against the whole slice, before any crop
            try:
                validate_boxes(np.asarray([box], dtype=np.float64), size)
            except PromptError as exc:
                raise PromptRefused(str(exc)) from None
        window = None
        if zoom and box is not None:
            policy = ZoomPolicy()
            if should_zoom(box, size, policy):
                window = zoom_window(box, size, policy.context, policy.min_side)
                y0, y1, x0, x1 = window
                xy = [(x, y) for x, y, _ in points] + [tuple(v) for s in strokes for v in s.vertices]
                if any(not (x0 <= x < x1 and y0 <= y < y1) for x, y in xy):  # exclusive ends
                    window = None
        oy, ox = (window[0], window[2]) if window is not None else (0, 0)
        kwargs: dict[str, Any] = {}
        if box is not None:
            kwargs["boxes"] = np.asarray([box], dtype=np.float64) - [ox, oy, ox, oy]
        if points:
            kwargs["points"] = np.asarray([[(x - ox, y - oy) for x, y, _ in points]], dtype=np.float64)
            kwargs["point_labels"] = np.asarray([[1 if pos else 0 for _, _, pos in points]])
        if strokes:
            kwargs["scribbles"] = [Scribble(s.vertices - [ox, oy], s.positive) for s in strokes]
        if entry is not None and entry[3] == window:
            kwargs["mask_input"] = entry[2]
        if not kwargs:  # only a handle, from a zoomed crop: nothing to prompt the whole slice with
            raise PromptRefused("the logits handle belongs to a zoomed crop; send its box again")
        adapt_threads()  # the thread count follows the load (medsam.cpu_threads)
        with self.lock:
            source = self._activate(loaded, index, window=window)
            try:
                # with candidates, token 0 and the three alternatives from one decoder pass
                pred = self.predictor.predict(**kwargs, multimask="all" if candidates else False)
            except PromptError as exc:
                raise PromptRefused(str(exc)) from None

        def whole(m: np.ndarray) -> np.ndarray:
            if window is None:
                return np.asarray(m, dtype=bool)
            out = np.zeros(size, dtype=bool)
            out[window[0] : window[1], window[2] : window[3]] = m
            return out

        main, score = (pred.masks[0, 0], pred.scores[0, 0]) if candidates else (pred.masks[0], pred.scores[0])
        proposals = []
        if candidates:
            proposals = [(whole(m), float(sc)) for m, sc in zip(pred.masks[0, 1:], pred.scores[0, 1:])]
        handle = secrets.token_urlsafe(12)
        with self.lock:
            self._handles[handle] = (loaded.image_id, int(index), pred.low_res_logits[0:1, :1].copy(), window)
            while len(self._handles) > _MAX_HANDLES:
                self._handles.popitem(last=False)
        elapsed = (time.perf_counter() - t0) * 1e3
        return SegmentOutcome(whole(main), float(score), handle, source, elapsed, window, proposals)

    def propagate(
        self,
        loaded: LoadedImage,
        keys: dict[int, tuple[int, int, int, int]],
        iou_threshold: float,
        box_margin: int,
        progress: Callable[[int, int], None],
        masks: dict[int, np.ndarray] | None = None,
    ):
        """:func:`medsam.volume.segment_volume` from 2D boxes on key slices (``keys``: slice -> box;
        several keys make one :class:`medsam.volume.KeyBoxes` object); for a SAM2-family model
        :func:`medsam.tracking.track_volume`, memory tracking, from the key slices' ``masks``
        themselves when given (:class:`~medsam.volume.Mask2D` / :class:`~medsam.volume.KeyMasks`,
        SAM2's mask prompt), else from the boxes; returns its result
        and the :meth:`model_info` of the model that made it (for provenance: the served model may
        change while the volume propagates).

        It runs on a predictor of its own over the model served when it starts, without holding
        :attr:`lock`, so interactive prompts are answered while a volume propagates (the two share
        the cores; PyTorch inference is safe from two threads, and the CPU fast paths give a
        concurrent call private scratch buffers). Embeddings go through the same disk cache,
        whose writes are atomic.
        """
        from ..model.sam2 import SAM2Model
        from ..volume import Box2D, KeyBoxes, KeyMasks, Mask2D

        boxes = {int(k): tuple(int(v) for v in b) for k, b in keys.items()}
        prompt: Box2D | KeyBoxes | Mask2D | KeyMasks
        if masks and isinstance(self.model, SAM2Model):  # SAM2 starts from the accepted masks themselves
            chosen = {int(k): masks[k] for k in sorted(masks)}
            if len(chosen) == 1:
                ((key, mask),) = chosen.items()
                prompt = Mask2D(mask, key)
            else:
                prompt = KeyMasks(tuple(chosen.values()), tuple(chosen))
        elif len(boxes) == 1:
            ((key, (x0, y0, x1, y1)),) = boxes.items()
            prompt = Box2D(x0, y0, x1, y1, slice=key)
        else:
            prompt = KeyBoxes(tuple(boxes.values()), tuple(boxes))  # type: ignore[arg-type]
        return self.segment_object(loaded, prompt, iou_threshold, box_margin, progress)

    def segment_object(
        self,
        loaded: LoadedImage,
        prompt: Any,
        iou_threshold: float,
        box_margin: int,
        progress: Callable[[int, int], None],
    ):
        """One object through the volume from ``prompt`` (a :class:`medsam.volume.Box2D`,
        :class:`~medsam.volume.KeyBoxes`, :class:`~medsam.volume.Clicks2D` or
        :class:`~medsam.volume.Box3D`), as :meth:`propagate` describes (memory tracking for a
        SAM2-family model and all but a Box3D); returns the
        :class:`medsam.volume.VolumeSegmentation` and the :meth:`model_info` of the model used."""
        from ..model.sam2 import SAM2Model
        from ..predictor import Predictor
        from ..volume import Box2D, Clicks2D, KeyBoxes, KeyMasks, Mask2D, segment_volume

        with self.lock:
            served = self.predictor
            info = self.model_info()
        adapt_threads(background=True)  # this job's thread leaves a core to interactive prompts
        if isinstance(prompt, KeyMasks) and not isinstance(served.model, SAM2Model):
            # the served model changed since the prompt was made: its masks' boxes, as KeyBoxes
            boxes = [np.flatnonzero(m.any(axis=0))[[0, -1]].tolist() for m in prompt.masks]
            rows = [np.flatnonzero(m.any(axis=1))[[0, -1]].tolist() for m in prompt.masks]
            prompt = KeyBoxes(tuple((c[0], r[0], c[1], r[1]) for c, r in zip(boxes, rows)), prompt.slices)
        if isinstance(served.model, SAM2Model) and isinstance(prompt, (Box2D, KeyBoxes, Clicks2D, Mask2D, KeyMasks)):
            # memory tracking (the IoU stop and margin are the v1 walk's)
            from ..tracking import track_volume

            result = track_volume(served.model, loaded.model_input, [prompt], progress=progress)
        else:
            result = segment_volume(
                Predictor(served.model, zoom=False),
                loaded.model_input,
                [prompt],
                iou_threshold=iou_threshold,
                box_margin=box_margin,
                cache=self.cache,
                progress=progress,
            )
        with self.lock:
            self.encoder_calls += result.embeddings_computed
            self.cache_hits += result.cache_hits
        return result, info

    def automatic(
        self, picture: np.ndarray, options: Any, progress: Callable[[int, int], None] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """:func:`medsam.automatic.generate_masks` on one slice's model input, on a predictor of its
        own over the served model (as :meth:`propagate`, without holding :attr:`lock`); returns the
        objects and the :meth:`model_info` of the model that found them."""
        from ..automatic import crop_boxes, generate_masks
        from ..predictor import Predictor

        with self.lock:
            served = self.predictor
            info = self.model_info()
        adapt_threads(background=True)
        predictor = Predictor(served.model, precision=served.precision, zoom=False)
        found = generate_masks(predictor, picture, options, progress)
        with self.lock:
            self.encoder_calls += len(crop_boxes(picture.shape[:2], options.crop_n_layers, options.crop_overlap_ratio))
        return found, info

    def uncertainty(self, loaded: LoadedImage, jitters: int = 8, fraction: float = 0.1) -> dict:
        """Box-jitter disagreement on the central slice (the active-learning score).

        The prompt is the central box covering the middle half of the slice (x and y from 1/4
        to 3/4). It and ``jitters`` copies whose corners are moved by up to ``fraction`` of the
        box size (seeded by the image id, so scores are reproducible) are decoded in one batch.
        ``agreement`` is the mean IoU of each mask with the pixel-wise majority mask (two empty
        masks agree fully); ``uncertainty = 1 - agreement``; ``predicted_iou`` is the model's
        IoU estimate for the unjittered box.
        """
        k = loaded.n_slices // 2
        H, W = loaded.model_slice(k).shape[:2]
        base = np.array([W * 0.25, H * 0.25, W * 0.75 - 1, H * 0.75 - 1], dtype=np.float64)
        seed = int.from_bytes(hashlib.sha256(loaded.image_id.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        size = np.array([base[2] - base[0], base[3] - base[1]] * 2)
        jit = base[None] + rng.uniform(-fraction, fraction, size=(jitters, 4)) * size[None]
        boxes = np.concatenate([base[None], jit])
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, W - 1)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, H - 1)
        boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
        boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
        with self.lock:
            self._activate(loaded, k)
            pred = self.predictor.predict(boxes=boxes)
        masks = np.asarray(pred.masks, dtype=bool)
        consensus = masks.mean(axis=0) > 0.5
        ious = []
        for m in masks:
            union = np.logical_or(m, consensus).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(m, consensus).sum() / union))
        agreement = float(np.mean(ious))
        return {
            "slice_index": int(k),
            "agreement": agreement,
            "uncertainty": 1.0 - agreement,
            "predicted_iou": float(pred.scores[0]),
        }

    def stats(self) -> dict:
        return {"encoder_calls": self.encoder_calls, "cache_hits": self.cache_hits, "memory_hits": self.memory_hits}
