"""sam_jax.training.losses: hand-computed values, optax's focal loss, argmin selection,
padding (valid=False) ignored."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_jax.training import losses

LOGITS = np.array([[2.0, -1.0], [0.0, 3.0]], np.float32)
TARGETS = np.array([[True, False], [True, False]])


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_focal_matches_optax_and_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 7)).astype(np.float32) * 3
    targets = rng.random((3, 2, 5, 7)) < 0.4
    ours = losses.sigmoid_focal_loss(logits, targets)
    ref = optax.sigmoid_focal_loss(logits, targets.astype(np.float32), alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(ours, ref.mean((-2, -1)), rtol=1e-5, atol=1e-7)
    assert ours.shape == (3, 2)

    # 2x2 by hand: per pixel alpha_t * (1 - p_t)^2 * -log(p_t).
    p = _sig(LOGITS.astype(np.float64))
    t = TARGETS.astype(np.float64)
    p_t = np.where(t > 0, p, 1 - p)
    a_t = np.where(t > 0, 0.25, 0.75)
    want = np.mean(a_t * (1 - p_t) ** 2 * -np.log(p_t))
    np.testing.assert_allclose(losses.sigmoid_focal_loss(LOGITS, TARGETS), want, rtol=1e-6)


def test_focal_bf16_logits_computed_in_f32():
    out = losses.sigmoid_focal_loss(jnp.asarray(LOGITS, jnp.bfloat16), TARGETS)
    assert out.dtype == jnp.float32


def test_dice_hand():
    p = _sig(LOGITS.astype(np.float64))
    t = TARGETS.astype(np.float64)
    want = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    np.testing.assert_allclose(losses.dice_loss(LOGITS, TARGETS), want, rtol=1e-6)
    # Perfect, confident prediction: dice -> 0.
    big = np.where(TARGETS, 50.0, -50.0)
    np.testing.assert_allclose(losses.dice_loss(big, TARGETS), 0.0, atol=1e-6)


def test_mask_iou():
    # pred = logits > 0 = [[1, 0], [0, 1]]; target [[1, 0], [1, 0]]: inter 1, union 3.
    np.testing.assert_allclose(losses.mask_iou(LOGITS, TARGETS), 1 / 3, rtol=1e-6)
    empty = np.zeros((2, 2), bool)
    np.testing.assert_allclose(losses.mask_iou(-np.ones((2, 2)), empty), 1.0)
    np.testing.assert_allclose(losses.mask_iou(np.ones((2, 2)), empty), 0.0)
    g = jax.grad(lambda x: losses.mask_iou(x, TARGETS).sum())(jnp.asarray(LOGITS))
    np.testing.assert_array_equal(g, 0.0)


def _hand_sam_loss(logits, iou_pred, target, supervise_all):
    """One entry by hand with numpy: returns (loss, focal, dice, iou_mse, iou)."""
    f = np.array([float(losses.sigmoid_focal_loss(m, target)) for m in logits])
    d = np.array([float(losses.dice_loss(m, target)) for m in logits])
    iou = np.array([np.logical_and(m > 0, target).sum() / max(np.logical_or(m > 0, target).sum(), 1)
                    if np.logical_or(m > 0, target).any() else 1.0 for m in logits])
    ml = 20 * f + d
    k = int(np.argmin(ml))
    se = (iou_pred - iou) ** 2
    il = se.mean() if supervise_all else se[k]
    return ml[k] + il, f[k], d[k], il, iou[k]


@pytest.mark.parametrize("supervise_all", [True, False])
def test_sam_loss_hand(supervise_all):
    rng = np.random.default_rng(1)
    b, m, h, w = 4, 3, 6, 5
    logits = (rng.normal(size=(b, m, h, w)) * 2).astype(np.float32)
    target = rng.random((b, h, w)) < 0.5
    iou_pred = rng.random((b, m)).astype(np.float32)
    valid = np.array([True, False, True, True])
    loss, met = losses.sam_loss(logits, iou_pred, target, valid, supervise_all_iou=supervise_all)
    per = np.array([_hand_sam_loss(logits[i], iou_pred[i], target[i], supervise_all)
                    for i in range(b) if valid[i]])
    np.testing.assert_allclose(loss, per[:, 0].mean(), rtol=1e-5)
    for j, name in enumerate(["focal", "dice", "iou_mse", "iou"], start=1):
        np.testing.assert_allclose(met[name], per[:, j].mean(), rtol=1e-5, err_msg=name)
    assert float(met["num_valid"]) == 3


def test_sam_loss_single_mask_and_extra_batch_dims():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 1, 4, 4)).astype(np.float32)
    target = rng.random((2, 3, 4, 4)) < 0.5
    iou_pred = rng.random((2, 3, 1)).astype(np.float32)
    loss, _ = losses.sam_loss(logits, iou_pred, target, np.ones((2, 3), bool))
    per = [_hand_sam_loss(logits[i, j], iou_pred[i, j], target[i, j], True)[0]
           for i in range(2) for j in range(3)]
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-5)


def test_sam_loss_gradient_only_into_chosen_mask():
    rng = np.random.default_rng(3)
    target = rng.random((2, 8, 8)) < 0.5
    good = np.where(target, 4.0, -4.0)
    logits = np.stack([rng.normal(size=(2, 8, 8)), good, rng.normal(size=(2, 8, 8))], 1)
    logits = jnp.asarray(logits, jnp.float32)  # (2, 3, 8, 8): mask 1 is best for both entries
    iou_pred = jnp.full((2, 3), 0.5)
    valid = jnp.ones((2,), bool)

    g = jax.grad(lambda x: losses.sam_loss(x, iou_pred, target, valid)[0])(logits)
    assert np.abs(np.asarray(g[:, 1])).max() > 0
    np.testing.assert_array_equal(g[:, 0], 0.0)
    np.testing.assert_array_equal(g[:, 2], 0.0)
    # The IoU head gets gradient for all 3 masks with supervise_all_iou, only the chosen without.
    gi = jax.grad(lambda p: losses.sam_loss(logits, p, target, valid)[0])(iou_pred)
    assert np.all(np.asarray(gi) != 0)
    gi = jax.grad(lambda p: losses.sam_loss(logits, p, target, valid,
                                            supervise_all_iou=False)[0])(iou_pred)
    np.testing.assert_array_equal(gi[:, [0, 2]], 0.0)
    assert np.all(np.asarray(gi[:, 1]) != 0)


def test_sam_loss_invalid_entries_ignored():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 3, 6, 6)).astype(np.float32)
    target = rng.random((3, 6, 6)) < 0.5
    iou_pred = rng.random((3, 3)).astype(np.float32)
    valid = np.array([True, False, True])
    ref = losses.sam_loss(logits, iou_pred, target, valid)
    logits2, iou2, target2 = logits.copy(), iou_pred.copy(), target.copy()
    logits2[1] = 1e4
    iou2[1] = -7.0
    target2[1] = ~target2[1]
    out = losses.sam_loss(logits2, iou2, target2, valid)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref, out)
    g = jax.grad(lambda x: losses.sam_loss(x, iou_pred, target, valid)[0])(jnp.asarray(logits))
    np.testing.assert_array_equal(g[1], 0.0)


def test_sam_loss_all_invalid_no_nan():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 3, 4, 4)), jnp.bfloat16)
    target = rng.random((2, 4, 4)) < 0.5
    iou_pred = jnp.asarray(rng.random((2, 3)), jnp.bfloat16)
    valid = np.zeros((2,), bool)
    loss, met = losses.sam_loss(logits, iou_pred, target, valid)
    assert loss.dtype == jnp.float32
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in met.values())
    g = jax.grad(lambda x: losses.sam_loss(x, iou_pred, target, valid)[0])(logits)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)
