"""Ports `segment_anything/modeling/image_encoder.py`: the ViTDet-style image encoder.

Layout is channels-last throughout (B, H, W, C); the official model permutes to NCHW only for
the neck, which we do not need. Deliberate differences, none of which change the result:
- attention has one implementation per kind of hardware (`rel_pos_attention`): on CPU head by
  head, global attention in chunks of query rows; on GPU/TPU a fused flash attention with the
  relative-position bias folded into q and k. Each softmax sees every key: exact, not an
  approximation;
- the relative-position tables must already have the size the input needs (they always do
  for SAM's fixed 1024 input); the official code would silently interpolate them.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import LayerNorm, MLPBlock, dense
from .rel_pos_attention import attention_with_rel_pos, resolve_impl


def window_partition(x: jax.Array, window_size: int) -> Tuple[jax.Array, Tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, ws, ws, C), zero-padding H and W at the bottom/right.

    The padded tokens take part in attention as zeros, exactly as in the official code."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`, dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    use_rel_pos: bool = True
    input_size: Tuple[int, int] = (14, 14)
    chunk_size: int = 0
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"  # see rel_pos_attention.resolve_impl

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = dense(3 * self.dim, "qkv", self.dtype, use_bias=self.qkv_bias)(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim)
        # The projection accumulates in float32; attention's matmuls take the compute dtype.
        q, k, v = (qkv[:, :, i].astype(self.dtype) for i in range(3))  # (B, T, heads, C)
        rel_pos_h = rel_pos_w = None
        if self.use_rel_pos:
            zeros = nn.initializers.zeros
            rel_pos_h = self.param("rel_pos_h", zeros, (2 * self.input_size[0] - 1, head_dim))
            rel_pos_w = self.param("rel_pos_w", zeros, (2 * self.input_size[1] - 1, head_dim))
        impl = resolve_impl(self.impl, self.dtype, head_dim, (h, w))
        out = attention_with_rel_pos(q, k, v, rel_pos_h, rel_pos_w, (h, w), impl=impl,
                                     chunk_size=self.chunk_size, use_rel_pos=self.use_rel_pos)
        out = out.reshape(b, h, w, self.dim)
        return dense(self.dim, "proj", self.dtype)(out)


class DropPath(nn.Module):
    """Stochastic depth for training (not in the official inference code): drops a residual
    branch for whole samples with probability `rate`, rescaling the kept ones by 1/(1-rate)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global attention.
    `drop_path` > 0 drops the attention and MLP branches when `deterministic` is False."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_rel_pos: bool = True
    window_size: int = 0
    input_size: Tuple[int, int] = (64, 64)
    chunk_size: int = 0
    dtype: jnp.dtype = jnp.float32
    drop_path: float = 0.0
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        shortcut = x
        x = LayerNorm(1e-6, name="norm1")(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        attn_size = self.input_size if self.window_size == 0 else (self.window_size,) * 2
        x = Attention(self.dim, self.num_heads, self.qkv_bias, self.use_rel_pos, attn_size,
                      chunk_size=self.chunk_size if self.window_size == 0 else 0,
                      dtype=self.dtype, impl=self.attention_impl, name="attn")(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + DropPath(self.drop_path)(x, deterministic)
        y = LayerNorm(1e-6, name="norm2")(x)
        y = MLPBlock(self.dim, int(self.dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)
        return x + DropPath(self.drop_path)(y, deterministic)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a stride-`patch` conv), as a reshape and one matmul."""

    patch_size: int
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                       dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)


class ImageEncoderViT(nn.Module):
    """(B, S, S, 3) normalized, padded images -> (B, S/16, S/16, out_chans) embeddings.

    Training options (inference never uses them): `config.drop_path_rate` is the stochastic
    depth of the last block, rising linearly from 0 at the first (ViTDet's rule), active when
    `deterministic` is False; `config.remat_blocks` recomputes each block's activations in the
    backward pass instead of storing them."""

    config: "ImageEncoderConfig"  # noqa: F821
    chunk_size: int = 0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        x = x.astype(self.dtype)
        x = PatchEmbed(cfg.patch_size, cfg.embed_dim, self.dtype, name="patch_embed")(x)
        grid = cfg.img_size // cfg.patch_size
        if cfg.use_abs_pos:
            # The official code starts from zeros and always loads MAE weights. From scratch,
            # zeros make every all-padding patch an exact zero vector whose LayerNorm (zero
            # variance) multiplies its gradient by 1/sqrt(eps) = 1e3: ViT's usual small random
            # init avoids that (converted checkpoints overwrite it either way).
            pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                   (1, grid, grid, cfg.embed_dim))
            x = x + pos_embed.astype(x.dtype)
        # argument 2 of Block.__call__ (self = 0) is `deterministic`, a Python bool
        block_cls = nn.remat(Block, static_argnums=(2,)) if cfg.remat_blocks else Block
        for i in range(cfg.depth):
            window = 0 if i in cfg.global_attn_indexes else cfg.window_size
            rate = cfg.drop_path_rate * i / max(cfg.depth - 1, 1)
            x = block_cls(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias,
                          cfg.use_rel_pos, window, (grid, grid), self.chunk_size, self.dtype,
                          rate, self.attention_impl, name=f"blocks.{i}")(x, deterministic)
        conv = lambda feat, k, name: nn.Conv(feat, (k, k), padding=[(k // 2, k // 2)] * 2,  # noqa
                                             use_bias=False, dtype=self.dtype,
                                             param_dtype=jnp.float32, name=name)
        x = conv(cfg.out_chans, 1, "neck.0")(x)
        x = LayerNorm(1e-6, name="neck.1")(x)
        x = conv(cfg.out_chans, 3, "neck.2")(x)
        x = LayerNorm(1e-6, name="neck.3")(x)
        return x.astype(jnp.float32)
