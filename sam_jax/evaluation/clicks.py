"""The point-to-mask click protocol of the SAM paper (§7.1, App. D.1), which follows RITM's.

- First click: "center", the mask pixel farthest from the mask's boundary (the maximum of its
  Euclidean distance transform; the image border counts as boundary), or "random", a pixel of
  the mask drawn uniformly.
- Every next click: the pixel farthest from the boundary of the larger error region, where
  "larger" compares those farthest distances (false negatives win ties): positive on a false
  negative, negative on a false positive.
- Pixels marked "ignore" (e.g. a dataset's void label) count neither way: they are outside
  every IoU and never clicked.

Host code (numpy / scipy); `evaluation.points` runs it for every object of an image at once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

FIRST_POINT_MODES = ("center", "random")
XY = Tuple[int, int]


def farthest_from_boundary(region: np.ndarray) -> Tuple[XY, float]:
    """(x, y) of the pixel of `region` farthest from its boundary (image borders count as
    boundary; the first such pixel in row-major order on ties), and that distance (0 when the
    region is empty)."""
    if not region.any():
        return (0, 0), 0.0
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return (int(x), int(y)), float(dist[y, x])


def mask_iou(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """IoU of two boolean masks over the `valid` pixels (all if None); 1.0 when both are
    empty there."""
    if valid is not None:
        pred, gt = pred & valid, gt & valid
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def first_click(gt: np.ndarray, mode: str = "center",
                rng: Optional[np.random.Generator] = None,
                valid: Optional[np.ndarray] = None) -> XY:
    """The first (positive) click on mask `gt`: "center" or "random" (needs `rng`)."""
    region = gt if valid is None else gt & valid
    if not region.any():
        raise ValueError("the mask has no pixel to click (empty, or entirely ignored)")
    if mode == "center":
        return farthest_from_boundary(region)[0]
    if mode == "random":
        if rng is None:
            raise ValueError("a random first point needs a numpy Generator (rng)")
        ys, xs = np.nonzero(region)
        i = int(rng.integers(len(ys)))
        return int(xs[i]), int(ys[i])
    raise ValueError(f"first point mode must be one of {FIRST_POINT_MODES}, got {mode!r}")


def next_click(pred: np.ndarray, gt: np.ndarray,
               valid: Optional[np.ndarray] = None) -> Tuple[XY, int]:
    """The corrective click for prediction `pred` of mask `gt`: ((x, y), label), label 1 on
    the false-negative region's center, 0 on the false-positive region's."""
    fn, fp = gt & ~pred, pred & ~gt
    if valid is not None:
        fn, fp = fn & valid, fp & valid
    fn_xy, fn_d = farthest_from_boundary(fn)
    fp_xy, fp_d = farthest_from_boundary(fp)
    return (fn_xy, 1) if fn_d >= fp_d else (fp_xy, 0)
