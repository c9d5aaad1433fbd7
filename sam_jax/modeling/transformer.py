"""Ports `segment_anything/modeling/transformer.py`: the two-way transformer of the mask decoder.

Difference: every attention takes an optional `token_mask` (B, T) over the sparse prompt
tokens. Masked tokens are removed from the keys of every attention that attends to tokens, so
padding a prompt to a fixed length is exact (the official code has no padding). Layer norms here
use torch's default eps 1e-5, not the 1e-6 of the encoder.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import LayerNorm, MLPBlock, named, relu


# At most this many queries or keys: attention with block-diagonal matmuls (below).
SMALL_SIDE = 64


def _masked_scores(scores, key_mask, key_axis):
    if key_mask is None:
        return scores
    shape = [1] * scores.ndim
    shape[0], shape[key_axis] = key_mask.shape
    return jnp.where(key_mask.reshape(shape), scores, jnp.finfo(jnp.float32).min)


def _attention_heads(q, k, v, num_heads, key_mask):
    """Textbook multi-head attention over (B, N, heads * c) projections."""
    split = lambda x: x.reshape(*x.shape[:-1], num_heads, -1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = _masked_scores(scores / jnp.sqrt(jnp.float32(q.shape[-1])), key_mask, 3)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(*out.shape[:-2], -1)


def _block_diagonal(x, num_heads):
    """(B, N, heads * c) -> (B, heads * c, heads * N), block h holding head h's (c, N)."""
    b, n, _ = x.shape
    x = x.reshape(b, n, num_heads, -1)
    eye = jnp.eye(num_heads, dtype=x.dtype)
    return jnp.einsum("bnhc,hg->bhcgn", x, eye).reshape(b, -1, num_heads * n)


def _attention_small_side(q, k, v, num_heads, key_mask):
    """Attention between a few prompt tokens and the 4096 image tokens, as dense matmuls.

    The per-head products have a contraction of 16 and a side of ~12, which batched-matmul
    kernels run far below peak. Putting the small side's heads on a block diagonal turns every
    head into one (4096 x 128) @ (128 x heads*12) matmul; the off-diagonal blocks multiply
    exact zeros, so the result is the same sum (8x the flops of a tiny op, ~3x less time)."""
    b = q.shape[0]
    c = q.shape[-1] // num_heads
    scale = 1.0 / jnp.sqrt(jnp.float32(c))
    f32 = jnp.float32
    if k.shape[1] <= q.shape[1]:  # few keys: (B, Nq, heads*Nk) scores
        nk = k.shape[1]
        scores = jnp.matmul(q, _block_diagonal(k, num_heads), preferred_element_type=f32)
        scores = _masked_scores(scores.reshape(b, -1, num_heads, nk) * scale, key_mask, 3)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, -1, num_heads * nk)
        v_bd = _block_diagonal(v, num_heads).transpose(0, 2, 1)  # (B, heads*Nk, heads*cv)
        return jnp.matmul(probs, v_bd, preferred_element_type=f32)
    nq = q.shape[1]  # few queries: scores laid out (B, Nk, heads*Nq)
    scores = jnp.matmul(k, _block_diagonal(q, num_heads), preferred_element_type=f32)
    scores = _masked_scores(scores.reshape(b, -1, num_heads, nq) * scale, key_mask, 1)
    probs = jax.nn.softmax(scores, axis=1).astype(v.dtype).reshape(b, -1, num_heads * nq)
    out = jnp.einsum("bkq,bkv->bqv", probs, v, preferred_element_type=f32)  # all head pairs
    out = out.reshape(b, num_heads, nq, num_heads, -1)
    return jnp.einsum("bhqgc,hg->bqhc", out, jnp.eye(num_heads, dtype=out.dtype)).reshape(
        b, nq, -1)


class Linear(nn.Module):
    """nn.Dense's parameters (kernel (in, out), bias) and output (float32 accumulation), with
    the weights also readable by the parent, which folds them into the other attention side."""

    in_features: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                 (self.in_features, self.features), jnp.float32)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)

    def __call__(self, x):
        return jnp.dot(x.astype(self.dtype), self.kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32) + self.bias


def _token_to_image_folded(q_tok, k_img, v_img, q_proj, k_proj, v_proj, num_heads, dtype):
    """Attention of T prompt tokens to N image tokens of their own prompt (B, N, D), without
    projecting the N image tokens.

    The key projection is moved onto the queries: (q Wq_h) . (x Wk_h + bk_h) =
    (Wk_h (q Wq_h)) . x + const, and the constant (per query and head) cancels in the softmax
    over keys. The value projection is applied after the weighted sum, which is linear and whose
    weights sum to one: sum_n p_n (x_n Wv_h + bv_h) = (sum_n p_n x_n) Wv_h + bv_h. Returns the
    per-head outputs (B, T, internal) before out_proj."""
    b, t, d = q_tok.shape
    c = q_proj.features // num_heads
    f32 = jnp.float32
    q = q_proj(q_tok).reshape(b, t, num_heads, c)
    wk = k_proj.kernel.reshape(d, num_heads, c)
    folded = jnp.einsum("bthc,dhc->bdht", q, wk) * (1.0 / jnp.sqrt(f32(c)))
    scores = jnp.einsum("bnd,bdq->bnq", k_img.astype(dtype),
                        folded.reshape(b, d, -1).astype(dtype), preferred_element_type=f32)
    probs = jax.nn.softmax(scores, axis=1).astype(dtype)  # over the N image tokens
    mixed = jnp.einsum("bnq,bnd->bqd", probs, v_img.astype(dtype), preferred_element_type=f32)
    wv = v_proj.kernel.reshape(d, num_heads, c)
    out = jnp.einsum("bhtd,dhc->bthc", mixed.reshape(b, num_heads, t, d), wv)
    return (out + v_proj.bias.reshape(num_heads, c)).reshape(b, t, -1)


def _image_to_token_folded(q_img, k_tok, v_tok, key_mask, q_proj, k_proj, v_proj, out_proj,
                           num_heads, dtype):
    """Attention of N image tokens (B or 1, N, D) to T prompt tokens, out_proj included,
    without projecting the N image tokens.

    The query projection is moved onto the keys: (x Wq_h + bq_h) . k_h = x . (Wq_h k_h) +
    bq_h . k_h (this term varies over the keys, so it is kept), and out_proj onto the values:
    sum_h (sum_t p_ht v_ht) Wo_h = sum_ht p_ht (v_ht Wo_h). Returns (B, N, D)."""
    b, t, d = k_tok.shape
    c = k_proj.features // num_heads
    f32 = jnp.float32
    scale = 1.0 / jnp.sqrt(f32(c))
    k = k_proj(k_tok).reshape(b, t, num_heads, c)
    v = v_proj(v_tok).reshape(b, t, num_heads, c)
    wq = q_proj.kernel.reshape(d, num_heads, c)
    folded = jnp.einsum("bthc,dhc->bdht", k, wq) * scale
    offset = jnp.einsum("bthc,hc->bht", k, q_proj.bias.reshape(num_heads, c)) * scale
    x = q_img.astype(dtype)
    scores = jnp.einsum("bnd,bdq->bnq" if x.shape[0] == b else "nd,bdq->bnq",
                        x if x.shape[0] == b else x[0], folded.reshape(b, d, -1).astype(dtype),
                        preferred_element_type=f32)
    scores = scores.reshape(b, -1, num_heads, t) + offset[:, None]
    scores = _masked_scores(scores, key_mask, 3)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, -1, num_heads * t).astype(dtype)
    wo = out_proj.kernel.reshape(num_heads, c, d)
    values_out = jnp.einsum("bthc,hcd->bhtd", v, wo).reshape(b, num_heads * t, d)
    out = jnp.einsum("bnq,bqd->bnd", probs, values_out.astype(dtype), preferred_element_type=f32)
    return out + out_proj.bias


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may downscale the embedding.

    Between a few prompt tokens and the N image tokens, the projection of the image side is
    folded into the token side when that takes fewer flops (`_token_to_image_folded`,
    `_image_to_token_folded`): per prompt it avoids projecting N x D image tokens, which was
    most of the decoder's time with many prompts. The sums are regrouped, so results equal the
    official ones up to float rounding."""

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, key_mask: Optional[jax.Array] = None):
        d, dt, heads = self.embedding_dim, self.dtype, self.num_heads
        internal = d // self.downsample_rate
        if internal % heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        q_proj, k_proj, v_proj = (Linear(d, internal, dt, name=n)
                                  for n in ("q_proj", "k_proj", "v_proj"))
        out_proj = Linear(internal, d, dt, name="out_proj")
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        nq, nk = q.shape[1], k.shape[1]
        pairs = heads * min(nq, nk)  # columns of the block-diagonal score matmul
        if nq <= SMALL_SIDE < nk:
            # flops per image token: project k and v (once if shared) + block-diagonal
            # scores and values, against the folded scores and weighted sums.
            plain = 4 * k.shape[0] * d * internal + 4 * batch * internal * pairs
            if 4 * batch * d * pairs < plain:
                out = _token_to_image_folded(q, k, v, q_proj, k_proj, v_proj, heads, dt)
                return out_proj(out.astype(dt)).astype(jnp.float32)
        elif nk <= SMALL_SIDE < nq:
            plain = 2 * q.shape[0] * d * internal + 4 * batch * internal * pairs + \
                2 * batch * internal * d
            if 4 * batch * d * pairs < plain:
                return _image_to_token_folded(q, k, v, key_mask, q_proj, k_proj, v_proj,
                                              out_proj, heads, dt)
        q, k, v = q_proj(q), k_proj(k), v_proj(v)
        # Image tokens shared by every prompt may come with batch 1 (see MaskDecoder): they are
        # projected once, then broadcast to the prompts.
        q, k, v = (jnp.broadcast_to(x, (batch,) + x.shape[1:]) for x in (q, k, v))
        if min(q.shape[1], k.shape[1]) <= SMALL_SIDE:
            out = _attention_small_side(q, k, v, heads, key_mask)
        else:
            out = _attention_heads(q, k, v, heads, key_mask)
        return out_proj(out.astype(dt)).astype(jnp.float32)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, tokens->image, token MLP, image->tokens."""

    embedding_dim: int
    num_heads: int
    mlp_dim: int = 2048
    activation: Callable = relu
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
        d, h, r, dt = self.embedding_dim, self.num_heads, self.attention_downsample_rate, self.dtype
        self_attn = Attention(d, h, dtype=dt, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask)
        queries = LayerNorm(1e-5, name="norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(d, h, r, dt, name="cross_attn_token_to_image")(q, k, keys)
        queries = LayerNorm(1e-5, name="norm2")(queries)

        queries = queries + MLPBlock(d, self.mlp_dim, self.activation, dt, name="mlp")(queries)
        queries = LayerNorm(1e-5, name="norm3")(queries)

        q, k = queries + query_pe, keys + key_pe
        keys = keys + Attention(d, h, r, dt, name="cross_attn_image_to_token")(k, q, queries,
                                                                               token_mask)
        keys = LayerNorm(1e-5, name="norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    embedding_dim: int
    num_heads: int
    mlp_dim: int
    activation: Callable = relu
    attention_downsample_rate: int = 2
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.layers = [named(self, f"layers.{i}", TwoWayAttentionBlock(
            self.embedding_dim, self.num_heads, self.mlp_dim, self.activation,
            self.attention_downsample_rate, skip_first_layer_pe=(i == 0), dtype=self.dtype))
            for i in range(self.depth)]
        self.final_attn_token_to_image = Attention(
            self.embedding_dim, self.num_heads, self.attention_downsample_rate, self.dtype)
        self.norm_final_attn = LayerNorm(1e-5)

    def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
        """image_embedding (B, h, w, C), image_pe broadcastable to it, point_embedding (B, T, C)
        -> (queries (B, T, C), keys (B, h*w, C))."""
        b, hh, ww, c = image_embedding.shape
        keys = image_embedding.reshape(b, hh * ww, c)
        image_pe = jnp.broadcast_to(image_pe, image_embedding.shape).reshape(b, hh * ww, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe, token_mask)
        q, k = queries + point_embedding, keys + image_pe
        queries = queries + self.final_attn_token_to_image(q, k, keys)
        return self.norm_final_attn(queries), keys
