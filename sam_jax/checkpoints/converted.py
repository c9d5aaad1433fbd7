"""Saving and loading converted SAM variables (no counterpart in the official repository, which
loads a torch state dict in `build_sam.py`).

A converted checkpoint is a directory:
  config.json   the SamConfig (`SamConfig.to_json`) plus "model_type", "source", "format"
  variables/    `{"params": ..., "buffers": ...}` written by Orbax
  backbone.safetensors   optional: leaves kept out of `variables/` (`save_converted(...,
                separate=)`), keyed by their path ("params/image_encoder/..."). For a model
                whose pretrained backbone stays fixed while its head is retrained: this file's
                bytes depend only on those arrays (Orbax's do not: its chunk files change
                names and layout from one write to the next), so a repository that versions
                the checkpoint stores the backbone once, not once per head.
It is restored into the abstract (`eval_shape`) tree of the model the config describes, after
checking that the saved tree (both files together) has exactly that structure and those shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..configs import SamConfig
from .errors import CheckpointError
from .quantize import SCALES, dequantize_variables, saved_abstract
from .safetensors_file import load_safetensors

FORMAT = "sam_jax-orbax-1"
BACKBONE_FILE = "backbone.safetensors"
_EXTRA_FIELDS = ("model_type", "source", "format", "generator_defaults")
Variables = Dict[str, Any]


def _flatten(tree) -> Dict[str, Any]:
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


def _flat_shapes(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in _flatten(tree).items()}


def _separate_arrays(flat: Dict[str, Any], path: str) -> Dict[str, np.ndarray]:
    """The leaves for the backbone file, checked to have dtypes it stores, in sorted order."""
    arrays = {name: np.ascontiguousarray(np.asarray(leaf)) for name, leaf in sorted(flat.items())}
    bad = {name: a.dtype.name for name, a in arrays.items()
           if a.dtype not in (np.float32, np.int8, np.int32, np.uint8, np.bool_)}
    if bad:
        raise CheckpointError(f"{path}: cannot store these dtypes in the backbone file: {bad}")
    return arrays


def _write_separate(arrays: Dict[str, np.ndarray], path: str) -> None:
    """A safetensors file whose bytes depend only on the arrays' names and values."""
    from safetensors.numpy import save_file

    save_file(arrays, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_converted(variables: Variables, config: SamConfig, out_dir: str | os.PathLike, *,
                   overwrite: bool = False, metadata: Optional[Dict[str, str]] = None,
                   separate: Optional[Callable[[str], bool]] = None) -> None:
    """Writes `out_dir/variables` (Orbax) then `out_dir/config.json`; with `separate`, the
    leaves whose path it accepts go to `out_dir/backbone.safetensors` instead of Orbax.

    `out_dir` must be absent or empty. With `overwrite=True` a previous conversion there is
    replaced, but only its own entries are touched: nothing else in the folder is removed.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    var_dir, config_path = os.path.join(out_dir, "variables"), os.path.join(out_dir, "config.json")
    backbone_path = os.path.join(out_dir, BACKBONE_FILE)
    flat = _flatten(variables)
    apart = {p: leaf for p, leaf in flat.items() if separate is not None and separate(p)}
    if separate is not None and (not apart or len(apart) == len(flat)):
        raise CheckpointError(f"{out_dir}: `separate` must select some leaves but not all "
                              f"({len(apart)} of {len(flat)} selected)")
    if apart:  # checked before anything already in out_dir is touched
        variables = _unflatten({p: leaf for p, leaf in flat.items() if p not in apart})
        apart = _separate_arrays(apart, backbone_path)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir}: directory is not empty; refusing to overwrite "
                                  "(pass overwrite=True / --overwrite to replace a conversion)")
        if os.path.exists(var_dir):
            # Only delete what is recognisably an Orbax checkpoint we wrote.
            if not os.path.exists(os.path.join(var_dir, "_CHECKPOINT_METADATA")):
                raise CheckpointError(f"{var_dir}: exists but is not an Orbax checkpoint; "
                                      "refusing to delete it")
            shutil.rmtree(var_dir)
        for path in (config_path, backbone_path):
            if os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    # host arrays, written by this process alone (e.g. process 0 of a multi-process training
    # run): Orbax's barriers must not wait for processes that do not call this
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
        checkpointer.save(var_dir, variables)  # leaving the block waits for the write
    if apart:
        _write_separate(apart, backbone_path)
    # config.json last: a directory that has one holds a complete conversion.
    info = dict(config.to_dict(), format=FORMAT, **(metadata or {}))
    with open(config_path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(config_path + ".tmp", config_path)


def read_config(ckpt_dir: str | os.PathLike) -> Tuple[SamConfig, Dict[str, Any]]:
    """The SamConfig of a converted checkpoint and its extra fields (model_type, source...)."""
    path = os.path.join(os.fspath(ckpt_dir), "config.json")
    try:
        with open(path) as f:
            info = json.load(f)
        extra = {k: info.pop(k) for k in _EXTRA_FIELDS if k in info}
        return SamConfig.from_dict(info), extra
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})")


def read_generator_defaults(ckpt_dir: str | os.PathLike) -> Dict[str, float]:
    """The automatic mask generator thresholds a converted checkpoint recommends for its
    model ("generator_defaults" in config.json: measured on held-out data for a model whose
    predicted IoUs and logits are not scaled like SAM's), or {} when it names none."""
    _, extra = read_config(ckpt_dir)
    raw = extra.get("generator_defaults") or {}
    allowed = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset")
    if not isinstance(raw, dict) or not set(raw) <= set(allowed) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()):
        raise CheckpointError(f"{ckpt_dir}: config.json generator_defaults must map some of "
                              f"{allowed} to numbers, got {raw!r}")
    return {k: float(v) for k, v in raw.items()}


def load_converted(ckpt_dir: str | os.PathLike,
                   sharding: Optional[jax.sharding.Sharding] = None) -> Tuple[SamConfig, Variables]:
    """Restores a directory written by `save_converted` as jax arrays placed with `sharding`
    (default: the first device). Raises listing any leaf whose path or shape differs from what
    the config's model expects."""
    from ..build_sam import abstract_variables

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    config, _ = read_config(ckpt_dir)
    var_dir = os.path.join(ckpt_dir, "variables")
    backbone_path = os.path.join(ckpt_dir, BACKBONE_FILE)
    apart = load_safetensors(backbone_path) if os.path.exists(backbone_path) else {}
    abstract = abstract_variables(config)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            in_orbax = _flatten(checkpointer.metadata(var_dir).item_metadata.tree)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{var_dir}: not a readable Orbax checkpoint ({e})")
        twice = sorted(set(apart) & set(in_orbax))
        if twice:
            raise CheckpointError(f"{backbone_path}: also in {var_dir}: {', '.join(twice[:5])}")
        saved = _unflatten({**in_orbax, **apart})
        quantized = isinstance(saved, dict) and SCALES in saved
        if quantized:  # int8 kernels with per-channel scales (quantize.py)
            abstract = saved_abstract(abstract, saved[SCALES])
        want, got = _flat_shapes(abstract), _flat_shapes(saved)
        problems = ([f"missing: {k}" for k in want if k not in got]
                    + [f"unused: {k}" for k in got if k not in want]
                    + [f"{k}: expected {want[k]}, saved {got[k]}"
                       for k in want if k in got and want[k] != got[k]])
        if problems:
            where = f"{var_dir} with {backbone_path}" if apart else var_dir
            raise CheckpointError(f"{where} does not match the model in its config.json:\n  "
                                  + "\n  ".join(sorted(problems)))
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                  for p, a in _flatten(abstract).items() if p not in apart}
        variables = checkpointer.restore(var_dir, _unflatten(target))
    if apart:
        variables = _unflatten({**_flatten(variables),
                                **{p: jax.device_put(a, sharding) for p, a in apart.items()}})
    if quantized:
        variables = dequantize_variables(variables)
    return config, variables
