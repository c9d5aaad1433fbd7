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

# The bundled default of `sam-jax segment` / `generate` and of `load()` with no path: the
# pretrained DINOv2 ViT-S/14 backbone (int8) with SAM's head trained here on real photos
# (experiments/train_default_model.py; README, "The bundled model").
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                                  "sam_dinov2_s")


DEFAULT_MODEL_TYPE = "dinov2_s"


def load(path: str | os.PathLike | None = None, model_type: str = "auto",
         config: Optional[SamConfig] = None) -> SamModel:
    """Loads an official .pth, a Hugging Face SamModel .safetensors (or its folder), a
    directory written by `sam-jax convert`, or official weights by name: "vit_b", "vit_l",
    "vit_h" (downloaded once, SHA-256 checked, converted and cached; `sam_jax.hub`) or a
    Hugging Face id such as "facebook/sam-vit-base". Never executes code from the file. With
    no path, the bundled default model (`DEFAULT_CHECKPOINT`).

    Also turns on JAX's persistent compilation cache (`sam_jax.compilation_cache`; off with
    SAM_JAX_NO_COMPILATION_CACHE=1), so a later process skips most compiling."""
    from . import compilation_cache
    from .checkpoints import load_variables
    from .hub import resolve

    if path is None:
        if model_type not in ("auto", DEFAULT_MODEL_TYPE):
            raise ValueError(
                f"load(model_type={model_type!r}) needs a path or a name: the bundled model "
                f"is {DEFAULT_MODEL_TYPE!r}; for SAM's own weights call "
                f"load({model_type!r}) (downloads the official checkpoint) or load(PATH, "
                f"model_type={model_type!r})")
        path = DEFAULT_CHECKPOINT
    else:
        path = resolve(path)
    compilation_cache.enable()
    config, variables = load_variables(path, model_type=model_type, config=config)
    return SamModel(config, variables)


__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_MODEL_TYPE", "CheckpointError", "DevicePrediction",
           "SamAutomaticMaskGenerator", "SamConfig", "SamModel", "SamPredictor",
           "abstract_variables",
           "build_sam", "get_config", "init_variables", "keep_freed_host_memory", "load",
           "predict_on_device", "tiny", "vit_b", "vit_h", "vit_l"]
