"""Converts official (and Hugging Face) SAM PyTorch checkpoints into our Flax variables.

There is no counterpart file in the official repository, whose `build_sam.py` simply calls
`load_state_dict`. Our Flax module paths equal the official state-dict paths, so the expected
torch key of every Flax leaf follows from its path; only the leaf name and the axis order differ:

  Linear           weight (out, in)          -> kernel (in, out)          transpose (1, 0)
  Conv2d           weight (O, I, kh, kw)     -> kernel (kh, kw, I, O)     transpose (2, 3, 1, 0)
  ConvTranspose2d  weight (I, O, kh, kw)     -> kernel (kh, kw, I, O)     transpose (2, 3, 0, 1)
                   (only `mask_decoder.output_upscaling.*`)
  LayerNorm(2d)    weight                    -> scale
  Embedding        weight                    -> embedding
  everything else (bias, pos_embed, rel_pos_h/w, the Gaussian matrix) keeps name and layout.

Conversion is strict: a missing, unused or mis-shaped key raises `CheckpointError` listing every
offender; nothing is ever left at its random initialization.

Reading the files is `pth.py` and `safetensors_file.py`; `sam_jax.checkpoints.read_checkpoint`
puts them together with the Hugging Face renaming below.

Usage: `sam-jax convert sam_vit_b_01ec64.pth out_dir [--model-type vit_b]`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import numpy as np

from ..configs import MODEL_TYPES, SamConfig
from .errors import CheckpointError

StateDict = Dict[str, np.ndarray]


class _Slot(NamedTuple):
    """Where one torch tensor goes: Flax collection + path, and the axis permutation."""
    path: Tuple[str, ...]          # e.g. ("params", "image_encoder", "neck.0", "kernel")
    perm: Optional[Tuple[int, ...]]  # torch -> flax transpose, None for identity
    flax_shape: Tuple[int, ...]
    torch_shape: Tuple[int, ...]


def _torch_shape(flax_shape, perm):
    if perm is None:
        return tuple(flax_shape)
    shape = [0] * len(perm)
    for i, p in enumerate(perm):  # flax axis i is torch axis perm[i]
        shape[p] = flax_shape[i]
    return tuple(shape)


def torch_layout(abstract: Mapping[str, Any]) -> Dict[str, _Slot]:
    """Maps each expected torch key to its slot in the variables tree `abstract`."""
    layout = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(str(k.key) for k in key_path)
        modules, name = path[1:-1], path[-1]  # path[0] is the collection
        shape = tuple(leaf.shape)
        perm = None
        if name == "kernel":
            if len(shape) == 2:
                perm = (1, 0)
            elif len(shape) == 4 and modules[-1].startswith("output_upscaling."):
                perm = (2, 3, 0, 1)
            elif len(shape) == 4:
                perm = (2, 3, 1, 0)
            else:
                raise ValueError(f"no conversion rule for the {len(shape)}-d kernel at {path}")
            name = "weight"
        elif name in ("scale", "embedding"):
            name = "weight"
        layout[".".join(modules + (name,))] = _Slot(path, perm, shape, _torch_shape(shape, perm))
    return layout


def _abstract_variables(config: SamConfig):
    from ..build_sam import abstract_variables  # the model code is only needed from here on
    return abstract_variables(config)


def _list(title: str, lines) -> str:
    lines = sorted(lines)
    return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(lines) if lines else ""


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: SamConfig,
                       source: str = "state dict") -> Dict[str, Any]:
    """Official-layout torch state dict -> `{"params": ..., "buffers": ...}` of float32 numpy
    arrays. `source` names the file in error messages."""
    layout = torch_layout(_abstract_variables(config))
    missing = [k for k in layout if k not in state_dict]
    unused = [k for k in state_dict if k not in layout]
    wrong = []
    for key, slot in layout.items():
        if key not in state_dict:
            continue
        got = np.asarray(state_dict[key])
        if tuple(got.shape) != slot.torch_shape:
            wrong.append(f"{key}: expected {slot.torch_shape}, got {tuple(got.shape)}")
        elif not np.issubdtype(got.dtype, np.floating) and got.dtype.name != "bfloat16":
            wrong.append(f"{key}: expected a floating tensor, got {got.dtype}")
    if missing or unused or wrong:
        raise CheckpointError(
            f"{source} does not match the model (image encoder width "
            f"{config.image_encoder.embed_dim}, depth {config.image_encoder.depth}):"
            + _list("missing keys", missing) + _list("unused keys", unused)
            + _list("wrong shapes or dtypes (torch layout)", wrong))

    variables: Dict[str, Any] = {}
    for key, slot in layout.items():
        array = np.asarray(state_dict[key], dtype=np.float32)  # copies only if not float32
        if slot.perm is not None:
            array = array.transpose(slot.perm)
        node = variables
        for part in slot.path[:-1]:
            node = node.setdefault(part, {})
        node[slot.path[-1]] = np.ascontiguousarray(array)
    return variables


def detect_model_type(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> str:
    """"vit_b" | "vit_l" | "vit_h" from the patch-embedding width and the number of blocks of
    an official-layout state dict. Other shapes (reduced test models) need an explicit config."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise CheckpointError(f"{source}: no {key}, so not a SAM image encoder state dict")
    width = int(state_dict[key].shape[0])
    depth = len({m.group(1) for k in state_dict
                 for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)] if m})
    for name, make in MODEL_TYPES.items():
        enc = make().image_encoder
        if (enc.embed_dim, enc.depth) == (width, depth):
            return name
    raise CheckpointError(f"{source}: image encoder of width {width} and depth {depth} is none "
                          f"of {sorted(MODEL_TYPES)}; pass an explicit config")


# ---- Hugging Face `transformers.SamModel` layout -------------------------------------------
# Verified against transformers 5.24.0 `SamModel(SamConfig(...)).state_dict()`. Each HF key must
# match exactly one pattern (fully); `{i}` is a layer index, `{p}` the parameter name.
_HF_RULES = [(re.compile(hf.replace(".", r"\.").replace("{i}", r"(\d+)")
                         .replace("{p}", r"(weight|bias)") + "$"), official) for hf, official in [
    ("vision_encoder.pos_embed", "image_encoder.pos_embed"),
    ("vision_encoder.patch_embed.projection.{p}", r"image_encoder.patch_embed.proj.\1"),
    ("vision_encoder.layers.{i}.layer_norm1.{p}", r"image_encoder.blocks.\1.norm1.\2"),
    ("vision_encoder.layers.{i}.layer_norm2.{p}", r"image_encoder.blocks.\1.norm2.\2"),
    ("vision_encoder.layers.{i}.attn.(qkv|proj).{p}", r"image_encoder.blocks.\1.attn.\2.\3"),
    ("vision_encoder.layers.{i}.attn.(rel_pos_h|rel_pos_w)", r"image_encoder.blocks.\1.attn.\2"),
    ("vision_encoder.layers.{i}.mlp.(lin1|lin2).{p}", r"image_encoder.blocks.\1.mlp.\2.\3"),
    ("vision_encoder.neck.conv1.weight", "image_encoder.neck.0.weight"),
    ("vision_encoder.neck.layer_norm1.{p}", r"image_encoder.neck.1.\1"),
    ("vision_encoder.neck.conv2.weight", "image_encoder.neck.2.weight"),
    ("vision_encoder.neck.layer_norm2.{p}", r"image_encoder.neck.3.\1"),
    ("prompt_encoder.mask_embed.conv1.{p}", r"prompt_encoder.mask_downscaling.0.\1"),
    ("prompt_encoder.mask_embed.layer_norm1.{p}", r"prompt_encoder.mask_downscaling.1.\1"),
    ("prompt_encoder.mask_embed.conv2.{p}", r"prompt_encoder.mask_downscaling.3.\1"),
    ("prompt_encoder.mask_embed.layer_norm2.{p}", r"prompt_encoder.mask_downscaling.4.\1"),
    ("prompt_encoder.mask_embed.conv3.{p}", r"prompt_encoder.mask_downscaling.6.\1"),
    ("prompt_encoder.point_embed.{i}.weight", r"prompt_encoder.point_embeddings.\1.weight"),
    ("prompt_encoder.(no_mask_embed|not_a_point_embed).weight", r"prompt_encoder.\1.weight"),
    ("mask_decoder.(iou_token|mask_tokens).weight", r"mask_decoder.\1.weight"),
    ("mask_decoder.transformer.layers.{i}.layer_norm([1-4]).{p}",
     r"mask_decoder.transformer.layers.\1.norm\2.\3"),
    ("mask_decoder.transformer.layers.{i}.(self_attn|cross_attn_token_to_image|"
     "cross_attn_image_to_token).((?:q|k|v|out)_proj).{p}",
     r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    ("mask_decoder.transformer.layers.{i}.mlp.(lin1|lin2).{p}",
     r"mask_decoder.transformer.layers.\1.mlp.\2.\3"),
    ("mask_decoder.transformer.final_attn_token_to_image.((?:q|k|v|out)_proj).{p}",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    ("mask_decoder.transformer.layer_norm_final_attn.{p}",
     r"mask_decoder.transformer.norm_final_attn.\1"),
    ("mask_decoder.upscale_conv1.{p}", r"mask_decoder.output_upscaling.0.\1"),
    ("mask_decoder.upscale_layer_norm.{p}", r"mask_decoder.output_upscaling.1.\1"),
    ("mask_decoder.upscale_conv2.{p}", r"mask_decoder.output_upscaling.3.\1"),
]]
# HF splits the official MLP `layers.0 .. layers.{n-1}` into proj_in, layers.0 .. layers.{n-3},
# proj_out; the shift of the middle indexes needs n, so these are handled apart.
_HF_MLP = re.compile(r"(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\."
                     r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")
# One Gaussian matrix, stored by HF under two names (tied): the model-level one and the prompt
# encoder's reference to it. Files may hold either or both.
_HF_GAUSSIAN = ("shared_image_embedding.positional_embedding",
                "prompt_encoder.shared_embedding.positional_embedding")
_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in state_dict)


def hf_to_official(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> StateDict:
    """Renames a Hugging Face `SamModel` state dict to the official key names (values are
    shared, not copied). Raises listing every key it cannot place."""
    out: StateDict = {}
    unknown, mlps = [], {}
    for key, value in state_dict.items():
        if key in _HF_GAUSSIAN:
            continue
        m = _HF_MLP.match(key)
        if m:
            mlps.setdefault(m.group(1), []).append((m, value))
            continue
        for pattern, official in _HF_RULES:
            m = pattern.match(key)
            if m:
                out[m.expand(official)] = value
                break
        else:
            unknown.append(key)
    for prefix, items in mlps.items():
        hidden = {int(m.group(3)) for m, _ in items if m.group(3) is not None}
        depth = len(hidden) + 2
        for m, value in items:
            part = m.group(2)
            if part == "proj_in":
                index = 0
            elif part == "proj_out":
                index = depth - 1
            else:
                index = int(m.group(3)) + 1
            out[f"{prefix}.layers.{index}.{m.group(4)}"] = value
    gaussians = [state_dict[k] for k in _HF_GAUSSIAN if k in state_dict]
    if gaussians:
        if len(gaussians) == 2 and not np.array_equal(gaussians[0], gaussians[1]):
            raise CheckpointError(f"{source}: the two copies of the tied Gaussian matrix "
                                  f"({' and '.join(_HF_GAUSSIAN)}) differ")
        out[_GAUSSIAN] = gaussians[0]
    if unknown:
        raise CheckpointError(f"{source}: Hugging Face keys with no official counterpart:"
                              + _list("unknown keys", unknown))
    return out
