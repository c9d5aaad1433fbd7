"""Flax Linen modules mirroring `segment_anything/modeling`."""

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PAD_LABEL, PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = ["ImageEncoderViT", "MaskDecoder", "PAD_LABEL", "PromptEncoder", "Sam",
           "TwoWayTransformer"]
