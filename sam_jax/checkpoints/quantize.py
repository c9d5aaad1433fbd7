"""Per-output-channel int8 weights for shipping a model inside the package.

A kernel `w` (..., out) is stored as `q = round(w / s)` in int8 with one float32 scale per
output channel, `s = max|w[..., j]| / 127`, and restored as `q * s` in float32 when loaded, so
the model computes exactly as with float32 weights that differ from the originals by at most
s/2 per entry. This halves the bundled DINOv2 backbone against bfloat16 (21 MB instead of 43)
at a measured cost given in the README.

In a saved tree a quantized leaf keeps its path with dtype int8, and the scales sit in the
extra collection `int8_scales` under the same path (without the collection name); the list of
quantized paths is the presence of a scale.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

SCALES = "int8_scales"


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


# The pretrained backbone's matmul and patch-projection kernels (not the trained neck/head).
BACKBONE_KERNELS: Callable[[str], bool] = lambda path: bool(re.fullmatch(  # noqa: E731
    r"params/image_encoder/(encoder\.layer\.\d+/.+|embeddings/patch_embeddings\.projection)"
    r"/kernel", path))


# Every leaf of the pretrained backbone (and its int8 scales), the neck excepted: what stays the
# same from one export of the bundled model to the next (`save_converted(separate=...)`).
BACKBONE_LEAVES: Callable[[str], bool] = lambda path: bool(re.fullmatch(  # noqa: E731
    rf"({SCALES}/)?params/image_encoder/(?!neck\.)[^/]+/.+", path))


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (..., out) -> (int8 (..., out), float32 (out,) scales)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_variables(variables: Dict[str, Any], select: Callable[[str], bool]) -> Dict[str, Any]:
    """Variables with the leaves whose path `select` accepts stored as int8, plus their scales
    in the `int8_scales` collection."""
    scales: Dict[str, Any] = {}

    def one(path, leaf):
        name = _path_str(path)
        if not select(name):
            return leaf
        q, s = quantize(np.asarray(leaf))
        node = scales
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = s
        return q

    out = jax.tree_util.tree_map_with_path(one, dict(variables))
    if not scales:
        raise ValueError("quantize_variables: no leaf was selected")
    out[SCALES] = scales
    return out


def saved_abstract(abstract: Dict[str, Any], scales_tree: Dict[str, Any]) -> Dict[str, Any]:
    """The tree a quantized checkpoint holds, from the model's float32 abstract variables and
    the saved scales' structure: selected leaves int8, plus the scales collection."""
    wanted = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(scales_tree)[0]}

    def one(path, leaf):
        if _path_str(path) in wanted:
            return jax.ShapeDtypeStruct(leaf.shape, jnp.int8)
        return leaf

    out = jax.tree_util.tree_map_with_path(one, dict(abstract))
    out[SCALES] = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(tuple(s.shape), jnp.float32), scales_tree)
    return out


def dequantize_variables(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A restored quantized tree -> float32 variables (the scales collection removed)."""
    saved = dict(saved)
    scales = saved.pop(SCALES)
    flat = {_path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}

    def one(path, leaf):
        s = flat.get(_path_str(path))
        return leaf if s is None else leaf.astype(jnp.float32) * s

    return jax.tree_util.tree_map_with_path(one, saved)
