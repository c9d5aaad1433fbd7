"""A learned edge stage at the original image's resolution (not in the official SAM).

Why: after the mask refiner (`mask_refiner.py`, 2 input pixels a cell), what is left of the
bundled model's error after a few clicks lies within 1-2 pixels of the true outline in the
original image (a refiner cell is 3.3 pixels of an 854 px DAVIS frame at 518 px). The shown
logits upscaled to the original size put the outline between cells; the image's own pixels say
where the edge really is. So a small convolutional network reads the original image (normalized
as the encoder's input) and the upscaled logits and adds a residual to those logits. Its output
layer starts at zero, so an untrained stage returns the logits unchanged; its receptive field
is a few pixels (radius 2 + sum of the dilations), and its residual is bounded and applied
only within `BAND` pixels of the shown outline (`outline_band`), so it moves outlines by a few
pixels and never adds or removes whole regions.

The image's contribution to the first layer is computed once per image (`image_features`); each
mask then costs a few 3x3 convolutions of `width` channels over its pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import gelu

# logits enter the network squashed: only the few units around the outline carry detail
LOGIT_SCALE = 4.0
# the residual is bounded by this and applied only within BAND pixels of the shown outline, so
# the stage moves outlines by at most BAND pixels and cannot add or remove regions away from
# them (a first stage without the band, trained on outline patches, added whole background
# areas of DAVIS frames whose logits sat just below the threshold)
MAX_RESIDUAL = 8.0
BAND = 3


def outline_band(logits: jax.Array, radius: int = BAND) -> jax.Array:
    """(..., H, W) logits -> (..., H, W) bool: the pixels within `radius` (Chebyshev
    distance) of a pixel on the other side of the threshold (0, the masks' threshold)."""
    inside = (logits > 0).astype(jnp.float32)
    return (_max_filter(inside, radius) > 0) & (_max_filter(1.0 - inside, radius) > 0)


def _max_filter(x: jax.Array, radius: int) -> jax.Array:
    """The max over the (2 radius + 1)^2 square around each pixel of (..., H, W) values in
    [0, 1], as two 1-D passes (outside the image counts as 0)."""
    lead = (1,) * (x.ndim - 2)
    for window in ((2 * radius + 1, 1), (1, 2 * radius + 1)):
        pad = [(0, 0)] * (x.ndim - 2) + [((w - 1) // 2, (w - 1) // 2) for w in window]
        x = jax.lax.reduce_window(x, 0.0, jax.lax.max, lead + window, (1,) * x.ndim, pad)
    return x


class EdgeRefiner(nn.Module):
    """image_features (B, H, W, width) of normalized images, logits (B, N, H, W) over the same
    pixels -> (B, N, H, W) logits (N masks per image share the image features)."""

    width: int = 16
    dilations: tuple[int, ...] = (1, 2, 4, 1)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        def conv(features, dilation=1, zero=False, bias=True):
            init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
            return nn.Conv(features, (3, 3), kernel_dilation=dilation, padding="SAME",
                           use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=init)

        self.image_in = conv(self.width)
        self.mask_in = conv(self.width, bias=False)
        self.blocks = [conv(self.width, dilation=d) for d in self.dilations]
        self.out = conv(1, zero=True)

    @property
    def radius(self) -> int:
        """Pixels each side that one output pixel reads (the stage moves outlines by less)."""
        return 2 + sum(self.dilations)

    def image_features(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) normalized images -> (B, H, W, width)."""
        return self.image_in(images.astype(self.dtype))

    def refine(self, image_features: jax.Array, logits: jax.Array) -> jax.Array:
        b, n, h, w = logits.shape
        squashed = jnp.tanh(logits.astype(jnp.float32) / LOGIT_SCALE)[..., None]
        x = self.mask_in(squashed.reshape(b * n, h, w, 1).astype(self.dtype))
        x = x.reshape(b, n, h, w, self.width) + image_features[:, None].astype(self.dtype)
        x = gelu(x.reshape(b * n, h, w, self.width))
        for block in self.blocks:
            x = x + gelu(block(x))
        residual = self.out(x)[..., 0].astype(jnp.float32).reshape(b, n, h, w)
        logits = logits.astype(jnp.float32)
        bounded = MAX_RESIDUAL * jnp.tanh(residual / MAX_RESIDUAL)
        return logits + jnp.where(outline_band(logits), bounded, 0.0)

    def __call__(self, images: jax.Array, logits: jax.Array) -> jax.Array:
        return self.refine(self.image_features(images), logits)
