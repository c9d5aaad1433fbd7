"""The BSDS500 boundary benchmark (Arbelaez et al., TPAMI 2011): ODS, OIS, AP and R50 of soft edge
maps against human boundary annotations, as SAM's zero-shot edge detection is scored (§7.1).

Ports the benchmark of the BSR package (`bench/benchmarks/boundaryBench.m`,
`evaluation_bdry_image.m`, `collect_eval_bdry.m`, `correspondPixels`) and, for R50, the
Structured Edge toolbox's `edgesEvalDir.m`, which reproduces boundaryBench and adds R50 (the
SAM paper's table reports ODS, OIS, AP, R50):

- per image and threshold t (`thresholds` of them, evenly inside (0, 1)): the edge map
  `E >= t`, thinned to one pixel as MATLAB's `bwmorph(.., 'thin', inf)`, is matched against
  each human annotation in turn within `max_dist` x the image diagonal. Recall counts, summed
  over annotators, the annotated pixels matched; precision counts the edge pixels matched to
  any annotator;
- ODS: the best F on the dataset's precision/recall curve, searched along straight lines
  between neighbouring thresholds (100 points per segment); OIS: each image at its own best
  (not interpolated) threshold, counts summed, then R, P and F; AP: the curve's precision
  interpolated in recall at 0, 0.01, .., 1, summed and divided by 100 (the official code's
  divisor, although the grid has 101 points); R50: recall where precision crosses 0.5, on the
  same curve as AP (duplicate recalls dropped first, as edgesEvalDir does).

Deliberate differences, each small:
- matching: the official `correspondPixels` solves the min-cost assignment with the CSA
  algorithm on a graph whose outlier edges are sparse and random (6 per pixel), so it is
  approximate and breaks ties between equal-cost matchings at random. Here the same cost
  model (integer costs: 100 x distance, outliers 100 x 100 x max distance) is solved exactly,
  by scipy's sparse Jonker-Volgenant solver (LAPJVsp). So recall counts come out a little
  higher (matchings the approximation misses) and equal-cost ties pick other pixels, which
  moves precision both ways. On BSR's demo images the thinned edge pixel counts equal
  MATLAB's at every threshold, and ODS, OIS and AP lie within 4e-4 of the published values
  (tests/test_boundary_benchmark.py);
- MATLAB's `unique` keeps the first of equal recalls (precisions) in current releases, the
  last before R2013a; the first is kept here;
- R50 of a curve with a single precision value (where MATLAB's interp1 raises) is the recall
  there if that precision is at least 0.5, else NaN; R50 is NaN when the curve never reaches
  precision 0.5.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

PathLike = Union[str, os.PathLike]

DEFAULT_THRESHOLDS = 99  # evaluation_bdry_image.m's nthresh
DEFAULT_MAX_DIST = 0.0075  # matching tolerance as a fraction of the image diagonal
# correspondPixels' defaults: leaving a pixel unmatched costs 100 x the tolerance, and its
# CSA solver needs integer costs, so every cost is multiplied by 100 and rounded (distances
# to nearest, outlier cost up), exactly as here.
OUTLIER_COST = 100.0
COST_SCALE = 100
POINTS_PER_SEGMENT = 100  # MATLAB's linspace(0, 1): the interpolation of the ODS search
RECALL_GRID_STEP = 0.01  # AP samples precision at recall 0:0.01:1


# ---- results ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One point of a precision/recall curve. `threshold` is None for OIS, where each image
    has its own."""
    threshold: Optional[float]
    recall: float
    precision: float
    f: float

    def to_json(self) -> Dict[str, Any]:
        return {k: _json_float(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageCounts:
    """One image's counts per threshold, the columns of the official `<id>_ev1.txt`:
    `matched_ground_truth` / `ground_truth_pixels` is recall (cntR / sumR, summed over the
    annotators), `matched_edges` / `edge_pixels` is precision (cntP / sumP)."""
    thresholds: np.ndarray
    matched_ground_truth: np.ndarray
    ground_truth_pixels: np.ndarray
    matched_edges: np.ndarray
    edge_pixels: np.ndarray

    def recall_precision_f(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _recall_precision_f(self.matched_ground_truth, self.ground_truth_pixels,
                                   self.matched_edges, self.edge_pixels)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    """One image: its counts and its best point (interpolated like ODS, as the official
    `eval_bdry_img.txt`)."""
    name: str
    best: OperatingPoint
    counts: ImageCounts


@dataclasses.dataclass(frozen=True, eq=False)
class BoundaryResult:
    """The benchmark's numbers: ODS, OIS, AP, R50, the dataset's precision/recall curve (one
    point per threshold, as `eval_bdry_thr.txt`) and each image's best point."""
    ods: OperatingPoint
    ois: OperatingPoint
    ap: float
    r50: float  # NaN when the curve never reaches precision 0.5
    thresholds: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    f: np.ndarray
    images: Tuple[ImageResult, ...]
    max_dist: float
    thinned: bool

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict (NaN written as null)."""
        return {
            "ods": self.ods.to_json(),
            "ois": self.ois.to_json(),
            "ap": _json_float(self.ap),
            "r50": _json_float(self.r50),
            "curve": {name: [_json_float(v) for v in getattr(self, name)]
                      for name in ("thresholds", "recall", "precision", "f")},
            "images": [{"name": image.name, **image.best.to_json()} for image in self.images],
            "settings": {"thresholds": len(self.thresholds), "max_dist": self.max_dist,
                         "thin": self.thinned, "num_images": len(self.images)},
        }


def _json_float(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


# ---- thresholds and edge maps ----------------------------------------------------------------

def benchmark_thresholds(count: int = DEFAULT_THRESHOLDS) -> np.ndarray:
    """The official thresholds: `count` values evenly spaced from 1/(count+1) to
    1 - 1/(count+1), computed with MATLAB's linspace arithmetic (a uint8 map's 51/255 lies
    exactly on threshold 0.2, so the last bit decides whether those pixels count)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"thresholds must be a positive number of thresholds, got {count!r}")
    return _matlab_linspace(1.0 / (count + 1), 1.0 - 1.0 / (count + 1), int(count))


def _matlab_linspace(start: float, stop: float, count: int) -> np.ndarray:
    """MATLAB's linspace: start + (k * (stop - start)) / (count - 1), the last value `stop`
    (numpy divides first, which can differ in the last bit)."""
    if count == 1:
        return np.array([stop])
    values = start + (np.arange(count) * (stop - start)) / (count - 1)
    values[-1] = stop
    return values


def _matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
    """MATLAB's start:step:stop, built from both ends (the first half start + k*step, the
    second stop - k*step, an even count's middle (start+stop)/2), so 0:0.01:1 ends exactly at
    1 and its values can differ from numpy's arange in the last bit."""
    n = int(math.floor((stop - start) / step + 1e-10))
    k = np.arange(n + 1)
    values = np.where(k < n / 2, start + k * step, stop - (n - k) * step)
    if n % 2 == 0:
        values[n // 2] = (start + stop) / 2
    return values


def edge_probability(edge_map: np.ndarray, name: str = "edge map") -> np.ndarray:
    """An edge map as float64 in [0, 1]: uint8 (an 8-bit PNG, as the benchmark reads it) is
    divided by 255, uint16 by 65535 (the MATLAB code divides any PNG by 255, right only for
    8-bit ones), bool taken as 0/1; floats must already lie in [0, 1]."""
    edge_map = np.asarray(edge_map)
    if edge_map.ndim != 2:
        raise ValueError(f"{name}: an edge map must be 2-D (height, width), got shape "
                         f"{edge_map.shape}")
    if edge_map.dtype == bool:
        return edge_map.astype(np.float64)
    if edge_map.dtype == np.uint8:
        return edge_map / 255.0
    if edge_map.dtype == np.uint16:
        return edge_map / 65535.0
    if not np.issubdtype(edge_map.dtype, np.floating):
        raise ValueError(f"{name}: edge maps must be float in [0, 1], uint8 or uint16, got "
                         f"{edge_map.dtype}")
    edge_map = edge_map.astype(np.float64)
    if not np.isfinite(edge_map).all():
        raise ValueError(f"{name}: the edge map contains NaN or infinite values")
    if edge_map.size and (edge_map.min() < 0 or edge_map.max() > 1):
        raise ValueError(f"{name}: float edge maps must lie in [0, 1], got values from "
                         f"{edge_map.min():g} to {edge_map.max():g}")
    return edge_map


# ---- thinning ---------------------------------------------------------------------------------

# The 8 neighbours x1..x8 of the thinning algorithm, counter-clockwise from the east, as
# (row, column) steps: E, NE, N, NW, W, SW, S, SE (row 0 at the top of the image).
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thinning_tables() -> Tuple[np.ndarray, np.ndarray]:
    """For each of the 256 neighbourhoods (bit k set = neighbour x(k+1) is on), whether the
    centre pixel is deleted in the first and in the second sub-iteration. MATLAB documents
    bwmorph 'thin' as Lam, Lee & Suen (1992), p. 879: delete when G1 and G2 hold and G3 (first
    sub-iteration) or G3' (second) does."""
    codes = np.arange(256)
    x = [None] + [((codes >> k) & 1).astype(bool) for k in range(8)]
    x.append(x[1])  # x9 = x1: the neighbourhood is a ring
    # G1: exactly one 8-connected run of neighbours (the crossing number X_H is 1)
    crossings = sum((~x[2 * i - 1]) & (x[2 * i] | x[2 * i + 1]) for i in range(1, 5))
    # G2: 2 <= min(n1, n2) <= 3: not an end point, and not inside a thick region
    n1 = sum(x[2 * k - 1] | x[2 * k] for k in range(1, 5))
    n2 = sum(x[2 * k] | x[2 * k + 1] for k in range(1, 5))
    smaller = np.minimum(n1, n2)
    g12 = (crossings == 1) & (smaller >= 2) & (smaller <= 3)
    # G3 / G3': the first sub-iteration peels the south-east side, the second the north-west
    g3 = ~((x[2] | x[3] | ~x[8]) & x[1])
    g3_prime = ~((x[6] | x[7] | ~x[4]) & x[5])
    return g12 & g3, g12 & g3_prime


_DELETE_FIRST, _DELETE_SECOND = _thinning_tables()


def thin_boundaries(mask: np.ndarray) -> np.ndarray:
    """MATLAB's `bwmorph(mask, 'thin', inf)`: both sub-iterations repeated until nothing
    changes (outside the image counts as background). Lines one pixel wide stay as they are;
    thicker strokes shrink to their 8-connected centre line."""
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), bool)  # a background frame: no bounds checks
    padded[1:-1, 1:-1] = mask
    flat = padded.ravel()
    steps = np.array([dy * (width + 2) + dx for dy, dx in _NEIGHBOURS])
    weights = (1 << np.arange(8)).astype(np.uint8)
    pixels = np.flatnonzero(flat)  # only foreground pixels can be deleted: visit only those
    changed = True
    while changed:
        changed = False
        for table in (_DELETE_FIRST, _DELETE_SECOND):
            # every pixel of a sub-iteration is judged on the image before it (parallel)
            codes = (flat[pixels[:, None] + steps] * weights).sum(axis=1)
            delete = table[codes]
            if delete.any():
                flat[pixels[delete]] = False
                pixels = pixels[~delete]
                changed = True
    return padded[1:-1, 1:-1].copy()


# ---- matching ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Correspondence:
    """A one-to-one matching of edge pixels to ground-truth pixels. `pairs` holds one row
    (edge row, edge column, ground-truth row, ground-truth column) per matched pair."""
    edge_matched: np.ndarray  # bool (H, W)
    ground_truth_matched: np.ndarray  # bool (H, W)
    pairs: np.ndarray  # int (K, 4)
    cost: int  # the assignment's cost in correspondPixels' integer units (outliers included)


class _Tolerance:
    """The pixel offsets within the matching radius of an image size, with their integer
    costs, shared by every threshold and annotator of an image."""

    def __init__(self, shape: Tuple[int, int], max_dist: float,
                 outlier_cost: float = OUTLIER_COST):
        # correspondPixels requires a positive tolerance: at 0 a match would cost as much as
        # leaving both pixels out, and nothing would have to be matched
        if isinstance(max_dist, bool) or not isinstance(max_dist, (int, float, np.number)) \
                or not math.isfinite(max_dist) or max_dist <= 0:
            raise ValueError(f"max_dist must be a positive fraction of the image diagonal, got "
                             f"{max_dist!r}")
        self.radius = max_dist * math.hypot(*shape)  # pixels
        self.margin = int(math.ceil(self.radius))
        steps = np.arange(-self.margin, self.margin + 1)
        dy, dx = (a.ravel() for a in np.meshgrid(steps, steps, indexing="ij"))
        inside = dy * dy + dx * dx <= self.radius * self.radius  # correspondPixels' test
        self.dy, self.dx = dy[inside], dx[inside]
        self.pair_cost = np.rint(np.hypot(self.dy, self.dx) * COST_SCALE).astype(np.int64)
        self.outlier_cost = int(math.ceil(outlier_cost * self.radius * COST_SCALE))

    def index_map(self, rows: np.ndarray, cols: np.ndarray, shape: Tuple[int, int]):
        """An (H + 2m, W + 2m) map of pixel numbers (-1 elsewhere), m the margin, so every
        offset within the radius can be looked up without bounds checks."""
        out = np.full((shape[0] + 2 * self.margin, shape[1] + 2 * self.margin), -1, np.int64)
        out[rows + self.margin, cols + self.margin] = np.arange(rows.size)
        return out

    def candidate_pairs(self, rows: np.ndarray, cols: np.ndarray, others: np.ndarray):
        """Every (pixel of `rows, cols`, pixel of the index map `others`) pair within the
        radius, as (index, other index, integer cost)."""
        found = others[rows[:, None] + self.margin + self.dy,
                       cols[:, None] + self.margin + self.dx]
        mine, offset = np.nonzero(found >= 0)
        return mine, found[mine, offset], self.pair_cost[offset]


def _solve_assignment(n_edges: int, n_truth: int, edge_index: np.ndarray,
                      truth_index: np.ndarray, pair_cost: np.ndarray, outlier_cost: int):
    """The min-cost matching of correspondPixels: a matched pair costs its (integer) distance,
    an unmatched pixel on either side `outlier_cost`. -> (edge index, truth index) of the
    matched pairs and the total cost.

    Solved as a rectangular assignment: each pixel of the smaller side (a row) takes either a
    candidate partner (a column) at their distance or a stand-in column of its own at the
    outlier cost. Every row is assigned once, so k pairs cost
    sum(distances) + outlier_cost * (rows - k); with outlier_cost * (columns - k) for the
    other side's unmatched pixels that is correspondPixels' objective, and the two differ by
    the constant outlier_cost * columns: the same matchings are cheapest. The official code
    builds a square graph with stand-ins on both sides, links them sparsely at random (6 per
    pixel, plus a costly fallback) and solves it with CSA, approximately; this graph admits
    every matching the candidate pairs allow, and scipy's LAPJVsp solves it exactly."""
    edges_are_rows = n_edges <= n_truth  # fewer rows: fewer stand-ins, a smaller graph
    rows, cols = (edge_index, truth_index) if edges_are_rows else (truth_index, edge_index)
    n_rows, n_cols = (n_edges, n_truth) if edges_are_rows else (n_truth, n_edges)
    stand_in = np.arange(n_rows)
    cost = np.concatenate([pair_cost, np.full(n_rows, outlier_cost, np.int64)])
    # +1: the solver reads explicit zeros (a pair at distance 0) as missing edges; every row
    # takes exactly one edge, so a constant added to all of them changes no comparison
    graph = sparse.csr_matrix(
        (cost + 1, (np.concatenate([rows, stand_in]), np.concatenate([cols, n_cols + stand_in]))),
        shape=(n_rows, n_cols + n_rows))
    row, col = min_weight_full_bipartite_matching(graph)
    total = int(graph[row, col].sum()) - n_rows + outlier_cost * n_cols
    paired = col < n_cols
    if edges_are_rows:
        return row[paired], col[paired], total
    return col[paired], row[paired], total


def match_boundaries(edges: np.ndarray, ground_truth: np.ndarray,
                     max_dist: float = DEFAULT_MAX_DIST,
                     outlier_cost: float = OUTLIER_COST) -> Correspondence:
    """correspondPixels: the minimum-cost one-to-one matching of two boundary maps, a pair
    at most `max_dist` x the image diagonal apart, costing its distance; a pixel left
    unmatched costs `outlier_cost` x that tolerance."""
    edges, ground_truth = np.asarray(edges, bool), np.asarray(ground_truth, bool)
    if edges.shape != ground_truth.shape or edges.ndim != 2:
        raise ValueError(f"the two boundary maps must be 2-D of one shape, got {edges.shape} "
                         f"and {ground_truth.shape}")
    tolerance = _Tolerance(edges.shape, max_dist, outlier_cost)
    edge_rc, truth_rc = np.nonzero(edges), np.nonzero(ground_truth)
    truth_map = tolerance.index_map(*truth_rc, edges.shape)
    edge_hit, truth_hit, cost = _match(tolerance, edge_rc, truth_map, truth_rc[0].size)
    pairs = np.stack([edge_rc[0][edge_hit], edge_rc[1][edge_hit],
                      truth_rc[0][truth_hit], truth_rc[1][truth_hit]], axis=1)
    edge_matched = np.zeros(edges.shape, bool)
    edge_matched[pairs[:, 0], pairs[:, 1]] = True
    truth_matched = np.zeros(edges.shape, bool)
    truth_matched[pairs[:, 2], pairs[:, 3]] = True
    return Correspondence(edge_matched, truth_matched, pairs, cost)


def _match(tolerance: _Tolerance, edge_rc, truth_map: np.ndarray, n_truth_total: int):
    """The matched edge pixels and truth pixels (indices into the two pixel lists) and the
    assignment cost, outliers included."""
    n_edge_total = edge_rc[0].size
    outliers = tolerance.outlier_cost * (n_edge_total + n_truth_total)
    if n_edge_total == 0 or n_truth_total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), outliers
    edge_of_pair, truth_of_pair, pair_cost = tolerance.candidate_pairs(*edge_rc, truth_map)
    if pair_cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), outliers
    # number only the pixels that have a candidate: the graph stays as small as the problem
    edges_used, edge_index = np.unique(edge_of_pair, return_inverse=True)
    truth_used, truth_index = np.unique(truth_of_pair, return_inverse=True)
    edge_hit, truth_hit, cost = _solve_assignment(edges_used.size, truth_used.size, edge_index,
                                                  truth_index, pair_cost,
                                                  tolerance.outlier_cost)
    unmatchable = (n_edge_total - edges_used.size) + (n_truth_total - truth_used.size)
    return (edges_used[edge_hit], truth_used[truth_hit],
            cost + tolerance.outlier_cost * unmatchable)


# ---- one image --------------------------------------------------------------------------------

def evaluate_image(edge_map: np.ndarray, ground_truth: Sequence[np.ndarray],
                   thresholds: int = DEFAULT_THRESHOLDS, max_dist: float = DEFAULT_MAX_DIST,
                   thin: bool = True, name: str = "edge map") -> ImageCounts:
    """evaluation_bdry_image.m: one edge map's counts at each threshold against each of the
    image's annotations (bool boundary maps of the edge map's size)."""
    probability = edge_probability(edge_map, name)
    truths = _check_ground_truth(ground_truth, probability.shape, name)
    levels = benchmark_thresholds(thresholds)
    tolerance = _Tolerance(probability.shape, max_dist)
    truth_pixels = [np.nonzero(truth) for truth in truths]
    truth_maps = [tolerance.index_map(*rc, probability.shape) for rc in truth_pixels]
    truth_total = sum(rc[0].size for rc in truth_pixels)

    counts = np.zeros((4, levels.size), np.int64)
    previous_above = -1
    for t, level in enumerate(levels):
        above = probability >= level
        n_above = int(np.count_nonzero(above))
        if n_above == previous_above:  # the thresholded maps are nested: same count, same map
            counts[:, t] = counts[:, t - 1]
            continue
        previous_above = n_above
        edges = thin_boundaries(above) if thin else above
        edge_rc = np.nonzero(edges)
        matched_edges = np.zeros(edge_rc[0].size, bool)  # an edge pixel may match any annotator
        matched_truth = 0
        for truth_map, truth_rc in zip(truth_maps, truth_pixels):
            edge_hit, truth_hit, _ = _match(tolerance, edge_rc, truth_map, truth_rc[0].size)
            matched_edges[edge_hit] = True
            matched_truth += truth_hit.size
        counts[:, t] = (matched_truth, truth_total, np.count_nonzero(matched_edges),
                        edge_rc[0].size)
    for array in (levels, *counts):
        array.flags.writeable = False
    return ImageCounts(levels, *counts)


def _check_ground_truth(ground_truth: Sequence[np.ndarray], shape: Tuple[int, int],
                        name: str) -> List[np.ndarray]:
    truths = [np.asarray(truth) for truth in ground_truth]
    if not truths:
        raise ValueError(f"{name}: no ground-truth annotation to compare with")
    for i, truth in enumerate(truths):
        if truth.shape != shape:
            raise ValueError(f"{name}: edge map is {shape[0]}x{shape[1]} (HxW) but ground truth "
                             f"{i + 1} of {len(truths)} is "
                             f"{'x'.join(map(str, truth.shape))}")
        if truth.dtype != bool and not np.isin(truth, (0, 1)).all():
            raise ValueError(f"{name}: ground truth {i + 1} is not a 0/1 boundary map")
    return [truth.astype(bool) for truth in truths]


# ---- the dataset ------------------------------------------------------------------------------

def _recall_precision_f(matched_truth, truth_pixels, matched_edges, edge_pixels):
    """R, P and F as the official code: an empty denominator gives 0, not NaN."""
    matched_truth, truth_pixels, matched_edges, edge_pixels = (
        np.asarray(a, np.float64) for a in (matched_truth, truth_pixels, matched_edges,
                                             edge_pixels))
    recall = matched_truth / (truth_pixels + (truth_pixels == 0))
    precision = matched_edges / (edge_pixels + (edge_pixels == 0))
    return recall, precision, _f_measure(recall, precision)


def _f_measure(recall, precision):
    total = recall + precision
    return 2 * precision * recall / (total + (total == 0))


def max_f_interpolated(thresholds, recall, precision) -> OperatingPoint:
    """collect_eval_bdry's maxF: the best F of a precision/recall curve (one point per
    threshold, in threshold order) along straight lines between neighbouring points, the
    first best in threshold order. ODS is this on the dataset's curve."""
    thresholds, recall, precision = (np.asarray(a, np.float64)
                                     for a in (thresholds, recall, precision))
    if thresholds.size == 1:
        return OperatingPoint(float(thresholds[0]), float(recall[0]), float(precision[0]),
                              float(_f_measure(recall[0], precision[0])))
    step = _matlab_linspace(0.0, 1.0, POINTS_PER_SEGMENT)
    # the official formula, point i*d + point (i-1)*(1-d), for every segment at once
    t, r, p = (a[1:, None] * step + a[:-1, None] * (1 - step)
               for a in (thresholds, recall, precision))
    f = _f_measure(r, p)
    best = np.unravel_index(np.argmax(f), f.shape)
    return OperatingPoint(float(t[best]), float(r[best]), float(p[best]), float(f[best]))


def average_precision_and_r50(recall, precision) -> Tuple[float, float]:
    """edgesEvalDir's AP and R50 of a precision/recall curve (one point per threshold, in
    threshold order); AP equals collect_eval_bdry's Area_PR."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    # one point per recall value (of the lowest threshold), as MATLAB's unique; AP and R50
    # both use this curve
    recall_values, first = np.unique(recall, return_index=True)
    precision_values = precision[first]
    ap = 0.0
    if recall_values.size > 1:
        grid = _matlab_colon(0.0, RECALL_GRID_STEP, 1.0)
        # interp1: NaN outside the curve's recall range, and those grid points are skipped
        sampled = np.interp(grid, recall_values, precision_values, left=np.nan, right=np.nan)
        ap = float(np.nansum(sampled) / 100)
    # edgesEvalDir orders this curve by decreasing recall before its unique(P), so of equal
    # precisions the one at the highest recall is kept
    by_precision, first = np.unique(precision_values[::-1], return_index=True)
    recall_at = recall_values[::-1][first]
    query = max(by_precision[0], 0.5)  # above 0.5 everywhere: R50 is read at the lowest P
    if by_precision.size == 1:
        r50 = float(recall_at[0]) if query == by_precision[0] else math.nan
    else:
        r50 = float(np.interp(query, by_precision, recall_at, left=np.nan, right=np.nan))
    return ap, r50


def collect_results(images: Sequence[Tuple[str, ImageCounts]], max_dist: float =
                    DEFAULT_MAX_DIST, thin: bool = True) -> BoundaryResult:
    """collect_eval_bdry.m (with edgesEvalDir's R50): the dataset's numbers from each image's
    counts. `max_dist` and `thin` are only recorded in the result."""
    if not images:
        raise ValueError("no images to collect: the benchmark needs at least one edge map")
    thresholds = images[0][1].thresholds
    totals = np.zeros((4, thresholds.size), np.int64)
    best_counts = np.zeros(4, np.int64)
    results = []
    for name, counts in images:
        if not np.array_equal(counts.thresholds, thresholds):
            raise ValueError(f"{name}: evaluated at other thresholds than {images[0][0]}")
        columns = np.stack([counts.matched_ground_truth, counts.ground_truth_pixels,
                            counts.matched_edges, counts.edge_pixels])
        totals += columns
        recall, precision, f = counts.recall_precision_f()
        best_counts += columns[:, int(np.argmax(f))]  # OIS: this image's best threshold
        results.append(ImageResult(name, max_f_interpolated(thresholds, recall, precision),
                                   counts))
    recall, precision, f = _recall_precision_f(*totals)
    ois_recall, ois_precision, ois_f = _recall_precision_f(*best_counts)
    ap, r50 = average_precision_and_r50(recall, precision)
    curve = [np.array(a, np.float64) for a in (thresholds, recall, precision, f)]
    for array in curve:
        array.flags.writeable = False
    return BoundaryResult(
        ods=max_f_interpolated(thresholds, recall, precision),
        ois=OperatingPoint(None, float(ois_recall), float(ois_precision), float(ois_f)),
        ap=ap, r50=r50, thresholds=curve[0], recall=curve[1], precision=curve[2], f=curve[3],
        images=tuple(results), max_dist=float(max_dist), thinned=bool(thin))


def evaluate_boundaries(edge_maps: Iterable[Tuple[str, np.ndarray]],
                        ground_truth: Callable[[str], List[np.ndarray]],
                        thresholds: int = DEFAULT_THRESHOLDS,
                        max_dist: float = DEFAULT_MAX_DIST, thin: bool = True,
                        progress: bool = False) -> BoundaryResult:
    """The benchmark over a dataset: `edge_maps` yields (name, edge map) pairs (float in
    [0, 1], or uint8 as read from a PNG), `ground_truth(name)` gives that image's annotations
    (bool boundary maps). Images are read one at a time, so a generator keeps memory flat.
    `progress` shows a progress bar on stderr (with a total where `edge_maps` has a length)."""
    from tqdm import tqdm

    images = []
    total = len(edge_maps) if isinstance(edge_maps, collections.abc.Sized) else None
    for name, edge_map in tqdm(edge_maps, total=total, disable=not progress, unit="image",
                               desc="boundary benchmark"):
        counts = evaluate_image(edge_map, ground_truth(name), thresholds, max_dist, thin, name)
        images.append((name, counts))
    if not images:
        raise ValueError("no edge maps to evaluate")
    return collect_results(images, max_dist, thin)


# ---- files ------------------------------------------------------------------------------------

def load_bsds_ground_truth(path: PathLike) -> List[np.ndarray]:
    """The boundary maps of one BSDS500 `groundTruth/<id>.mat` (a cell array `groundTruth`
    whose cells hold the struct fields `Segmentation` and `Boundaries`), one per annotator."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        contents = loadmat(os.fspath(path))
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as error:
        raise ValueError(f"{path}: cannot read it as a MATLAB .mat file ({error})") from None
    if "groundTruth" not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"{path}: no 'groundTruth' variable (found: "
                         f"{', '.join(found) or 'none'})")
    boundaries = []
    for i, cell in enumerate(np.asarray(contents["groundTruth"], object).ravel()):
        record = np.asarray(cell)
        if record.dtype.names is None or "Boundaries" not in record.dtype.names:
            raise ValueError(f"{path}: groundTruth{{{i + 1}}} has no 'Boundaries' field")
        boundary = np.asarray(record["Boundaries"].ravel()[0])
        if boundary.ndim != 2:
            raise ValueError(f"{path}: groundTruth{{{i + 1}}}.Boundaries is not a 2-D map")
        boundaries.append(boundary.astype(bool))
    if not boundaries:
        raise ValueError(f"{path}: groundTruth holds no annotation")
    shapes = {b.shape for b in boundaries}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the annotations differ in size: {sorted(shapes)}")
    return boundaries


def load_edge_map(path: PathLike) -> np.ndarray:
    """A single-channel edge PNG as float in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(os.fspath(path)) as image:
            mode = image.mode
            if mode in ("L", "P", "1"):
                pixels = np.asarray(image.convert("L"))
            elif mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs open as one of these
                pixels = np.asarray(image).astype(np.int64)
                if pixels.min() < 0 or pixels.max() > 65535:
                    raise ValueError(f"{path}: a {mode} image with values outside 0..65535")
                pixels = pixels.astype(np.uint16)
            else:
                raise ValueError(f"{path}: edge maps must be single-channel (grayscale) images, "
                                 f"this one is {mode}")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path}: cannot read it as an image ({error})") from None
    return edge_probability(pixels, os.fspath(path))


def benchmark_folders(edge_dir: PathLike, ground_truth_dir: PathLike,
                      thresholds: int = DEFAULT_THRESHOLDS, max_dist: float = DEFAULT_MAX_DIST,
                      thin: bool = True, progress: bool = False) -> BoundaryResult:
    """The benchmark of a folder of edge PNGs against a BSDS500 `groundTruth` folder (one
    `<id>.mat` per `<id>.png`, e.g. BSR/BSDS500/data/groundTruth/test). Every ground-truth file
    must have its edge map and every edge map its ground truth."""
    edge_files = _files_by_stem(edge_dir, ".png", "edge maps")
    truth_files = _files_by_stem(ground_truth_dir, ".mat", "ground-truth files")
    missing = sorted(set(truth_files) - set(edge_files))
    extra = sorted(set(edge_files) - set(truth_files))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} ground-truth file(s) without an edge map in "
                            f"{edge_dir}: {_some(missing, '.png')}")
        if extra:
            problems.append(f"{len(extra)} edge map(s) without ground truth in "
                            f"{ground_truth_dir}: {_some(extra, '.png')}")
        raise ValueError("; ".join(problems))
    edge_maps = _EdgeMapFiles([(name, edge_files[name]) for name in sorted(truth_files)])
    return evaluate_boundaries(edge_maps, lambda name: load_bsds_ground_truth(truth_files[name]),
                               thresholds, max_dist, thin, progress)


class _EdgeMapFiles:
    """(name, edge map) per file, each read only when its turn comes; sized, so a progress bar
    knows the total."""

    def __init__(self, files: Sequence[Tuple[str, str]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        return ((name, load_edge_map(path)) for name, path in self.files)


def _files_by_stem(folder: PathLike, suffix: str, what: str) -> Dict[str, str]:
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    found = {name[:-len(suffix)]: os.path.join(folder, name) for name in os.listdir(folder)
             if name.lower().endswith(suffix) and not name.startswith(".")}
    if not found:
        raise ValueError(f"{folder}: no {what} (*{suffix}) in this folder")
    return found


def _some(names: Sequence[str], suffix: str, shown: int = 5) -> str:
    listed = ", ".join(name + suffix for name in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ---- plot -------------------------------------------------------------------------------------

def plot_pr_curve(result: BoundaryResult, path: PathLike, label: str = "edges",
                  title: Optional[str] = None) -> None:
    """The precision/recall curve as the BSDS500 plots draw it: iso-F contours (F = 0.1 ..
    0.9), the curve, and a dot at ODS. Uses a bare `Figure`, never pyplot, so the global
    backend and pyplot's figure list are untouched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    recall = np.linspace(0.01, 1, 400)
    for level in np.arange(1, 10) / 10:
        # P = F R / (2R - F), the points of equal F, where that precision lies in (0, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = level * recall / (2 * recall - level)
        visible = (recall > level / 2) & (precision > 0) & (precision <= 1)
        ax.plot(recall[visible], precision[visible], color="0.8", linewidth=0.8, zorder=1)
        ax.annotate(f"{level:.1f}", (recall[visible][-1], precision[visible][-1]),
                    fontsize=7, color="0.6", ha="right", va="bottom")
    ax.plot(result.recall, result.precision, color="tab:red", linewidth=2, zorder=2,
            label=f"{label}: ODS {result.ods.f:.3f}, OIS {result.ois.f:.3f}, AP {result.ap:.3f}")
    ax.plot([result.ods.recall], [result.ods.precision], "o", color="tab:red", zorder=3)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), aspect="equal",
           title=title or f"BSDS500 boundary benchmark ({len(result.images)} images)")
    ax.grid(True, color="0.92")
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(os.fspath(path))
