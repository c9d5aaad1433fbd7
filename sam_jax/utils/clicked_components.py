"""Keep only the parts of a point-prompted mask that the positive clicks touch (no counterpart
in the official model, which returns whatever the decoder gives).

A decoder that reads its image features as "this kind of thing" rather than "this instance"
(the bundled DINOv2 model: a click on one car also returns another car across the road, and
negative clicks on the second car never remove it) gives masks with components apart from the
object. `keep_clicked_components` drops every 8-connected component of a mask that holds no
positive click, on the logits' own grid, before upscaling: the same rule as the training-free
baseline's "component holding the click". A mask that no positive click falls on, and a prompt
without positive clicks (a box), is left whole.

The fill runs on the device with static shapes: a reached region grows by whole runs of mask
cells along rows, then along columns, then one diagonal step, until nothing changes; the loop
count is the number of turns a path within the mask takes, not its length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["keep_clicked_components", "clicked_component_masks"]


def _fill_runs(reached: jax.Array, mask: jax.Array) -> jax.Array:
    """Along the last axis: every run of True `mask` cells holding a `reached` cell becomes
    reached. (..., W) bool -> (..., W) bool."""
    width = mask.shape[-1]
    lines = mask.reshape(-1, width)
    # a run's id within its line: the count of non-mask cells before it
    run = jnp.cumsum(~lines, axis=-1)
    ids = (jnp.arange(lines.shape[0])[:, None] * (width + 1) + run).reshape(-1)
    hit = jax.ops.segment_max(reached.reshape(-1).astype(jnp.int32), ids,
                              num_segments=lines.shape[0] * (width + 1))
    return mask & (hit[ids].reshape(mask.shape) > 0)


def _diagonal_step(reached: jax.Array, mask: jax.Array) -> jax.Array:
    """One 8-neighbourhood dilation of `reached` (..., H, W) kept inside `mask`."""
    grown = jax.lax.reduce_window(reached.astype(jnp.int8), jnp.int8(0), jax.lax.max,
                                  (1,) * (reached.ndim - 2) + (3, 3),
                                  (1,) * reached.ndim, "SAME")
    return mask & (grown > 0)


def clicked_component_masks(mask: jax.Array, seeds: jax.Array) -> jax.Array:
    """(..., H, W) bool `mask`, (..., H, W) bool `seeds` -> the cells of `mask` 8-connected to a
    seed that lies on it. Where no seed lies on a mask, that mask is returned whole."""
    start = mask & seeds

    def grow(state):
        reached, _ = state
        rows = _fill_runs(reached, mask)
        cols = jnp.swapaxes(_fill_runs(jnp.swapaxes(rows, -1, -2), jnp.swapaxes(mask, -1, -2)),
                            -1, -2)
        out = _diagonal_step(cols, mask)
        return out, jnp.any(out != reached)

    reached, _ = jax.lax.while_loop(lambda state: state[1], grow, (start, jnp.bool_(True)))
    seeded = jnp.any(start, axis=(-2, -1), keepdims=True)
    return jnp.where(seeded, reached, mask)


@functools.partial(jax.jit, static_argnames=("image_size", "threshold"))
def keep_clicked_components(logits: jax.Array, coords: jax.Array, labels: jax.Array, *,
                            image_size: int, threshold: float = 0.0) -> jax.Array:
    """(P, C, S, S) mask logits over the padded input frame (`image_size` px square), prompts'
    coords (P, N, 2) (x, y) input-frame pixels and labels (P, N) -> the logits with every
    component of `logits > threshold` that holds no positive (label 1) click pushed below the
    threshold (mirrored about it, so a logit's distance from the threshold is kept). Nothing
    changes for a prompt without positive clicks, or in a mask no positive click falls on."""
    p, _, side, _ = logits.shape
    cell = image_size / side
    col = jnp.clip(jnp.floor(coords[..., 0] / cell).astype(jnp.int32), 0, side - 1)
    row = jnp.clip(jnp.floor(coords[..., 1] / cell).astype(jnp.int32), 0, side - 1)
    prompt = jnp.broadcast_to(jnp.arange(p)[:, None], labels.shape)
    seeds = jnp.zeros((p, side, side), bool).at[prompt, row, col].max(labels == 1)
    mask = logits > threshold
    kept = clicked_component_masks(mask, seeds[:, None])
    return jnp.where(mask & ~kept, 2 * threshold - logits, logits)
