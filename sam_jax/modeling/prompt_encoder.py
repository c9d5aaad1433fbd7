"""Ports `segment_anything/modeling/prompt_encoder.py`.

Sparse prompts are handled as one padded token sequence per prompt so that any mix of points,
a box and padding can share one jitted call. Each token has (x, y) in the 1024-px input frame
and a label:
  -1 "not a point" (the official padding point added when there is no box),
   0 background point, 1 foreground point, 2 box top-left corner, 3 box bottom-right corner,
  PAD_LABEL (-2) an absent token: embedded as zeros and masked out of every attention, so it
  changes nothing (the official code has no such token; it is how we pad to a fixed length).
`__call__(points, boxes, masks)` keeps the official signature and token order for parity.

The random-Fourier Gaussian matrix is a buffer, not a parameter: it lives in the "buffers"
collection so optimizers and weight decay never see it.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from .common import LayerNorm, gelu, named

PAD_LABEL = -2


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (sin, cos of 2*pi*(2c-1) @ G)."""

    num_pos_feats: int = 64
    scale: float = 1.0

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.variable(
            "buffers", "positional_encoding_gaussian_matrix",
            lambda: self.scale * jax.random.normal(self.make_rng("params"),
                                                   (2, self.num_pos_feats)))

    def pe_encoding(self, coords):
        """coords in [0, 1]^2, shape (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.value
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: Tuple[int, int]):
        """Dense encoding of an (h, w) grid of cell centres -> (h, w, C)."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.pe_encoding(grid)

    def forward_with_coords(self, coords, image_size: Tuple[int, int]):
        """Pixel coordinates (x, y) in an image of (H, W) -> (..., C)."""
        coords = coords.astype(jnp.float32) / jnp.array([image_size[1], image_size[0]],
                                                        jnp.float32)
        return self.pe_encoding(coords)


class PromptEncoder(nn.Module):
    embed_dim: int
    image_embedding_size: Tuple[int, int]
    input_image_size: Tuple[int, int]
    mask_in_chans: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        embed = lambda: nn.Embed(1, self.embed_dim)  # noqa: E731
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
        # pos/neg point + 2 box corners
        self.point_embeddings = [named(self, f"point_embeddings.{i}", embed()) for i in range(4)]
        self.not_a_point_embed = embed()
        self.no_mask_embed = embed()
        conv = lambda feat, k: nn.Conv(feat, (k, k), strides=(k, k), padding="VALID",  # noqa
                                       dtype=self.dtype, param_dtype=jnp.float32)
        c = self.mask_in_chans
        layers = {0: conv(c // 4, 2), 1: LayerNorm(1e-6), 3: conv(c, 2), 4: LayerNorm(1e-6),
                  6: conv(self.embed_dim, 1)}  # 2 and 5 are the parameter-free GELUs
        self.mask_downscaling = [named(self, f"mask_downscaling.{i}", m)
                                 for i, m in layers.items()]

    @property
    def mask_input_size(self) -> Tuple[int, int]:
        return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

    def get_dense_pe(self):
        """(h, w, C) positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size)

    def embed_tokens(self, coords, labels):
        """(..., T, 2) coordinates in the input frame and (..., T) labels -> (..., T, C)."""
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # centre
        labels = labels[..., None]
        table = [self.point_embeddings[i].embedding[0] for i in range(4)]
        out = jnp.where(labels < 0, 0.0, pe)
        out = out + jnp.where(labels == -1, self.not_a_point_embed.embedding[0], 0.0)
        for i, row in enumerate(table):
            out = out + jnp.where(labels == i, row, 0.0)
        return out

    def embed_masks(self, masks):
        """(B, 256, 256, 1) mask logits -> (B, 64, 64, C)."""
        d = self.mask_downscaling
        x = gelu(d[1](d[0](masks.astype(self.dtype))))
        x = gelu(d[3](d[2](x)))
        return d[4](x).astype(jnp.float32)

    def no_mask_dense(self, batch: int):
        h, w = self.image_embedding_size
        return jnp.broadcast_to(self.no_mask_embed.embedding[0], (batch, h, w, self.embed_dim))

    def __call__(self, points: Optional[Tuple[jax.Array, jax.Array]],
                 boxes: Optional[jax.Array], masks: Optional[jax.Array]):
        """Official semantics: points (B, N, 2) + labels (B, N), boxes (B, 4) XYXY, masks
        (B, 256, 256, 1), all in the input frame. Returns sparse (B, T, C) and dense
        (B, h, w, C) embeddings."""
        coords, labels = [], []
        if points is not None:
            pc, pl = points
            coords.append(pc)
            labels.append(pl)
            if boxes is None:  # the official padding point
                coords.append(jnp.zeros((pc.shape[0], 1, 2), jnp.float32))
                labels.append(-jnp.ones((pl.shape[0], 1), pl.dtype))
        if boxes is not None:
            coords.append(boxes.reshape(-1, 2, 2))
            labels.append(jnp.broadcast_to(jnp.array([2, 3]), (boxes.shape[0], 2)))
        batch = (points[0].shape[0] if points is not None else
                 boxes.shape[0] if boxes is not None else
                 masks.shape[0] if masks is not None else 1)
        if coords:
            sparse = self.embed_tokens(jnp.concatenate(coords, 1).astype(jnp.float32),
                                       jnp.concatenate(labels, 1).astype(jnp.int32))
        else:
            sparse = jnp.zeros((batch, 0, self.embed_dim), jnp.float32)
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(batch)
        return sparse, dense
