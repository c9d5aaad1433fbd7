"""sam_jax: Segment Anything in JAX/Flax, output-equal to the official PyTorch release.

    sam = sam_jax.load("sam_vit_b_01ec64.pth")   # official .pth, HF safetensors or converted dir
    predictor = sam_jax.SamPredictor(sam)
    predictor.set_image(image_rgb_uint8)
    masks, scores, logits = predictor.predict(point_coords=..., point_labels=...)
"""

from __future__ import annotations

import os
from typing import Optional

from .build_sam import abstract_variables, build_sam, init_variables
from .checkpoints import CheckpointError
from .configs import SamConfig, get_config, tiny, vit_b, vit_h, vit_l
from .inference import SamModel
from .automatic_mask_generator import SamAutomaticMaskGenerator
from .predictor import SamPredictor
from .device_predict import DevicePrediction, predict_on_device
from .utils.host_memory import keep_freed_host_memory

__version__ = "0.1.0"

# The small model trained here by `sam-jax train` (experiments/configs/davis_mini.json): the
# default of `sam-jax segment` / `generate` and of `load()` with no path.
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                                  "sam_mini_davis")


def load(path: str | os.PathLike | None = None, model_type: str = "auto",
         config: Optional[SamConfig] = None) -> SamModel:
    """Loads an official .pth, a Hugging Face SamModel .safetensors (or its folder), or a
    directory written by `sam-jax convert`. Never executes code from the file. With no path,
    the bundled default model (`DEFAULT_CHECKPOINT`)."""
    from .checkpoints import load_variables

    if path is None:
        path = DEFAULT_CHECKPOINT
    config, variables = load_variables(path, model_type=model_type, config=config)
    return SamModel(config, variables)


__all__ = ["DEFAULT_CHECKPOINT", "CheckpointError", "DevicePrediction",
           "SamAutomaticMaskGenerator", "SamConfig", "SamModel", "SamPredictor",
           "abstract_variables",
           "build_sam", "get_config", "init_variables", "keep_freed_host_memory", "load",
           "predict_on_device", "tiny", "vit_b", "vit_h", "vit_l"]
