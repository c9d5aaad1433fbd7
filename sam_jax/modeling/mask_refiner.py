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

With `subpixel` the refiner also writes each cell's 2x2 input pixels (a sub-pixel convolution,
as in ESPCN): what is left of the bundled model's error after a few clicks lies mostly within
1-2 original pixels of the true outline, finer than a cell (3.3 pixels of a DAVIS frame at 518
px). Its output is the cell logits upsampled 2x plus a per-pixel residual that one more
convolution and a 4-channel output layer read from the same features (whose first convolution
saw each cell's pixels); the output layer starts at zero too, so a refiner given `subpixel`
starts as its cell-resolution self, upsampled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .common import gelu

# logits are clipped before they enter the network: their scale is the decoder's, unbounded
LOGIT_CLIP = 20.0
# a click-reading refiner (`click_input`) sees each kind of click (positive, negative) as a
# Gaussian bump at these widths, in refiner cells (2 input pixels each): a few pixels, to say
# "this pixel", and about a DINOv2 patch, to say "this neighbourhood"
CLICK_SIGMAS = (3.0, 10.0)
CLICK_CHANNELS = 2 * len(CLICK_SIGMAS)


def click_maps(coords: jax.Array, labels: jax.Array, shape, origin=None) -> jax.Array:
    """coords (B, N, T, 2) (x, y) prompt points in input pixels and labels (B, N, T) (1
    positive, 0 negative; any other label, a box corner or padding, is not a click) -> (B, N,
    h, w, CLICK_CHANNELS) maps over the refiner cells `shape` (h, w), or over the window of
    that size whose top-left cell is `origin` (B, 2) (row, col). Channel k * 2 + c holds,
    for clicks of label c, the largest exp(-d^2 / 2 sigma_k^2) over them, d the distance in
    cells from the cell's centre to the click (a point sits at its pixel's centre, + 0.5, as
    the prompt encoder places it)."""
    h, w = shape
    b = coords.shape[0]
    origin = jnp.zeros((b, 2), jnp.float32) if origin is None else origin.astype(jnp.float32)
    # cell (r, c) of the window covers input pixels [2 (c + origin), 2 (c + origin) + 2)
    rows = jnp.arange(h, dtype=jnp.float32)[None, :] + origin[:, :1] + 0.5  # (B, h)
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] + origin[:, 1:] + 0.5  # (B, w)
    at = (coords.astype(jnp.float32) + 0.5) / 2.0  # (B, N, T, 2) in cells
    dy = rows[:, None, None, :] - at[..., 1:2]  # (B, N, T, h)
    dx = cols[:, None, None, :] - at[..., 0:1]  # (B, N, T, w)
    maps = []
    for sigma in CLICK_SIGMAS:
        gy = jnp.exp(-dy ** 2 / (2 * sigma ** 2))
        gx = jnp.exp(-dx ** 2 / (2 * sigma ** 2))
        bump = gy[..., :, None] * gx[..., None, :]  # (B, N, T, h, w)
        for label in (1, 0):
            mine = (labels == label)[..., None, None]
            maps.append(jnp.max(jnp.where(mine, bump, 0.0), axis=2))
    return jnp.stack(maps, axis=-1)


def depth_to_space(x: jax.Array) -> jax.Array:
    """(..., h, w, 4) -> (..., 2h, 2w): channel 2 * i + j is pixel (i, j) of its cell."""
    h, w = x.shape[-3:-1]
    x = x.reshape(x.shape[:-3] + (h, w, 2, 2))
    x = jnp.moveaxis(x, -2, -3)  # (..., h, 2, w, 2)
    return x.reshape(x.shape[:-4] + (2 * h, 2 * w))


def upsample_logits(low_res: jax.Array, side: int) -> jax.Array:
    """(..., L, L) -> (..., side, side), bilinear without antialiasing (align_corners=False,
    as `postprocess_masks`)."""
    shape = low_res.shape[:-2] + (side, side)
    return jax.image.resize(low_res.astype(jnp.float32), shape, "linear", antialias=False)


class MaskRefiner(nn.Module):
    """(B, S, S, 3) normalized padded images, (B, N, L, L) low-res logits -> (B, N, S/2, S/2)
    refined logits over the padded input frame, (B, N, S, S) with `subpixel` (N masks per
    image share the image branch)."""

    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    dtype: jnp.dtype = jnp.float32
    # the image branch also reads the image embedding (B, h, w, C) over the same frame: what
    # is where, which colour and edges alone do not say
    embedding_input: bool = False
    # the prompt's clicks are read too (`click_maps`): a corrective click near the outline is
    # below the decoder's grid, so only the refiner, at 2 pixels a cell, can honour it
    click_input: bool = False
    # each cell's 2x2 pixels are written too: logits at the input resolution (module doc)
    subpixel: bool = False

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
        if self.click_input:
            # starts at zero: a refiner trained without clicks is reproduced exactly, then learns
            self.click_in = conv(self.width, zero=True)
        # pre-norm residual blocks: without the norms the residual sums grow block by block
        # and the first trained steps swing the logits by tens
        self.norms = [nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
                      for _ in self.dilations]
        self.blocks = [conv(self.width, dilation=d) for d in self.dilations]
        self.out_norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
        self.out = conv(1, zero=True)
        if self.subpixel:
            self.subpixel_hidden = conv(self.width)
            self.out_subpixel = conv(4, zero=True)

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

    def refine(self, image_features: jax.Array, low_res: jax.Array, coords=None,
               labels=None) -> jax.Array:
        """image_features (B, s, s, width), low_res (B, N, L, L) [and, for `click_input`, the
        prompts' points coords (B, N, T, 2) and labels (B, N, T) in the input frame] -> (B,
        N, s, s) logits."""
        side = image_features.shape[1]
        clicks = None
        if self.click_input:
            clicks = self.prompt_clicks(coords, labels, low_res.shape[:2], (side, side))
        return self.refine_upsampled(image_features, upsample_logits(low_res, side), clicks)

    def prompt_clicks(self, coords, labels, batch, shape, origin=None) -> jax.Array:
        """`click_maps` of the prompts' points; no points (a box alone) give empty maps."""
        if coords is None:
            return jnp.zeros(tuple(batch) + tuple(shape) + (CLICK_CHANNELS,), jnp.float32)
        return click_maps(coords, labels, shape, origin)

    def refine_upsampled(self, image_features: jax.Array, coarse: jax.Array,
                         clicks=None) -> jax.Array:
        """image_features (B, h, w, width), coarse (B, N, h, w) logits already at the
        features' resolution [, clicks (B, N, h, w, CLICK_CHANNELS) `click_maps` over the same
        cells, for `click_input`] -> (B, N, h, w): any window of the frame (training uses
        crops; the network is convolutional and its norms act per pixel)."""
        b, n = coarse.shape[:2]
        h, w = image_features.shape[1:3]
        clipped = jnp.clip(coarse, -LOGIT_CLIP, LOGIT_CLIP) / LOGIT_CLIP
        mask_in = jnp.stack([clipped, jax.nn.sigmoid(coarse)], axis=-1)  # (B, N, s, s, 2)
        feats = jnp.broadcast_to(image_features[:, None], (b, n) + image_features.shape[1:])
        x = jnp.concatenate([feats.astype(self.dtype), mask_in.astype(self.dtype)], axis=-1)
        x = x.reshape((b * n,) + x.shape[2:])
        x = self.fuse(x)
        if self.click_input:
            if clicks is None:
                clicks = jnp.zeros((b, n, h, w, CLICK_CHANNELS), jnp.float32)
            x = x + self.click_in(clicks.reshape((b * n, h, w, -1)).astype(self.dtype))
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(gelu(norm(x)).astype(self.dtype))
        x = gelu(self.out_norm(x)).astype(self.dtype)
        cells = coarse + self.out(x)[..., 0].astype(jnp.float32).reshape(b, n, h, w)
        if not self.subpixel:
            return cells
        fine = self.out_subpixel(gelu(self.subpixel_hidden(x)))
        fine = depth_to_space(fine.astype(jnp.float32))
        up = jax.image.resize(cells, (b, n, 2 * h, 2 * w), "linear", antialias=False)
        return up + fine.reshape(b, n, 2 * h, 2 * w)

    def __call__(self, images: jax.Array, low_res: jax.Array, embeddings=None, coords=None,
                 labels=None) -> jax.Array:
        return self.refine(self.image_features(images, embeddings), low_res, coords, labels)
