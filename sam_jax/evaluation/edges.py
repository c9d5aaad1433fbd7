"""Zero-shot edge detection with SAM (SAM §7.2, App. D.2): soft edge maps for the BSDS500
boundary benchmark (`evaluation.boundary_benchmark`), written as 8-bit PNGs.

The paper's recipe, step by step, and where each step runs:
1. prompt SAM with a regular 16 x 16 grid of single foreground points, three masks a point
   (768 masks); no predicted-IoU or stability filter;
2. remove redundant masks by box NMS, scored by predicted IoU (the automatic generator's NMS:
   `amg.greedy_nms` on the boxes of the thresholded full-size masks). The paper gives no IoU
   threshold for this NMS; the default is the generator's `box_nms_thresh`, 0.7;
3. per kept mask, the Sobel gradient magnitude of its unthresholded probability map (sigmoid
   of the logits upscaled to the image size), set to zero away from the mask's boundary
   (`sobel_edges`, `BOUNDARIES`);
4. the pixel-wise max over all kept masks, linearly normalized to [0, 1] (`normalize_edges`);
5. edge NMS (`edge_nms`): the Structured Edge toolbox's thinning (`edgesNmsMex` with the
   orientation that `edgesDetect.m` computes), on the host in numpy.
Steps 1-4 are one jitted function per image size (`_soft_edges`): the prompts are decoded a
batch at a time, boxes are measured and NMS runs on the device, and the kept masks are upscaled,
filtered and max-reduced in fixed-size chunks inside a `lax.while_loop`, so neither the 768
full-size maps nor their edge maps are ever stored at once and nothing but the final (H, W) map
comes back to the host.

"Outer boundary pixels of a mask" (App. D.2: Sobel values are "set to zero if they do not
intersect with the outer boundary pixels of a mask") is read here as `boundary="band"`: the
pixels whose 3 x 3 neighbourhood holds both mask and non-mask pixels of the thresholded mask
(logit > 0), i.e. dilation minus erosion, 2 px wide and straddling the contour (outer contour
and hole contours alike). This is exactly where a 3 x 3 Sobel stencil sees the binary
transition. The sigmoid's slope peaks at logit 0, so the ridge of the gradient magnitude lies
at the contour itself, between the two pixel rows of the band: the band keeps the ridge
wherever it falls between them, and edge NMS then picks the stronger side. A one-sided ring
keeps only one side's pixel whatever the ridge's sub-pixel position, and the edges of two
adjacent masks then come out one pixel apart, as double lines that edge NMS keeps. The two
one-sided readings stay available as `boundary="outer"` (non-mask pixels touching the mask, as
the unofficial port github.com/ymgw55/segment-anything-edge-detection reads it) and
`boundary="inner"` (mask pixels touching a non-mask pixel). The image frame is not a boundary:
morphology and Sobel replicate the edge pixels, so a mask that runs off the image has no edge
along the frame.

Edge NMS (`edge_nms`, `edge_orientation`), as the Structured Edge toolbox (Dollár and Zitnick):
the orientation is the normal of the edge, from second derivatives of the map smoothed with a
triangle filter of radius 4 (`convTri(E, 4)`, symmetric padding; `gradient2` = central
differences, one-sided at the border): O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi). A
pixel is kept if `multiplier` x its value is not below the map bilinearly interpolated at
+-1 .. +-radius pixels along the normal (sample positions clamped to [0, size - 1.001]); then
the values within `border` pixels of the image edge are scaled down linearly (by d / border
at distance d: the frame itself becomes 0), as `edgesNmsMex` does.

Deviations: none in the recipe, beyond the choices the paper leaves open (the NMS threshold,
the boundary's exact pixels, the Sobel scale, which normalization cancels). In the orientation,
sign(-Oxy) is taken as +1 where Oxy is exactly 0: MATLAB's sign(0) = 0 gives an exactly
horizontal ridge (Oxy = 0, Oxx = 0) the orientation 0, along the ridge, so it is never thinned;
real maps almost never have Oxy exactly 0, and elsewhere nothing changes. Edge NMS computes in
float32 as the MATLAB code in single precision, but numpy's and MATLAB's cos/atan may differ
in the last bit, which can flip a comparison between equal neighbours.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterable, List, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from .. import inference
from ..automatic_mask_generator import DevicePlan, plan_for_backend
from ..inference import SamModel
from ..predictor import SamPredictor
from ..utils import amg

PathLike = Union[str, os.PathLike]

# Which pixels of a mask keep their Sobel response (module docstring).
BOUNDARIES = ("band", "outer", "inner")


@dataclasses.dataclass(frozen=True)
class EdgeOptions:
    """The knobs of `edge_map` (same names, same defaults: the paper's recipe).

    points_per_side: the grid of single-point prompts (16: 256 points, 768 masks);
    nms_thresh: box IoU above which a mask with lower predicted IoU is dropped as redundant;
    points_per_batch: prompts decoded together (bounds the decoder's memory);
    edge_nms: thin the edges (`edge_nms`); False returns the normalized soft map;
    boundary: which pixels keep their Sobel response, one of BOUNDARIES."""

    points_per_side: int = 16
    nms_thresh: float = 0.7
    points_per_batch: int = 64
    edge_nms: bool = True
    boundary: str = "band"

    def __post_init__(self):
        if int(self.points_per_side) < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if int(self.points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if not 0.0 <= float(self.nms_thresh) <= 1.0:
            raise ValueError(f"nms_thresh must be in [0, 1], got {self.nms_thresh}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")


# ---- Sobel, boundary gating, max and normalization (jnp; run inside the jitted function) -----

def _neighbours(x: jax.Array):
    """`at(dy, dx)`: x shifted by (dy, dx) over its last two axes, edge pixels replicated."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    padded = jnp.pad(x, pad, mode="edge")
    return lambda dy, dx: padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _sobel_magnitude(probs: jax.Array) -> jax.Array:
    """Gradient magnitude of the 3 x 3 Sobel filter over the last two axes, scaled by 1/8 so
    that a ramp of slope 1 gives 1; edge pixels replicated."""
    at = _neighbours(probs)
    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return jnp.sqrt(gx * gx + gy * gy) / 8


def _dilate_erode(masks: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """3 x 3 (8-neighbour) dilation and erosion of bool masks, edge pixels replicated."""
    at = _neighbours(masks)
    shifted = [at(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return functools.reduce(jnp.logical_or, shifted), functools.reduce(jnp.logical_and, shifted)


def boundary_pixels(masks: jax.Array, boundary: str = "band") -> jax.Array:
    """(..., H, W) bool masks -> the pixels whose Sobel response is kept: "band" dilation minus
    erosion (2 px straddling each contour), "outer" dilation minus mask, "inner" mask minus
    erosion (module docstring)."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    masks = jnp.asarray(masks, bool)
    dilated, eroded = _dilate_erode(masks)
    if boundary == "band":
        return dilated & ~eroded
    if boundary == "outer":
        return dilated & ~masks
    return masks & ~eroded


def sobel_edges(probs: jax.Array, masks: jax.Array, boundary: str = "band") -> jax.Array:
    """(..., H, W) mask probability maps and their thresholded masks -> float32 edge strength
    (..., H, W): the Sobel gradient magnitude of `probs`, zero outside `boundary_pixels`."""
    probs = jnp.asarray(probs, jnp.float32)
    return jnp.where(boundary_pixels(masks, boundary), _sobel_magnitude(probs), 0.0)


def normalize_edges(edges: jax.Array) -> jax.Array:
    """Linear map of an edge map to [0, 1]: (E - min) / (max - min); all zeros if constant."""
    edges = jnp.asarray(edges, jnp.float32)
    low, high = jnp.min(edges), jnp.max(edges)
    span = high - low
    return jnp.where(span > 0, (edges - low) / jnp.where(span > 0, span, 1.0), 0.0)


def merge_edges(edges: jax.Array) -> jax.Array:
    """(N, H, W) per-mask edge strengths -> their pixel-wise max, normalized to [0, 1] (what
    the device function computes chunk by chunk for the kept masks)."""
    return normalize_edges(jnp.max(jnp.asarray(edges, jnp.float32), axis=0))


# ---- the device function: decode, NMS, per-mask edges, max ------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "input_size", "original_size",
                                             "stats_group", "chunk", "boundary"))
def _soft_edges(variables, features, coords, labels, valid_rows, nms_thresh, refiner_features,
                edge_features, *, config, input_size, original_size, stats_group, chunk,
                boundary):
    """coords (B, P, T, 2), labels (B, P, T): B batches of P single-point prompts (model
    frame); valid_rows (B * P,): rows that are grid points. Returns the normalized pixel-wise
    max of the kept masks' edge strengths (H, W) and the number of kept masks. With
    `refiner_features` (a model with a mask refiner) the kept masks' edges are taken from
    their refined logits, as the generator's kept masks are, and with `edge_features` (a
    model with an edge stage) after it."""
    p = coords.shape[1]
    threshold = config.mask_threshold
    upscale = functools.partial(inference.postprocess_masks, input_size=input_size,
                                original_size=original_size, image_size=config.image_size)

    def decode(batch):
        c, lab = batch
        prompts = inference.PromptBatch(c, lab, None, None, jnp.zeros((p,), jnp.int32), p)
        low_res, iou = inference.decode_prompts(variables, features, prompts, config=config,
                                                multimask_output=True, with_masks=False)
        boxes_of = lambda x: amg.masks_to_boxes(upscale(x, threshold=threshold))  # noqa: E731
        group = p if stats_group is None else math.gcd(stats_group, p)
        if group == p:
            boxes = boxes_of(low_res)
        else:  # full-size masks exist a group at a time
            grouped = low_res.reshape((p // group, group) + low_res.shape[1:])
            boxes = jax.lax.map(boxes_of, grouped)
        return low_res, iou, boxes.reshape(p, -1, 4)

    low_res, iou, boxes = jax.lax.map(decode, (coords, labels))
    prompt_coords = coords.reshape((-1,) + coords.shape[2:])  # (B * P, T, 2)
    prompt_labels = labels.reshape((-1,) + labels.shape[2:])
    n = iou.size
    low_res = low_res.reshape((n,) + low_res.shape[-2:])
    valid = jnp.repeat(valid_rows, iou.shape[-1])
    index, count = amg.greedy_nms(boxes.reshape(n, 4), iou.reshape(n), valid, nms_thresh)

    def add_chunk(state):
        start, acc = state
        slots = start + jnp.arange(chunk)
        kept = low_res[index[jnp.minimum(slots, n - 1)]]
        if refiner_features is not None:
            # a refiner that reads clicks reads each kept mask's own prompt
            prompt = index[jnp.minimum(slots, n - 1)] // iou.shape[-1]
            kept = inference.refine_low_res(variables, refiner_features, kept[:, None],
                                            jnp.zeros((chunk,), jnp.int32), prompt_coords[prompt],
                                            prompt_labels[prompt], config=config)[:, 0]
        logits = upscale(kept)
        if edge_features is not None:
            logits = inference.refine_edges(variables, edge_features, logits[:, None],
                                            config=config)[:, 0]
        edges = sobel_edges(jax.nn.sigmoid(logits), logits > threshold, boundary)
        edges = jnp.where((slots < count)[:, None, None], edges, 0.0)
        return start + chunk, jnp.maximum(acc, jnp.max(edges, axis=0))

    start = (jnp.int32(0), jnp.zeros(original_size, jnp.float32))
    _, strongest = jax.lax.while_loop(lambda s: s[0] < count, add_chunk, start)
    return normalize_edges(strongest), count


class SoftEdges(NamedTuple):
    """`soft_edges`' result: the normalized soft edge map (H, W) float32 in [0, 1] before edge
    NMS, and how many of the grid's masks survived the box NMS."""

    edges: np.ndarray
    num_masks: int


def soft_edges(model: SamModel, image: np.ndarray, options: EdgeOptions = EdgeOptions(), *,
               plan: Optional[DevicePlan] = None) -> SoftEdges:
    """Steps 1-4 of the recipe (module docstring) for an HxWx3 uint8 RGB image. `plan`: how
    the device work is laid out (`automatic_mask_generator.plan_for_backend()` by default;
    `stats_group` groups the box measurement, `mask_chunk` masks per edge step); every plan
    gives the same result."""
    plan = plan_for_backend() if plan is None else plan
    predictor = SamPredictor(inference.single_view(model))
    predictor.set_image(image)
    h, w = predictor.original_size
    points = amg.build_point_grid(int(options.points_per_side)) * np.array([w, h])
    points = predictor.transform.apply_coords(points, (h, w))
    per_batch = int(options.points_per_batch)
    n = len(points)
    padded = np.concatenate([points, np.repeat(points[:1], -n % per_batch, 0)])
    config = model.config
    batches = [inference.make_prompt_batch(config, coords=padded[s:s + per_batch, None, :],
                                           labels=np.ones((per_batch, 1), np.int32))
               for s in range(0, len(padded), per_batch)]
    rows = len(batches[0].coords)  # per_batch rounded up to the decoder's prompt bucket
    point_of_row = (np.arange(len(batches))[:, None] * per_batch + np.arange(rows)).ravel()
    valid_rows = np.tile(np.arange(rows) < per_batch, len(batches)) & (point_of_row < n)
    edges, count = _soft_edges(
        model.variables, predictor.features, np.stack([b.coords for b in batches]),
        np.stack([b.labels for b in batches]), valid_rows, np.float32(options.nms_thresh),
        predictor.refiner_features, predictor.edge_features, config=config,
        input_size=predictor.input_size, original_size=(h, w),
        stats_group=plan.stats_group, chunk=int(plan.mask_chunk), boundary=options.boundary)
    edges, count = jax.device_get((edges, count))
    return SoftEdges(np.asarray(edges, np.float32), int(count))


# ---- edge NMS (host, numpy): the Structured Edge toolbox's thinning ---------------------------

def _conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """`convTri(I, r)` for an integer r >= 1: separable triangle filter
    [1 .. r, r + 1, r .. 1] / (r + 1)^2, symmetric padding (edge pixel repeated)."""
    f = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)])
    f = (f / (radius + 1) ** 2).astype(image.dtype)
    h, w = image.shape
    padded = np.pad(image, radius, mode="symmetric")
    rows = sum(f[k] * padded[k:k + h, :] for k in range(len(f)))
    return sum(f[k] * rows[:, k:k + w] for k in range(len(f)))


def _gradient(a: np.ndarray, axis: int) -> np.ndarray:
    """MATLAB's `gradient` along one axis: central differences inside, one-sided at both
    ends, zero along an axis of length 1."""
    if a.shape[axis] < 2:
        return np.zeros_like(a)
    return np.gradient(a, axis=axis)


def edge_orientation(edges: np.ndarray, smoothing: int = 4) -> np.ndarray:
    """(H, W) edge normal orientation in [0, pi) (0: along +x, the columns; pi/2: along +y,
    the rows), from second derivatives of the triangle-smoothed map, as `edgesDetect.m`."""
    e = np.asarray(edges, np.float32)
    smooth = _conv_tri(e, smoothing) if smoothing >= 1 else e
    ox, oy = _gradient(smooth, 1), _gradient(smooth, 0)
    oxx = _gradient(ox, 1)
    oxy, oyy = _gradient(oy, 1), _gradient(oy, 0)
    # sign(-Oxy), with +1 where Oxy is exactly 0 (the toolbox's sign(0) = 0 turns an exactly
    # horizontal ridge's normal to 0, along the ridge, so it is never thinned; module docstring)
    flip = np.where(oxy > 0, np.float32(-1), np.float32(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.mod(np.arctan(oyy * flip / (oxx + np.float32(1e-5))), np.pi)
    return np.nan_to_num(o, nan=0.0).astype(np.float32)


def _interp(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of `image` at (x: column, y: row), positions clamped to
    [0, size - 1.001] as `edgesNmsMex`'s interp."""
    h, w = image.shape
    x = np.clip(x, 0, np.float32(w - 1.001)).astype(np.float32)
    y = np.clip(y, 0, np.float32(h - 1.001)).astype(np.float32)
    x0, y0 = np.maximum(x, 0).astype(np.int64), np.maximum(y, 0).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    dx, dy = x - x0, y - y0
    return (image[y0, x0] * (1 - dx) * (1 - dy) + image[y0, x1] * dx * (1 - dy)
            + image[y1, x0] * (1 - dx) * dy + image[y1, x1] * dx * dy)


def edge_nms(edges: np.ndarray, radius: int = 1, border: int = 5, multiplier: float = 1.01,
             orientation: Optional[np.ndarray] = None) -> np.ndarray:
    """Thins an (H, W) soft edge map as `edgesNmsMex(E, O, radius, border, multiplier)`: a
    pixel survives if `multiplier` x its value is not below the map interpolated at
    +-1 .. +-radius pixels along its normal (`orientation`, default `edge_orientation(edges)`);
    then values within `border` pixels of the image edge are scaled by (distance / border).
    Returns float32 (H, W); values only shrink, so a map in [0, 1] stays in [0, 1]."""
    e = np.asarray(edges, np.float32)
    if e.ndim != 2:
        raise ValueError(f"edges must be a 2-D (H, W) map, got shape {e.shape}")
    o = edge_orientation(e) if orientation is None else np.asarray(orientation, np.float32)
    if o.shape != e.shape:
        raise ValueError(f"orientation must have the edge map's shape {e.shape}, got {o.shape}")
    h, w = e.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cos, sin = np.cos(o), np.sin(o)
    scaled = e * np.float32(multiplier)
    keep = e != 0
    for d in range(-int(radius), int(radius) + 1):
        if d:
            keep &= ~(scaled < _interp(e, xs + d * cos, ys + d * sin))
    out = np.where(keep, e, np.float32(0))
    s = min(int(border), w // 2, h // 2)
    for i in range(s):  # edge rows and columns are scaled by their distance to the frame / s
        f = np.float32(i / s)
        out[:, i] *= f
        out[:, w - 1 - i] *= f
        out[i, :] *= f
        out[h - 1 - i, :] *= f
    return out


_thin = edge_nms  # `edge_map`'s flag of the same name hides the function there


# ---- the public entry points ------------------------------------------------------------------

def edge_map(model: SamModel, image: np.ndarray, points_per_side: int = 16,
             nms_thresh: float = 0.7, points_per_batch: int = 64, edge_nms: bool = True, *,
             boundary: str = "band") -> np.ndarray:
    """SAM's zero-shot edge map of an HxWx3 uint8 RGB image: float32 (H, W) in [0, 1]
    (module docstring for the recipe; the options are `EdgeOptions`' fields). One compiled
    device function per image size and options: images of one size do not trace again."""
    options = EdgeOptions(points_per_side, nms_thresh, points_per_batch, edge_nms, boundary)
    edges = soft_edges(model, image, options).edges
    return _thin(edges) if options.edge_nms else edges


def edge_png(edges: np.ndarray) -> np.ndarray:
    """An edge map in [0, 1] as the 8-bit image written to disk: round(255 x E), uint8."""
    return np.round(np.clip(np.asarray(edges, np.float64), 0, 1) * 255).astype(np.uint8)


def _named_image(item: Any) -> Tuple[str, Any]:
    """(stem, image or path) for a path, a (name, HxWx3 array) pair, or an object with
    `.name` and `.image` (`evaluation.datasets.EvalImage`)."""
    if isinstance(item, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(os.fspath(item)))[0], item
    if hasattr(item, "name") and hasattr(item, "image"):
        return str(item.name), item.image
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), item[1]
    raise TypeError("images must be paths, (name, HxWx3 uint8 array) pairs or objects with "
                    f".name and .image, got {type(item).__name__}")


def _read_rgb(path: PathLike) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_edge_maps(model: SamModel, images: Iterable[Any], out_dir: PathLike,
                    progress: bool = True, *,
                    options: EdgeOptions = EdgeOptions()) -> List[str]:
    """Writes `edge_map` of each image to `out_dir/<stem>.png` (8-bit grayscale, `edge_png`,
    the image's size: what the BSDS500 benchmark reads) and returns the paths written.

    `images`: paths (read as RGB; the stem names the output), (name, HxWx3 uint8) pairs, or
    `EvalImage`s. Two images with one stem raise ValueError before that image is processed."""
    from PIL import Image
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    seen = set()
    for item in tqdm(images, disable=not progress, unit="image", desc="edges"):
        stem, source = _named_image(item)
        if stem in seen:
            raise ValueError(f"two images are named {stem!r}: their edge maps would share "
                             f"{stem}.png")
        seen.add(stem)
        image = _read_rgb(source) if isinstance(source, (str, os.PathLike)) else source
        edges = edge_map(model, image, **dataclasses.asdict(options))
        path = os.path.join(os.fspath(out_dir), stem + ".png")
        Image.fromarray(edge_png(edges)).save(path)  # 2-D uint8: mode "L"
        written.append(path)
    return written
