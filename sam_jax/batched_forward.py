"""The official `Sam.forward(batched_input, multimask_output)`: several images, each with its
own prompts, in one call (`sam(batched_input, multimask_output=False)` in the official
predictor notebook's "end-to-end batched inference").

Each entry of `batched_input` is a dict as the official one:
- "image": (3, H', W') the image ALREADY RESIZED so its longest side is the model's input size
  (`ResizeLongestSide(sam.image_encoder.img_size).apply_image`), channels first, uint8 or
  float in [0, 255], as a numpy array, jax array or torch tensor;
- "original_size": (H, W) of the image before resizing;
- optional prompts in the resized frame: "point_coords" (B, N, 2) with "point_labels" (B, N),
  "boxes" (B, 4), "mask_inputs" (B, 1, 4h, 4w).
Returns one dict per image: "masks" (B, C, H, W) bool at the original size, "iou_predictions"
(B, C), "low_res_logits" (B, C, 4h, 4w), as jax arrays (C = 3 with multimask_output, else 1).

All images are embedded in one call and all prompts of all images are decoded in one call.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import inference
from .inference import SamModel
from .utils.transforms import from_torch, normalize_padded

_PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_inputs")


def _entry_image(entry: dict, i: int, size: int) -> np.ndarray:
    image = from_torch(entry["image"])
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"batched_input[{i}]['image'] must be (3, H, W) (channels first, as "
                         f"the official code), got shape {image.shape}")
    if max(image.shape[1:]) != size or min(image.shape[1:]) < 1:
        raise ValueError(f"batched_input[{i}]['image'] must already be resized so its longest "
                         f"side is {size} (ResizeLongestSide({size}).apply_image), got "
                         f"{image.shape[1]}x{image.shape[2]}")
    return image.transpose(1, 2, 0)


def _entry_prompts(entry: dict, i: int) -> dict[str, Any]:
    prompts = {k: from_torch(entry.get(k)) for k in _PROMPT_KEYS}
    prompts = {k: None if v is None else np.asarray(v) for k, v in prompts.items()}
    if (prompts["point_coords"] is None) != (prompts["point_labels"] is None):
        raise ValueError(f"batched_input[{i}]: point_coords and point_labels go together")
    counts = {len(v) for k, v in prompts.items() if v is not None and k != "point_labels"}
    if not counts:
        raise ValueError(f"batched_input[{i}] has no prompt: give point_coords/point_labels, "
                         "boxes or mask_inputs")
    if len(counts) > 1:
        raise ValueError(f"batched_input[{i}]: its prompts disagree on the batch size: "
                         f"{sorted(counts)}")
    return prompts


def forward(model: SamModel, batched_input: Sequence[dict],
            multimask_output: bool) -> list[dict[str, Any]]:
    """`sam(batched_input, multimask_output)`; see the module docstring."""
    if not isinstance(batched_input, (list, tuple)) or not batched_input:
        raise ValueError("batched_input must be a non-empty list of dicts (one per image)")
    config = model.config
    size = config.image_size
    images, input_sizes, original_sizes, per_image = [], [], [], []
    for i, entry in enumerate(batched_input):
        if not isinstance(entry, dict) or "image" not in entry or "original_size" not in entry:
            raise ValueError(f"batched_input[{i}] must be a dict with 'image' and "
                             "'original_size'")
        image = _entry_image(entry, i, size)
        padded = np.zeros((size, size, 3), np.float32)
        padded[:image.shape[0], :image.shape[1]] = image
        images.append(padded)
        input_sizes.append(image.shape[:2])
        original_sizes.append(tuple(int(v) for v in from_torch(entry["original_size"])))
        per_image.append(_entry_prompts(entry, i))

    pixels = normalize_padded(np.stack(images), np.asarray(input_sizes), config.pixel_mean,
                              config.pixel_std)
    embeddings = inference.embed_images(model.variables, pixels, config=config)

    coords, labels, boxes, masks, index = [], [], [], [], []
    for i, prompts in enumerate(per_image):
        n = len(next(v for v in prompts.values() if v is not None))
        for j in range(n):
            pick = lambda k: None if prompts[k] is None else prompts[k][j]  # noqa: E731
            coords.append(pick("point_coords"))
            labels.append(pick("point_labels"))
            boxes.append(pick("boxes"))
            masks.append(pick("mask_inputs"))
            index.append(i)
    has = lambda seq: any(x is not None for x in seq)  # noqa: E731
    batch = inference.make_prompt_batch(
        config, coords=coords if has(coords) else None, labels=labels if has(coords) else None,
        boxes=boxes if has(boxes) else None, mask_inputs=masks if has(masks) else None,
        image_index=index)
    low_res, iou = inference.decode_prompts(
        model.variables, embeddings, batch._replace(num_prompts=None), config=config,
        multimask_output=multimask_output, with_masks=bool(batch.has_mask.any()))

    outputs, index = [], np.asarray(index)
    for i in range(len(batched_input)):
        rows = np.flatnonzero(index == i)
        logits = low_res[rows]
        outputs.append({
            "masks": inference.postprocess_masks(
                logits, input_size=tuple(int(v) for v in input_sizes[i]),
                original_size=original_sizes[i], image_size=size,
                threshold=config.mask_threshold),
            "iou_predictions": iou[rows],
            "low_res_logits": logits,
        })
    return outputs
