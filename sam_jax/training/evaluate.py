"""Point-prompt evaluation: mIoU after 1, 2, ..., K clicks, as the paper's single-point and
interactive experiments (SAM §7.1, following RITM's click protocol).

Click protocol (deterministic, so runs compare): the first click is the mask pixel farthest
from the mask's boundary; each next click goes to the pixel farthest from the boundary of the
larger error region (false negatives -> positive click, false positives -> negative click).
Every prediction after the first feeds the previous low-res logits back as the mask prompt.
The first click uses the 3 multimask outputs and keeps the one with the highest predicted IoU
("mIoU@1"); "oracle@1" keeps the best of the 3 against the truth. Later clicks ask for one mask.
IoU is measured at the original image resolution through the public `SamPredictor`, so this is
exactly what a user of the model gets.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..evaluation.clicks import farthest_from_boundary, mask_iou, next_click
from ..inference import SamModel
from ..predictor import SamPredictor


# The protocol's pieces live in sam_jax.evaluation.clicks; these names stay for callers.
_farthest_from_boundary = farthest_from_boundary
iou = mask_iou


def click_ious(predictor: SamPredictor, gt: np.ndarray, num_clicks: int) -> dict:
    """IoUs after each click for one mask on the predictor's current image."""
    points, labels, ious = [], [], []
    xy, _ = _farthest_from_boundary(gt)
    click = (xy, 1)
    logits = None
    oracle = 0.0
    for k in range(num_clicks):
        points.append(click[0])
        labels.append(click[1])
        masks, scores, low_res = predictor.predict(
            point_coords=np.asarray(points, np.float32), point_labels=np.asarray(labels),
            mask_input=None if logits is None else logits[None], multimask_output=(k == 0))
        best = int(np.argmax(scores))
        if k == 0:
            oracle = max(iou(m, gt) for m in masks)
        pred = masks[best]
        ious.append(iou(pred, gt))
        logits = low_res[best]
        click = next_click(pred, gt)
    return {"ious": ious, "oracle_1": oracle}


def evaluate_clicks(model: SamModel, examples: Iterable, num_clicks: int = 3,
                    progress: bool = False) -> dict:
    """examples: (image uint8 HxWx3, masks bool (N, H, W), info) tuples. Returns mIoU after
    1..num_clicks clicks ("miou_1", "miou_2", ...), "oracle_1" and the number of masks."""
    predictor = SamPredictor(model)
    per_click: list[list[float]] = [[] for _ in range(num_clicks)]
    oracle: list[float] = []
    items = examples
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(examples, desc="evaluating", unit="image")
    for image, masks, _ in items:
        masks = np.asarray(masks, bool)
        if not masks.any():
            continue
        predictor.set_image(image)
        for gt in masks:
            if not gt.any():
                continue
            result = click_ious(predictor, gt, num_clicks)
            for k, v in enumerate(result["ious"]):
                per_click[k].append(v)
            oracle.append(result["oracle_1"])
    out = {f"miou_{k + 1}": float(np.mean(v)) if v else float("nan")
           for k, v in enumerate(per_click)}
    out["oracle_1"] = float(np.mean(oracle)) if oracle else float("nan")
    out["num_masks"] = len(oracle)
    return out
