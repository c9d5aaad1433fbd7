"""Device-resident batched prediction: the counterpart of the official `predict_torch`.

`predict_on_device(variables, embeddings, coords, labels, config=..., boxes=..., ...)` takes
prompts as jax arrays already in the model input frame (longest side `config.image_size`) and
returns masks, IoU predictions and low-res logits as jax arrays on the device. Nothing is
copied to the host on that path (tested under `jax.transfer_guard("disallow")`): on a GPU the
copy of the full-size masks, not the decoder, is what took most of `predict_batch`'s time.

- Token rule (official `PromptEncoder._embed_points/_embed_boxes`, applied to every prompt,
  as `predict_torch` does): points without boxes get the extra not-a-point token (label -1),
  boxes add their two corners (labels 2, 3). Label -1 in `labels` is the official padding
  point (it is embedded and attended to); `sam_jax.modeling.PAD_LABEL` is an absent token
  (masked out of attention: exact), for prompts with fewer points than N.
- Static shapes: `device_prompt_batch` pads the prompt count P and the token count to the
  same power-of-two buckets as `inference.make_prompt_batch`, on the device, so the decoder
  and the upscaling compile once per bucket (only the small padding step sees raw shapes).
  The padded arrays are those `make_prompt_batch` builds, so results equal `predict_batch`'s.
- Upscaling (`inference.postprocess_masks`) only when `input_size` and `original_size` are
  given; it needs one size for all prompts, so several images must share it. Otherwise only
  the low-res logits (and IoU) are returned.
- Several images: `embeddings` (N_img, h, w, C) and `image_index` (P,) (which embedding each
  prompt reads; out-of-range indices are clamped by the gather, not checked: checking values
  would need a host round trip).
- On a mesh (`mesh=`, a `sam_jax.sharding.data_mesh`): the prompts are split along P over the
  `data` axis (P padded to a multiple of the device count) and each device decodes and
  upscales its own prompts (`shard_map`; `inference.decode_prompts`'s decode groups then apply
  per device). Variables and embeddings are replicated (`sharding.replicate`; they are moved
  there if not): every prompt may read any image, so a replicated embedding makes that gather
  local on every device, while embeddings sharded by image would need an all-gather on every
  call for an array that is small next to the per-prompt decoder work. Without `mesh`, sharded
  inputs still give correct results through XLA's sharding propagation, but the decode groups
  (a `lax.map` over reshaped prompts) then come out replicated: every device decodes all.

Shapes are validated before anything is traced, with errors that name the problem; values
(labels in range, finite coordinates) are not, since that would need a device-to-host copy:
`SamPredictor.predict_batch` is the validating numpy convenience on top of the same code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as Spec

from . import inference
from .build_sam import Variables
from .configs import SamConfig
from .inference import MIN_TOKENS, MirroredImages, PromptBatch, _bucket
from .modeling import PAD_LABEL

Size = Tuple[int, int]


class DevicePrediction(NamedTuple):
    """Outputs of `predict_on_device`, jax arrays on the device; M = 3 or 1.

    masks: (P, M, H, W) bool (float32 logits with return_logits), None unless an output size
    was given; iou_predictions: (P, M) float32; low_res_logits: (P, M, 4h, 4w) float32."""

    masks: Optional[jax.Array]
    iou_predictions: jax.Array
    low_res_logits: jax.Array


def num_tokens(num_points: Optional[int], with_boxes: bool) -> int:
    """Tokens per prompt under the official rule, before padding: the points, the
    not-a-point token if there are points and no box, two box corners if there is a box."""
    points = 0 if num_points is None else num_points + (0 if with_boxes else 1)
    return points + (2 if with_boxes else 0)


@functools.partial(jax.jit, static_argnames=("num_prompts", "num_tokens"))
def device_prompt_batch(coords: Optional[jax.Array], labels: Optional[jax.Array],
                        boxes: Optional[jax.Array], mask_inputs: Optional[jax.Array],
                        image_index: Optional[jax.Array], *, num_prompts: int,
                        num_tokens: int) -> PromptBatch:
    """The device-side `make_prompt_batch` for prompts of one structure (all with points or
    none, all with a box or none, all with a mask input or none), as `predict_torch` takes
    them: applies the official token rule and pads to `num_prompts` prompts of `num_tokens`
    tokens (coordinates 0, label PAD_LABEL; padding prompts read image 0 and have no mask).

    Inputs are those of `predict_on_device` (already validated); returns a `PromptBatch` of
    device arrays whose `num_prompts` is None (the count is the caller's static P)."""
    present = [x for x in (coords, boxes, mask_inputs) if x is not None]
    p = present[0].shape[0]
    tok_coords, tok_labels = [], []
    if coords is not None:
        tok_coords.append(coords.astype(jnp.float32))
        tok_labels.append(labels.astype(jnp.int32))
        if boxes is None:  # the official not-a-point token
            tok_coords.append(jnp.zeros((p, 1, 2), jnp.float32))
            tok_labels.append(jnp.full((p, 1), -1, jnp.int32))
    if boxes is not None:
        tok_coords.append(boxes.astype(jnp.float32).reshape(p, 2, 2))
        tok_labels.append(jnp.broadcast_to(jnp.array([2, 3], jnp.int32), (p, 2)))
    tok_coords.append(jnp.zeros((p, num_tokens - sum(c.shape[1] for c in tok_coords), 2),
                                jnp.float32))
    tok_labels.append(jnp.full((p, tok_coords[-1].shape[1]), PAD_LABEL, jnp.int32))
    extra = num_prompts - p
    pad = lambda x, value=0: jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1),  # noqa: E731
                                     constant_values=value)
    out_coords = pad(jnp.concatenate(tok_coords, axis=1))
    out_labels = pad(jnp.concatenate(tok_labels, axis=1), PAD_LABEL)
    grid = None if mask_inputs is None else mask_inputs.shape[-2:]
    if mask_inputs is None:  # never read: decode_prompts is called with with_masks=False
        masks = jnp.zeros((num_prompts, 1, 1, 1), jnp.float32)
    else:  # official (P, 1, 4h, 4w) -> the model's (P, 4h, 4w, 1)
        masks = pad(mask_inputs.astype(jnp.float32).reshape(p, *grid, 1))
    has_mask = jnp.arange(num_prompts) < (p if mask_inputs is not None else 0)
    index = (jnp.zeros((num_prompts,), jnp.int32) if image_index is None else
             pad(image_index.astype(jnp.int32)))
    return PromptBatch(out_coords, out_labels, masks, has_mask, index, None)


def decode_and_upscale(variables: Variables, embeddings: jax.Array, prompts: PromptBatch, *,
                       config: SamConfig, multimask_output: bool = True, with_masks: bool = True,
                       return_logits: bool = False, input_size: Optional[Size] = None,
                       original_size: Optional[Size] = None,
                       refiner_features: Optional[jax.Array] = None,
                       mirrored: Optional[MirroredImages] = None,
                       edge_features: Optional[jax.Array] = None) -> DevicePrediction:
    """`inference.decode_shown` then, with an output size, `inference.postprocess_masks`
    [and, with `edge_features`, `inference.refine_edges`] (thresholded unless
    `return_logits`), on a padded `PromptBatch` (numpy or device arrays);
    returns the outputs of all padded prompts. The code path shared by `predict_on_device` and
    `SamPredictor.predict_batch`; jitted calls, each compiled once per bucket.

    With `refiner_features` (`inference.refiner_features` of the images and their
    embeddings, for a model with a mask refiner) the masks are upscaled from the refined
    logits; the low-res logits returned stay the decoder's (they are the next click's mask
    prompt). With `mirrored` (`inference.mirror_images`, for a model with `mirror_average`)
    every output is the mean over the image and its mirror image."""
    _check_mirrored(config, mirrored)
    prompts = prompts._replace(num_prompts=None)  # no host int among the jitted arguments
    shown, iou, low_res = inference.decode_shown(
        variables, embeddings, prompts, config=config, multimask_output=multimask_output,
        with_masks=with_masks, shown=input_size is not None,
        refiner_features=refiner_features if input_size is not None else None,
        mirrored=mirrored)
    masks = None
    threshold = None if return_logits else config.mask_threshold
    if input_size is not None:
        masks = inference.postprocess_masks(
            shown, input_size=tuple(input_size), original_size=tuple(original_size),
            image_size=config.image_size,
            threshold=threshold if edge_features is None else None)
        if edge_features is not None:
            masks = inference.refine_edges(variables, edge_features, masks,
                                           prompts.image_index, config=config,
                                           threshold=threshold)
    return DevicePrediction(masks, iou, low_res)


def _check_mirrored(config: SamConfig, mirrored: Optional[MirroredImages]) -> None:
    """A model that averages over the mirror image needs the mirrored images, and only such a
    model takes them: either mistake would silently return other masks than its predictor."""
    if config.mirror_average and mirrored is None:
        raise ValueError("this model averages its masks over the mirror image "
                         "(SamConfig.mirror_average): pass mirrored=inference.mirror_images("
                         "variables, images, input_widths, config=...)")
    if mirrored is not None and not config.mirror_average:
        raise ValueError("mirrored images were given for a model without mirror averaging "
                         "(SamConfig.mirror_average is False)")


def predict_on_device(variables: Variables, embeddings: jax.Array,
                      coords: Optional[jax.Array] = None, labels: Optional[jax.Array] = None, *,
                      config: SamConfig, boxes: Optional[jax.Array] = None,
                      mask_inputs: Optional[jax.Array] = None,
                      image_index: Optional[jax.Array] = None, multimask_output: bool = True,
                      return_logits: bool = False, input_size: Optional[Size] = None,
                      original_size: Optional[Size] = None,
                      mesh: Optional[Mesh] = None,
                      refiner_features: Optional[jax.Array] = None,
                      mirrored: Optional[MirroredImages] = None,
                      edge_features: Optional[jax.Array] = None) -> DevicePrediction:
    """P prompts against one or more image embeddings, everything on the device.

    variables: the model's (replicated on a mesh); embeddings: (N_img, h, w, C) from
    `inference.embed_images`. Prompts, in the model input frame, all of one structure as in
    the official `predict_torch` (give at least one):
      coords (P, N, 2) float (x, y) with labels (P, N) int: 1 foreground, 0 background,
        -1 the official padding point, PAD_LABEL an absent point;
      boxes (P, 4) XYXY; mask_inputs (P, 1, 4h, 4w) low-res logits (as returned here);
      image_index (P,) int, which embedding each prompt reads (required when N_img > 1).
    input_size (h, w) after resizing and original_size (H, W), both static, ask for masks at
    the original size (bool, or float32 logits with return_logits); without them only IoU and
    low-res logits are computed. `refiner_features` (`inference.refiner_features` of the
    images and their embeddings, for a model with a mask refiner) refines the upscaled masks;
    the low-res logits stay the decoder's. `mirrored` (`inference.mirror_images` of the same
    images), required for and only for a model with `mirror_average`, makes every output the
    mean over the image and its mirror image. `edge_features` (`inference.edge_features` of
    the original images, for a model with an edge stage) sharpens the upscaled masks'
    outlines on the images' own pixels. With `mesh` (a `data` axis), the prompts are decoded
    data-parallel, the outputs sharded along P. Returns a `DevicePrediction` of jax arrays, P
    rows each.

    Raises ValueError for inconsistent shapes before tracing. Traceable: it may be called
    inside the caller's own `jax.jit` (then the caller's shapes decide the compilations)."""
    p = _check_inputs(config, embeddings, coords, labels, boxes, mask_inputs, image_index)
    _check_mirrored(config, mirrored)
    if mirrored is not None and mirrored.embeddings.shape != embeddings.shape:
        raise ValueError(f"mirrored.embeddings {mirrored.embeddings.shape} must be the mirror "
                         f"images' of embeddings {embeddings.shape}")
    if (input_size is None) != (original_size is None):
        raise ValueError("give both input_size and original_size (to upscale the masks) or "
                         f"neither, got input_size={input_size}, original_size={original_size}")
    if return_logits and input_size is None:
        raise ValueError("return_logits asks for upscaled logits: give input_size and "
                         "original_size (the low-res logits are always returned)")
    if mesh is not None and "data" not in mesh.shape:
        raise ValueError(f"mesh must have a 'data' axis (sharding.data_mesh()), has "
                         f"{tuple(mesh.axis_names)}")
    tokens = num_tokens(None if coords is None else coords.shape[1], boxes is not None)
    devices = 1 if mesh is None else mesh.shape["data"]
    if mesh is not None:  # no-ops for inputs already placed as documented
        variables, embeddings = jax.device_put((variables, embeddings),
                                               NamedSharding(mesh, Spec()))
        coords, labels, boxes, mask_inputs, image_index = jax.device_put(
            (coords, labels, boxes, mask_inputs, image_index),
            NamedSharding(mesh, Spec("data") if p % devices == 0 else Spec()))
    prompts = device_prompt_batch(coords, labels, boxes, mask_inputs, image_index,
                                  num_prompts=-(-_bucket(p) // devices) * devices,
                                  num_tokens=_bucket(tokens, MIN_TOKENS))
    options = dict(config=config, multimask_output=multimask_output,
                   with_masks=mask_inputs is not None, return_logits=return_logits,
                   input_size=None if input_size is None else tuple(map(int, input_size)),
                   original_size=None if original_size is None else
                   tuple(map(int, original_size)))
    # per-image inputs beside the embeddings, absent ones left out (no None in shard_map)
    if edge_features is not None and input_size is None:
        raise ValueError("edge_features refine the upscaled masks: give input_size and "
                         "original_size too")
    images = {k: v for k, v in (("refiner_features", refiner_features),
                                ("mirrored", mirrored), ("edge_features", edge_features))
              if v is not None}
    if mesh is None:
        out = decode_and_upscale(variables, embeddings, prompts, **images, **options)
    else:
        images = jax.device_put(images, NamedSharding(mesh, Spec()))
        out = _decode_on_mesh(variables, embeddings, prompts, images, mesh=mesh, **options)
    return out if prompts.coords.shape[0] == p else _first_rows(out, rows=p)


@functools.partial(jax.jit, static_argnames=("mesh", "config", "multimask_output", "with_masks",
                                             "return_logits", "input_size", "original_size"))
def _decode_on_mesh(variables, embeddings, prompts, images, *, mesh: Mesh, **options):
    """`decode_and_upscale` on each device's block of prompts (split along P over `data`),
    with the variables, embeddings and the other per-image inputs (`images`: refiner
    features, mirrored images) replicated; outputs sharded along P."""
    def body(variables, embeddings, prompts, images):
        return decode_and_upscale(variables, embeddings, prompts, **images, **options)

    return jax.shard_map(body, mesh=mesh, in_specs=(Spec(), Spec(), Spec("data"), Spec()),
                         out_specs=Spec("data"))(variables, embeddings, prompts, images)


@functools.partial(jax.jit, static_argnames=("rows",))
def _first_rows(tree, *, rows: int):
    """Drops the padding prompts, in a jitted call: an eager `x[:rows]` sends its start index
    from the host (a transfer `jax.transfer_guard` rejects)."""
    return jax.tree.map(lambda x: x[:rows], tree)


def _check_inputs(config: SamConfig, embeddings, coords, labels, boxes, mask_inputs,
                  image_index) -> int:
    """Shape and dtype checks on the (possibly traced) inputs; returns P."""
    n = config.image_embedding_size
    if jnp.ndim(embeddings) != 4 or tuple(embeddings.shape[1:3]) != (n, n):
        raise ValueError(f"embeddings must be (N_img, {n}, {n}, C) as embed_images returns, "
                         f"got {jnp.shape(embeddings)}")
    if coords is not None:
        if labels is None:
            raise ValueError("labels must be given with coords")
        if jnp.ndim(coords) != 3 or coords.shape[2] != 2:
            raise ValueError(f"coords must be (P, N, 2), got {jnp.shape(coords)}")
        if jnp.shape(labels) != coords.shape[:2]:
            raise ValueError(f"labels must be (P, N) = {coords.shape[:2]} like coords "
                             f"{coords.shape}, got {jnp.shape(labels)}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    elif labels is not None:
        raise ValueError("labels given without coords")
    if boxes is not None and (jnp.ndim(boxes) != 2 or boxes.shape[1] != 4):
        raise ValueError(f"boxes must be (P, 4) XYXY, got {jnp.shape(boxes)}")
    grid = 4 * n
    if mask_inputs is not None and (jnp.ndim(mask_inputs) != 4 or
                                    tuple(mask_inputs.shape[1:]) != (1, grid, grid)):
        raise ValueError(f"mask_inputs must be (P, 1, {grid}, {grid}) (low-res logits), got "
                         f"{jnp.shape(mask_inputs)}")
    given = {name: x.shape[0] for name, x in (("coords", coords), ("boxes", boxes),
                                              ("mask_inputs", mask_inputs)) if x is not None}
    if not given:
        raise ValueError("no prompt given: pass coords and labels, boxes or mask_inputs")
    if len(set(given.values())) > 1:
        raise ValueError(f"prompt inputs disagree on the number of prompts P: {given}")
    p = next(iter(given.values()))
    if p == 0:
        raise ValueError("no prompt given: P is 0")
    if image_index is not None:
        if jnp.shape(image_index) != (p,) or not jnp.issubdtype(image_index.dtype, jnp.integer):
            raise ValueError(f"image_index must be ({p},) integers, one per prompt, got shape "
                             f"{jnp.shape(image_index)} dtype {image_index.dtype}")
    elif embeddings.shape[0] > 1:
        raise ValueError(f"{embeddings.shape[0]} image embeddings given: image_index (P,) "
                         "must say which one each prompt reads")
    return p

