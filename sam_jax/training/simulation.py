"""The paper's interactive training simulation (SAM App. A), jitted with static shapes.

For every ground-truth mask (a "prompt" below), one training step runs 11 rounds of the mask
decoder against the same image embedding:
- round 0: with equal probability a foreground point drawn uniformly from the mask, or its box
  with noise on each coordinate (std 10% of the box side, clipped to +-20 px); a lone point
  asks for the 3 multimask outputs, a box for the single output;
- rounds 1-10: the previous round's unthresholded low-res logits (of the mask with the highest
  predicted IoU) are the mask prompt; 8 of the 10 rounds also add one point drawn uniformly from
  the error region (positive where the prediction misses the mask, negative where it spills
  over); the other 2 add nothing: one at a random place among the 8, and the last.
  Optionally (`center_prob`, 0 in the paper) a click goes instead to the error region's
  interior-most cells, where the evaluation protocol (RITM's, the paper's) clicks; and
  optionally (`background_prob`, 0 in the paper) it is a negative click on the background
  near the object (`background_band`), whatever the prediction: a lesson the error region
  rarely teaches for a whole object, whose errors are a thin rim, while on datasets with parts
  most negative clicks that follow a whole-object first mask mean "only this part". Without
  it a negative click beside a whole person turned the mask into the clicked garment. Given
  the view's unannotated pixels (`background`), the click avoids every annotated object, so
  that a part's band never puts it on the rest of the person.
Prompts and mask inputs taken from predictions carry no gradient (they are sampled data).

Tokens use a fixed layout of `NUM_TOKENS` slots so all rounds share one shape: slots 0-1 hold
the box corners (labels 2, 3) or the first point and the official "not a point" pad (1, -1);
slots 2-9 fill with the clicks in order; unused slots are PAD_LABEL, which the model masks out
of attention. A box with clicks therefore has no pad token and points alone have one, exactly
the token sets the official prompt encoder builds for those prompts.

Sampling works on the decoder's low-res grid (`cell` input pixels per cell over the padded
input: 4 for SAM's ViT, 3.5 for a patch-14 backbone): a cell is drawn, then a position uniformly
inside it. Clicks are drawn only inside the image (not in
the zero padding); a prompt with no error left gets no click that round.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..modeling import PAD_LABEL
from .losses import mask_iou, sam_loss

NUM_CLICK_ROUNDS = 8
NUM_ROUNDS = 1 + NUM_CLICK_ROUNDS + 2
NUM_TOKENS = 2 + NUM_CLICK_ROUNDS
BOX_NOISE_FRACTION = 0.1
BOX_NOISE_MAX_PX = 20.0
# How far from the mask a background click may land, in low-res cells (~2.5 patches of a
# patch-14 backbone on its 3.5 px grid): as far as the evaluation's clicks on spills reach.
BACKGROUND_BAND_CELLS = 10


class Prompts(NamedTuple):
    coords: jax.Array  # (P, NUM_TOKENS, 2) float32, input frame (x, y)
    labels: jax.Array  # (P, NUM_TOKENS) int32
    num_clicks: jax.Array  # (P,) int32


def _image_region(input_size: jax.Array, side: int, cell: float = 4.0) -> jax.Array:
    """(P, 2) resized (h, w) -> (P, side, side) True on low-res cells that touch the image
    (each cell covers cell x cell input pixels)."""
    rows = jnp.arange(side)[None, :, None]
    cols = jnp.arange(side)[None, None, :]
    return ((cell * rows < input_size[:, 0, None, None])
            & (cell * cols < input_size[:, 1, None, None]))


def sample_pixels(key: jax.Array, where: jax.Array, input_size: jax.Array | None = None,
                  cell: float = 4.0) -> tuple[jax.Array, jax.Array]:
    """Uniform position inside a uniformly drawn True cell of each (side, side) map; with
    `input_size` (P, 2) (h, w), inside the part of the cell that lies in the image (a cell on
    the image's bottom/right edge can reach into the padding).

    Returns (P, 2) (x, y) input-frame coordinates (`cell` px per cell) and (P,) whether the map
    had any True cell at all."""
    p, side, _ = where.shape
    k_pick, k_jitter = jax.random.split(key)
    score = jax.random.uniform(k_pick, where.shape)
    flat = jnp.where(where, score, -1.0).reshape(p, side * side)
    index = jnp.argmax(flat, axis=-1)
    corner = cell * jnp.stack([index % side, index // side], axis=-1).astype(jnp.float32)
    extent = jnp.full((p, 2), cell)
    if input_size is not None:
        limit = jnp.stack([input_size[:, 1], input_size[:, 0]], axis=-1).astype(jnp.float32)
        extent = jnp.clip(limit - corner, 0.0, cell)
    # the jitter is < 1 and the product is rounded down, so a point never reaches the far edge
    jitter = jax.random.uniform(k_jitter, (p, 2), maxval=1.0 - 2.0 ** -12)
    return corner + jitter * extent, where.reshape(p, -1).any(axis=-1)


def noisy_boxes(key: jax.Array, boxes: jax.Array, input_size: jax.Array) -> jax.Array:
    """XYXY boxes with Gaussian noise of std 10% of the side (at most 20 px) on each coordinate,
    kept inside the image and ordered."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    std = BOX_NOISE_FRACTION * jnp.stack([w, h, w, h], axis=-1)
    noise = jnp.clip(std * jax.random.normal(key, boxes.shape), -BOX_NOISE_MAX_PX,
                     BOX_NOISE_MAX_PX)
    out = boxes + noise
    limit = jnp.stack([input_size[:, 1], input_size[:, 0]] * 2, axis=-1).astype(jnp.float32)
    out = jnp.clip(out, 0.0, limit)
    x0, x1 = jnp.minimum(out[:, 0], out[:, 2]), jnp.maximum(out[:, 0], out[:, 2])
    y0, y1 = jnp.minimum(out[:, 1], out[:, 3]), jnp.maximum(out[:, 1], out[:, 3])
    return jnp.stack([x0, y0, x1, y1], axis=-1)


def first_prompts(key: jax.Array, gt: jax.Array, boxes: jax.Array, input_size: jax.Array,
                  cell: float = 4.0):
    """Round 0: a point in the mask or a noisy box, each with probability 1/2.

    Returns (Prompts, use_box (P,) bool)."""
    p = gt.shape[0]
    k_choice, k_point, k_box = jax.random.split(key, 3)
    use_box = jax.random.bernoulli(k_choice, 0.5, (p,))
    point, _ = sample_pixels(k_point, gt, input_size, cell)
    box = noisy_boxes(k_box, boxes, input_size).reshape(p, 2, 2)
    first_two = jnp.where(use_box[:, None, None], box,
                          jnp.stack([point, jnp.zeros_like(point)], axis=1))
    first_labels = jnp.where(use_box[:, None], jnp.array([2, 3]), jnp.array([1, -1]))
    coords = jnp.zeros((p, NUM_TOKENS, 2), jnp.float32).at[:, :2].set(first_two)
    labels = jnp.full((p, NUM_TOKENS), PAD_LABEL, jnp.int32).at[:, :2].set(first_labels)
    return Prompts(coords, labels, jnp.zeros((p,), jnp.int32)), use_box


def _erode(region: jax.Array) -> jax.Array:
    """(P, side, side) bool eroded by one cell (4-neighbourhood; outside the map is False)."""
    padded = jnp.pad(region, ((0, 0), (1, 1), (1, 1)))
    return (region & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
            & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])


def deepest_cells(region: jax.Array, max_depth: int = 16) -> jax.Array:
    """The cells of each (side, side) map that survive the most erosions (up to `max_depth`):
    the interior-most part of the region (a city-block distance-transform maximum; the map's
    edge counts as boundary). An empty map stays empty."""
    def body(_, carry):
        current, deepest = carry
        current = _erode(current)
        keep = current.reshape(current.shape[0], -1).any(axis=-1)[:, None, None]
        return current, jnp.where(keep, current, deepest)

    return jax.lax.fori_loop(0, max_depth, body, (region, region))[1]


def background_band(gt: jax.Array, inside: jax.Array,
                    band: int = BACKGROUND_BAND_CELLS) -> jax.Array:
    """(P, side, side): the cells inside the image, outside the mask and within `band` cells
    of it (a square neighbourhood), where a negative click says "not this" about background."""
    near = jax.lax.reduce_window(gt.astype(jnp.int8), jnp.int8(0), jax.lax.max,
                                 (1, 2 * band + 1, 2 * band + 1), (1, 1, 1), "SAME")
    return (near > 0) & ~gt & inside


def add_click(key: jax.Array, prompts: Prompts, logits: jax.Array, gt: jax.Array,
              inside: jax.Array, enabled: jax.Array | bool,
              input_size: jax.Array | None = None, cell: float = 4.0,
              center_prob: float = 0.0, background_prob: float = 0.0,
              background: jax.Array | None = None) -> Prompts:
    """One click from the error region of `logits` (P, side, side), labelled by the truth:
    uniformly from the region (the paper), or with probability `center_prob` from its
    interior-most cells (the evaluation's click), or with probability `background_prob` a
    negative click anywhere in the background band around the mask, error or not (within
    `background` (P, side, side) bool, the view's unannotated cells, where given)."""
    error = ((logits > 0) != gt) & inside
    if center_prob > 0:
        key, k_center = jax.random.split(key)
        to_center = jax.random.bernoulli(k_center, center_prob, (gt.shape[0],))
        error = jnp.where(to_center[:, None, None], deepest_cells(error), error)
    if background_prob > 0:
        key, k_background = jax.random.split(key)
        to_background = jax.random.bernoulli(k_background, background_prob, (gt.shape[0],))
        band = background_band(gt, inside)
        if background is not None:
            band = band & background
        error = jnp.where(to_background[:, None, None], band, error)
    xy, any_error = sample_pixels(key, error, input_size, cell)
    # the label is the ground truth under the chosen cell: a miss gives a positive click
    at = jnp.clip((xy / cell).astype(jnp.int32), 0, gt.shape[-1] - 1)
    label = gt[jnp.arange(gt.shape[0]), at[:, 1], at[:, 0]].astype(jnp.int32)
    add = any_error & enabled & (prompts.num_clicks < NUM_CLICK_ROUNDS)
    slot = 2 + jnp.minimum(prompts.num_clicks, NUM_CLICK_ROUNDS - 1)
    rows = jnp.arange(gt.shape[0])
    coords = prompts.coords.at[rows, slot].set(
        jnp.where(add[:, None], xy, prompts.coords[rows, slot]))
    labels = prompts.labels.at[rows, slot].set(
        jnp.where(add, label, prompts.labels[rows, slot]))
    return Prompts(coords, labels, prompts.num_clicks + add.astype(jnp.int32))


def click_schedule(key: jax.Array, click_rounds: int = NUM_CLICK_ROUNDS) -> jax.Array:
    """(click_rounds + 2,) bool for rounds 1..10 (the paper's 8 clicks): whether the round adds
    a click. The 2 rounds without one are the last and one drawn uniformly among the
    click_rounds + 1 places around the clicks."""
    rounds = click_rounds + 2
    quiet = jax.random.randint(key, (), 0, rounds - 1)
    steps = jnp.arange(rounds)
    return (steps != quiet) & (steps != rounds - 1)


def select_outputs(masks: jax.Array, iou: jax.Array, multimask: jax.Array):
    """From all 1 + 3 decoder outputs, the candidates a prompt is trained on: the 3 multimask
    outputs where `multimask`, else the single output repeated 3 times (so the min over
    candidates and the mean IoU loss reduce to that one mask)."""
    single_m, single_i = masks[:, :1], iou[:, :1]
    multi_m, multi_i = masks[:, 1:], iou[:, 1:]
    cand_m = jnp.where(multimask[:, None, None, None], multi_m, single_m)
    cand_i = jnp.where(multimask[:, None], multi_i, single_i)
    return cand_m, cand_i


def best_logits(cand_masks: jax.Array, cand_iou: jax.Array) -> jax.Array:
    """The candidate with the highest predicted IoU: the next round's mask prompt."""
    best = jnp.argmax(cand_iou, axis=-1)
    return cand_masks[jnp.arange(cand_masks.shape[0]), best]


class SimulationOutput(NamedTuple):
    loss: jax.Array
    metrics: dict[str, jax.Array]


def simulate(decode: Callable[..., Any], key: jax.Array, gt: jax.Array, boxes: jax.Array,
             valid: jax.Array, input_size: jax.Array, *, remat_rounds: bool = True,
             loss_kwargs: dict | None = None, cell: float = 4.0,
             click_rounds: int = NUM_CLICK_ROUNDS,
             center_prob: float = 0.0, background_prob: float = 0.0,
             background: jax.Array | None = None) -> SimulationOutput:
    """Runs the 11 rounds (1 + click_rounds + 2 with fewer clicks, to spend a small compute
    budget on more masks) and returns the mean loss over rounds and valid prompts.

    decode(coords, labels, mask_logits or None) -> (masks (P, 4, side, side), iou (P, 4)) closes
    over the image embeddings and parameters (gradients flow through it); gt (P, side, side)
    bool; boxes (P, 4) XYXY input frame; valid (P,) bool; input_size (P, 2) resized (h, w);
    cell: input pixels per low-res cell (`SamConfig.low_res_stride`); center_prob: the share
    of corrective clicks put at the error region's interior, background_prob: the share that
    are negative clicks on the background near the object, inside `background` (P, side, side)
    bool where given (`add_click`).
    """
    if not 1 <= click_rounds <= NUM_CLICK_ROUNDS:
        raise ValueError(f"click_rounds must be in 1..{NUM_CLICK_ROUNDS}, got {click_rounds}")
    loss_kwargs = loss_kwargs or {}
    side = gt.shape[-1]
    inside = _image_region(input_size, side, cell)
    k_first, k_sched, k_clicks = jax.random.split(key, 3)
    prompts, use_box = first_prompts(k_first, gt, boxes, input_size, cell)

    masks, iou = decode(prompts.coords, prompts.labels, None)
    cand_m, cand_i = select_outputs(masks, iou, ~use_box)
    loss0, metrics0 = sam_loss(cand_m, cand_i, gt, valid, **loss_kwargs)
    first_iou = metrics0["iou"]
    prev = jax.lax.stop_gradient(best_logits(cand_m, cand_i))

    def one_round(carry, xs):
        prompts, prev = carry
        adds, k = xs
        prompts = add_click(k, prompts, prev, gt, inside, adds, input_size, cell, center_prob,
                            background_prob, background)
        masks, iou = decode(prompts.coords, prompts.labels, prev)
        cand_m, cand_i = masks[:, :1], iou[:, :1]  # later rounds: the single output
        loss, metrics = sam_loss(cand_m, cand_i, gt, valid, **loss_kwargs)
        prev = jax.lax.stop_gradient(cand_m[:, 0])
        return (prompts, prev), (loss, metrics)

    body = jax.checkpoint(one_round) if remat_rounds else one_round
    schedule = click_schedule(k_sched, click_rounds)
    keys = jax.random.split(k_clicks, click_rounds + 2)
    (prompts, prev), (losses, metrics) = jax.lax.scan(body, (prompts, prev), (schedule, keys))

    num_rounds = click_rounds + 3
    loss = (loss0 + losses.sum()) / num_rounds
    final_iou = mask_iou(prev, gt)
    count = jnp.maximum(valid.sum(), 1)
    out = {k: (metrics0[k] + metrics[k].sum()) / num_rounds for k in metrics0}
    out.update(loss=loss, iou_first_round=first_iou,
               iou_last_round=jnp.where(valid, final_iou, 0.0).sum() / count,
               clicks=jnp.where(valid, prompts.num_clicks, 0).sum() / count)
    return SimulationOutput(loss, out)
