"""Ports `segment_anything/automatic_mask_generator.py`: masks for a whole image from a grid of
point prompts (SAM's fully automatic data-engine stage).

Same constructor options, same algorithm and same records as the official generator. Each crop
is one jitted function with static shapes (`_crop_candidates`): decode every batch of grid
points, upscale each mask's logits to the crop size and reduce them to the predicted IoU,
stability score and box (without keeping the full-size logits), flag the masks that pass the
IoU, stability and near-crop-edge filters, and run greedy NMS over all flagged masks of the
crop. Only the count and the (small) per-mask numbers come to the host; the surviving masks
are then upscaled on the device in fixed-size chunks (`_kept_masks`) and copied to the host
as binary masks for run-length encoding.

Deviations from the official code, none of which changes the algorithm:
- points are padded to whole batches of `points_per_batch` (padding masks are flagged
  invalid), so every crop of one size runs one compiled function;
- filters set validity flags instead of dropping masks, and NMS runs on the flagged set
  (`amg.greedy_nms`: torchvision's order and ties);
- full-size binary masks are computed only for masks kept after the filters and NMS; the
  official thresholds and encodes every mask that passes the filters, then runs NMS;
- upscaling composes the two bilinear resizes (`inference.postprocess_masks`): a pixel whose
  logit lies within float rounding (~1e-5) of the threshold can land on the other side. The
  parity test measures the effect on a real image;
- a crop's low-res logits stay on the device until its kept masks are made (3 x 256 x 256
  float32 a point: 805 MB for the default 32 x 32 grid); the official keeps those that pass
  the filters;
- the layout of the work depends on the backend (`plan_for_backend`), not the results.
NMS across crops and after small-region removal runs on the host's (few) records, through
the same jitted `amg.greedy_nms`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, inference
from .inference import SamModel
from .predictor import SamPredictor
from .utils import amg

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Wall seconds per stage of the last `generate`, in `generator.last_timings`. "decode and
# filter" is the per-crop device function, NMS within the crop included; "nms, masks and
# rle" is the kept masks' upscaling, their copy to the host and encoding, and NMS across crops.
TIMED_STAGES = ("embed", "decode and filter", "nms, masks and rle", "small regions")


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """How a crop's work is laid out on the device; every plan gives the same records.

    stats_group: masks upscaled together when measuring stability and boxes (a sequential
    `lax.map` over groups within each batch); None: the whole batch at once.
    mask_chunk: kept masks upscaled and copied to the host per call."""

    stats_group: Optional[int]
    mask_chunk: int


# On the 2-core CPU the full-size logits of 4 x 3 masks stay cache-friendly (groups of 2, 4:
# 1.55 s a batch of 64 at 1024x683; 8: 1.8 s; 64: 2.0 s).
CPU_PLAN = DevicePlan(stats_group=4, mask_chunk=16)
# GPUs and TPUs have the memory and parallelism for whole batches: no small sequential steps.
ACCELERATOR_PLAN = DevicePlan(stats_group=None, mask_chunk=64)


def plan_for_backend(name: Optional[str] = None) -> DevicePlan:
    """The plan for a jax backend ("cpu", "gpu", "tpu"; default: `jax.default_backend()`):
    ACCELERATOR_PLAN where `backend.on_accelerator`, else CPU_PLAN. A generator takes it at
    construction as `generator.plan`; assign another plan there to override (the tests run
    both plans on CPU and compare)."""
    return ACCELERATOR_PLAN if backend.on_accelerator(name) else CPU_PLAN


class _Filters(NamedTuple):
    """The generator's thresholds, traced (float32 scalars): new values do not recompile."""

    pred_iou: Any
    stability: Any
    stability_offset: Any
    box_nms: Any


class _Candidates(NamedTuple):
    """A crop's masks after filters and NMS, in keep order, padded to all N candidates:
    entries past `count` are padding. `low_res` (N, 4h, 4w) stays in candidate order."""

    count: Any
    index: Any  # (N,) candidate index = 3 * prompt row + mask
    iou: Any
    stability: Any
    boxes: Any  # (N, 4) XYXY, crop frame
    low_res: Any


def _batch_stats(variables, features, coords, labels, stability_offset, *, config, input_size,
                 crop_size, stats_group):
    """Decode one batch of single-point prompts; returns low-res logits (P, 3, 4h, 4w),
    predicted IoU, stability score (P, 3) and XYXY boxes (P, 3, 4) in the crop frame, the
    last two measured on the logits upscaled to `crop_size` as the official does."""
    p = coords.shape[0]
    # No mask inputs: `with_masks=False` reads neither mask_inputs nor has_mask.
    prompts = inference.PromptBatch(coords, labels, None, None, jnp.zeros((p,), jnp.int32), p)
    low_res, iou = inference.decode_prompts(variables, features, prompts, config=config,
                                            multimask_output=True, with_masks=False)
    threshold = config.mask_threshold
    upscale = functools.partial(inference.postprocess_masks, input_size=input_size,
                                original_size=crop_size, image_size=config.image_size)

    def measure(logits_group):  # (group, 3, 4h, 4w): full-size logits exist a group at a time
        full = upscale(logits_group)
        stability = amg.stability_score(full, threshold, stability_offset)
        return stability, amg.masks_to_boxes(full > threshold)

    group = p if stats_group is None else math.gcd(stats_group, p)
    if group == p:
        stability, boxes = measure(low_res)
    else:
        grouped = low_res.reshape((p // group, group) + low_res.shape[1:])
        stability, boxes = jax.lax.map(measure, grouped)
    return low_res, iou, stability.reshape(p, -1), boxes.reshape(p, -1, 4)


@functools.partial(jax.jit, static_argnames=("config", "input_size", "crop_size",
                                             "stats_group"))
def _crop_candidates(variables, features, coords, labels, valid_rows, crop_box, orig_box,
                     filters: _Filters, *, config, input_size, crop_size,
                     stats_group) -> _Candidates:
    """A crop's masks, decoded, filtered and NMS'd on the device.

    coords (B, P, T, 2), labels (B, P, T): B batches of P single-point prompts (model frame);
    valid_rows (B * P,): the rows that are grid points, not padding; crop_box and orig_box
    XYXY, traced so that crops of one size share the compiled function."""
    stats = functools.partial(_batch_stats, variables, features,
                              stability_offset=filters.stability_offset, config=config,
                              input_size=input_size, crop_size=crop_size,
                              stats_group=stats_group)
    # One batch at a time (each batch is parallel work): `points_per_batch` bounds the
    # decoder's memory, as in the official.
    low_res, iou, stability, boxes = jax.lax.map(lambda batch: stats(*batch), (coords, labels))
    masks_per_prompt = iou.shape[-1]
    n = iou.size
    low_res = low_res.reshape((n,) + low_res.shape[-2:])
    iou, stability, boxes = iou.reshape(n), stability.reshape(n), boxes.reshape(n, 4)
    valid = jnp.repeat(valid_rows, masks_per_prompt)
    # The official skips a filter whose threshold is 0 (so NaN stability passes then).
    valid &= (iou > filters.pred_iou) | (filters.pred_iou <= 0)
    valid &= (stability >= filters.stability) | (filters.stability <= 0)
    valid &= ~amg.is_box_near_crop_edge(boxes, crop_box, orig_box)
    index, count = amg.greedy_nms(boxes, iou, valid, filters.box_nms)
    return _Candidates(count, index, iou[index], stability[index], boxes[index], low_res)


@functools.partial(jax.jit, static_argnames=("chunk", "input_size", "crop_size", "config"))
def _kept_masks(variables, refiner_features, edge_features, low_res, index, start, coords,
                labels, *, chunk, input_size, crop_size, config):
    """Binary masks (chunk, H, W) at the crop size of candidates index[start:start + chunk]
    and their XYXY boxes; past the end of `index`, repeats of its last entry (the caller drops
    them). With `refiner_features` (a model with a mask refiner) the masks are the refined
    ones: the candidates were chosen on the decoder's masks, what is kept is refined (a
    refiner that reads clicks reads each candidate's prompt, `coords` (R, T, 2) and `labels`
    (R, T), the prompt rows the candidates' rows come from, masks_per_prompt each). With
    `edge_features` (a model with an edge stage) the upscaled masks' outlines are sharpened on
    the crop's own pixels."""
    rows = index[jnp.minimum(start + jnp.arange(chunk), index.shape[0] - 1)]
    logits = low_res[rows]
    if refiner_features is not None:
        prompt = rows // (low_res.shape[0] // coords.shape[0])
        logits = inference.refine_low_res(variables, refiner_features, logits[:, None],
                                          jnp.zeros((chunk,), jnp.int32), coords[prompt],
                                          labels[prompt], config=config)[:, 0]
    threshold = config.mask_threshold
    masks = inference.postprocess_masks(logits, input_size=input_size, original_size=crop_size,
                                        image_size=config.image_size,
                                        threshold=threshold if edge_features is None else None)
    if edge_features is not None:
        masks = inference.refine_edges(variables, edge_features, masks[:, None], config=config,
                                       threshold=threshold)[:, 0]
    return masks, amg.masks_to_boxes(masks)


# The official defaults, for SAM's weights. A checkpoint may recommend others for its model
# (`SamModel.generator_defaults`); an explicit argument always wins.
OFFICIAL_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                       "stability_score_offset": 1.0}


def resolve_thresholds(model: SamModel, **given: Optional[float]) -> Dict[str, float]:
    """Each of OFFICIAL_THRESHOLDS' options: as given, else the model's recommendation, else
    the official default."""
    recommended = getattr(model, "generator_defaults", {}) or {}
    return {name: float(given[name] if given.get(name) is not None
                        else recommended.get(name, default))
            for name, default in OFFICIAL_THRESHOLDS.items()}


class SamAutomaticMaskGenerator:
    def __init__(self, model: SamModel, points_per_side: Optional[int] = 32,
                 points_per_batch: int = 64, pred_iou_thresh: Optional[float] = None,
                 stability_score_thresh: Optional[float] = None,
                 stability_score_offset: Optional[float] = None,
                 box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1,
                 point_grids: Optional[List[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask") -> None:
        """Options and defaults as the official `SamAutomaticMaskGenerator` (see its
        docstring); `model` is what `sam_jax.load` returns. Invalid options raise ValueError
        naming the option. `pred_iou_thresh`, `stability_score_thresh` and
        `stability_score_offset` left at None take the model's recommended values
        (`model.generator_defaults`, which the bundled model's checkpoint sets) or else the
        official 0.88, 0.95 and 1.0."""
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
        self.predictor = SamPredictor(inference.single_view(model))
        self.points_per_batch = int(points_per_batch)
        thresholds = resolve_thresholds(model, pred_iou_thresh=pred_iou_thresh,
                                        stability_score_thresh=stability_score_thresh,
                                        stability_score_offset=stability_score_offset)
        self.pred_iou_thresh = thresholds["pred_iou_thresh"]
        self.stability_score_thresh = thresholds["stability_score_thresh"]
        self.stability_score_offset = thresholds["stability_score_offset"]
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        # The work's layout on this backend; assign another DevicePlan to override.
        self.plan = plan_for_backend()
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
        timings = self.last_timings
        start = time.perf_counter()
        self.predictor.set_image(crop)
        jax.block_until_ready(self.predictor.features)
        timings["embed"] += time.perf_counter() - start
        start = time.perf_counter()
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        found, row_points, prompts = self._candidates(points, crop_box, crop_size, orig_size)
        # The only copy to the host before the masks: the kept masks' count and numbers.
        count, index, iou, stability, boxes = jax.device_get(tuple(found)[:5])
        timings["decode and filter"] += time.perf_counter() - start
        start = time.perf_counter()
        offset = np.array([x0, y0, x0, y0])
        masks_per_prompt = len(found.low_res) // len(row_points)
        rles, kept_boxes = self._kept_rles(found, int(count), crop_box, crop_size, orig_size,
                                           prompts)
        if (self.predictor.refiner_features is not None
                or self.predictor.edge_features is not None):
            boxes = kept_boxes.astype(boxes.dtype)  # the refined masks' own boxes
        data = {"iou_preds": iou[:count], "stability_score": stability[:count],
                "boxes": boxes[:count] + offset,
                "points": row_points[index[:count] // masks_per_prompt] + offset[:2],
                "rles": rles,
                "crop_boxes": np.tile(np.asarray(crop_box)[None], (int(count), 1))}
        self.predictor.reset_image()
        timings["nms, masks and rle"] += time.perf_counter() - start
        return data

    def _candidates(self, points: np.ndarray, crop_box, crop_size,
                    orig_size) -> Tuple[_Candidates, np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """`_crop_candidates` for a crop's grid points (crop frame), padded to whole batches;
        also returns the point of every prompt row and the rows' prompts (coords (R, T, 2),
        labels (R, T), model frame)."""
        predictor, per_batch = self.predictor, self.points_per_batch
        n = len(points)
        padded = np.concatenate([points, np.repeat(points[:1], -n % per_batch, 0)])
        batches = [predictor._prompts(padded[s:s + per_batch, None, :],
                                      np.ones((per_batch, 1), int), None, None)
                   for s in range(0, len(padded), per_batch)]
        # Rows per batch: points_per_batch rounded up to the decoder's prompt bucket.
        rows = len(batches[0].coords)
        point_of_row = (np.arange(len(batches))[:, None] * per_batch + np.arange(rows)).ravel()
        valid_rows = np.tile(np.arange(rows) < per_batch, len(batches)) & (point_of_row < n)
        config = predictor.model.config
        found = _crop_candidates(
            predictor.model.variables, predictor.features,
            np.stack([b.coords for b in batches]), np.stack([b.labels for b in batches]),
            valid_rows, np.asarray(crop_box, np.int32),
            np.array([0, 0, orig_size[1], orig_size[0]], np.int32),
            _Filters(*(np.float32(x) for x in (
                self.pred_iou_thresh, self.stability_score_thresh,
                self.stability_score_offset, self.box_nms_thresh))),
            config=config, input_size=predictor.input_size, crop_size=tuple(crop_size),
            stats_group=self.plan.stats_group)
        prompts = (np.concatenate([b.coords for b in batches]),
                   np.concatenate([b.labels for b in batches]))
        return found, padded[np.minimum(point_of_row, len(padded) - 1)], prompts

    def _kept_rles(self, found: _Candidates, count: int, crop_box, crop_size,
                   orig_size, prompts) -> List[amg.Rle]:
        """RLEs (image frame) of the `count` kept masks. All chunks are dispatched before the
        first is read, so the device upscales the next chunks while the host encodes."""
        chunk = self.plan.mask_chunk
        config = self.predictor.model.config
        prompts = jax.device_put(prompts)  # once, not once per chunk
        parts = [_kept_masks(self.predictor.model.variables, self.predictor.refiner_features,
                             self.predictor.edge_features, found.low_res, found.index,
                             np.int32(s), *prompts, chunk=chunk,
                             input_size=self.predictor.input_size, crop_size=tuple(crop_size),
                             config=config)
                 for s in range(0, count, chunk)]
        rles: List[amg.Rle] = []
        boxes = []
        for s, (part, part_boxes) in zip(range(0, count, chunk), parts):
            rles += _uncropped_rles(np.asarray(part)[:count - s], crop_box, orig_size)
            boxes.append(np.asarray(part_boxes)[:count - s])
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64)
        return rles, boxes

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
