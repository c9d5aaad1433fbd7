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

`refine` runs the network over every pixel of each mask: the reference, and what training uses
on small patches. `refine_tiles` gives the same logits but runs it only on the square tiles
that hold part of the band, a window of the stage's radius around each: on an 1800x1200 photo
the band is about 1% of the pixels, and the dense convolutions were 85% of a click's time on
a CPU. The tiles go through in fixed-size steps of a loop that stops when none are left, so the
shapes are static (one compilation) and the work follows the outline's length. It reads the
normalized image itself (its first layer too runs on the tiles only): computing that layer for
the whole image once per image cost more than all the tiles of a click, and held 16 channels
of the original size.
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


def default_tiles_per_step(backend: str) -> int:
    """How many tiles `EdgeRefiner.refine_tiles` runs at once on `backend`. A CPU works
    through a step's tiles one after another, so the unused tiles of the last step are wasted
    work: small steps (32 measured fastest of 16/32/64 on the truck). An accelerator runs a
    step's tiles at once and pays a launch and a host read of the loop's condition per step:
    large steps, so one or two steps cover a photo's masks."""
    return 32 if backend == "cpu" else 512


def active_tiles(band: jax.Array, tile: int) -> jax.Array:
    """(M, H, W) bool band -> (M, ceil(H / tile), ceil(W / tile)) bool: which tile x tile
    squares (the last row and column cut by the image's border) hold a band pixel."""
    m, h, w = band.shape
    rows, cols = -(-h // tile), -(-w // tile)
    padded = jnp.pad(band, ((0, 0), (0, rows * tile - h), (0, cols * tile - w)))
    return padded.reshape(m, rows, tile, cols, tile).any(axis=(2, 4))


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

    def refine_tiles(self, images: jax.Array, logits: jax.Array, image_index: jax.Array, *,
                     tile: int = 16, tiles_per_step: int | None = None) -> jax.Array:
        """`__call__` computed on the tiles holding the band only: images (I, H, W, 3)
        normalized, logits (M, H, W) and image_index (M,) (the image each mask reads) -> (M,
        H, W) logits, equal to the dense network's up to float rounding.

        The image is cut into tile x tile squares; each square with a band pixel is read with
        `radius` pixels each side, and the network runs on these windows with VALID
        convolutions, so each layer shrinks the window by what it reads until the output is
        the tile itself. Activations outside the image are kept at zero, as the dense
        network's zero padding has them. Other tiles keep their logits: outside the band the
        residual is not applied. `tiles_per_step` defaults to the backend's
        (`default_tiles_per_step`)."""
        m, h, w = logits.shape
        radius = self.radius
        if tiles_per_step is None:
            tiles_per_step = default_tiles_per_step(jax.default_backend())
        logits = logits.astype(jnp.float32)
        band = outline_band(logits)
        active = active_tiles(band, tile)
        _, rows, cols = active.shape
        per_mask = rows * cols
        total = m * per_mask
        active = active.reshape(total)
        count = active.sum()
        # the active tiles' ids in order, then `total` (past the last mask: its pixels are
        # not written) to fill the last step
        ids = jnp.nonzero(active, size=total + tiles_per_step, fill_value=total)[0]
        size = tile + 2 * radius

        def window(idx):
            """One tile's pixels and the window around it, read in place: indices outside
            the image are clamped for reading and zeroed by `inside`."""
            mask = jnp.minimum(idx // per_mask, m - 1)
            y0 = jnp.where(idx < total, (idx % per_mask) // cols * tile, h)
            x0 = (idx % per_mask) % cols * tile
            ys, xs = y0 - radius + jnp.arange(size), x0 - radius + jnp.arange(size)
            inside = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
            yc, xc = jnp.clip(ys, 0, h - 1)[:, None], jnp.clip(xs, 0, w - 1)[None, :]
            squashed = jnp.where(inside, jnp.tanh(logits[mask, yc, xc] / LOGIT_SCALE), 0.0)
            pixels = jnp.where(inside[..., None], images[image_index[mask], yc, xc], 0.0)
            # the tile itself: where its pixels go (rows or columns past the image dropped)
            ty, tx = y0 + jnp.arange(tile), x0 + jnp.arange(tile)
            return squashed[..., None], pixels, inside, (mask, ty[:, None], tx[None, :])

        def residual(squashed, pixels, inside):
            # mask_in and image_in as one 4-channel convolution: on a CPU one pass over the
            # window costs 0.6x the two
            image_in = self.image_in.variables["params"]
            kernel = jnp.concatenate([self.mask_in.variables["params"]["kernel"],
                                      image_in["kernel"]], axis=2)
            x = jnp.concatenate([squashed, pixels], axis=-1)
            x = gelu(_valid_conv(x, kernel, image_in["bias"], 1, self.dtype))
            x, shrink = x * inside[:, 1:-1, 1:-1, None], 1
            for block, dilation in zip(self.blocks, self.dilations):
                params = block.variables["params"]
                y = _valid_conv(x, params["kernel"], params["bias"], dilation, self.dtype)
                shrink += dilation
                x = x[:, dilation:-dilation, dilation:-dilation] + gelu(y)
                x = x * inside[:, shrink:size - shrink, shrink:size - shrink, None]
            params = self.out.variables["params"]
            out = _valid_conv(x, params["kernel"], params["bias"], 1, self.dtype)
            out = out[..., 0].astype(jnp.float32)
            return MAX_RESIDUAL * jnp.tanh(out / MAX_RESIDUAL)

        def step(state):
            i, out = state
            chunk = jax.lax.dynamic_slice(ids, (i * tiles_per_step,), (tiles_per_step,))
            squashed, pixels, inside, (mask, ty, tx) = jax.vmap(window)(chunk)
            where = (mask[:, None, None], ty, tx)
            read = (mask[:, None, None], jnp.minimum(ty, h - 1), jnp.minimum(tx, w - 1))
            new = logits[read] + jnp.where(band[read], residual(squashed, pixels, inside), 0.0)
            return i + 1, out.at[where].set(new, mode="drop")

        return jax.lax.while_loop(lambda state: state[0] * tiles_per_step < count, step,
                                  (jnp.int32(0), logits))[1]

    def __call__(self, images: jax.Array, logits: jax.Array) -> jax.Array:
        return self.refine(self.image_features(images), logits)


def _valid_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dilation: int,
                dtype: jnp.dtype) -> jax.Array:
    """A 3x3 layer's weights (its nn.Conv pads SAME) applied to (B, S, S, C) with VALID
    padding in `dtype`: (B, S - 2 dilation, S - 2 dilation, features)."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (1, 1), "VALID", rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(dtype)
