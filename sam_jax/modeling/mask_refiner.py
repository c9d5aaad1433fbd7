"""A learned high-resolution mask refiner for a patch-14 backbone (not in the official SAM).

Why: with a frozen DINOv2-S at 448 px the decoder sees a 32x32 grid, and its masks are right at
the patch level but blobby below it. On held-out photos almost all of the bundled model's error
lies within half a patch of the true outline (correcting only the pixels within 7 input pixels
of it lifts mIoU@1 from 0.85 to 0.96 on horses, 0.77 to 0.92 on DAVIS). That is detail the
image has and the 32x32 features do not, so a small convolutional network reads it from the
image (CascadePSP-style class-agnostic refinement): the padded input image at full resolution
and the decoder's low-res logits in, a residual on the logits out, at half the input resolution
(2 input pixels per cell: 224x224 for a 448 px input).

The decoder's low-res logits are left as they are (they remain the mask prompt of the next
click); only the masks a user sees are refined. The last layer starts at zero, so an untrained
refiner returns the decoder's own (upsampled) logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import gelu

# logits are clipped before they enter the network: their scale is the decoder's, unbounded
LOGIT_CLIP = 20.0


def upsample_logits(low_res: jax.Array, side: int) -> jax.Array:
    """(..., L, L) -> (..., side, side), bilinear without antialiasing (align_corners=False,
    as `postprocess_masks`)."""
    shape = low_res.shape[:-2] + (side, side)
    return jax.image.resize(low_res.astype(jnp.float32), shape, "linear", antialias=False)


class MaskRefiner(nn.Module):
    """(B, S, S, 3) normalized padded images, (B, N, L, L) low-res logits -> (B, N, S/2, S/2)
    refined logits over the padded input frame (N masks per image share the image branch)."""

    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    dtype: jnp.dtype = jnp.float32
    # the image branch also reads the image embedding (B, h, w, C) over the same frame: what
    # is where, which colour and edges alone do not say
    embedding_input: bool = False

    def setup(self):
        def conv(features, dilation=1, stride=1, zero=False):
            init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
            return nn.Conv(features, (3, 3), strides=stride, kernel_dilation=dilation,
                           padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=init)

        self.image_in = conv(self.width, stride=2)
        self.image_mid = conv(self.width)
        if self.embedding_input:
            # starts at zero: a refiner trained without it is reproduced exactly, then learns
            self.embedding_proj = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                           kernel_init=nn.initializers.zeros)
        self.fuse = conv(self.width)
        # pre-norm residual blocks: without the norms the residual sums grow block by block
        # and the first trained steps swing the logits by tens
        self.norms = [nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
                      for _ in self.dilations]
        self.blocks = [conv(self.width, dilation=d) for d in self.dilations]
        self.out_norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
        self.out = conv(1, zero=True)

    def image_features(self, images: jax.Array, embeddings=None) -> jax.Array:
        """(B, S, S, 3) [and the (B, h, w, C) image embeddings over the same padded frame, for
        `embedding_input`] -> (B, S/2, S/2, width): computed once per image."""
        x = self.pixel_features(images)
        if not self.embedding_input:
            return x
        if embeddings is None:
            raise ValueError("this mask refiner reads the image embedding: pass embeddings")
        return x + self.embedding_features(embeddings, x.shape[1:3])

    def pixel_features(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) -> (B, S/2, S/2, width): the colour branch alone (also any crop)."""
        x = gelu(self.image_in(images.astype(self.dtype)))
        return gelu(self.image_mid(x))

    def embedding_features(self, embeddings: jax.Array, shape) -> jax.Array:
        """(B, h, w, C) embeddings -> (B, *shape, width): projected, then upsampled bilinearly
        over the same frame (projecting first keeps the upsampled tensor `width` deep)."""
        x = self.embedding_proj(embeddings.astype(self.dtype))
        return jax.image.resize(x, (x.shape[0],) + tuple(shape) + (x.shape[-1],), "linear",
                                antialias=False)

    def refine(self, image_features: jax.Array, low_res: jax.Array) -> jax.Array:
        """image_features (B, s, s, width), low_res (B, N, L, L) -> (B, N, s, s) logits."""
        return self.refine_upsampled(image_features,
                                     upsample_logits(low_res, image_features.shape[1]))

    def refine_upsampled(self, image_features: jax.Array, coarse: jax.Array) -> jax.Array:
        """image_features (B, h, w, width), coarse (B, N, h, w) logits already at the
        features' resolution -> (B, N, h, w): any window of the frame (training uses crops;
        the network is convolutional and its norms act per pixel)."""
        b, n = coarse.shape[:2]
        h, w = image_features.shape[1:3]
        clipped = jnp.clip(coarse, -LOGIT_CLIP, LOGIT_CLIP) / LOGIT_CLIP
        mask_in = jnp.stack([clipped, jax.nn.sigmoid(coarse)], axis=-1)  # (B, N, s, s, 2)
        feats = jnp.broadcast_to(image_features[:, None], (b, n) + image_features.shape[1:])
        x = jnp.concatenate([feats.astype(self.dtype), mask_in.astype(self.dtype)], axis=-1)
        x = x.reshape((b * n,) + x.shape[2:])
        x = self.fuse(x)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(gelu(norm(x)).astype(self.dtype))
        delta = self.out(gelu(self.out_norm(x)).astype(self.dtype))[..., 0].astype(jnp.float32)
        return coarse + delta.reshape(b, n, h, w)

    def __call__(self, images: jax.Array, low_res: jax.Array, embeddings=None) -> jax.Array:
        return self.refine(self.image_features(images, embeddings), low_res)
