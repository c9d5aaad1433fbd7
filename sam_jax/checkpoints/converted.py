"""Saving and loading converted SAM variables (no counterpart in the official repository, which
loads a torch state dict in `build_sam.py`).

A converted checkpoint is a directory:
  config.json   the SamConfig (`SamConfig.to_json`) plus "model_type", "source", "format"
  variables/    `{"params": ..., "buffers": ...}` written by Orbax
It is restored into the abstract (`eval_shape`) tree of the model the config describes, after
checking that the saved tree has exactly that structure and those shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..configs import SamConfig
from .errors import CheckpointError
from .quantize import SCALES, dequantize_variables, saved_abstract

FORMAT = "sam_jax-orbax-1"
_EXTRA_FIELDS = ("model_type", "source", "format", "generator_defaults")
Variables = Dict[str, Any]


def _flat_shapes(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {"/".join(str(k.key) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_converted(variables: Variables, config: SamConfig, out_dir: str | os.PathLike, *,
                   overwrite: bool = False, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `out_dir/variables` (Orbax) then `out_dir/config.json`.

    `out_dir` must be absent or empty. With `overwrite=True` a previous conversion there is
    replaced, but only its own two entries are touched: nothing else in the folder is removed.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    var_dir, config_path = os.path.join(out_dir, "variables"), os.path.join(out_dir, "config.json")
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
        if os.path.exists(config_path):
            os.remove(config_path)
    os.makedirs(out_dir, exist_ok=True)
    # host arrays, written by this process alone (e.g. process 0 of a multi-process training
    # run): Orbax's barriers must not wait for processes that do not call this
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
        checkpointer.save(var_dir, variables)  # leaving the block waits for the write
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
    abstract = abstract_variables(config)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(var_dir).item_metadata.tree
        except (OSError, ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{var_dir}: not a readable Orbax checkpoint ({e})")
        quantized = isinstance(saved, dict) and SCALES in saved
        if quantized:  # int8 kernels with per-channel scales (quantize.py)
            abstract = saved_abstract(abstract, saved[SCALES])
        want, got = _flat_shapes(abstract), _flat_shapes(saved)
        problems = ([f"missing: {k}" for k in want if k not in got]
                    + [f"unused: {k}" for k in got if k not in want]
                    + [f"{k}: expected {want[k]}, saved {got[k]}"
                       for k in want if k in got and want[k] != got[k]])
        if problems:
            raise CheckpointError(f"{var_dir} does not match the model in its config.json:\n  "
                                  + "\n  ".join(sorted(problems)))
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                              abstract)
        variables = checkpointer.restore(var_dir, target)
    if quantized:
        variables = dequantize_variables(variables)
    return config, variables
