"""Import the reference ``segment-anything==1.0`` package as a test oracle.

The package imports torchvision for resize helpers and NMS only; torchvision from PyPI does not
import beside the local CPU torch, so a stub is registered. Its ``resize`` and ``to_pil_image``
do exactly what torchvision does for a uint8 HWC numpy image: a PIL bilinear resize (this is what
``SamPredictor.set_image`` runs). Its ``batched_nms`` (what ``SamAutomaticMaskGenerator`` runs)
is ONNX Runtime's ``NonMaxSuppression`` operator, an implementation independent of this project's
(a box is dropped when its IoU with a kept, higher-scoring box exceeds the threshold; output best
first), and ``box_area`` is torchvision's formula.
"""

from __future__ import annotations

import sys
import types

import numpy as np


def _install_torchvision_stub() -> None:
    if "torchvision" in sys.modules:
        return
    from PIL import Image

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")

    def to_pil_image(array):
        return Image.fromarray(np.asarray(array))

    def resize(img, size):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stub: not available in tests")

    class _Unavailable:  # sam2's image transforms: imported, never built in the tests
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stub: not available in tests")

    functional.to_pil_image = to_pil_image
    functional.resize = resize
    transforms.functional = functional
    transforms.Normalize = transforms.Resize = transforms.ToTensor = _Unavailable
    boxes.batched_nms = _onnxruntime_batched_nms
    boxes.box_area = _box_area
    ops.boxes = boxes
    tv.transforms = transforms
    tv.ops = ops
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes,
        }
    )


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


_NMS_SESSION = None


def _nms_session():
    global _NMS_SESSION
    if _NMS_SESSION is None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou"], ["selected"])],
            "nms",
            [
                helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, None]),
                helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]),
                helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            ],
            [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        _NMS_SESSION = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        del onnx
    return _NMS_SESSION


def _onnxruntime_batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's ``batched_nms`` for one category (all the generator uses), by ONNX Runtime."""
    import torch

    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64)
    if torch.as_tensor(idxs).unique().numel() > 1:
        raise NotImplementedError("the stub's batched_nms handles one category")
    selected = _nms_session().run(
        None,
        {
            "boxes": boxes.detach().float().numpy()[None],
            "scores": scores.detach().float().numpy()[None, None],
            "max_out": np.array([len(boxes)], dtype=np.int64),
            "iou": np.array([iou_threshold], dtype=np.float32),
        },
    )[0]
    return torch.as_tensor(selected[:, 2], dtype=torch.int64)


def import_reference():
    """Return the ``segment_anything`` module (with the stub installed)."""
    _install_torchvision_stub()
    import segment_anything

    return segment_anything


def build_reference(kind: str = "vit_b", seed: int = 0):
    """A reference SAM model with seeded random weights (incl. the normally-zero rel-pos tables)."""
    import torch

    sa = import_reference()
    torch.manual_seed(seed)
    model = sa.sam_model_registry[kind]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "token" in name:
                p.normal_(0, 0.02)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def build_reference_small_sam(seed: int = 0, decoder_gain: float = 4.0):
    """A reference ``Sam`` with a 2-block ViT encoder (1024 px input, 64 x 64 embedding) and SAM's
    decoder, seeded random weights shaped so that masks differ from click to click: the prompt
    encoder's and decoder's matrices are scaled by ``decoder_gain`` (sharper logits, spread
    IoU predictions) and the decoder's transposed convolutions use one kernel value per channel
    pair (a mask follows the image's regions instead of a 4 x 4 checkerboard). Saved with
    ``torch.save(model.state_dict())`` it is an official-format SAM checkpoint."""
    from functools import partial

    import torch

    import_reference()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=2,
        embed_dim=64,
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=[1],
        window_size=14,
        out_chans=256,
    )
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "token" in name:
                p.normal_(0, 0.02)
        for name, p in model.named_parameters():
            if name.startswith(("mask_decoder", "prompt_encoder")) and p.dim() > 1:
                p.mul_(decoder_gain)
        for layer in model.mask_decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(layer.weight[:, :, :1, :1].expand_as(layer.weight))
    return model.eval()
