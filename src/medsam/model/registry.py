"""Named model configurations and the builder that turns one into a :class:`MedSAMModel`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import ConfigRecord
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import MedSAMModel
from .transformer import TwoWayTransformer


@dataclass(frozen=True)
class ModelConfig(ConfigRecord):
    """Architecture of a model. ``encoder`` is ``"vit"`` or ``"tiny_vit"``.

    ``img_size`` is the side of the square network input; the image embedding is
    ``embedding_size`` x ``embedding_size`` with ``prompt_embed_dim`` channels.
    """

    name: str
    encoder: str = "vit"
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    embedding_size: int = 64
    default_contract: str = "medsam"
    # TinyViT only
    tiny_embed_dims: tuple[int, ...] = field(default=(64, 128, 160, 320))
    tiny_depths: tuple[int, ...] = field(default=(2, 2, 6, 2))
    tiny_num_heads: tuple[int, ...] = field(default=(2, 4, 5, 10))
    tiny_window_sizes: tuple[int, ...] = field(default=(7, 7, 14, 7))
    # Med-SA adapters in every ViT block ("medsa"; "" = none): medsam.model.adapters
    adapter: str = ""
    adapter_ratio: float = 0.25
    adapter_scale: float = 0.5


CONFIGS: dict[str, ModelConfig] = {
    "vit_b": ModelConfig("vit_b"),
    "vit_l": ModelConfig(
        "vit_l",
        embed_dim=1024,
        depth=24,
        num_heads=16,
        global_attn_indexes=(5, 11, 17, 23),
        default_contract="sam",
    ),
    "vit_h": ModelConfig(
        "vit_h",
        embed_dim=1280,
        depth=32,
        num_heads=16,
        global_attn_indexes=(7, 15, 23, 31),
        default_contract="sam",
    ),
    # LiteMedSAM: TinyViT at 256 px giving a 64 x 64 embedding.
    "lite": ModelConfig(
        "lite",
        encoder="tiny_vit",
        img_size=256,
        patch_size=4,
        embed_dim=320,
        depth=0,
        num_heads=0,
        global_attn_indexes=(),
        window_size=0,
        default_contract="lite",
    ),
    # A small ViT for fast tests and CPU experiments: 256 px input, 16 x 16 embedding.
    "vit_tiny": ModelConfig(
        "vit_tiny",
        img_size=256,
        embed_dim=96,
        depth=4,
        num_heads=3,
        global_attn_indexes=(1, 3),
        window_size=7,
        embedding_size=16,
        default_contract="medsam",
    ),
}


def build_model(config: ModelConfig | str, contract: str | None = None) -> MedSAMModel:
    """Build a randomly initialised model from a config or a registered name."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model {config!r}; known: {sorted(CONFIGS)}")
        config = CONFIGS[config]
    if config.encoder == "vit":
        encoder = ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes,
        )
    elif config.encoder == "tiny_vit":
        from .tiny_vit import TinyViT

        encoder = TinyViT(
            img_size=config.img_size,
            embed_dims=list(config.tiny_embed_dims),
            depths=list(config.tiny_depths),
            num_heads=list(config.tiny_num_heads),
            window_sizes=list(config.tiny_window_sizes),
        )
    else:
        raise ValueError(f"unknown encoder kind {config.encoder!r}")
    if config.adapter == "medsa":
        from .adapters import add_medsa_adapters

        add_medsa_adapters(encoder, config.adapter_ratio, config.adapter_scale)
    elif config.adapter:
        raise ValueError(f"unknown adapter kind {config.adapter!r}; known: medsa")
    e = config.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(e, e),
        input_image_size=(config.img_size, config.img_size),
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_embed_dim, mlp_dim=2048, num_heads=8),
    )
    return MedSAMModel(encoder, prompt_encoder, mask_decoder, config, contract or config.default_contract)
