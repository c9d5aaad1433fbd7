"""Left-right mirroring in the model's padded input frame, for averaging a model's masks over
the image and its mirror image (`SamConfig.mirror_average`; no counterpart in the official
model).

An image of width w (after resizing) fills columns [0, w) of the frame; the rest is zero
padding, which stays where it is. Input pixel x mirrors to w - 1 - x, which is the exact mirror
under SAM's convention that a prompt coordinate x names the centre of pixel x (the prompt
encoder adds 0.5): x + 0.5 -> w - (x + 0.5). All functions take the widths as arrays, one per
image or prompt, so images of different widths share one compiled call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mirror_pixels", "mirror_points", "mirror_columns"]


def mirror_pixels(pixels: jax.Array, widths: jax.Array) -> jax.Array:
    """(B, S, S, C) padded images, (B,) image widths -> each image mirrored inside its own
    width (an exact column reversal; the padding columns are kept)."""
    x = jnp.arange(pixels.shape[2])
    widths = jnp.asarray(widths)[:, None]
    source = jnp.where(x[None] < widths, widths - 1 - x[None], x[None])  # (B, S)
    return jnp.take_along_axis(pixels, source[:, None, :, None], axis=2)


def mirror_points(coords: jax.Array, labels: jax.Array, widths: jax.Array) -> jax.Array:
    """(P, T, 2) prompt tokens' (x, y) in the input frame, their labels (P, T), (P,) widths of
    the images the prompts read -> the tokens' coordinates on the mirrored images. A box's
    corners (labels 2 and 3, top-left and bottom-right) swap their x, so the box stays XYXY.
    Tokens whose coordinates the model ignores (not-a-point, padding) are mirrored too."""
    x = coords[..., 0]
    w = jnp.asarray(widths, coords.dtype)[:, None]
    top_left, bottom_right = labels == 2, labels == 3
    # one box per prompt at most: its corners' x, 0 where a prompt has no box
    x0 = jnp.sum(jnp.where(top_left, x, 0), axis=-1, keepdims=True)
    x1 = jnp.sum(jnp.where(bottom_right, x, 0), axis=-1, keepdims=True)
    mirrored = jnp.where(top_left, w - 1 - x1, jnp.where(bottom_right, w - 1 - x0, w - 1 - x))
    return coords.at[..., 0].set(mirrored)


def mirror_columns(grid: jax.Array, widths: jax.Array, image_size: int,
                   axis: int = -1) -> jax.Array:
    """A map over the padded frame, (P, ..., side, ...) with `side` cells along `axis`
    covering `image_size` input pixels, and (P,) image widths -> the same map for the mirrored
    images (the mirrored image's map, mirrored back, is the original's).

    Cell j's centre (j + 0.5) * cell mirrors to w - (j + 0.5) * cell, i.e. to cell
    w / cell - 1 - j: an exact reversal of the first w / cell cells when that is whole (always
    for an image as wide as the frame), else linear between the two nearest cells. Cells over
    the padding read the image's last column (clamped)."""
    grid = jnp.moveaxis(grid, axis, -1)
    side = grid.shape[-1]
    w = jnp.asarray(widths, jnp.float32)
    source = w[:, None] * side / image_size - 1 - jnp.arange(side, dtype=jnp.float32)[None]
    source = jnp.clip(source, 0, side - 1)  # (P, side)
    left = jnp.floor(source).astype(jnp.int32)
    right = jnp.minimum(left + 1, side - 1)
    weight = source - left
    shape = (grid.shape[0],) + (1,) * (grid.ndim - 2) + (side,)
    pick = lambda index: jnp.take_along_axis(grid, index.reshape(shape), axis=-1)  # noqa: E731
    out = pick(left) * (1 - weight.reshape(shape)) + pick(right) * weight.reshape(shape)
    return jnp.moveaxis(out.astype(grid.dtype), -1, axis)
