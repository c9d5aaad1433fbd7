"""The SAM paper's dataset statistics (§5, Figs. 5-6) of an SA-1B-format folder: masks per
image, relative mask size, mask concavity and where mask centers fall in the image.

Definitions (the paper's where it gives one, otherwise stated here):
- relative mask size: sqrt(mask area / image area) (§5);
- concavity: 1 - mask area / area of the mask's convex hull (§5). The mask is taken as the union
  of its pixel squares, so the hull is that of the pixels' corners: a filled rectangle, a single
  pixel and a one-pixel line all have concavity exactly 0 (no degenerate hull, nothing to guard);
- mask center: the center of mass of the mask's pixels (pixel (x, y) at (x + 0.5, y + 0.5)),
  divided by the image width and height, so it lies in (0, 1) x (0, 1). The paper does not say
  which center Fig. 5 uses; the center of mass is defined by the mask alone (a bbox center would
  follow from SA-1B's `bbox` field, whose convention differs from pycocotools' by one pixel);
- masks-per-image bins: the x-axis of Fig. 6 (left), "<10, 11-50, 51-100, 101-200, >200"; the
  first bin here is 0-10, so an image without masks is counted too;
- small / medium / large: COCO's area classes in pixels (< 32², < 96², the rest), the only
  published definition; the paper speaks of "small and medium relative-size masks" without
  thresholds. The paper stratifies concavity by mask size; the summary gives concavity per class.

Nothing is decoded to a pixel array: every quantity follows from the RLE's runs (COCO RLE runs
are column-major, alternating background and foreground; the string is read by the project's
`amg.coco_decode_counts`, so no pycocotools is needed), so the cost follows the number of runs,
not the 2-3 MP of an SA-1B image. The convex hull uses only each run's end pixels, the mask's
boundary along the columns, and is the hull of every pixel (tested against a brute-force hull
of pycocotools-decoded masks).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import numpy as np
from scipy.spatial import ConvexHull
from tqdm import tqdm

from .. import sa1b
from ..utils import amg

PathLike = Union[str, os.PathLike]

# Fig. 6 (left): images binned by their number of masks, as (first, last) counts, inclusive
MASKS_PER_IMAGE_BINS = ((0, 10), (11, 50), (51, 100), (101, 200), (201, None))
COCO_AREA_CLASSES = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2),
                     ("large", 96 ** 2, np.inf))  # [low, high) in pixels, as COCO's eval
RELATIVE_SIZE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class MaskGeometry(NamedTuple):
    """What the statistics need of one mask, in pixels (x right, y down)."""
    area: int
    center_x: float  # center of mass, pixel units (NaN for an empty mask)
    center_y: float
    hull_area: float  # area of the convex hull of the mask's pixel squares (0 when empty)

    @property
    def concavity(self) -> float:
        """1 - area / hull area; 0 for an empty mask, which has no shape to be concave."""
        if self.area == 0:
            return 0.0
        return max(0.0, 1.0 - self.area / self.hull_area)  # max: qhull's rounding on convex masks


def _foreground_runs(rle: Dict[str, Any]):
    """(start, end) flat column-major indices of the RLE's foreground runs, end exclusive."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = amg.coco_decode_counts(counts)
    counts = np.asarray(counts, np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError("RLE has a negative run length (corrupt counts)")
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, but size {h}x{w} needs {h * w}")
    ends = np.cumsum(counts)
    starts = ends - counts
    keep = counts[1::2] > 0  # odd runs are foreground; a zero-length one is no run at all
    return starts[1::2][keep], ends[1::2][keep]


def _sum_of_column_and_row(n: np.ndarray, h: int):
    """Sums of x = i // h and y = i % h over flat column-major indices i in [0, n): with
    n = q h + r, sum x = h q(q-1)/2 + r q and sum y = q h(h-1)/2 + r(r-1)/2."""
    q, r = np.divmod(n, h)
    return h * q * (q - 1) // 2 + r * q, q * (h * (h - 1) // 2) + r * (r - 1) // 2


def _hull_corner_points(starts: np.ndarray, ends: np.ndarray, h: int) -> np.ndarray:
    """Corners of the rectangles that make up the runs, as (K, 2) (x, y) points. A run from
    pixel (x0, y0) to (x1, y1) is column x0 from y0 down (to y1, or to the bottom if it wraps),
    column x1 from the top to y1, and the full columns between: at most three rectangles, and
    the hull of their corners is the hull of every pixel of the run."""
    x0, y0 = np.divmod(starts, h)
    x1, y1 = np.divmod(ends - 1, h)
    wraps = x1 > x0
    first = np.stack([x0, x0 + 1, y0, np.where(wraps, h, y1 + 1)], 1)
    last = np.stack([x1, x1 + 1, np.zeros_like(y1), y1 + 1], 1)[wraps]
    full = x1 > x0 + 1
    between = np.stack([x0 + 1, x1, np.zeros_like(x0), np.full_like(x0, h)], 1)[full]
    rects = np.concatenate([first, last, between])  # (x_lo, x_hi, y_lo, y_hi)
    corners = [rects[:, [xi, yi]] for xi in (0, 1) for yi in (2, 3)]
    return np.concatenate(corners).astype(np.float64)


def mask_geometry(rle: Dict[str, Any]) -> MaskGeometry:
    """Area, center of mass and convex-hull area of an RLE mask ({"size": [h, w], "counts":
    COCO string or uncompressed list}), straight from its runs."""
    h = int(rle["size"][0])
    starts, ends = _foreground_runs(rle)
    area = int((ends - starts).sum())
    if area == 0:
        return MaskGeometry(0, float("nan"), float("nan"), 0.0)
    sx_end, sy_end = _sum_of_column_and_row(ends, h)
    sx_start, sy_start = _sum_of_column_and_row(starts, h)
    center_x = float((sx_end - sx_start).sum()) / area + 0.5
    center_y = float((sy_end - sy_start).sum()) / area + 0.5
    # Every rectangle has width and height >= 1, so the hull is never flat: qhull cannot fail.
    hull_area = float(ConvexHull(_hull_corner_points(starts, ends, h)).volume)
    return MaskGeometry(area, center_x, center_y, hull_area)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskStats:
    """Per-image and per-mask statistics of a set of SA-1B files; masks in file order."""
    masks_per_image: np.ndarray  # (I,) int
    area: np.ndarray  # (N,) int, pixels
    relative_size: np.ndarray  # (N,) sqrt(area / image area)
    concavity: np.ndarray  # (N,) in [0, 1)
    centers: np.ndarray  # (N, 2) (x, y) center of mass / (width, height); NaN if empty mask

    @property
    def num_images(self) -> int:
        return int(self.masks_per_image.size)

    @property
    def num_masks(self) -> int:
        return int(self.area.size)

    def masks_per_image_histogram(self) -> Dict[str, int]:
        """Images per Fig. 6 (left) bin, by label ("0-10", ..., ">200")."""
        out = {}
        for first, last in MASKS_PER_IMAGE_BINS:
            n = self.masks_per_image
            inside = (n >= first) if last is None else (n >= first) & (n <= last)
            out[f">{first - 1}" if last is None else f"{first}-{last}"] = int(inside.sum())
        return out

    def area_class(self) -> np.ndarray:
        """(N,) index into COCO_AREA_CLASSES of each mask."""
        highs = np.array([high for _, _, high in COCO_AREA_CLASSES[:-1]])
        return np.searchsorted(highs, self.area, side="right")

    def center_heatmap(self, bins: int = 64) -> np.ndarray:
        """(bins, bins) mask counts on the unit square, [row = y, column = x] as an image
        (Fig. 5); empty masks, which have no center, are left out."""
        centers = self.centers[np.isfinite(self.centers).all(1)]
        heat, _, _ = np.histogram2d(centers[:, 1], centers[:, 0], bins=bins,
                                    range=[[0, 1], [0, 1]])
        return heat.astype(np.int64)

    def summary(self) -> Dict[str, Any]:
        """JSON-able numbers (None where there is nothing to measure)."""
        def stat(fn, values):
            return float(fn(values)) if values.size else None

        classes = self.area_class()
        by_class = {}
        for i, (name, _, _) in enumerate(COCO_AREA_CLASSES):
            chosen = self.concavity[classes == i]
            by_class[name] = {"masks": int(chosen.size), "mean": stat(np.mean, chosen),
                              "median": stat(np.median, chosen)}
        n = max(self.num_masks, 1)
        return {
            "images": self.num_images,
            "masks": self.num_masks,
            "masks_per_image": {
                "mean": stat(np.mean, self.masks_per_image),
                "median": stat(np.median, self.masks_per_image),
                "histogram": self.masks_per_image_histogram()},
            "relative_size": {
                "mean": stat(np.mean, self.relative_size),
                "quantiles": {f"p{round(q * 100)}": stat(lambda v: np.quantile(v, q),
                                                         self.relative_size)
                              for q in RELATIVE_SIZE_QUANTILES}},
            "area_classes": {
                "definition": "COCO: small < 32^2 px, medium < 96^2 px, large otherwise",
                **{name: int((classes == i).sum()) / n
                   for i, (name, _, _) in enumerate(COCO_AREA_CLASSES)}},
            "concavity": {"mean": stat(np.mean, self.concavity),
                          "median": stat(np.median, self.concavity),
                          "by_area_class": by_class},
        }


def annotation_files(folder_or_paths: Union[PathLike, Iterable[PathLike]]) -> List[str]:
    """The SA-1B files to read: a folder's *.json (sorted; dot-files such as the temporaries of
    `sa1b.write_json_atomic` left out), one file, or a list of files as given."""
    if isinstance(folder_or_paths, (str, os.PathLike)):
        path = os.fspath(folder_or_paths)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path)
                           if n.endswith(".json") and not n.startswith("."))
            if not names:
                raise ValueError(f"{path}: no SA-1B .json files in this folder")
            return [os.path.join(path, n) for n in names]
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file or folder")
        return [path]
    paths = [os.fspath(p) for p in folder_or_paths]
    if not paths:
        raise ValueError("no SA-1B files given")
    return paths


def image_mask_geometry(path: str) -> Tuple[List[MaskGeometry], int, int]:
    """(geometry of each mask, image width, image height) of one SA-1B file, checked by
    `sa1b.read_sa1b`; every error is a ValueError (`SA1BFormatError`) that names the file."""
    data = sa1b.read_sa1b(path)
    width, height = data["image"]["width"], data["image"]["height"]
    if not all(isinstance(v, int) and v > 0 for v in (width, height)):
        raise sa1b.SA1BFormatError(f"{path}: image width and height must be positive "
                                   f"integers, got {width!r} x {height!r}")
    out = []
    for i, ann in enumerate(data["annotations"]):
        try:
            out.append(mask_geometry(ann["segmentation"]))
        except ValueError as e:
            raise sa1b.SA1BFormatError(f"{path}: annotation {i}: {e}") from None
    return out, width, height


def collect_mask_stats(folder_or_paths: Union[PathLike, Iterable[PathLike]],
                       progress: bool = False, max_images: Optional[int] = None) -> MaskStats:
    """Statistics of the SA-1B files in a folder (or a file, or a list of files); with
    `max_images`, of the first that many in sorted order."""
    paths = annotation_files(folder_or_paths)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        paths = paths[:max_images]

    per_image, areas, relative, concavity, centers = [], [], [], [], []
    for path in tqdm(paths, disable=not progress, unit="image", desc="mask stats"):
        masks, width, height = image_mask_geometry(path)
        per_image.append(len(masks))
        for g in masks:
            areas.append(g.area)
            relative.append(np.sqrt(g.area / (width * height)))
            concavity.append(g.concavity)
            centers.append((g.center_x / width, g.center_y / height))
    return MaskStats(masks_per_image=np.asarray(per_image, np.int64),
                     area=np.asarray(areas, np.int64),
                     relative_size=np.asarray(relative, np.float64),
                     concavity=np.asarray(concavity, np.float64),
                     centers=np.asarray(centers, np.float64).reshape(-1, 2))


def _percent(counts: np.ndarray) -> np.ndarray:
    return 100.0 * counts / max(int(counts.sum()), 1)


def plot_mask_stats(stats: MaskStats, path: PathLike, title: Optional[str] = None) -> None:
    """One PNG (1600x400 px) with the four panels: masks per image and relative mask size and
    concavity as Fig. 6, mask centers as Fig. 5. Uses a bare `Figure`, never pyplot, so the
    global backend and pyplot's figure list are untouched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4), dpi=100, layout="constrained")
    ax_count, ax_size, ax_concave, ax_center = fig.subplots(1, 4)
    if title:
        fig.suptitle(title)

    histogram = stats.masks_per_image_histogram()
    ax_count.bar(list(histogram), _percent(np.array(list(histogram.values()))))
    ax_count.set(xlabel="masks per image", ylabel="percent of images",
                 title=f"{stats.num_images} images")

    edges = np.linspace(0, 1, 41)
    ax_size.stairs(_percent(np.histogram(stats.relative_size, edges)[0]), edges)
    ax_size.set(xlabel="relative mask size sqrt(area / image area)",
                ylabel="percent of masks", title=f"{stats.num_masks} masks", xlim=(0, 1))

    edges = np.linspace(0, 1, 21)
    ax_concave.stairs(_percent(np.histogram(stats.concavity, edges)[0]), edges, label="all",
                      linewidth=2)
    classes = stats.area_class()
    for i, (name, _, _) in enumerate(COCO_AREA_CLASSES):  # the paper stratifies by size
        counts = np.histogram(stats.concavity[classes == i], edges)[0]
        ax_concave.stairs(_percent(counts), edges, label=f"{name} (COCO area)")
    ax_concave.set(xlabel="concavity 1 - area / convex hull area",
                   ylabel="percent of the masks of each curve", xlim=(0, 1))
    ax_concave.legend(fontsize="small")

    image = ax_center.imshow(stats.center_heatmap(), extent=(0, 1, 1, 0), cmap="viridis",
                             interpolation="nearest")
    ax_center.set(xlabel="x / width", ylabel="y / height", title="mask centers (center of mass)")
    fig.colorbar(image, ax=ax_center, label="masks")
    fig.savefig(os.fspath(path), format="png")
