"""Ports `segment_anything/modeling/image_encoder.py`: the ViTDet-style image encoder.

Layout is channels-last throughout (B, H, W, C); the official model permutes to NCHW only for
the neck, which we do not need. Deliberate differences, none of which change the result:
- attention runs head by head, and global attention in chunks of query rows
  (`attention_chunk_size` queries at a time), so the (4096 x 4096) score matrix of a head never
  exists whole; each chunk's softmax sees every key, so this is exact, not an approximation;
- the relative-position tables must already have the size the input needs (they always do
  for SAM's fixed 1024 input); the official code would silently interpolate them.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import LayerNorm, MLPBlock, dense


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


def get_rel_pos(size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative-position embeddings for equal query and key lengths: (size, size, C) with
    entry [i, j] = rel_pos[i - j + size - 1]."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, but an axis "
                         f"of {size} tokens needs {2 * size - 1}")
    idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
    return rel_pos[idx]


def attention_with_rel_pos(q, k, v, rel_pos_h, rel_pos_w, hw: Tuple[int, int],
                           chunk_size: int, use_rel_pos: bool = True) -> jax.Array:
    """softmax(q*scale @ k^T + rel_h + rel_w) @ v over (B, heads, H*W, C) tensors.

    rel_h[q, kh] = <q, Rh[q_row, kh]> and rel_w[q, kw] = <q, Rw[q_col, kw]> (decomposed relative
    position bias of MViTv2, with the unscaled q, as the official code). The matmuls run in
    the dtype of q, k, v (the compute dtype) with float32 accumulation; the softmax is float32.

    Heads are processed one after another (`lax.map`) and, within a head, query rows
    `chunk_size` queries at a time: the score block then stays cache-sized instead of a
    (heads x 4096 x 4096) array streamed through memory, which measured 2.4x faster on CPU for
    SAM's global attention. Each softmax still sees every key, so the result is exact. The
    softmax is normalized after the value matmul (dividing C outputs per query instead of
    4096 probabilities), and each head's keys are transposed once, not once per chunk."""
    h, w = hw
    b, n, tokens, c = q.shape
    scale = c ** -0.5
    f32 = jnp.float32
    rh = get_rel_pos(h, rel_pos_h).astype(q.dtype) if use_rel_pos else None
    rw = get_rel_pos(w, rel_pos_w).astype(q.dtype) if use_rel_pos else None
    rows = max(1, min(h, chunk_size // w)) if chunk_size > 0 else h
    if h % rows:
        rows = h

    def rows_attention(q_rows, k_t, v_head, row0):
        # q_rows: (B, r, W, C), the query rows row0 .. row0 + r of one head; k_t: (B, C, keys).
        r = q_rows.shape[1]
        scores = jnp.einsum("brwc,bck->brwk", q_rows * jnp.asarray(scale, q.dtype), k_t,
                            preferred_element_type=f32)
        if use_rel_pos:
            rh_rows = jax.lax.dynamic_slice_in_dim(rh, row0, r, axis=0)
            rel_h = jnp.einsum("brwc,rkc->brwk", q_rows, rh_rows, preferred_element_type=f32)
            rel_w = jnp.einsum("brwc,wkc->brwk", q_rows, rw, preferred_element_type=f32)
            scores = scores.reshape(b, r, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
            scores = scores.reshape(b, r, w, h * w)
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        out = jnp.einsum("brwk,bkc->brwc", weights.astype(v_head.dtype), v_head,
                         preferred_element_type=f32)
        if v_head.shape[-1] > c:  # the appended column of ones summed the weights
            return out[..., :c] / out[..., c:]
        return out / weights.sum(-1, keepdims=True)

    def head_attention(args):
        q_head, k_head, v_head = args  # (B, H*W, C)
        q_head = q_head.reshape(b, h, w, c)
        k_t = k_head.transpose(0, 2, 1)
        if v_head.dtype != f32:
            # Below float32, a column of ones appended to v makes the value matmul return the
            # softmax denominator too (measured 4% faster on the bf16 encoder; at float32 the
            # separate sum is faster). The sum then uses the rounded weights it divides.
            v_head = jnp.concatenate([v_head, jnp.ones_like(v_head[..., :1])], axis=-1)
        if rows == h:
            return rows_attention(q_head, k_t, v_head, 0)
        chunks = q_head.reshape(b, h // rows, rows, w, c).transpose(1, 0, 2, 3, 4)
        starts = jnp.arange(0, h, rows)
        out = jax.lax.map(lambda a: rows_attention(a[0], k_t, v_head, a[1]), (chunks, starts))
        return out.transpose(1, 0, 2, 3, 4).reshape(b, h, w, c)

    heads_first = lambda x: x.transpose(1, 0, 2, 3)  # noqa: E731
    out = jax.lax.map(head_attention, (heads_first(q), heads_first(k), heads_first(v)))
    return out.reshape(n, b, tokens, c).transpose(1, 0, 2, 3)


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    use_rel_pos: bool = True
    input_size: Tuple[int, int] = (14, 14)
    chunk_size: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = dense(3 * self.dim, "qkv", self.dtype, use_bias=self.qkv_bias)(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        # The projection accumulates in float32; attention's matmuls take the compute dtype.
        q, k, v = (t.astype(self.dtype) for t in (qkv[0], qkv[1], qkv[2]))
        rel_pos_h = rel_pos_w = None
        if self.use_rel_pos:
            zeros = nn.initializers.zeros
            rel_pos_h = self.param("rel_pos_h", zeros, (2 * self.input_size[0] - 1, head_dim))
            rel_pos_w = self.param("rel_pos_w", zeros, (2 * self.input_size[1] - 1, head_dim))
        out = attention_with_rel_pos(q, k, v, rel_pos_h, rel_pos_w, (h, w), self.chunk_size,
                                     self.use_rel_pos)
        out = out.reshape(b, self.num_heads, h, w, head_dim).transpose(0, 2, 3, 1, 4)
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
                      dtype=self.dtype, name="attn")(x)
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
                          rate, name=f"blocks.{i}")(x, deterministic)
        conv = lambda feat, k, name: nn.Conv(feat, (k, k), padding=[(k // 2, k // 2)] * 2,  # noqa
                                             use_bias=False, dtype=self.dtype,
                                             param_dtype=jnp.float32, name=name)
        x = conv(cfg.out_chans, 1, "neck.0")(x)
        x = LayerNorm(1e-6, name="neck.1")(x)
        x = conv(cfg.out_chans, 3, "neck.2")(x)
        x = LayerNorm(1e-6, name="neck.3")(x)
        return x.astype(jnp.float32)
