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

from .common import LayerNorm, MLPBlock, dense, named, relu


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may downscale the embedding."""

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, key_mask: Optional[jax.Array] = None):
        internal = self.embedding_dim // self.downsample_rate
        if internal % self.num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        q = dense(internal, "q_proj", self.dtype)(q)
        k = dense(internal, "k_proj", self.dtype)(k)
        v = dense(internal, "v_proj", self.dtype)(v)
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, -1)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        c = q.shape[-1]
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(c))
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", probs, v, preferred_element_type=jnp.float32)
        out = out.reshape(*out.shape[:-2], internal).astype(self.dtype)
        return dense(self.embedding_dim, "out_proj", self.dtype)(out).astype(jnp.float32)


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
