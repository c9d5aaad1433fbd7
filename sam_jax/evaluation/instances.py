"""Instance segmentation from a detector's boxes (SAM §7.4, App. D.4): mask AP on COCO/LVIS.

Protocol: every detection box of an image (a detector's COCO results, e.g. ViTDet-H's) is a
box prompt; SAM's single output (`multimask_output=False`, the official box usage) is the
instance's mask, with the detection's image, category and score. All boxes of an image are
decoded together (`SamPredictor.predict_batch`, `boxes_per_call` at a time). `refine=True`
adds the paper's variant: one more pass with the same box and the most confident mask's
low-res logits as the mask prompt. Boxes are XYWH in the file, clipped to the image and
passed as XYXY. A detection whose box has no area (width or height <= 0, also after
clipping) cannot prompt SAM: it is skipped, and a warning gives the count.

Scoring (`evaluate_instances`): pycocotools' COCOeval(iouType="segm").stats: AP, AP50, AP75,
AP small/medium/large at `max_dets` (100, COCO's; LVIS's own evaluation keeps 300). On LVIS
this is plain COCOeval over LVIS's annotations, not LVIS's federated evaluation (lvis-api:
only images whose labels are verified count per category, and extras in non-exhaustive
categories are not false positives), so it is lower than the paper's LVIS AP; use lvis-api
on the results JSON for that number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from .coco import PathLike, check_image_ids, coco_image_path, load_coco_gt, read_results, run_cocoeval

DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")  # stats[0:6]


def _detections_by_image(detections: List[dict], score_threshold: float,
                         max_per_image: Optional[int]) -> Dict[int, List[dict]]:
    """The detections kept per image, best score first (ties in file order)."""
    by_image: Dict[int, List[dict]] = {}
    for i, d in enumerate(detections):
        bbox = d["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and
                all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"detections: entry {i} has bbox {bbox!r}, expected [x, y, w, h] "
                             "(4 finite numbers)")
        if not isinstance(d["score"], (int, float)):
            raise ValueError(f"detections: entry {i} has score {d['score']!r}, not a number")
        if d["score"] >= score_threshold:
            by_image.setdefault(d["image_id"], []).append(d)
    for image_id, dets in by_image.items():
        dets.sort(key=lambda d: -d["score"])  # stable
        by_image[image_id] = dets[:max_per_image]
    return by_image


def _encode(masks: np.ndarray) -> List[dict]:
    """(N, H, W) bool -> COCO RLEs with str counts."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in rles]


def masks_from_detections(model, detections, images_dir: PathLike, coco_gt,
                          score_threshold: float = 0.0, max_per_image: Optional[int] = None,
                          refine: bool = False, progress: bool = False, *,
                          boxes_per_call: int = 64) -> List[dict]:
    """SAM's masks for a detector's boxes: a list of COCO segmentation results (`image_id`,
    `category_id`, `score` of the detection, `segmentation` RLE with str counts), per image
    in decreasing score.

    model: a `SamModel`, or a predictor (`set_image`, `predict_batch`, e.g. a `SamPredictor`).
    detections: COCO detection results (a list or JSON path; `image_id`, `category_id`,
    `bbox` XYWH, `score`). coco_gt (COCO, CocoInstances or annotation JSON path) names each
    image's file in `images_dir` and its size. Detections below `score_threshold` are dropped,
    and at most `max_per_image` (the best) are kept per image."""
    from ..utils.image_io import load_image

    if max_per_image is not None and int(max_per_image) < 1:
        raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
    if int(boxes_per_call) < 1:
        raise ValueError(f"boxes_per_call must be >= 1, got {boxes_per_call}")
    if hasattr(model, "predict_batch") and hasattr(model, "set_image"):
        predictor = model
    else:
        from ..predictor import SamPredictor
        predictor = SamPredictor(model)
    gt = load_coco_gt(coco_gt)
    detections = read_results(detections, DETECTION_KEYS, "detections")
    check_image_ids(gt, (d["image_id"] for d in detections), "detections")
    by_image = _detections_by_image(detections, float(score_threshold), max_per_image)
    image_ids = [i for i in gt.getImgIds() if i in by_image]  # the annotations' order
    if progress:
        from tqdm.auto import tqdm
        image_ids = tqdm(image_ids, desc="instances", unit="image")
    results: List[dict] = []
    skipped: List[tuple] = []
    for image_id in image_ids:
        info = gt.imgs[image_id]
        path = coco_image_path(images_dir, info)
        if not os.path.isfile(path):
            raise ValueError(f"image {image_id} of the annotations is not at {path}")
        image, _ = load_image(path)
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise ValueError(f"{path}: image is {w}x{h}, the annotations say "
                             f"{info['width']}x{info['height']}")
        dets = by_image[image_id]
        xywh = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = np.clip(boxes, 0, [w, h, w, h])
        ok = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (boxes[:, 2] > boxes[:, 0]) & \
            (boxes[:, 3] > boxes[:, 1])
        skipped += [(image_id, dets[i]["bbox"]) for i in np.flatnonzero(~ok)]
        keep = np.flatnonzero(ok)
        if not len(keep):
            continue
        predictor.set_image(image)
        for start in range(0, len(keep), int(boxes_per_call)):
            idx = keep[start:start + int(boxes_per_call)]
            rows = np.arange(len(idx))
            masks, iou, low_res = predictor.predict_batch(boxes=boxes[idx],
                                                          multimask_output=False)
            if refine:  # the most confident mask's logits back in, with the same box
                best = np.argmax(iou, axis=1)
                masks, iou, low_res = predictor.predict_batch(
                    boxes=boxes[idx], mask_input=low_res[rows, best][:, None],
                    multimask_output=False)
            best = np.argmax(iou, axis=1)
            for i, rle in zip(idx, _encode(np.asarray(masks[rows, best], bool))):
                results.append({"image_id": image_id, "category_id": dets[i]["category_id"],
                                "segmentation": rle, "score": float(dets[i]["score"])})
    if skipped:
        warnings.warn(f"skipped {len(skipped)} detection(s) whose box has no area inside the "
                      f"image (e.g. image {skipped[0][0]}, bbox {skipped[0][1]})",
                      stacklevel=2)
    return results


@dataclasses.dataclass
class InstanceResult:
    """COCOeval(segm) `stats` (12 numbers, -1 where a size has no object) and counts."""

    stats: List[float]
    max_dets: int
    images: int
    detections: int
    seconds: float

    def table(self) -> Dict[str, float]:
        """{"AP": .., "AP50": .., "AP75": .., "AP_small": .., "AP_medium": .., "AP_large": ..}
        (NaN where COCOeval has -1)."""
        return {k: (float("nan") if v < 0 else float(v))
                for k, v in zip(STAT_NAMES, self.stats)}

    @property
    def ap(self) -> float:
        return self.table()["AP"]

    def to_json(self) -> dict:
        return {"protocol": {"evaluation": "COCOeval segm", "max_dets": self.max_dets},
                "results": {k: (None if math.isnan(v) else v) for k, v in self.table().items()},
                "stats": list(self.stats), "images": self.images,
                "detections": self.detections, "seconds": self.seconds}

    def format_table(self) -> str:
        row = self.table()
        head = ["images", "masks"] + list(row)
        cells = [str(self.images), str(self.detections)] + [f"{100 * v:.1f}" for v in
                                                            row.values()]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          "| " + " | ".join(cells) + " |"])


def evaluate_instances(coco_gt, results, *, max_dets: int = 100,
                       image_ids: Optional[Sequence[int]] = None) -> InstanceResult:
    """Mask AP of `results` (COCO segmentation results, list or JSON path) against `coco_gt`
    (COCO, CocoInstances or annotation JSON path): COCOeval(iouType="segm") with
    `params.maxDets` = [1, 10, max_dets], its `stats` after `summarize()`. `image_ids`: the
    images scored (default all of the ground truth's)."""
    start = time.perf_counter()
    if int(max_dets) <= 10:
        raise ValueError(f"max_dets must be > 10 (COCOeval keeps 1 and 10 too), got {max_dets}")
    gt = load_coco_gt(coco_gt)
    if not gt.getCatIds():
        raise ValueError("the ground truth has no 'categories': mask AP is per category")
    results = read_results(results, ("image_id", "category_id", "segmentation", "score"))
    ev = run_cocoeval(gt, results, use_cats=True, max_dets=(1, 10, int(max_dets)),
                      image_ids=image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    return InstanceResult([float(s) for s in ev.stats], int(max_dets), len(ev.params.imgIds),
                          len(results), time.perf_counter() - start)
