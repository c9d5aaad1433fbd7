"""Pure-function inference: preprocessing, image embedding, prompt decoding, postprocessing.

Replaces the official `Sam.forward` / `SamPredictor.predict_torch` loop with three jitted
functions whose shapes do not depend on the request:
- `embed_images(variables, images, config=)`: (B, S, S, 3) normalized padded images.
- `decode_prompts(variables, embeddings, prompts, config=, multimask_output=)`: a
  `PromptBatch` of any mix of points, boxes and mask inputs over one or more images.
- `postprocess_masks(low_res, input_size=, original_size=, image_size=)`: bilinear upscaling
  as the official `Sam.postprocess_masks` (align_corners=False, no antialiasing), with the two
  resizes composed into one banded map per axis.
`decode_shown` adds what the masks users see are made of (a mask refiner, the mean over the
image and its mirror image for `SamConfig.mirror_average`, the clicked components) on top of
`decode_prompts`; it is what the predictor, the device API and the batched call run.
`make_prompt_batch` builds a `PromptBatch` on the host and pads the number of prompts and the
number of tokens per prompt to powers of two, so a new prompt count does not trace again. Padding
tokens are masked out of attention (exact); padding prompts are dropped from the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import backend
from .build_sam import Variables
from .configs import SamConfig, preset_name
from .modeling import PAD_LABEL, Sam
from .utils.clicked_components import keep_clicked_components
from .utils.mirror import mirror_columns, mirror_pixels, mirror_points
from .utils.transforms import from_torch, normalize_padded, resize_and_pad

MIN_TOKENS = 2  # a single point (+ its not-a-point pad) or a box: the common prompts


@dataclasses.dataclass(frozen=True, repr=False)
class SamModel:
    """A configuration and its variables: what `sam_jax.load` and the official builders
    (`sam_jax.sam_model_registry[...]`) return.

    Also takes the calls official SAM code makes on its torch model: `sam.to(device)` (in
    place, returns the model), `sam.eval()` (returns the model), `sam.device`,
    `sam.image_encoder.img_size`, and `sam(batched_input, multimask_output)`
    (`forward_batched`)."""

    config: SamConfig
    variables: Variables
    # Thresholds for the automatic mask generator that the checkpoint recommends for this
    # model (`checkpoints.read_generator_defaults`); empty for SAM's own weights, whose
    # thresholds are the official defaults.
    generator_defaults: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def mask_threshold(self) -> float:
        return self.config.mask_threshold

    @property
    def image_encoder(self):
        """The image encoder's config: official code reads `sam.image_encoder.img_size`."""
        return self.config.image_encoder

    def __call__(self, batched_input, multimask_output: bool):
        """The official `Sam.forward`: several images with their prompts in one call."""
        return forward_batched(self, batched_input, multimask_output)

    @property
    def device(self) -> str:
        """Where the variables are, named as torch names devices ("cpu", "cuda:0"), so official
        code such as `torch.tensor(boxes, device=predictor.device)` runs unchanged."""
        leaf = jax.tree.leaves(self.variables)[0]
        devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.devices()[:1]
        return backend.torch_style_name(sorted(devices, key=lambda d: d.id))

    def to(self, device) -> "SamModel":
        """Moves the variables to `device` ("cpu", "cuda", "cuda:1", a torch.device or a
        jax.Device) IN PLACE and returns the model, as torch's `Module.to` (the official
        notebooks call `sam.to(device=device)` and keep using `sam`). Later calls compute
        where the variables are.

        "cuda" (or "tpu") on a JAX without such a device warns and leaves the model where it
        is: the official notebooks hard-code `device = "cuda"`, and the results are the same
        on the CPU, only slower; an error would stop an unchanged notebook for no gain. An
        unknown device name, or an index past the devices present, raises ValueError."""
        target = backend.find_device(device)
        if target is None:
            warnings.warn(f"sam.to({str(device)!r}): this JAX has no such device (it has "
                          f"{jax.devices()}); the model stays on {self.device}. Install a "
                          "JAX build for your accelerator to use it.", RuntimeWarning,
                          stacklevel=2)
            return self
        # frozen dataclass: the one sanctioned mutation, so that `sam.to(...)` moves `sam`
        object.__setattr__(self, "variables", jax.device_put(self.variables, target))
        return self

    def with_config(self, **changes: Any) -> "SamModel":
        """The same variables under a config with `changes` (`SamConfig.replace`), for the
        switches that do not change the weights: e.g. `sam_jax.load().with_config(
        mirror_average=True)` (masks averaged over the mirror image, twice the time), or
        `compute_dtype="bfloat16"`."""
        return dataclasses.replace(self, config=self.config.replace(**changes))

    def eval(self) -> "SamModel":
        """Returns the model: official code calls `sam.eval()`; inference here is always in
        evaluation mode (no dropout; drop path only in the training step)."""
        return self

    def __repr__(self) -> str:
        # The default dataclass repr printed every weight (~550,000 characters for vit_b).
        c = self.config
        e = c.image_encoder
        kind = "DINOv2 ViT" if getattr(e, "kind", None) == "dinov2" else "ViT"
        if getattr(e, "detail_layer", 0):
            kind += f" (detail branch from block {e.detail_layer})"
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.variables["params"]))
        count = f"{params / 1e6:.1f} M" if params >= 1e6 else f"{params / 1e3:.1f} k"
        int8 = ", int8 weights" if "int8_scales" in self.variables else ""
        return (f"SamModel({preset_name(c) or 'custom'}: image encoder {kind} width "
                f"{e.embed_dim} depth {e.depth} at {e.img_size} px, {count} params{int8}, "
                f"compute {c.compute_dtype}, on {self.device})")


def single_view(model: SamModel) -> SamModel:
    """`model` without `mirror_average`, for paths that decode only the image as given (the
    automatic mask generator, soft edges): their predictor then embeds no mirror image."""
    return model.with_config(mirror_average=False) if model.config.mirror_average else model


class PreparedImage(NamedTuple):
    pixels: np.ndarray  # (S, S, 3) float32, normalized and zero-padded bottom-right
    input_size: Tuple[int, int]  # (h, w) after resizing, before padding
    original_size: Tuple[int, int]  # (H, W) of the image given


class PromptBatch(NamedTuple):
    """P prompts of T tokens; coordinates in the model input frame (longest side S).

    labels: -1 not-a-point, 0 negative, 1 positive, 2/3 box corners, PAD_LABEL absent.
    mask_inputs: (P, 4h, 4w, 1) low-res logits, used where has_mask; image_index: which
    embedding each prompt reads. `num_prompts` is the count before padding (host int)."""

    coords: np.ndarray
    labels: np.ndarray
    mask_inputs: np.ndarray
    has_mask: np.ndarray
    image_index: np.ndarray
    num_prompts: int


def check_image(image: np.ndarray) -> np.ndarray:
    """Accepts only HxWx3 uint8 RGB, with errors that say what was given instead."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 with values in [0, 255], got dtype {image.dtype}"
                         " (convert 16-bit or float images first)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) (RGB), got {image.shape}; convert "
                         "grayscale or RGBA images to RGB first")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def prepare_image(image: np.ndarray, config: SamConfig) -> PreparedImage:
    """Resize the longest side to S (PIL bilinear), normalize, pad bottom-right with zeros,
    exactly as `ResizeLongestSide.apply_image` + `Sam.preprocess` (sam_jax/utils/transforms.py,
    which the training step's normalization calls too)."""
    image = check_image(image)
    padded, input_size = resize_and_pad(image, config.image_size)
    pixels = normalize_padded(padded, input_size, config.pixel_mean, config.pixel_std)
    return PreparedImage(pixels, input_size, tuple(image.shape[:2]))


@functools.partial(jax.jit, static_argnames=("config",))
def embed_images(variables: Variables, images: jax.Array, *, config: SamConfig) -> jax.Array:
    """(B, S, S, 3) prepared images -> (B, S/16, S/16, C) embeddings. Sharding follows the
    inputs: put `images` on a mesh with `sam_jax.sharding.shard_batch` to split the batch."""
    return Sam(config).apply(variables, images, method="embed_image")


def refiner_features(variables: Variables, images: jax.Array,
                     image_embeddings: Optional[jax.Array] = None, *,
                     config: SamConfig) -> Optional[jax.Array]:
    """(B, S, S, 3) prepared images [and their `embed_images` embeddings, which a refiner with
    `embedding_input` reads] -> the mask refiner's image features (B, S/2, S/2, width), or
    None for a model without a refiner (`SamConfig.mask_refiner`)."""
    if config.mask_refiner is None:
        return None
    if config.mask_refiner.embedding_input:
        if image_embeddings is None:
            raise ValueError("this model's mask refiner reads the image embedding: call "
                             "refiner_features(variables, images, embed_images(...), "
                             "config=...)")
        if image_embeddings.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {image_embeddings.shape[0]} "
                             "embeddings")
    else:
        image_embeddings = None  # not read: no retrace keyed on it
    return _refiner_features(variables, images, image_embeddings, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _refiner_features(variables, images, image_embeddings, *, config):
    return Sam(config).apply(variables, images, image_embeddings, method="refiner_features")


def edge_features(variables: Variables, images, *, config: SamConfig) -> Optional[jax.Array]:
    """(H, W, 3) or (B, H, W, 3) RGB images (uint8, or float in [0, 255]) at their ORIGINAL
    size -> what the edge stage reads of them (`SamConfig.edge_refiner`): the images normalized
    as the encoder's input, (B, H, W, 3) float32 on the device; None for a model without a
    stage. (The stage's layers all run at each click, on the tiles around the outlines.)"""
    if config.edge_refiner is None:
        return None
    images = jnp.asarray(images)
    return _edge_features(images[None] if images.ndim == 3 else images, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _edge_features(images, *, config):
    mean = jnp.asarray(config.pixel_mean, jnp.float32)
    std = jnp.asarray(config.pixel_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


@functools.partial(jax.jit, static_argnames=("config", "threshold"))
def refine_edges(variables: Variables, features: jax.Array, logits: jax.Array,
                 image_index: Optional[jax.Array] = None, *, config: SamConfig,
                 threshold: Optional[float] = None) -> jax.Array:
    """The edge stage on masks at the original size: `edge_features` (N_img, H, W, 3),
    logits (P, C, H, W) from `postprocess_masks` and image_index (P,) (which image each row
    reads; all the first without it) -> (P, C, H, W) logits, or with `threshold` the masks
    `logits > threshold`."""
    if config.edge_refiner is None:
        raise ValueError("edge features were given for a model without an edge stage "
                         "(SamConfig.edge_refiner is None)")
    if features.shape[1:3] != logits.shape[-2:]:
        raise ValueError(f"edge features of a {features.shape[1]}x{features.shape[2]} image "
                         f"cannot refine {logits.shape[-2]}x{logits.shape[-1]} masks")
    if image_index is None:
        image_index = jnp.zeros(logits.shape[0], jnp.int32)
    out = Sam(config).apply(variables, features, logits, image_index, method="refine_edges")
    return out if threshold is None else out > threshold


@functools.partial(jax.jit, static_argnames=("config",))
def refine_low_res(variables: Variables, features: jax.Array, low_res: jax.Array,
                   image_index: jax.Array, coords: Optional[jax.Array] = None,
                   labels: Optional[jax.Array] = None, *, config: SamConfig) -> jax.Array:
    """low_res (P, C, 4h, 4w) decoder logits of prompts reading images `image_index` (P,) ->
    (P, C, s, s) refined logits over the padded input frame (s = S/2, or S for a refiner with
    `subpixel_output`), for `postprocess_masks`.
    A refiner with `click_input` also reads the prompts' points, `coords` (P, T, 2) and
    `labels` (P, T) in the input frame (without them it sees no click, as for a box alone).

    Prompts go REFINE_GROUP at a time when P is a multiple of it: each prompt reads its own
    copy of its image's features (6 MB at 448 px), which a few hundred prompts at once would
    multiply into gigabytes."""
    if not config.mask_refiner.click_input:
        coords = labels = None  # not read

    def refine(args):
        index, logits, points = args
        c, lab = (None, None) if points is None else points
        return Sam(config).apply(variables, features[index], logits, c, lab,
                                 method="refine_masks")

    points = None if coords is None else (coords, labels)
    p = low_res.shape[0]
    if p <= REFINE_GROUP or p % REFINE_GROUP:
        return refine((image_index, low_res, points))
    group = lambda x: x.reshape((-1, REFINE_GROUP) + x.shape[1:])  # noqa: E731
    grouped = jax.lax.map(refine, (group(image_index), group(low_res),
                                   None if points is None else jax.tree.map(group, points)))
    return grouped.reshape((p,) + grouped.shape[2:])


REFINE_GROUP = 16


@functools.partial(jax.jit, static_argnames=("config", "multimask_output", "with_masks"))
def decode_prompts(variables: Variables, embeddings: jax.Array, prompts: PromptBatch, *,
                   config: SamConfig, multimask_output: bool = True, with_masks: bool = True):
    """Decode a padded `PromptBatch` against (N_img, h, w, C) embeddings.

    `with_masks=False` promises that no prompt has a mask input (`prompts.has_mask` all
    False): the no-mask embedding is then added once, and with one image the first layer's
    image-side work is shared by all prompts. Returns low-res logits (P, M, 4h, 4w) and IoU
    predictions (P, M), M = 3 or 1, for all P padded prompts (slice with `num_prompts`)."""
    model = Sam(config)
    sparse = model.apply(variables, prompts.coords, prompts.labels, method="encode_tokens")
    if with_masks:
        dense_mask = model.apply(variables, prompts.mask_inputs, method="encode_masks")
        dense_none = model.apply(variables, prompts.coords.shape[0], method="no_mask_dense")
        dense = jnp.where(prompts.has_mask[:, None, None, None], dense_mask, dense_none)
    else:
        dense = model.apply(variables, 1, method="no_mask_dense")
    image = embeddings[prompts.image_index] if embeddings.shape[0] > 1 else embeddings
    token_mask = prompts.labels != PAD_LABEL
    num = sparse.shape[0]
    group = backend.decode_group_size(config.decode_group_size)
    if group <= 0 or num <= group:
        return model.apply(variables, image, sparse, dense, multimask_output, token_mask,
                           method="decode")
    # Decode `group` prompts at a time: the per-prompt feature maps (64x64x256 and larger) of
    # a group stay cache- and heap-sized, instead of GBs re-faulted in on every call. A group
    # takes every (num/group)-th prompt, so prompts sharded in blocks over a mesh stay spread
    # over the devices in every step (consecutive prompts would put a whole group on one
    # device, and XLA then replicates the loop).
    groups = lambda x: x.reshape((group, num // group) + x.shape[1:]).swapaxes(0, 1)  # noqa
    per_prompt = lambda x: x.shape[0] == num and num > 1  # noqa: E731
    shared = {k: x for k, x in (("image", image), ("dense", dense)) if not per_prompt(x)}
    mapped = {k: groups(x) for k, x in (("image", image), ("dense", dense)) if per_prompt(x)}

    def decode_group(args):
        parts = {**shared, **args}
        return model.apply(variables, parts["image"], args["sparse"], parts["dense"],
                           multimask_output, args["token_mask"], method="decode")

    low_res, iou = jax.lax.map(decode_group, dict(mapped, sparse=groups(sparse),
                                                  token_mask=groups(token_mask)))
    ungroup = lambda x: x.swapaxes(0, 1).reshape((num,) + x.shape[2:])  # noqa: E731
    return ungroup(low_res), ungroup(iou)


class MirroredImages(NamedTuple):
    """The images mirrored left-right inside their padded frames, for a model with
    `SamConfig.mirror_average` (`mirror_images`): their embeddings (N_img, h, w, C), mask
    refiner features (None without a refiner) and widths after resizing (N_img,) int32."""

    embeddings: jax.Array
    refiner_features: Optional[jax.Array]
    input_widths: jax.Array


def mirror_images(variables: Variables, images: jax.Array, input_widths, *,
                  config: SamConfig) -> Optional[MirroredImages]:
    """(B, S, S, 3) prepared images and their widths after resizing (B,) -> their mirror
    images embedded (and read by the refiner), or None for a model without
    `mirror_average`. Mirrored on the device from the prepared frames."""
    if not config.mirror_average:
        return None
    widths = jnp.asarray(input_widths, jnp.int32).reshape(-1)
    if widths.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {widths.shape[0]} input widths")
    mirrored = _mirror_pixels(images, widths)
    embeddings = embed_images(variables, mirrored, config=config)
    return MirroredImages(embeddings, refiner_features(variables, mirrored, embeddings,
                                                       config=config), widths)


_mirror_pixels = jax.jit(mirror_pixels)


@functools.partial(jax.jit, static_argnames=("config", "multimask_output", "with_masks",
                                             "shown"))
def decode_shown(variables: Variables, embeddings: jax.Array, prompts: PromptBatch, *,
                 config: SamConfig, multimask_output: bool = True, with_masks: bool = True,
                 shown: bool = True, refiner_features: Optional[jax.Array] = None,
                 mirrored: Optional[MirroredImages] = None):
    """`decode_prompts`, then what the masks users see are made of: the decoder's low-res
    logits, or the refiner's (with `refiner_features`), averaged with the mirror image's
    (with `mirrored`), then only the clicked components (`config.keep_clicked_components`).
    Returns (shown logits (P, M, s, s) over the padded frame, or None without `shown`; IoU
    predictions (P, M); low-res logits (P, M, 4h, 4w), the next click's mask prompt).

    With `mirrored` each prompt is decoded twice, as given and mirrored (points and boxes
    `mirror_points`, its mask input `mirror_columns`) on the mirrored image; the mirrored
    outputs are mirrored back and each output is the mean of the two: the shown logits, the
    IoU predictions and the low-res logits alike, so the next click reads one mask prompt."""
    def decode(embeddings, prompts, features):
        low_res, iou = decode_prompts(variables, embeddings, prompts, config=config,
                                      multimask_output=multimask_output, with_masks=with_masks)
        seen = None
        if shown:
            seen = low_res if features is None else refine_low_res(
                variables, features, low_res, prompts.image_index, prompts.coords,
                prompts.labels, config=config)
        return seen, iou, low_res

    if refiner_features is not None and config.mask_refiner is None:
        raise ValueError("refiner_features were given for a model without a mask refiner "
                         "(SamConfig.mask_refiner is None)")
    seen, iou, low_res = decode(embeddings, prompts, refiner_features)
    if mirrored is not None:
        widths = mirrored.input_widths[prompts.image_index]
        flip = functools.partial(mirror_columns, widths=widths, image_size=config.image_size)
        flipped = prompts._replace(
            coords=mirror_points(prompts.coords, prompts.labels, widths),
            mask_inputs=flip(prompts.mask_inputs, axis=-2) if with_masks else
            prompts.mask_inputs)
        seen_m, iou_m, low_res_m = decode(mirrored.embeddings, flipped,
                                          mirrored.refiner_features)
        iou = (iou + iou_m) / 2
        low_res = (low_res + flip(low_res_m)) / 2
        if shown:
            seen = (seen + flip(seen_m)) / 2
    if shown and config.keep_clicked_components:
        seen = keep_clicked_components(seen, prompts.coords, prompts.labels,
                                       image_size=config.image_size,
                                       threshold=config.mask_threshold)
    return seen, iou, low_res


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def make_prompt_batch(config: SamConfig, *, coords: Optional[Sequence] = None,
                      labels: Optional[Sequence] = None, boxes: Optional[Sequence] = None,
                      mask_inputs: Optional[np.ndarray] = None,
                      image_index: Optional[Sequence[int]] = None,
                      num_prompts: Optional[int] = None) -> PromptBatch:
    """Host-side batching of prompts already in the model input frame.

    coords/labels: per prompt a (N_i, 2) array and (N_i,) labels (lists, so N_i may differ),
    or (P, N, 2)/(P, N) arrays, or None; boxes: (P, 4) XYXY or a list with None entries;
    mask_inputs: (P, 1, 4h, 4w) (official layout) with NaN-free logits, or a list with None.
    Follows the official token rule: a prompt with points and no box gets the extra
    not-a-point token. Pads P and T to powers of two."""
    p = num_prompts
    for seq in (coords, boxes, mask_inputs):
        if seq is not None:
            p = len(seq) if p is None else p
            if len(seq) != p:
                raise ValueError(f"prompt inputs disagree on the number of prompts: {len(seq)} "
                                 f"vs {p}")
    if p is None or p == 0:
        raise ValueError("no prompt given: pass points, boxes or mask inputs")
    if coords is not None and labels is None:
        raise ValueError("point labels must be given with point coordinates")
    grid = 4 * config.image_embedding_size
    tokens = []
    for i in range(p):
        c = [] if coords is None or coords[i] is None else [np.asarray(coords[i], np.float32)]
        lab = [] if c == [] else [np.asarray(labels[i], np.int32).reshape(-1)]
        if c and (c[0].ndim != 2 or c[0].shape[1] != 2 or len(lab[0]) != len(c[0])):
            raise ValueError(f"prompt {i}: point coordinates must be (N, 2) with N labels, got "
                             f"{c[0].shape} and {lab[0].shape}")
        box = None if boxes is None else boxes[i]
        if c and box is None:
            c.append(np.zeros((1, 2), np.float32))
            lab.append(np.array([-1], np.int32))
        if box is not None:
            c.append(np.asarray(box, np.float32).reshape(2, 2))
            lab.append(np.array([2, 3], np.int32))
        tokens.append((np.concatenate(c) if c else np.zeros((0, 2), np.float32),
                       np.concatenate(lab) if lab else np.zeros((0,), np.int32)))
    pp = _bucket(p)
    t = _bucket(max(len(tk[1]) for tk in tokens), MIN_TOKENS)
    out_coords = np.zeros((pp, t, 2), np.float32)
    out_labels = np.full((pp, t), PAD_LABEL, np.int32)
    for i, (c, lab) in enumerate(tokens):
        out_coords[i, :len(lab)] = c
        out_labels[i, :len(lab)] = lab
    masks = np.zeros((pp, grid, grid, 1), np.float32)
    has_mask = np.zeros((pp,), bool)
    if mask_inputs is not None:
        for i, m in enumerate(mask_inputs):
            if m is None:
                continue
            m = np.asarray(m, np.float32)
            if m.shape != (1, grid, grid):
                raise ValueError(f"prompt {i}: mask input must have shape (1, {grid}, {grid}) "
                                 f"(low-res logits, as returned by predict), got {m.shape}")
            masks[i, :, :, 0] = m[0]
            has_mask[i] = True
    index = np.zeros((pp,), np.int32)
    if image_index is not None:
        index[:p] = np.asarray(image_index, np.int32)
    return PromptBatch(out_coords, out_labels, masks, has_mask, index, p)


def _linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bilinear resize along one axis (align_corners=False, no
    antialiasing: half-pixel centres, source clamped at the edges)."""
    # Source positions in float32 arithmetic, as torch's CPU kernel computes them, so each
    # resize samples exactly where the official one does.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = np.clip(src - i0.astype(f32), 0, 1).astype(np.float64)
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m


@functools.lru_cache(maxsize=64)
def _upscale_taps(low: int, image_size: int, valid: int, original: int):
    """Indices and weights (original, k) of the composed map low -> image_size -> crop to
    `valid` -> original along one axis. Both steps are linear, so their product is one banded
    matrix with at most 3 non-zeros a row: one gather-and-sum pass instead of materializing
    the 1024x1024 intermediate (which made this step 7x slower than the decoder itself)."""
    m = _linear_resize_matrix(valid, original) @ _linear_resize_matrix(low, image_size)[:valid]
    k = int((m != 0).sum(1).max())
    idx = np.sort(np.argsort(-(m != 0).astype(np.int8), axis=1, kind="stable")[:, :k], axis=1)
    return idx.astype(np.int32), np.take_along_axis(m, idx, 1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _upscale_column_blocks(low: int, image_size: int, valid: int, original: int,
                           block: int = 128):
    """The same composed map as `_upscale_taps`, as dense (width, <=block) matrices, each
    reading the `width` consecutive inputs starting at its offset: ((offset, matrix), ...).

    Along the minor (column) axis XLA:CPU's gather ran at ~5 ns an output; these small
    matmuls (width ~21 for SAM's 256 -> ~1800) measured 2x faster for 64 prompts' masks."""
    idx, weights = _upscale_taps(low, image_size, valid, original)
    dense = np.zeros((original, low), np.float32)
    np.put_along_axis(dense, idx, weights, 1)
    spans = []
    for start in range(0, original, block):
        used = np.nonzero(dense[start:start + block].any(0))[0]
        spans.append((start, int(used.min()), int(used.max()) + 1))
    width = max(hi - lo for _, lo, hi in spans)
    blocks = []
    for start, lo, _ in spans:
        lo = min(lo, low - width)
        blocks.append((lo, dense[start:start + block, lo:lo + width].T.copy()))
    return width, tuple(blocks)


@functools.partial(jax.jit, static_argnames=("input_size", "original_size", "image_size",
                                             "threshold"))
def postprocess_masks(masks: jax.Array, *, input_size: Tuple[int, int],
                      original_size: Tuple[int, int], image_size: int,
                      threshold: Optional[float] = None) -> jax.Array:
    """(..., 4h, 4w) low-res logits -> (..., H, W) logits at the original image size, as the
    official `Sam.postprocess_masks` (upscale to S x S, crop the padding, resize to H x W);
    with `threshold`, the binary masks `logits > threshold` (fused, no float image stored).

    Columns first, on the small array, as banded block matmuls; then rows, as a gather of
    whole rows (fast) fused with the threshold into the one large output."""
    width, blocks = _upscale_column_blocks(masks.shape[-1], image_size, input_size[1],
                                           original_size[1])
    cols = jnp.concatenate([
        jnp.einsum("...i,io->...o", masks[..., lo:lo + width], matrix,
                   precision=jax.lax.Precision.HIGHEST) for lo, matrix in blocks], axis=-1)
    iy, wy = _upscale_taps(masks.shape[-2], image_size, input_size[0], original_size[0])
    out = sum(jnp.take(cols, iy[:, j], axis=-2) * wy[:, j, None] for j in range(iy.shape[1]))
    return out if threshold is None else out > threshold


# ---- the official Sam.forward: several images and their prompts in one call ----

_PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_inputs")


def _entry_image(entry: dict, i: int, size: int) -> np.ndarray:
    image = from_torch(entry["image"])
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"batched_input[{i}]['image'] must be (3, H, W) (channels first, as "
                         f"the official code), got shape {image.shape}")
    if max(image.shape[1:]) != size or min(image.shape[1:]) < 1:
        raise ValueError(f"batched_input[{i}]['image'] must already be resized so its longest "
                         f"side is {size} (ResizeLongestSide({size}).apply_image), got "
                         f"{image.shape[1]}x{image.shape[2]}")
    return image.transpose(1, 2, 0)


def _entry_prompts(entry: dict, i: int) -> dict[str, Any]:
    prompts = {k: from_torch(entry.get(k)) for k in _PROMPT_KEYS}
    prompts = {k: None if v is None else np.asarray(v) for k, v in prompts.items()}
    if (prompts["point_coords"] is None) != (prompts["point_labels"] is None):
        raise ValueError(f"batched_input[{i}]: point_coords and point_labels go together")
    counts = {len(v) for k, v in prompts.items() if v is not None and k != "point_labels"}
    if not counts:
        raise ValueError(f"batched_input[{i}] has no prompt: give point_coords/point_labels, "
                         "boxes or mask_inputs")
    if len(counts) > 1:
        raise ValueError(f"batched_input[{i}]: its prompts disagree on the batch size: "
                         f"{sorted(counts)}")
    return prompts


def forward_batched(model: SamModel, batched_input: Sequence[dict],
                    multimask_output: bool) -> list[dict[str, Any]]:
    """The official `Sam.forward(batched_input, multimask_output)`: several images, each with its
    own prompts, in one call (`sam(batched_input, multimask_output=False)` in the official
    predictor notebook's "end-to-end batched inference").

    Each entry of `batched_input` is a dict as the official one:
    - "image": (3, H', W') the image ALREADY RESIZED so its longest side is the model's input size
      (`ResizeLongestSide(sam.image_encoder.img_size).apply_image`), channels first, uint8 or
      float in [0, 255], as a numpy array, jax array or torch tensor;
    - "original_size": (H, W) of the image before resizing;
    - optional prompts in the resized frame: "point_coords" (B, N, 2) with "point_labels" (B, N),
      "boxes" (B, 4), "mask_inputs" (B, 1, 4h, 4w).
    Returns one dict per image: "masks" (B, C, H, W) bool at the original size, "iou_predictions"
    (B, C), "low_res_logits" (B, C, 4h, 4w), as jax arrays (C = 3 with multimask_output, else 1).

    All images are embedded in one call and all prompts of all images are decoded in one call.
    """
    if not isinstance(batched_input, (list, tuple)) or not batched_input:
        raise ValueError("batched_input must be a non-empty list of dicts (one per image)")
    config = model.config
    size = config.image_size
    images, input_sizes, original_sizes, per_image = [], [], [], []
    for i, entry in enumerate(batched_input):
        if not isinstance(entry, dict) or "image" not in entry or "original_size" not in entry:
            raise ValueError(f"batched_input[{i}] must be a dict with 'image' and "
                             "'original_size'")
        image = _entry_image(entry, i, size)
        padded = np.zeros((size, size, 3), np.float32)
        padded[:image.shape[0], :image.shape[1]] = image
        images.append(padded)
        input_sizes.append(image.shape[:2])
        original_sizes.append(tuple(int(v) for v in from_torch(entry["original_size"])))
        per_image.append(_entry_prompts(entry, i))

    pixels = normalize_padded(np.stack(images), np.asarray(input_sizes), config.pixel_mean,
                              config.pixel_std)
    embeddings = embed_images(model.variables, pixels, config=config)
    detail = refiner_features(model.variables, pixels, embeddings, config=config)
    mirrored = mirror_images(model.variables, pixels, [w for _, w in input_sizes],
                             config=config)

    coords, labels, boxes, masks, index = [], [], [], [], []
    for i, prompts in enumerate(per_image):
        n = len(next(v for v in prompts.values() if v is not None))
        for j in range(n):
            pick = lambda k: None if prompts[k] is None else prompts[k][j]  # noqa: E731
            coords.append(pick("point_coords"))
            labels.append(pick("point_labels"))
            boxes.append(pick("boxes"))
            masks.append(pick("mask_inputs"))
            index.append(i)
    has = lambda seq: any(x is not None for x in seq)  # noqa: E731
    batch = make_prompt_batch(
        config, coords=coords if has(coords) else None, labels=labels if has(coords) else None,
        boxes=boxes if has(boxes) else None, mask_inputs=masks if has(masks) else None,
        image_index=index)
    # shown: what the masks are made of (the decoder's logits, or the refined ones, ...)
    shown, iou, low_res = decode_shown(
        model.variables, embeddings, batch._replace(num_prompts=None), config=config,
        multimask_output=multimask_output, with_masks=bool(batch.has_mask.any()),
        refiner_features=detail, mirrored=mirrored)
    outputs, index = [], np.asarray(index)
    for i in range(len(batched_input)):
        rows = np.flatnonzero(index == i)
        logits = low_res[rows]
        edge = None
        if config.edge_refiner is not None:
            # this API gets the image already resized: the edge stage reads it resized back
            h, w = input_sizes[i]
            edge = edge_features(model.variables, jax.image.resize(
                jnp.asarray(images[i][:h, :w]), original_sizes[i] + (3,), "linear"),
                config=config)
        masks = postprocess_masks(
            shown[rows], input_size=tuple(int(v) for v in input_sizes[i]),
            original_size=original_sizes[i], image_size=size,
            threshold=config.mask_threshold if edge is None else None)
        if edge is not None:
            masks = refine_edges(model.variables, edge, masks, config=config,
                                 threshold=config.mask_threshold)
        outputs.append({
            "masks": masks,
            "iou_predictions": iou[rows],
            "low_res_logits": logits,
        })
    return outputs
