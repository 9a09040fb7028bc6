"""SAM2's tracking step: one object on one frame, conditioned on the memories of earlier frames.

This is the inference of SAM2's video predictor (``sam2==1.1.0``, ``SAM2VideoPredictor`` with
``build_sam2_video_predictor``'s settings) for one object in one direction, written for
:class:`medsam.model.sam2.SAM2Model`:

* the **prompted frame** (the key slice) is decoded from its own features plus ``no_mem_embed``,
  as an image; one mask for a box (with the stability fallback), the best of three for a single
  click; its memory is made from the binarised mask (x 20 - 10);
* every **further frame** attends (:class:`~medsam.model.sam2_memory.MemoryAttention`) to the
  prompted frame's memory (temporal slot 0; with several prompted frames, all of theirs), the
  memories of the 6 frames tracked just before it (slots 1-6, the nearest last) and the object
  pointers of the prompted frame(s) behind it and of up to 15 tracked frames before it (SAM2.1:
  each with a sine encoding of its signed frame distance; SAM2: without temporal encoding); the
  decoder then runs without prompts and keeps the best of its three masks; the frame's memory is
  made from that mask's sigmoid (x 20 - 10);
* where the object-score head says the object is absent the mask logits are -1024, the object
  pointer is ``no_obj_ptr`` and (SAM2.1) ``no_obj_embed_spatial`` is added to the memory;
* memories are kept rounded to bfloat16, as the reference stores them; small background holes
  (``fill_hole_area`` pixels of the low-resolution mask, 8-connected) are filled (0.1) in the
  output masks and so in the prompted frame's memory, which is made from its output mask, but
  not in the memories of tracked frames (made from the decoder's mask before filling).

Frame features (:class:`FrameFeatures`) are computed once per frame and shared by all objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .fpn_neck import sine_position_encoding
from .sam2 import PROMPT_DIM, SAM2Model

NO_OBJECT_SCORE = -1024.0
MAX_OBJECT_POINTERS = 16
MEMORY_SCALE, MEMORY_BIAS = 20.0, -10.0


@dataclass
class FrameFeatures:
    """One frame's features: the lowest-resolution map (1, 256, E, E) without ``no_mem_embed``,
    its sine position encoding (1, 256, E, E) and the projected high-resolution maps."""

    pix: torch.Tensor
    pos: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]


@dataclass
class HeadOutput:
    """What SAM2's heads give for one object on one frame, as tensors (differentiable where the
    tracker runs with gradients, as fine-tuning does).

    ``masks``: (1, K, 4E, 4E) logits of the K candidate masks (three for a frame without prompts
    or with one click, else one), -1024 where the object-score head says the object is absent;
    ``ious``: (1, K) their predicted IoU; ``object_logit``: (1, 1); ``best``: the index of the
    chosen mask (the highest predicted IoU among several); ``pointer``: (1, 256) the object pointer.
    """

    masks: torch.Tensor
    ious: torch.Tensor
    object_logit: torch.Tensor
    best: int
    pointer: torch.Tensor

    @property
    def low_res(self) -> torch.Tensor:
        return self.masks[:, self.best : self.best + 1]


# A frame's correction: given ``decode(coords, labels, previous)`` (the heads again on the
# frame's features, with clicks ``coords`` (1, P, 2) / ``labels`` (1, P) added to the frame's own
# prompt and ``previous``'s chosen logits, clamped to +-32, as the dense prompt) and the first decoding, it returns
# the decodings after each corrective click, in order (fine-tuning's simulated corrections).
Decode = Callable[[torch.Tensor, torch.Tensor, "HeadOutput"], "HeadOutput"]
Corrector = Callable[[Decode, "HeadOutput"], "list[HeadOutput]"]


@dataclass
class FrameOutput:
    """One object on one frame: low-resolution logits (1, 1, 4E, 4E) (holes filled), the chosen
    mask's predicted IoU, the object score, the object pointer (1, 256), the memory and, where
    the decoder ran, its :class:`HeadOutput` (before hole filling) and those of any corrections
    (``corrections``; the frame's output is then the last one's)."""

    low_res: torch.Tensor
    iou: float
    object_score: float
    pointer: torch.Tensor
    memory: torch.Tensor | None = None
    memory_pos: torch.Tensor | None = None
    heads: HeadOutput | None = None
    corrections: list[HeadOutput] = field(default_factory=list)


@dataclass
class Track:
    """One object tracked in one direction from its prompted frame ``key``: the outputs of the
    last 16 tracked frames (the next step reads at most 15 back).

    ``conditioning``: every prompted frame of the object (frame -> its output, in the order the
    prompts were given), when there are several; empty means ``{key: key_output}``. Each is a
    memory of slot 0 for every tracked frame, and a pointer where it lies behind the frame (as
    SAM2's video predictor conditions on all prompted frames); a tracking pass passes over them.
    """

    key: int
    reverse: bool
    key_output: FrameOutput
    outputs: dict[int, FrameOutput] = field(default_factory=dict)
    conditioning: dict[int, FrameOutput] = field(default_factory=dict)

    @property
    def prompted(self) -> dict[int, FrameOutput]:
        return self.conditioning or {self.key: self.key_output}


def frame_features(model: SAM2Model, image: torch.Tensor) -> FrameFeatures:
    """(1, 3, S, S) preprocessed frame -> its :class:`FrameFeatures`."""
    pix, feat_s1, feat_s0 = model.image_features(image)
    return FrameFeatures(pix, sine_position_encoding(pix, PROMPT_DIM).to(pix.dtype), (feat_s0, feat_s1))


def _sine_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(P,) positions -> (P, dim): sines of the first half, cosines of the second."""
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    angles = positions.unsqueeze(-1) / dim_t
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def fill_holes(low_res: torch.Tensor, max_area: int) -> torch.Tensor:
    """Background components (logit <= 0, 8-connected) of at most ``max_area`` pixels -> 0.1."""
    if max_area <= 0:
        return low_res
    from scipy import ndimage

    out = low_res.clone()
    for index in np.ndindex(*low_res.shape[:-2]):
        background = (low_res[index] <= 0).cpu().numpy()
        labels, count = ndimage.label(background, structure=np.ones((3, 3), bool))
        if not count:
            continue
        areas = np.bincount(labels.ravel())
        small = (areas <= max_area) & (np.arange(len(areas)) > 0)
        holes = torch.from_numpy(small[labels]).to(low_res.device)
        out[index] = torch.where(holes, torch.tensor(0.1, dtype=out.dtype, device=out.device), out[index])
    return out


class SAM2Tracker:
    """Tracking steps of one :class:`SAM2Model` (see the module docstring)."""

    def __init__(self, model: SAM2Model, fill_hole_area: int = 8) -> None:
        self.model = model
        self.fill_hole_area = int(fill_hole_area)
        self.signed_pointer_distance = model.config.version == "2.1"
        self.pointer_distance_encoding = model.config.version == "2.1"

    # ---------------------------------------------------------------- the heads
    def _heads(
        self,
        pix: torch.Tensor,
        features: FrameFeatures,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask: bool,
        mask_input: torch.Tensor | None = None,
    ) -> HeadOutput:
        """SAM2's heads on memory-conditioned features ``pix`` (``mask_input``: a (1, 1, 4E, 4E)
        dense mask prompt)."""
        model = self.model
        encoder, decoder = model.sam_prompt_encoder, model.sam_mask_decoder
        if coords is None or labels is None:  # no prompt: one padding point
            coords = pix.new_zeros(1, 1, 2)
            labels = torch.full((1, 1), -1, dtype=torch.int64, device=pix.device)
        sparse, dense = encoder(points=(coords, labels), boxes=None, masks=mask_input)
        masks, iou, tokens, obj = decoder.predict_all(pix, encoder.get_dense_pe(), sparse, dense, features.high_res)
        masks, iou, tokens = decoder.choose(masks, iou, tokens, multimask)
        present = obj > 0
        masks = torch.where(present[:, :, None, None], masks, NO_OBJECT_SCORE).float()
        best = int(iou[0].argmax()) if multimask else 0
        pointer = model.obj_ptr_proj(tokens[:, best])
        weight = present.float()
        pointer = weight * pointer + (1 - weight) * model.no_obj_ptr
        return HeadOutput(masks, iou, obj, best, pointer)

    def _upsampled(self, low_res: torch.Tensor) -> torch.Tensor:
        """(1, 1, 4E, 4E) -> (1, 1, S, S) logits at the network's input size (bilinear)."""
        S = self.model.input_size
        return F.interpolate(low_res, size=(S, S), mode="bilinear", align_corners=False)

    def _memory(
        self, features: FrameFeatures, high_res: torch.Tensor, object_score: float, binarize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        mask = (high_res > 0).float() if binarize else torch.sigmoid(high_res)
        mask = mask * MEMORY_SCALE + MEMORY_BIAS
        memory, pos = model.memory_encoder(features.pix, mask, skip_mask_sigmoid=True)
        if model.config.version == "2.1" and object_score <= 0:
            memory = memory + model.no_obj_embed_spatial[..., None, None]
        return memory.to(torch.bfloat16).float(), pos

    # ---------------------------------------------------------------- frames
    def prompt(
        self,
        features: FrameFeatures,
        coords: torch.Tensor,
        labels: torch.Tensor,
        key: int,
        reverse: bool = False,
        corrector: Corrector | None = None,
    ) -> Track:
        """Start a track on its prompted frame ``key``: ``coords`` (1, P, 2) in network-input
        pixels with ``labels`` (1, P) (1/0 clicks, 2/3 box corners). The prompted frame's output
        does not depend on the direction: a track the other way may share it
        (``Track(key, not reverse, track.key_output)``). ``corrector``: see :data:`Corrector`."""
        pix = features.pix + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        heads = self._heads(pix, features, coords, labels, labels.shape[1] <= 1)
        corrections = self._corrected(pix, features, coords, labels, heads, corrector)
        out = self._output(features, heads, corrections, binarize=True, memory_after_filling=True)
        return Track(key=key, reverse=reverse, key_output=out)

    def _output(
        self,
        features: FrameFeatures,
        heads: HeadOutput,
        corrections: list[HeadOutput],
        binarize: bool,
        memory_after_filling: bool,
    ) -> FrameOutput:
        """A decoded frame's output from its last decoding: holes filled, and its memory made
        from the mask (binarised or its sigmoid; with the holes filled or before, as SAM2 makes
        a prompted or a tracked frame's)."""
        final = corrections[-1] if corrections else heads
        iou, score = float(final.ious[0, final.best].detach()), float(final.object_logit[0, 0].detach())
        low = fill_holes(final.low_res, self.fill_hole_area)
        high = self._upsampled(low if memory_after_filling else final.low_res)
        memory, memory_pos = self._memory(features, high, score, binarize)
        return FrameOutput(low, iou, score, final.pointer, memory, memory_pos, heads, corrections)

    def _corrected(
        self,
        pix: torch.Tensor,
        features: FrameFeatures,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        heads: HeadOutput,
        corrector: Corrector | None,
    ) -> list[HeadOutput]:
        """The decodings after each of ``corrector``'s clicks (none without one)."""
        if corrector is None:
            return []

        def decode(more: torch.Tensor, more_labels: torch.Tensor, previous: HeadOutput) -> HeadOutput:
            all_coords = more if coords is None else torch.cat([coords, more], dim=1)
            all_labels = more_labels if labels is None else torch.cat([labels, more_labels], dim=1)
            multimask = all_labels.shape[1] <= 1
            limit = self.model.low_res_logit_limit  # as SAM2's predictor hands logits back (-1024 absent)
            dense = previous.low_res.clamp(-limit, limit)
            return self._heads(pix, features, all_coords, all_labels, multimask, dense)

        return corrector(decode, heads)

    def prompt_mask(self, features: FrameFeatures, mask: torch.Tensor, key: int) -> Track:
        """Start a track from a mask drawn on frame ``key``: ``mask`` (1, 1, S, S) of 0 / 1 at the
        network's input size. As SAM2 does with a mask prompt, the mask itself is the frame's
        output (logits +10 / -10, the low-resolution map by an anti-aliased downsampling), its
        object score +10 / -10 by whether it is empty, its IoU 1, and its object pointer comes
        from the decoder given the mask (through ``mask_downsample``) as a dense prompt."""
        model = self.model
        mask = mask.float()
        high = mask * MEMORY_SCALE + MEMORY_BIAS
        S = model.input_size
        low = F.interpolate(high, size=(S // 4, S // 4), mode="bilinear", align_corners=False, antialias=True)
        pointer = self._heads(features.pix, features, None, None, False, model.mask_downsample(mask)).pointer
        present = bool((mask > 0).any())
        if not present:
            pointer = model.no_obj_ptr.expand_as(pointer).clone()
        score = MEMORY_SCALE + MEMORY_BIAS if present else MEMORY_BIAS
        low = fill_holes(low, self.fill_hole_area)
        memory, memory_pos = self._memory(features, self._upsampled(low), score, binarize=True)
        out = FrameOutput(low, 1.0, score, pointer, memory, memory_pos)
        return Track(key=key, reverse=False, key_output=out)

    def step(
        self,
        track: Track,
        frame: int,
        features: FrameFeatures,
        num_frames: int,
        corrector: Corrector | None = None,
    ) -> FrameOutput:
        """Track the object onto ``frame`` (the next one in the track's direction).
        ``corrector``: see :data:`Corrector`; a corrected frame's memory is made from its
        binarised mask, as a prompted frame's is."""
        model = self.model
        memory, memory_pos, pointer_tokens = self._gather(track, frame, num_frames)
        current = features.pix.flatten(2).transpose(1, 2)
        current_pos = features.pos.flatten(2).transpose(1, 2)
        conditioned = model.memory_attention(current, current_pos, memory, memory_pos, pointer_tokens)
        pix = conditioned.transpose(1, 2).reshape(features.pix.shape)
        heads = self._heads(pix, features, None, None, multimask=True)
        corrections = self._corrected(pix, features, None, None, heads, corrector)
        out = self._output(features, heads, corrections, binarize=bool(corrections), memory_after_filling=False)
        track.outputs[frame] = out
        # a frame this far behind is read neither as a memory (6 back) nor as a pointer (15 back)
        track.outputs.pop(frame + (1 if track.reverse else -1) * MAX_OBJECT_POINTERS, None)
        return out

    def _gather(self, track: Track, frame: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The memory tokens (1, M, 64), their encodings and the number of pointer tokens."""
        model = self.model
        slots = model.config.num_maskmem
        direction = 1 if track.reverse else -1  # where the frames tracked before this one lie
        prompted = track.prompted
        entries: list[tuple[int, FrameOutput]] = [(0, out) for out in prompted.values()]
        for t_pos in range(1, slots):
            previous = track.outputs.get(frame + direction * (slots - t_pos))
            if previous is not None:
                entries.append((t_pos, previous))
        tokens, encodings = [], []
        for t_pos, out in entries:
            assert out.memory is not None and out.memory_pos is not None
            tokens.append(out.memory.flatten(2).transpose(1, 2))
            encodings.append(out.memory_pos.flatten(2).transpose(1, 2) + model.maskmem_tpos_enc[slots - t_pos - 1, 0])
        # object pointers: the prompted frame's (when it lies behind), then the tracked frames'
        max_pointers = min(num_frames, MAX_OBJECT_POINTERS)
        sign = -1 if track.reverse else 1
        positions: list[float] = []
        pointers: list[torch.Tensor] = []
        for t, out in prompted.items():  # the prompted frames that lie behind this one
            if (t >= frame) if track.reverse else (t <= frame):
                distance = (frame - t) * sign if self.signed_pointer_distance else abs(frame - t)
                positions.append(float(distance))
                pointers.append(out.pointer)
        for t_diff in range(1, max_pointers):
            t = frame + t_diff if track.reverse else frame - t_diff
            if t < 0 or t >= num_frames:
                break
            tracked = track.outputs.get(t)
            if tracked is not None:
                positions.append(float(t_diff))
                pointers.append(tracked.pointer)
        n_pointer_tokens = 0
        if pointers:
            mem_dim = model.memory_encoder.out_dim
            stacked = torch.stack(pointers, dim=1)  # (1, P, 256)
            P = stacked.shape[1]
            if self.pointer_distance_encoding:
                pos = torch.tensor(positions, device=stacked.device) / (max_pointers - 1)
                pos_enc = model.obj_ptr_tpos_proj(_sine_1d(pos, PROMPT_DIM))  # (P, 64)
            else:
                pos_enc = stacked.new_zeros(P, mem_dim)
            split = PROMPT_DIM // mem_dim
            tokens.append(stacked.reshape(1, P * split, mem_dim))  # each pointer as 4 tokens of 64
            encodings.append(pos_enc.repeat_interleave(split, dim=0).unsqueeze(0))
            n_pointer_tokens = P * split
        return torch.cat(tokens, dim=1), torch.cat(encodings, dim=1), n_pointer_tokens
