"""sam_jax: Segment Anything in JAX/Flax, output-equal to the official PyTorch release.

    sam = sam_jax.load("sam_vit_b_01ec64.pth")   # official .pth, HF safetensors or converted dir
    predictor = sam_jax.SamPredictor(sam)
    predictor.set_image(image_rgb_uint8)
    masks, scores, logits = predictor.predict(point_coords=..., point_labels=...)

The official package's names work too, so switching is one import line:

    from sam_jax import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    sam = sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from .build_sam import abstract_variables, build_module, init_variables
from .checkpoints import CheckpointError
from .configs import SamConfig, get_config, preset_name, tiny, vit_b, vit_h, vit_l
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
    from .checkpoints import generator_defaults, load_variables
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
    return SamModel(config, variables, generator_defaults(path))


# ---- the official builders (segment_anything/build_sam.py), here because they call `load` ----

def build_sam_model(model_type: str, checkpoint: str | os.PathLike | None = None) -> SamModel:
    """What the official builders do, for any preset of `sam_jax.get_config`: with a
    checkpoint, `load(checkpoint, model_type=model_type)` (an official .pth is read without
    torch; a checkpoint of another model type raises CheckpointError); without one, an
    untrained model with the random initialization of `init_variables` (fixed seed 0, so two
    calls give the same weights on one backend), as the official `build_sam_vit_b()` gives an
    untrained one.
    Tests register small presets in `sam_model_registry` through this function."""
    if checkpoint is not None:
        model = load(checkpoint, model_type=model_type)
        # A converted directory carries its own config and ignores model_type: without this
        # check, build_sam_vit_h(checkpoint=a_vit_b_dir) would quietly return a ViT-B.
        found = preset_name(model.config)
        if found != model_type:
            hint = f"sam_model_registry[{found!r}]" if found else "sam_jax.load"
            raise CheckpointError(f"{checkpoint}: holds a {found or 'custom'} model, not the "
                                  f"{model_type} this builder makes; use {hint}")
        return model
    from . import compilation_cache

    compilation_cache.enable()  # as load() does: the init compiles the whole model
    config = get_config(model_type)
    # rbg keys: the init's random numbers compile in half the time of threefry's (the default
    # key, which training keeps), and an untrained model needs no particular stream
    return SamModel(config, init_variables(config, jax.random.key(0, impl="rbg")))


def build_sam_vit_h(checkpoint: str | os.PathLike | None = None) -> SamModel:
    """The official `build_sam_vit_h`: ViT-H SAM from `checkpoint` (a path, or "vit_h" to
    download the official weights), or untrained with checkpoint=None."""
    return build_sam_model("vit_h", checkpoint)


build_sam = build_sam_vit_h  # the official alias: the default model is ViT-H


def build_sam_vit_l(checkpoint: str | os.PathLike | None = None) -> SamModel:
    """The official `build_sam_vit_l` (see `build_sam_vit_h`)."""
    return build_sam_model("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: str | os.PathLike | None = None) -> SamModel:
    """The official `build_sam_vit_b` (see `build_sam_vit_h`)."""
    return build_sam_model("vit_b", checkpoint)


class _Registry(dict):
    """A dict, as the official registry, whose KeyError also lists the keys there are."""

    def __missing__(self, key):
        raise KeyError(f"{key!r}: no such model type in sam_model_registry; it has "
                       f"{sorted(self)}")


# The official registry, same keys: `sam_model_registry["vit_b"](checkpoint=path)`.
sam_model_registry = _Registry({
    "default": build_sam,
    "vit_h": build_sam,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
})


__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_MODEL_TYPE", "CheckpointError", "DevicePrediction",
           "SamAutomaticMaskGenerator", "SamConfig", "SamModel", "SamPredictor",
           "abstract_variables", "build_module", "build_sam", "build_sam_model",
           "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "get_config",
           "init_variables", "keep_freed_host_memory", "load", "predict_on_device",
           "sam_model_registry", "tiny", "vit_b", "vit_h", "vit_l"]
