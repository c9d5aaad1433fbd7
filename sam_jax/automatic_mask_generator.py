"""Ports `segment_anything/automatic_mask_generator.py`: masks for a whole image from a grid of
point prompts (SAM's fully automatic data-engine stage).

Same constructor options, same algorithm and same records as the official generator. The
per-batch work runs in one jitted function with static shapes (`_batch_stats`): decode a batch
of grid points, upscale every mask's logits to the crop size, and reduce them to the
predicted IoU, stability score and box, without keeping the full-size logits. The host then
filters by those numbers (cheap, per mask), runs NMS (jitted, padded sizes), and upscales and
run-length-encodes only the masks that survive.

Deviations from the official code, none of which changes the algorithm:
- the last batch of points is padded to `points_per_batch` (padding masks are dropped), so
  every batch reuses one compiled function;
- full-size binary masks are computed only for masks kept after the filters and NMS; the
  official thresholds and encodes every mask that passes the filters, then runs NMS;
- upscaling composes the two bilinear resizes (`inference.postprocess_masks`): a pixel whose
  logit lies within float rounding (~1e-5) of the threshold can land on the other side. The
  parity test measures the effect on a real image.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from . import inference
from .inference import SamModel
from .predictor import SamPredictor
from .utils import amg

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Prompts whose masks are upscaled together when measuring stability and boxes: the
# full-size logits of 4 x 3 masks stay cache-friendly (2, 4: 1.55 s a batch of 64 at
# 1024x683 on the 2-core CPU; 8: 1.8 s; 64: 2.0 s).
STATS_GROUP = 4
# Wall seconds per stage of the last `generate`, in `generator.last_timings`.
TIMED_STAGES = ("embed", "decode and filter", "nms, masks and rle", "small regions")


@functools.partial(jax.jit, static_argnames=("config", "input_size", "crop_size", "group"))
def _batch_stats(variables, features, prompts, stability_offset, *, config, input_size,
                 crop_size, group):
    """Decode a batch of single-point prompts; returns low-res logits (P, 3, 4h, 4w),
    predicted IoU, stability score (P, 3) and XYXY boxes (P, 3, 4) in the crop frame, the
    last two measured on the logits upscaled to `crop_size` as the official does."""
    low_res, iou = inference.decode_prompts(variables, features, prompts, config=config,
                                            multimask_output=True, with_masks=False)
    threshold = config.mask_threshold
    upscale = functools.partial(inference.postprocess_masks, input_size=input_size,
                                original_size=crop_size, image_size=config.image_size)

    def measure(logits_group):  # (group, 3, 4h, 4w): full-size logits exist one group at a time
        full = upscale(logits_group)
        stability = amg.stability_score(full, threshold, stability_offset)
        return stability, amg.masks_to_boxes(full > threshold)

    p = low_res.shape[0]
    group = math.gcd(group, p)
    grouped = low_res.reshape((p // group, group) + low_res.shape[1:])
    stability, boxes = jax.lax.map(measure, grouped)
    return low_res, iou, stability.reshape(p, -1), boxes.reshape(p, -1, 4)


class SamAutomaticMaskGenerator:
    def __init__(self, model: SamModel, points_per_side: Optional[int] = 32,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
                 box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1,
                 point_grids: Optional[List[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask") -> None:
        """Options and defaults as the official `SamAutomaticMaskGenerator` (see its
        docstring); `model` is what `sam_jax.load` returns. Invalid options raise ValueError
        naming the option."""
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids")
        if points_per_side is not None:
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            if crop_n_points_downscale_factor < 1 or \
                    points_per_side // crop_n_points_downscale_factor ** crop_n_layers < 1:
                raise ValueError("crop_n_points_downscale_factor leaves no points in the last "
                                 "crop layer")
            self.point_grids = amg.build_all_layer_point_grids(
                int(points_per_side), crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(self.point_grids)} grids, but "
                                 f"crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}")
            for g in self.point_grids:
                if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or \
                        np.any(g < 0) or np.any(g > 1):
                    raise ValueError("each point grid must be a non-empty (N, 2) array of "
                                     "points in [0, 1]")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        self.predictor = SamPredictor(model)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        self.last_timings: Dict[str, float] = {}

    # -- public ----------------------------------------------------------------------------
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image: a list of records with `segmentation` (per
        `output_mode`), `area`, `bbox` (XYWH), `predicted_iou`, `point_coords`,
        `stability_score` and `crop_box` (XYWH), as the official `generate`."""
        image = inference.check_image(image)
        self.last_timings = dict.fromkeys(TIMED_STAGES, 0.0)
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            start = time.perf_counter()
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
            self.last_timings["small regions"] += time.perf_counter() - start
        records = []
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation = amg.coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = amg.rle_to_mask(rle)
            else:
                segmentation = rle
            records.append({
                "segmentation": segmentation,
                "area": amg.area_from_rle(rle),
                "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]),
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]),
                "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]),
            })
        return records

    # -- steps -----------------------------------------------------------------------------
    def _generate_masks(self, image: np.ndarray) -> Dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers,
                                                         self.crop_overlap_ratio)
        crops = [self._process_crop(image, box, layer, orig_size)
                 for box, layer in zip(crop_boxes, layer_idxs)]
        data = {k: _concat([c[k] for c in crops]) for k in crops[0]}
        if len(crop_boxes) > 1 and len(data["rles"]):
            # Remove duplicates between crops, preferring masks from smaller crops.
            start = time.perf_counter()
            cb = data["crop_boxes"].astype(np.float32)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data = _take(data, amg.nms(data["boxes"], scores, self.crop_nms_thresh))
            self.last_timings["nms, masks and rle"] += time.perf_counter() - start
        return data

    def _process_crop(self, image, crop_box, layer_idx, orig_size) -> Dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        predictor = self.predictor
        timings = self.last_timings
        start = time.perf_counter()
        predictor.set_image(crop)
        jax.block_until_ready(predictor.features)
        timings["embed"] += time.perf_counter() - start
        start = time.perf_counter()
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        config = predictor.model.config
        kept: Dict[str, list] = {k: [] for k in ("low_res", "iou_preds", "stability_score",
                                                 "boxes", "points")}
        for first in range(0, len(points), self.points_per_batch):
            batch = points[first:first + self.points_per_batch]
            n = len(batch)
            padded = np.concatenate([batch, np.repeat(batch[:1], self.points_per_batch - n, 0)])
            prompts = predictor._prompts(padded[:, None, :], np.ones((len(padded), 1), int),
                                         None, None)
            low_res, iou, stability, boxes = (np.asarray(x) for x in _batch_stats(
                predictor.model.variables, predictor.features, prompts,
                np.float32(self.stability_score_offset), config=config,
                input_size=predictor.input_size, crop_size=crop_size, group=STATS_GROUP))
            low_res, iou, stability, boxes = (x[:n] for x in (low_res, iou, stability, boxes))
            keep = np.ones(iou.shape, bool)
            if self.pred_iou_thresh > 0.0:
                keep &= iou > self.pred_iou_thresh
            if self.stability_score_thresh > 0.0:
                keep &= stability >= self.stability_score_thresh
            flat = boxes.reshape(-1, 4)
            keep &= ~amg.is_box_near_crop_edge(flat, crop_box, [0, 0, orig_size[1],
                                                                orig_size[0]]).reshape(keep.shape)
            kept["low_res"].append(low_res[keep])
            kept["iou_preds"].append(iou[keep])
            kept["stability_score"].append(stability[keep])
            kept["boxes"].append(boxes[keep])
            kept["points"].append(np.repeat(batch[:, None, :], 3, axis=1)[keep])
        data = {k: _concat(v) for k, v in kept.items()}
        timings["decode and filter"] += time.perf_counter() - start
        start = time.perf_counter()
        # Remove duplicates within this crop.
        data = _take(data, amg.nms(data["boxes"].astype(np.float32), data["iou_preds"],
                                   self.box_nms_thresh))
        masks = self._binary_masks(data.pop("low_res"), crop_size)
        data["rles"] = _uncropped_rles(masks, crop_box, orig_size)
        offset = np.array([x0, y0, x0, y0])
        data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + offset[:2]
        data["crop_boxes"] = np.tile(np.asarray(crop_box)[None], (len(data["rles"]), 1))
        predictor.reset_image()
        timings["nms, masks and rle"] += time.perf_counter() - start
        return data

    def _binary_masks(self, low_res: np.ndarray, crop_size: Tuple[int, int]) -> np.ndarray:
        """Kept masks at the crop size, upscaled in chunks of a fixed size (one compile)."""
        chunk = 16
        out = np.zeros((len(low_res),) + tuple(crop_size), bool)
        config = self.predictor.model.config
        for s in range(0, len(low_res), chunk):
            part = low_res[s:s + chunk]
            padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:],
                                                    part.dtype)])
            masks = inference.postprocess_masks(
                padded, input_size=self.predictor.input_size, original_size=tuple(crop_size),
                image_size=config.image_size, threshold=config.mask_threshold)
            out[s:s + len(part)] = np.asarray(masks)[:len(part)]
        return out

    @staticmethod
    def _postprocess_small_regions(data: Dict[str, Any], min_area: int,
                                   nms_thresh: float) -> Dict[str, Any]:
        """Removes small islands and fills small holes, then reruns box NMS preferring masks
        that did not change (the official `postprocess_small_regions`)."""
        if len(data["rles"]) == 0:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            mask = amg.rle_to_mask(rle)
            mask, changed_holes = amg.remove_small_regions(mask, min_area, "holes")
            mask, changed_islands = amg.remove_small_regions(mask, min_area, "islands")
            masks.append(mask)
            scores.append(float(not (changed_holes or changed_islands)))
        masks = np.stack(masks)
        boxes = np.asarray(amg.masks_to_boxes(masks))
        keep = amg.nms(boxes.astype(np.float32), np.asarray(scores, np.float32), nms_thresh)
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].copy())
        for i in keep:
            if scores[i] == 0.0:
                data["rles"][i] = amg.mask_to_rle(masks[i][None])[0]
                data["boxes"][i] = boxes[i]
        return _take(data, keep)


def _uncropped_rles(masks: np.ndarray, crop_box, orig_size) -> List[amg.Rle]:
    x0, y0, x1, y1 = crop_box
    h, w = orig_size
    if (x0, y0, x1, y1) != (0, 0, w, h):
        full = np.zeros((len(masks), h, w), bool)
        full[:, y0:y1, x0:x1] = masks
        masks = full
    return amg.mask_to_rle(masks)


def _concat(parts):
    if isinstance(parts[0], list):
        return [x for p in parts for x in p]
    return np.concatenate(parts, axis=0)


def _take(data: Dict[str, Any], index: np.ndarray) -> Dict[str, Any]:
    return {k: [v[i] for i in index] if isinstance(v, list) else v[index]
            for k, v in data.items()}
