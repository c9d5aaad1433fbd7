"""Helpers for parity tests: the official PyTorch SAM built from a `SamConfig`, with seeded
perturbed weights, saved as a `.pth` and loaded back through the real conversion path.

Self-contained (imports only torch, the official `segment_anything` package and sam_jax), so
other test modules may import it. The official initialization leaves exact zeros and ones
(relative-position tables, LayerNorm scales and biases, ...), which would hide a mis-mapped or
transposed weight; `perturb` adds seeded noise to every parameter.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import numpy as np
import torch

import sam_jax
from sam_jax.configs import SamConfig


def official_sam(config: SamConfig):
    """The official `segment_anything.modeling.Sam` for any SamConfig, in eval mode.

    Mirrors the official `_build_sam` (which only covers the presets): LayerNorm eps 1e-6 in
    the image encoder, relative positions on, the config's widths, depths and heads."""
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    e, p, d = config.image_encoder, config.prompt_encoder, config.mask_decoder
    n = config.image_embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=e.img_size, patch_size=e.patch_size, in_chans=e.in_chans,
            embed_dim=e.embed_dim, depth=e.depth, num_heads=e.num_heads, mlp_ratio=e.mlp_ratio,
            out_chans=e.out_chans, qkv_bias=e.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=e.use_abs_pos,
            use_rel_pos=e.use_rel_pos, window_size=e.window_size,
            global_attn_indexes=tuple(e.global_attn_indexes)),
        prompt_encoder=PromptEncoder(
            embed_dim=p.embed_dim, image_embedding_size=(n, n),
            input_image_size=(e.img_size, e.img_size), mask_in_chans=p.mask_in_chans),
        mask_decoder=MaskDecoder(
            transformer_dim=d.transformer_dim,
            transformer=TwoWayTransformer(depth=d.transformer_depth,
                                          embedding_dim=d.transformer_dim,
                                          num_heads=d.transformer_num_heads,
                                          mlp_dim=d.transformer_mlp_dim,
                                          attention_downsample_rate=d.attention_downsample_rate),
            num_multimask_outputs=d.num_multimask_outputs, iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim),
        pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std),
    ).eval()


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Adds seeded `scale * N(0, 1)` noise to every parameter (rel_pos tables included), in
    place; buffers (the prompt encoder's Gaussian matrix) are already random and kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def seeded_official(config: SamConfig, seed: int = 0, scale: float = 0.1):
    """`official_sam(config)` with seeded initialization and perturbation."""
    torch.manual_seed(seed)
    return perturb(official_sam(config), seed=seed, scale=scale)


def save_and_load(model: torch.nn.Module, directory: str | os.PathLike,
                  config: Optional[SamConfig] = None, model_type: str = "auto",
                  name: str = "sam.pth") -> sam_jax.SamModel:
    """`torch.save(state_dict)` then `sam_jax.load` of that file: the real conversion path."""
    path = os.path.join(os.fspath(directory), name)
    torch.save(model.state_dict(), path)
    return sam_jax.load(path, model_type=model_type, config=config)


def official_predictor(model: torch.nn.Module):
    from segment_anything import SamPredictor
    return SamPredictor(model)


def max_abs_diff(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
