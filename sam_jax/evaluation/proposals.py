"""Object proposals (SAM §7.3, App. D.3): class-agnostic mask average recall on COCO/LVIS.

Protocol (the paper's "slightly modified" automatic mask generator, `proposal_settings`): a
64x64 point grid, box NMS at 0.9, no crops, no filtering by predicted IoU or stability (both
thresholds 0), no small-region post-processing; every mask is a proposal scored by the mean of
its predicted IoU and stability score, and the `max_proposals` (1000) best of an image are
kept. Proposals with a non-finite score are dropped: only an empty mask has one (its stability
is 0/0), and it cannot match anything.

Scoring (`evaluate_proposals`): pycocotools' COCOeval on segmentation masks with categories
ignored (`params.useCats = 0`, every proposal may match every object), `params.maxDets` =
(100, 1000): mask AR@100, AR@1000 and AR@1000 for small / medium / large objects (area
below 32², up to 96², above), as COCO's own proposal evaluation. On LVIS this is plain
COCOeval over LVIS's annotations, the usual class-agnostic reading of LVIS in proposal papers
(SAM's does not name its evaluation code). LVIS's own evaluation (lvis-api) is federated
(per category, only images whose labels are verified count, and extras in non-exhaustive
categories are not penalised); that shapes per-category precision, while class-agnostic
recall only asks which annotated objects some proposal covers.

The COCO helpers (ground truth, result files, COCOeval) are in `evaluation.coco`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .coco import load_coco_gt, read_results, run_cocoeval

AREA_RANGES = ("all", "small", "medium", "large")  # COCOeval's params.areaRngLbl, in order
DEFAULT_MAX_DETS = (100, 1000)


# ---- generating proposals ---------------------------------------------------------------------

def proposal_settings(points_per_side: int = 64, box_nms_thresh: float = 0.9,
                      points_per_batch: int = 64) -> Dict[str, Any]:
    """The paper's generator options for proposals (App. D.3) as `SamAutomaticMaskGenerator`
    keyword arguments; a smaller `points_per_side` for quick runs. The thresholds are given
    explicitly (0, and the official stability offset 1.0), so a checkpoint's recommended
    generator thresholds do not apply."""
    if int(points_per_side) < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    return dict(points_per_side=int(points_per_side), points_per_batch=int(points_per_batch),
                pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=1.0,
                box_nms_thresh=float(box_nms_thresh), crop_n_layers=0, min_mask_region_area=0,
                output_mode="coco_rle")


def _coco_rle(segmentation) -> dict:
    """A record's segmentation (COCO RLE, uncompressed RLE or binary mask) -> COCO RLE with
    str counts."""
    from pycocotools import mask as mask_utils

    from ..utils import amg

    if isinstance(segmentation, np.ndarray):
        rle = mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    elif isinstance(segmentation, dict) and not isinstance(segmentation.get("counts"),
                                                           (str, bytes)):
        rle = amg.coco_encode_rle(segmentation)
    else:
        rle = segmentation
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rank_proposals(records: List[dict], image_id: int, max_proposals: int) -> List[dict]:
    """Generator records of one image -> its best `max_proposals` as COCO results, scored by
    the mean of predicted IoU and stability score (ties keep the generator's order)."""
    scores = np.array([(r["predicted_iou"] + r["stability_score"]) / 2 for r in records],
                      np.float64)
    order = [i for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i])]
    return [{"image_id": image_id, "category_id": 1,
             "segmentation": _coco_rle(records[i]["segmentation"]),
             "score": float(scores[i])} for i in order[:max_proposals]]


def _images(dataset_or_images):
    """(image_id, HxWx3 uint8 array) pairs from a CocoInstances, a {image_id: image} mapping
    or an iterable of (image_id, image) pairs; an image may be an array or a file path."""
    from ..utils.image_io import load_image
    from .datasets import CocoInstances

    if isinstance(dataset_or_images, CocoInstances):
        pairs = ((i, item.image) for i, item in zip(dataset_or_images.ids, dataset_or_images))
    elif isinstance(dataset_or_images, dict):
        pairs = iter(dataset_or_images.items())
    else:
        pairs = iter(dataset_or_images)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError("images must be a CocoInstances, a {image_id: image} dict or "
                             f"(image_id, image) pairs, got an item {type(pair).__name__}")
        image_id, image = pair
        if isinstance(image, (str, os.PathLike)):
            image, _ = load_image(image)
        yield image_id, image


def generate_proposals(model, dataset_or_images, max_proposals: int = 1000, *,
                       settings: Optional[Dict[str, Any]] = None,
                       progress: bool = False) -> List[dict]:
    """Proposals for every image: a list of COCO results (`image_id`, `category_id` 1,
    `segmentation` RLE with str counts, `score` = mean(predicted IoU, stability score)), the
    best `max_proposals` per image.

    model: a `SamModel` (a generator is built with `settings`, default
    `proposal_settings()`), or a ready generator (anything with `.generate(image)` returning
    the official records). dataset_or_images: a `CocoInstances` (its images with their COCO
    ids), a {image_id: image} dict or (image_id, image) pairs; an image is an HxWx3 uint8 RGB
    array or a file path."""
    if int(max_proposals) < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    if hasattr(model, "generate"):
        if settings is not None:
            raise ValueError("settings apply to a model; this is already a generator")
        generator = model
    else:
        from ..automatic_mask_generator import SamAutomaticMaskGenerator
        generator = SamAutomaticMaskGenerator(model, **(settings or proposal_settings()))
    items = _images(dataset_or_images)
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="proposals", unit="image",
                     total=len(dataset_or_images) if hasattr(dataset_or_images, "__len__")
                     else None)
    results: List[dict] = []
    for image_id, image in items:
        results += rank_proposals(generator.generate(image), image_id, int(max_proposals))
    return results


# ---- scoring ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ProposalResult:
    """Class-agnostic mask recall; `recall` is COCOeval's (T, A, M) recall per IoU threshold,
    area range (AREA_RANGES) and max_dets (-1: no object of that size)."""

    max_dets: Tuple[int, ...]
    recall: np.ndarray
    iou_thresholds: Tuple[float, ...]
    images: int
    proposals: int
    seconds: float

    def ar(self, area: str = "all", max_dets: Optional[int] = None) -> float:
        r = self.recall[:, AREA_RANGES.index(area),
                        self.max_dets.index(max_dets or self.max_dets[-1])]
        r = r[r > -1]
        return float(r.mean()) if r.size else float("nan")

    def table(self) -> Dict[str, float]:
        """{"AR@100": .., "AR@1000": .., "AR_small@1000": .., "AR_medium@1000": ..,
        "AR_large@1000": ..} (every max_dets, the sizes at the largest)."""
        top = self.max_dets[-1]
        row = {f"AR@{m}": self.ar("all", m) for m in self.max_dets}
        row.update({f"AR_{a}@{top}": self.ar(a, top) for a in AREA_RANGES[1:]})
        return row

    def to_json(self) -> dict:
        return {"protocol": {"evaluation": "COCOeval segm, useCats=0 (class-agnostic)",
                             "max_dets": list(self.max_dets),
                             "iou_thresholds": list(self.iou_thresholds),
                             "score": "mean of predicted IoU and stability score"},
                "results": {k: (None if np.isnan(v) else v) for k, v in self.table().items()},
                "recall": {"axes": ["iou_threshold", "area", "max_dets"],
                           "areas": list(AREA_RANGES), "values": self.recall.tolist()},
                "images": self.images, "proposals": self.proposals, "seconds": self.seconds}

    def format_table(self) -> str:
        row = self.table()
        head = ["images", "proposals"] + list(row)
        cells = [str(self.images), str(self.proposals)] + [f"{100 * v:.1f}" for v in
                                                           row.values()]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          "| " + " | ".join(cells) + " |"])


def evaluate_proposals(coco_gt, results, max_dets: Sequence[int] = DEFAULT_MAX_DETS, *,
                       image_ids: Optional[Sequence[int]] = None) -> ProposalResult:
    """Class-agnostic mask AR of `results` (COCO results list or JSON path, e.g. from
    `generate_proposals`) against `coco_gt` (COCO, CocoInstances or annotation JSON path),
    with COCOeval (see the module docstring). `image_ids`: the images scored (default all of
    the ground truth's)."""
    start = time.perf_counter()
    max_dets = tuple(sorted({int(m) for m in max_dets}))
    if not max_dets or max_dets[0] < 1:
        raise ValueError(f"max_dets must be positive integers, got {max_dets}")
    gt = load_coco_gt(coco_gt)
    results = read_results(results, ("image_id", "segmentation", "score"))
    # category_id plays no part with useCats=0, but loadRes reads it
    results = [r if "category_id" in r else dict(r, category_id=1) for r in results]
    ev = run_cocoeval(gt, results, use_cats=False, max_dets=max_dets, image_ids=image_ids)
    # ev.eval["recall"] is (T, K, A, M): T IoU thresholds (params.iouThrs, 0.50:0.05:0.95),
    # K categories (1 with useCats=0: every object pooled), A area ranges (params.areaRngLbl:
    # all, small, medium, large), M params.maxDets (sorted); -1 marks a cell without ground
    # truth. `ProposalResult.ar` averages over T the cells that are not -1, as
    # COCOeval.summarize does.
    recall = np.asarray(ev.eval["recall"])[:, 0]  # (T, A, M)
    return ProposalResult(max_dets, recall, tuple(float(t) for t in ev.params.iouThrs),
                          len(ev.params.imgIds), len(results), time.perf_counter() - start)
