"""Ports `segment_anything/predictor.py`: `SamPredictor` with the official API.

Switching is one line (`from sam_jax import SamPredictor, sam_model_registry`; or
`sam_jax.load(path)` for the model): `set_image`, `predict`, `get_image_embedding`,
`reset_image` take and return the same shapes, dtypes and coordinate conventions (numpy,
(x, y) pixels of the original image, XYXY boxes, CxHxW masks, 1x256x256 mask inputs).
Differences, all on the side of safety:
- prompts are validated (points/boxes inside the image, labels 0/1, shapes) with errors that
  name the problem, where the official code asserts or silently extrapolates;
- `predict_batch` takes prompts in the ORIGINAL image frame as numpy arrays and returns numpy;
  `transform` is available for callers who want the model frame;
- `predict_jax` is the official `predict_torch` on jax arrays: model-frame prompts in, masks,
  IoU and low-res logits out as jax arrays on the device (`sam_jax.device_predict`);
  `predict_torch` is the same under the official name, also taking numpy arrays and torch
  tensors (converted through numpy), so notebook code built on it runs unchanged, with
  `transform.apply_coords_torch` / `apply_boxes_torch`. Its outputs are jax arrays, not
  torch tensors (`np.asarray(masks)` instead of `masks.cpu().numpy()`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import device_predict, inference
from .inference import SamModel
from .utils.transforms import ResizeLongestSide, from_torch


class SamPredictor:
    def __init__(self, sam_model: SamModel) -> None:
        if not isinstance(sam_model, SamModel):
            raise TypeError("SamPredictor takes the model returned by sam_jax.load(...) or "
                            "sam_jax.sam_model_registry[...](...), got "
                            f"{type(sam_model).__name__}")
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.reset_image()

    # -- image ---------------------------------------------------------------------------
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds an HxWx3 uint8 image (RGB, or BGR with image_format="BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', is {image_format!r}")
        image = inference.check_image(image)
        if image_format == "BGR":
            image = image[..., ::-1]
        prepared = inference.prepare_image(image, self.model.config)
        self.reset_image()
        self.features = inference.embed_images(self.model.variables, prepared.pixels[None],
                                               config=self.model.config)
        # a model with a mask refiner reads the image again when it upscales masks
        self.refiner_features = inference.refiner_features(
            self.model.variables, prepared.pixels[None], self.features,
            config=self.model.config)
        # a model that averages over the mirror image embeds that too (None for others)
        self.mirrored = inference.mirror_images(
            self.model.variables, prepared.pixels[None], [prepared.input_size[1]],
            config=self.model.config)
        # a model with an edge stage reads the original image where it sharpens outlines
        self.edge_features = inference.edge_features(self.model.variables, image,
                                                     config=self.model.config)
        self.original_size = prepared.original_size
        self.input_size = prepared.input_size
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The embedding of the current image, 1xCxHxW (official layout)."""
        self._require_image("to get its embedding")
        return np.asarray(self.features).transpose(0, 3, 1, 2)

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.refiner_features = None
        self.mirrored = None
        self.edge_features = None
        self.original_size = None
        self.input_size = None

    @property
    def device(self) -> str:
        """Where the model's variables are, torch-style ("cpu", "cuda:0"), as the official
        `predictor.device`."""
        return self.model.device

    def _require_image(self, what: str) -> None:
        if not self.is_image_set:
            raise RuntimeError(f"An image must be set with .set_image(...) {what}.")

    # -- prompts -------------------------------------------------------------------------
    def _check_points(self, coords: np.ndarray, what: str) -> None:
        h, w = self.original_size
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"{what} contain NaN or infinite values")
        bad = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | \
              (coords[..., 1] > h)
        if np.any(bad):
            first = coords[bad][0]
            raise ValueError(f"{what} lie outside the {w}x{h} image (x in [0, {w}], y in "
                             f"[0, {h}]): e.g. ({first[0]:g}, {first[1]:g})")

    def _prompts(self, point_coords, point_labels, boxes, mask_input) -> inference.PromptBatch:
        """Validates batched prompts in the original frame and moves them to the model frame."""
        grid = 4 * self.model.config.image_embedding_size
        coords = labels = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            coords = np.asarray(point_coords, np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(f"point_coords must be (N, 2) with point_labels (N,) (batched: "
                                 f"(B, N, 2) and (B, N)), got {coords.shape} and {labels.shape}")
            if not np.all(np.isin(labels, (0, 1))):
                raise ValueError("point_labels must be 0 (background) or 1 (foreground), got "
                                 f"{sorted(set(np.unique(labels).tolist()) - {0, 1})}")
            self._check_points(coords, "point_coords")
            coords = self.transform.apply_coords(coords, self.original_size)
        if boxes is not None:
            boxes = np.asarray(boxes, np.float64)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"box must be (4,) XYXY (batched: (B, 4)), got {boxes.shape}")
            self._check_points(boxes.reshape(-1, 2, 2), "box corners")
            if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
                raise ValueError("box must be XYXY with x0 <= x1 and y0 <= y1")
            boxes = self.transform.apply_boxes(boxes, self.original_size)
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.ndim != 4 or mask_input.shape[1:] != (1, grid, grid):
                raise ValueError(f"mask_input must be (1, {grid}, {grid}) (batched: "
                                 f"(B, 1, {grid}, {grid})), got {mask_input.shape}")
        sizes = {len(x) for x in (coords, boxes, mask_input) if x is not None}
        if len(sizes) > 1:
            raise ValueError(f"batched prompts disagree on the batch size: {sorted(sizes)}")
        return inference.make_prompt_batch(self.model.config, coords=coords, labels=labels,
                                           boxes=boxes, mask_inputs=mask_input)

    # -- prediction ----------------------------------------------------------------------
    def predict(self, point_coords: Optional[np.ndarray] = None,
                point_labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
                mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
                return_logits: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt -> masks (C, H, W) bool (float32 logits if return_logits), IoU
        predictions (C,) float32, low-res logits (C, 256, 256) float32; C = 3 or 1."""
        self._require_image("before mask prediction")
        if box is not None:
            box = np.asarray(box)
            if box.shape not in ((4,), (1, 4)):
                raise ValueError(f"box must be (4,) XYXY for one prompt, got {box.shape}; use "
                                 "predict_batch for several boxes")
        grid = 4 * self.model.config.image_embedding_size
        masks, iou, low_res = self.predict_batch(
            _one_prompt(point_coords, "point_coords", ("N", 2)),
            _one_prompt(point_labels, "point_labels", ("N",)),
            None if box is None else box.reshape(1, 4),
            _one_prompt(mask_input, "mask_input", (1, grid, grid)),
            multimask_output, return_logits)
        return masks[0], iou[0], low_res[0]

    def predict_batch(self, point_coords: Optional[np.ndarray] = None,
                      point_labels: Optional[np.ndarray] = None,
                      boxes: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                      multimask_output: bool = True, return_logits: bool = False):
        """B prompts at once (points (B, N, 2) + labels (B, N), boxes (B, 4), mask inputs
        (B, 1, 256, 256)) in the original image frame -> masks (B, C, H, W), IoU (B, C),
        low-res logits (B, C, 256, 256). One jitted decode for all B; B and N are padded to
        powers of two, so varying them does not recompile for every new value."""
        self._require_image("before mask prediction")
        prompts = self._prompts(point_coords, point_labels, boxes, mask_input)
        out = device_predict.decode_and_upscale(
            self.model.variables, self.features, prompts, config=self.model.config,
            multimask_output=multimask_output, with_masks=bool(prompts.has_mask.any()),
            return_logits=return_logits, input_size=self.input_size,
            original_size=self.original_size, refiner_features=self.refiner_features,
            mirrored=self.mirrored, edge_features=self.edge_features)
        # The padded batch was upscaled (a fixed shape, so no retrace): drop the padding on
        # the host, where slicing is a view.
        n = prompts.num_prompts
        masks, iou, low_res = (np.asarray(x)[:n] for x in out)
        return masks, np.asarray(iou, np.float32), np.asarray(low_res, np.float32)

    def predict_jax(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False,
                    upscale: bool = True) -> device_predict.DevicePrediction:
        """The official `predict_torch` on jax arrays: B prompts ALREADY IN THE MODEL INPUT
        FRAME (`self.transform.apply_coords` / `apply_boxes`): points (B, N, 2) + labels
        (B, N), boxes (B, 4), mask inputs (B, 1, 256, 256) -> a `DevicePrediction` of jax
        arrays on the device: masks (B, C, H, W) at the original size (None with
        upscale=False), IoU (B, C), low-res logits (B, C, 256, 256). Nothing is copied to
        the host; shapes are checked, values are not (see `sam_jax.device_predict`)."""
        self._require_image("before mask prediction")
        sizes = dict(input_size=self.input_size, original_size=self.original_size)
        return device_predict.predict_on_device(
            self.model.variables, self.features, point_coords, point_labels,
            config=self.model.config, boxes=boxes, mask_inputs=mask_input,
            multimask_output=multimask_output, return_logits=return_logits,
            refiner_features=self.refiner_features if upscale else None,
            mirrored=self.mirrored, edge_features=self.edge_features if upscale else None,
            **(sizes if upscale else {}))

    def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output: bool = True,
                      return_logits: bool = False) -> device_predict.DevicePrediction:
        """The official `predict_torch`: `predict_jax` under the official name, for code
        written against the official API. Prompts ALREADY IN THE MODEL INPUT FRAME
        (`self.transform.apply_coords_torch` / `apply_boxes_torch`) as numpy or jax arrays or
        torch tensors (converted through numpy, on the host). Returns (masks (B, C, H, W)
        bool, IoU (B, C), low-res logits (B, C, 256, 256)) as jax arrays; the tuple unpacks
        as the official `masks, scores, logits = ...`."""
        return self.predict_jax(*map(from_torch, (point_coords, point_labels, boxes,
                                                  mask_input)),
                                multimask_output=multimask_output, return_logits=return_logits)


def _one_prompt(x, name: str, shape: tuple):
    """Adds the batch axis to one prompt's array of `shape` (e.g. ("N", 2)); another number of
    dimensions is an error (a silent batch would return only its first result). The exact
    sizes are checked by `_prompts`."""
    if x is None:
        return None
    x = np.asarray(x)
    if x.ndim != len(shape):
        text = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must be {text} for one prompt, got shape {x.shape}; use "
                         "predict_batch for several prompts")
    return x[None]
