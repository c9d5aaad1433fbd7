"""SAM's training losses (paper App. A; no counterpart in the official release).

Follows SAM 2's `training/loss_fns.py`: sigmoid focal loss (alpha 0.25, gamma 2) averaged over
pixels, dice loss with +1 smoothing, and an MSE loss between the IoU head's prediction and the
actual IoU of the thresholded (logits > 0) mask with the ground truth. Focal and dice are combined
20:1; with several candidate masks only the lowest-loss one is back-propagated.

All functions are pure `jnp` and compute in float32 whatever the logits' dtype (bf16 logits from
a bf16 compute dtype are upcast first). Differences from SAM 2: SAM 2 normalizes by the number of
objects across the batch; here `sam_loss` takes a `valid` mask (padded prompts/masks) and averages
over the valid entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PIXEL_AXES = (-2, -1)


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017) per mask, averaged over the last two (pixel) axes.

    logits: (..., H, W); targets: (..., H, W) bool or {0, 1}. `alpha` < 0 disables the class
    weighting. Returns (...) float32.
    """
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(targets, jnp.float32)
    p = jax.nn.sigmoid(x)
    # Binary cross entropy from logits, written with log-sigmoid for stability.
    ce = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss.mean(_PIXEL_AXES)


def dice_loss(logits, targets, smooth: float = 1.0):
    """Soft dice loss per mask: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth).

    p = sigmoid(logits); sums over the last two (pixel) axes. Returns (...) float32.
    """
    p = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
    t = jnp.asarray(targets, jnp.float32)
    num = 2.0 * (p * t).sum(_PIXEL_AXES) + smooth
    den = p.sum(_PIXEL_AXES) + t.sum(_PIXEL_AXES) + smooth
    return 1.0 - num / den


def mask_iou(logits, targets):
    """IoU of the binarized prediction (logits > 0) with the target, per mask; no gradient.

    Returns (...) float32. When prediction and target are both empty (union 0) the IoU is 1.0:
    predicting nothing for an empty target is a perfect answer, and it keeps the value finite.
    """
    pred = jnp.asarray(logits) > 0
    t = jnp.asarray(targets).astype(bool)
    inter = (pred & t).sum(_PIXEL_AXES).astype(jnp.float32)
    union = (pred | t).sum(_PIXEL_AXES).astype(jnp.float32)
    iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
    return jax.lax.stop_gradient(iou)


def _masked_mean(x, valid, denom):
    return jnp.where(valid, x, 0.0).sum() / denom


def sam_loss(mask_logits, iou_pred, targets, valid, *, focal_weight: float = 20.0,
             dice_weight: float = 1.0, iou_weight: float = 1.0,
             supervise_all_iou: bool = True):
    """SAM's loss for one round of prompts.

    Args:
      mask_logits: (..., M, H, W) candidate mask logits (M = 1 or 3), any float dtype.
      iou_pred: (..., M) the IoU head's predictions.
      targets: (..., H, W) bool ground-truth masks at the logits' resolution.
      valid: (...) bool; False entries (padding) contribute nothing.
      supervise_all_iou: regress the IoU of all M candidates (SAM 2's default, so the IoU head
        learns to rank the candidates as inference uses it); else only the chosen one's.

    Per candidate the mask loss is focal_weight * focal + dice_weight * dice; with M > 1 only
    the lowest-loss candidate's mask loss is used (gradient flows only into it). The total is the
    mean over valid entries of mask loss + iou_weight * IoU MSE; 0 if no entry is valid.

    Returns:
      (loss, metrics): loss a float32 scalar; metrics 'focal', 'dice' (of the chosen masks,
      unweighted), 'iou_mse' (the IoU loss as used), 'iou' (actual IoU of the chosen masks),
      all means over valid entries, and 'num_valid'.
    """
    mask_logits = jnp.asarray(mask_logits, jnp.float32)
    iou_pred = jnp.asarray(iou_pred, jnp.float32)
    targets = jnp.asarray(targets).astype(bool)[..., None, :, :]  # broadcast over M
    valid = jnp.asarray(valid).astype(bool)

    focal = sigmoid_focal_loss(mask_logits, targets)  # (..., M)
    dice = dice_loss(mask_logits, targets)  # (..., M)
    actual_iou = mask_iou(mask_logits, targets)  # (..., M)
    mask_loss = focal_weight * focal + dice_weight * dice

    best = jnp.argmin(jax.lax.stop_gradient(mask_loss), axis=-1)[..., None]  # (..., 1)

    def chosen(x):
        return jnp.take_along_axis(x, best, axis=-1)[..., 0]

    iou_sq_err = (iou_pred - actual_iou) ** 2
    iou_loss = iou_sq_err.mean(-1) if supervise_all_iou else chosen(iou_sq_err)
    per_entry = chosen(mask_loss) + iou_weight * iou_loss

    num_valid = valid.astype(jnp.float32).sum()
    denom = jnp.maximum(num_valid, 1.0)
    loss = _masked_mean(per_entry, valid, denom)
    metrics = {
        "focal": _masked_mean(chosen(focal), valid, denom),
        "dice": _masked_mean(chosen(dice), valid, denom),
        "iou_mse": _masked_mean(iou_loss, valid, denom),
        "iou": _masked_mean(chosen(actual_iou), valid, denom),
        "num_valid": num_valid,
    }
    return loss, metrics
