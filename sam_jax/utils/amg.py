"""Ports `segment_anything/utils/amg.py`: point grids, crop boxes, stability score, mask boxes,
near-crop-edge test, run-length encodings and small-region removal, for the automatic mask
generator, plus the NMS the official takes from torchvision.

Host-side helpers are numpy (RLE encoding is inherently sequential output); what runs on every
decoded mask (`stability_score`, `masks_to_boxes`, `is_box_near_crop_edge`, `greedy_nms`) is
jax with static shapes, so the generator filters and suppresses a crop's masks on the device.
Differences from the official module:
- `greedy_nms` is torchvision's `nms` (same order, same ties) on a fixed-size candidate set
  with validity flags, returning the kept indices padded to that size and their count;
- COCO's compressed RLE string is written here (`coco_encode_rle`), byte-identical to
  pycocotools (tested), so reading and writing SA-1B needs no pycocotools;
- `remove_small_regions` labels components with scipy instead of OpenCV (same 8-connectivity,
  same result: tested against the official function).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Rle = Dict[str, Any]  # {"size": [h, w], "counts": [int, ...] or str}


# ---- grids and crops ---------------------------------------------------------------------------

def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points evenly spaced in [0, 1]^2, cell centres, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int,
                                scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has n_per_side / scale_per_layer**i points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer ** i)))
            for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes (the whole image first, then (2**i)**2 overlapping crops for layer i)
    and the layer index of each."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for layer in range(n_layers):
        n = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer + 1)
    return boxes, layers


def box_xyxy_to_xywh(box: Sequence[float]) -> List[float]:
    """XYXY -> XYWH as a list of Python numbers (ints stay ints, as the official records)."""
    x0, y0, x1, y1 = np.asarray(box).tolist()
    return [x0, y0, x1 - x0, y1 - y0]


# ---- device-side per-mask reductions, filters and NMS -------------------------------------------

def stability_score(logits: jax.Array, mask_threshold: float, offset: float) -> jax.Array:
    """IoU of the masks thresholded at `mask_threshold` +- `offset` (the high one is inside
    the low one, so IoU = count(high) / count(low)); over the last two axes."""
    high = jnp.sum(logits > mask_threshold + offset, axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum(logits > mask_threshold - offset, axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def boxes_from_any(rows_any: jax.Array, cols_any: jax.Array) -> jax.Array:
    """XYXY boxes (inclusive max index, as the official) from per-mask row and column
    occupancy (..., H) and (..., W); [0, 0, 0, 0] for an empty mask."""
    def edges(occupied):
        n = occupied.shape[-1]
        idx = jnp.arange(n)
        last = jnp.max(jnp.where(occupied, idx, -1), axis=-1)
        first = jnp.min(jnp.where(occupied, idx, n), axis=-1)
        return first, last
    top, bottom = edges(rows_any)
    left, right = edges(cols_any)
    box = jnp.stack([left, top, right, bottom], axis=-1)
    empty = (right < left) | (bottom < top)
    return jnp.where(empty[..., None], 0, box).astype(jnp.int32)


def masks_to_boxes(masks: jax.Array) -> jax.Array:
    """(..., H, W) bool masks -> (..., 4) XYXY boxes, as the official `batched_mask_to_box`."""
    return boxes_from_any(jnp.any(masks, axis=-1), jnp.any(masks, axis=-2))


def is_box_near_crop_edge(boxes: jax.Array, crop_box: jax.Array, orig_box: jax.Array,
                          atol: float = 20.0) -> jax.Array:
    """(N,) True where a box (crop frame, XYXY) lies within `atol` of a crop edge that is not
    also an edge of the image: the mask was probably cut by the crop. Jittable; the crop and
    image boxes may be traced, so crops of one size share a compiled function."""
    crop_box = jnp.asarray(crop_box, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32) + crop_box[jnp.array([0, 1, 0, 1])]
    near_crop = jnp.abs(boxes - crop_box) <= atol
    near_image = jnp.abs(boxes - jnp.asarray(orig_box, jnp.float32)) <= atol
    return jnp.any(near_crop & ~near_image, axis=1)


def greedy_nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array,
               iou_threshold: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """torchvision's `nms` on the `valid` ones of N XYXY boxes, jittable with static shapes:
    returns the kept indices by decreasing score (ties: lower index first), padded with 0 to
    N, and their count.

    Greedy, as torchvision: the best remaining box is kept and suppresses every remaining box
    with IoU > threshold (IoU NaN, two empty boxes, suppresses nothing). One loop step per
    kept box, each comparing it with all N boxes: no N x N matrix is stored. Mask boxes are
    integers, so areas and intersections are exact in float32 and only the division rounds,
    as in torchvision: the same boxes are kept on every backend."""
    n = boxes.shape[0]
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    b = jnp.asarray(boxes, jnp.float32)[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def keep_best(state):
        remaining, kept, count = state
        i = jnp.argmax(remaining)  # the first remaining box in score order
        wh = jnp.maximum(jnp.minimum(b[i, 2:], b[:, 2:]) - jnp.maximum(b[i, :2], b[:, :2]), 0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (area[i] + area - inter)
        remaining = (remaining & ~(iou > iou_threshold)).at[i].set(False)
        return remaining, kept.at[count].set(order[i]), count + 1

    state = (jnp.asarray(valid)[order], jnp.zeros((n,), jnp.int32), jnp.int32(0))
    _, kept, count = jax.lax.while_loop(lambda s: jnp.any(s[0]), keep_best, state)
    return kept, count


_greedy_nms_jit = jax.jit(greedy_nms)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """`greedy_nms` for host arrays: indices of the kept boxes (torchvision's `nms`). Runs
    jitted on a power-of-two padded size, so the number of boxes does not trigger a new
    compile each call."""
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    size = 1 << max(0, n - 1).bit_length()
    pb = np.zeros((size, 4), np.float32)
    pb[:n] = boxes
    ps = np.zeros((size,), np.float32)
    ps[:n] = scores
    kept, count = jax.device_get(_greedy_nms_jit(pb, ps, np.arange(size) < n,
                                                 np.float32(iou_threshold)))
    return kept[:count].astype(np.int64)


# ---- run-length encodings ----------------------------------------------------------------------

def mask_to_rle(masks: np.ndarray) -> List[Rle]:
    """(B, H, W) bool masks -> uncompressed COCO RLEs (column-major runs, starting with the
    count of zeros), as the official `mask_to_rle_pytorch`."""
    masks = np.asarray(masks, bool)
    b, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(b, h * w)
    out = []
    for i in range(b):
        change = np.flatnonzero(flat[i, 1:] != flat[i, :-1]) + 1
        bounds = np.concatenate([[0], change, [h * w]])
        counts = np.diff(bounds).tolist()
        if flat[i, 0]:
            counts = [0] + counts
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Rle) -> np.ndarray:
    """Uncompressed or COCO-compressed RLE -> (H, W) bool mask."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_decode_counts(counts)
    counts = np.asarray(counts, np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, but size {h}x{w} needs "
                         f"{h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def area_from_rle(rle: Rle) -> int:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_decode_counts(counts)
    return int(sum(counts[1::2]))


def coco_encode_counts(counts: Sequence[int]) -> str:
    """pycocotools' `rleToString`: counts from the third on are stored as differences to the
    count two before, each as little-endian 5-bit groups with a continuation bit, offset by
    48 into printable ASCII."""
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's >> on the signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def coco_decode_counts(s: str | bytes) -> List[int]:
    """Inverse of `coco_encode_counts` (pycocotools' `rleFrString`)."""
    data = s.encode() if isinstance(s, str) else bytes(s)
    counts: List[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated COCO RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_encode_rle(rle: Rle) -> Rle:
    """Uncompressed RLE -> {"size": [h, w], "counts": str}, as pycocotools.frPyObjects +
    decode('utf-8') in the official `coco_encode_rle`."""
    return {"size": list(rle["size"]), "counts": coco_encode_counts(rle["counts"])}


# ---- small regions -----------------------------------------------------------------------------

def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: str) -> Tuple[np.ndarray, bool]:
    """Fills holes (mode "holes") or removes islands ("islands") smaller than `area_thresh`
    (8-connected); returns the mask and whether it changed. If every island is small, the
    largest is kept, as the official."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = correct_holes ^ np.asarray(mask, bool)
    regions, n_labels = ndimage.label(working, structure=np.ones((3, 3), bool))
    sizes = np.bincount(regions.ravel(), minlength=n_labels + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n_labels + 1) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
