"""Optimizer for training SAM (paper App. A; no counterpart in the official release).

AdamW with linear warmup and a step schedule (/10 at two steps), layer-wise learning-rate decay
for the ViT image encoder (MAE/BEiT convention), weight decay only on weight matrices and conv
kernels, optional global-norm clipping, and frozen parameter subtrees that get zero updates and
hold no optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

_BLOCK = re.compile(r"blocks\.(\d+)$")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings. `drop_path` and `batch_size` are not used by the optimizer: they are
    kept here so one preset holds a run's hyper-parameters (the model reads drop_path; the input
    pipeline reads batch_size, the global batch in images)."""

    peak_lr: float
    total_steps: int
    decay_steps: tuple[int, ...]  # the lr is divided by 1/decay_factor at each of these steps
    warmup_steps: int = 250
    decay_factor: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    layer_decay: float = 1.0  # 1.0 = off
    drop_path: float = 0.0
    freeze: tuple[str, ...] = ()  # param path prefixes ("image_encoder", "a/b") kept frozen
    grad_clip: float = 0.0  # max global norm of the trainable grads; 0 = off
    batch_size: int = 256


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to peak_lr over warmup_steps, then constant, multiplied by
    decay_factor at each step in decay_steps (a step >= the boundary gets the decayed lr)."""
    if cfg.warmup_steps <= 0:
        return optax.piecewise_constant_schedule(
            cfg.peak_lr, {int(s): cfg.decay_factor for s in cfg.decay_steps})
    warmup = optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps)
    # join_schedules evaluates the second schedule at (step - warmup_steps).
    constant = optax.piecewise_constant_schedule(
        cfg.peak_lr, {int(s) - cfg.warmup_steps: cfg.decay_factor for s in cfg.decay_steps})
    return optax.join_schedules([warmup, constant], [cfg.warmup_steps])


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(keypath) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in keypath)


def _encoder_depth(params) -> int:
    enc = params.get("image_encoder", {}) if hasattr(params, "get") else {}
    return sum(1 for k in enc if _BLOCK.match(str(k)))


def layer_id(path: tuple[str, ...], depth: int) -> int:
    """MAE/BEiT layer id: 0 for the patch embedding and pos_embed, i + 1 for encoder block i,
    depth + 1 for everything else (the neck, the prompt encoder, the mask decoder)."""
    if len(path) >= 2 and path[0] == "image_encoder":
        if path[1] in ("patch_embed", "pos_embed"):
            return 0
        m = _BLOCK.match(path[1])
        if m:
            return int(m.group(1)) + 1
    return depth + 1


def layer_scales(params, layer_decay: float):
    """Per-parameter lr multipliers: layer_decay ** (depth + 1 - layer_id), depth being the
    number of `image_encoder/blocks.*`. A tree of Python floats shaped like `params`."""
    depth = _encoder_depth(params)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: float(layer_decay ** (depth + 1 - layer_id(_path(kp), depth))), params)


def weight_decay_mask(params):
    """True where weight decay applies: leaves named "kernel" with ndim >= 2 (dense weight
    matrices, conv and transposed-conv kernels). Biases, norm scales, token/point embeddings
    (`embedding`), pos_embed and rel_pos_* are not decayed (standard ViT/MAE practice)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: _path(kp)[-1] == "kernel" and len(jnp.shape(x)) >= 2, params)


def _is_frozen(path: tuple[str, ...], freeze: tuple[str, ...]) -> bool:
    joined = "/".join(path)
    return any(joined == f or joined.startswith(f.rstrip("/") + "/") for f in freeze)


def param_labels(params, freeze: tuple[str, ...]):
    """'frozen' for params under a prefix in `freeze`, else 'train'."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "frozen" if _is_frozen(_path(kp), freeze) else "train", params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Stateless: multiply each update by the matching entry of `scales` (a tree like params)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
    """AdamW for SAM. `params` may be concrete or abstract (`jax.eval_shape`): only its structure,
    names and ndims are read.

    update = -lr(step) * layer_scale * (adam(g) + wd * mask * p) for trainable params, with g
    clipped to global norm `grad_clip` (over the trainable grads) when > 0; the layer scale
    multiplies the decay too, as in BEiT. Frozen params get zero updates and no Adam state.
    """
    trainable = [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
    ]
    if cfg.grad_clip > 0:
        trainable.insert(0, optax.clip_by_global_norm(cfg.grad_clip))
    tx = optax.multi_transform(
        {"train": optax.chain(*trainable), "frozen": optax.set_to_zero()},
        param_labels(params, cfg.freeze))
    if cfg.layer_decay != 1.0:
        # Multiplication commutes with the steps above; applied once on the full tree (frozen
        # updates are already zero).
        tx = optax.chain(tx, scale_by_tree(layer_scales(params, cfg.layer_decay)))
    return tx


# ViT-H: 90k steps, lr /10 at 60k and 86,666 (paper table). ViT-B/L train 180k steps; the paper
# gives no decay steps for them, so ViT-H's fractions (2/3 and 86,666/90,000) are scaled to 180k.
_H_STEPS = 90_000
_BL_STEPS = 180_000
_BL_DECAY = (round(_BL_STEPS * 60_000 / _H_STEPS), round(_BL_STEPS * 86_666 / _H_STEPS))

PRESETS: dict[str, OptimConfig] = {
    "vit_h": OptimConfig(peak_lr=8e-4, total_steps=_H_STEPS, decay_steps=(60_000, 86_666),
                         weight_decay=0.1, layer_decay=0.8, drop_path=0.4, batch_size=256),
    "vit_l": OptimConfig(peak_lr=4e-4, total_steps=_BL_STEPS, decay_steps=_BL_DECAY,
                         weight_decay=0.1, layer_decay=0.8, drop_path=0.4, batch_size=128),
    "vit_b": OptimConfig(peak_lr=8e-4, total_steps=_BL_STEPS, decay_steps=_BL_DECAY,
                         weight_decay=0.1, layer_decay=0.6, drop_path=0.6, batch_size=128),
    # Fine-tuning a released checkpoint on a new domain: freeze the image encoder (no Adam state
    # for it, and embeddings can be precomputed), train the prompt encoder and mask decoder.
    # AdamW lr 1e-4, weight decay 0.01 as MedSAM (Ma et al. 2024) fine-tunes SAM; a released
    # model needs a much lower lr than from-MAE pre-training. Decays at ViT-H's fractions.
    "finetune": OptimConfig(peak_lr=1e-4, total_steps=10_000, decay_steps=(6_667, 9_630),
                            weight_decay=0.01, layer_decay=1.0, drop_path=0.0,
                            freeze=("image_encoder",), batch_size=16),
    # For tests: a few steps, every feature on.
    "tiny": OptimConfig(peak_lr=1e-3, total_steps=10, decay_steps=(6, 8), warmup_steps=2,
                        layer_decay=0.8, drop_path=0.1, grad_clip=1.0, batch_size=2),
}
