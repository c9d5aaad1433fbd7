"""Training on cached backbone features: the click simulation on a 3.5 px low-res grid with
fewer click rounds, and the loss/gradients of a features batch through the neck and the
decoder only."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import configs
from sam_jax.modeling import PAD_LABEL
from sam_jax.training import simulation as sim
from random_weights import random_variables  # noqa: E402


def _paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}




# ---------------------------------------------------------------------------------------------
# Simulation on a 3.5 px grid with 3 click rounds

CELL = 3.5
SIDE = 16  # low-res side of a 56 px input (4x4 embedding)
S = 56


def test_click_schedule_three_rounds():
    keys = jax.random.split(jax.random.key(0), 200)
    sched = np.asarray(jax.vmap(lambda k: sim.click_schedule(k, 3))(keys))
    assert sched.shape == (200, 5) and sched.dtype == bool
    assert (sched.sum(axis=1) == 3).all()
    assert not sched[:, -1].any()
    quiet = np.argmin(sched[:, :-1], axis=1)
    assert set(quiet.tolist()) == {0, 1, 2, 3}  # the other quiet round, anywhere before it
    one = np.asarray(sim.click_schedule(jax.random.key(3), 3))
    assert one.shape == (5,) and one.sum() == 3 and not one[-1]


def _batch(rng, p, sizes=None):
    """Rectangle masks on the 16x16 grid inside images of odd sizes (or the given (p, 2)
    sizes), their boxes (input frame) and sizes (h, w)."""
    gt = np.zeros((p, SIDE, SIDE), bool)
    boxes = np.zeros((p, 4), np.float32)
    sizes = np.zeros((p, 2), np.int32) if sizes is None else np.asarray(sizes, np.int32)
    for i in range(p):
        h, w = rng.integers(30, S + 1, size=2) if not sizes[i].any() else sizes[i]
        sizes[i] = (h, w)
        rows, cols = int(np.ceil(h / CELL)), int(np.ceil(w / CELL))  # cells touching the image
        y0, x0 = rng.integers(0, rows - 3), rng.integers(0, cols - 3)
        y1, x1 = rng.integers(y0 + 1, rows), rng.integers(x0 + 1, cols)
        gt[i, y0:y1, x0:x1] = True
        boxes[i] = (CELL * x0, CELL * y0, min(CELL * x1, w), min(CELL * y1, h))
    return gt, boxes, sizes


def test_simulation_on_a_3p5_px_grid_with_three_click_rounds():
    rng = np.random.default_rng(1)
    p = 48
    gt, boxes, sizes = _batch(rng, p)
    base = jnp.asarray(rng.normal(size=(p, 4, SIDE, SIDE)), jnp.float32)
    valid = jnp.asarray([True] * (p - 2) + [False] * 2)
    rounds = []

    def record(coords, labels):
        rounds.append((np.asarray(coords), np.asarray(labels)))

    def decode(coords, labels, mask_logits):
        jax.debug.callback(record, coords, labels, ordered=True)
        m = 3.0 * base + 0.01 * coords.sum(axis=(1, 2))[:, None, None, None]
        if mask_logits is not None:
            m = m + 0.5 * mask_logits[:, None]
        return m, jax.nn.sigmoid(base.mean(axis=(2, 3)))

    out = sim.simulate(decode, jax.random.key(2), jnp.asarray(gt), jnp.asarray(boxes), valid,
                       jnp.asarray(sizes), remat_rounds=False, cell=CELL, click_rounds=3)
    jax.effects_barrier()
    assert len(rounds) == 1 + 3 + 2  # round 0, then 5 rounds of which 3 add a click
    assert np.isfinite(float(out.loss)) and float(out.loss) > 0
    clicks = float(out.metrics["clicks"])
    assert 0 < clicks <= 3
    print(f"loss {float(out.loss):.4f}, clicks per prompt {clicks:.2f}")

    coords, labels = rounds[-1]
    assert coords.shape == (p, sim.NUM_TOKENS, 2)
    h, w = sizes[:, 0], sizes[:, 1]
    # round 0: a point in the mask (positive, with its not-a-point pad) or a box
    point = labels[:, 0] == 1
    assert point.any() and (~point).any()
    assert (labels[point, 1] == -1).all() and (labels[~point, :2] == [2, 3]).all()
    xy = coords[point, 0]
    assert (xy >= 0).all() and (xy[:, 0] < w[point]).all() and (xy[:, 1] < h[point]).all()
    cells = np.floor(xy / CELL).astype(int)
    assert gt[point][np.arange(point.sum()), cells[:, 1], cells[:, 0]].all()
    # the first prompt is what round 0 decoded, kept in the later rounds
    np.testing.assert_array_equal(rounds[0][0][:, :2], coords[:, :2])

    # clicks: at most 3, in order, inside the image, labelled by the truth under their cell
    n = (labels[:, 2:] != PAD_LABEL).sum(axis=1)
    assert n.max() <= 3 and n.sum() > 0
    assert (labels[:, 5:] == PAD_LABEL).all()
    for i in range(p):
        for j in range(n[i]):
            x, y = coords[i, 2 + j]
            assert 0 <= x < w[i] and 0 <= y < h[i], (i, j, x, y, sizes[i])
            cx, cy = int(x // CELL), int(y // CELL)
            assert labels[i, 2 + j] == int(gt[i, cy, cx]), (i, j)
        assert (labels[i, 2 + n[i]:] == PAD_LABEL).all()
    # the clicks come from all over each image, up to its bottom-right cell
    xs = coords[:, 2:, 0][labels[:, 2:] != PAD_LABEL]
    assert xs.max() > 40


def test_first_prompts_and_clicks_respect_odd_sizes_on_the_3p5_grid():
    p = 512
    gt = np.zeros((p, SIDE, SIDE), bool)
    gt[:, 2:6, 3:7] = True
    sizes = np.tile(np.array([[37, 45]], np.int32), (p, 1))  # 37 / 3.5, 45 / 3.5 not whole
    inside = sim._image_region(jnp.asarray(sizes), SIDE, CELL)
    assert np.asarray(inside).sum(axis=(1, 2))[0] == 11 * 13  # ceil(37/3.5) x ceil(45/3.5)
    wrong = jnp.where(jnp.asarray(gt), -5.0, 5.0)  # wrong everywhere, padding included
    start = sim.Prompts(jnp.zeros((p, sim.NUM_TOKENS, 2), jnp.float32),
                        jnp.full((p, sim.NUM_TOKENS), PAD_LABEL, jnp.int32).at[:, :2].set(
                            jnp.array([1, -1])), jnp.zeros((p,), jnp.int32))
    out = sim.add_click(jax.random.key(4), start, wrong, jnp.asarray(gt), inside, True,
                        jnp.asarray(sizes), CELL)
    xy = np.asarray(out.coords)[:, 2]
    assert (np.asarray(out.num_clicks) == 1).all()
    assert (xy >= 0).all() and (xy[:, 0] < 45).all() and (xy[:, 1] < 37).all()
    assert xy[:, 0].max() > 42 and xy[:, 1].max() > 35  # the partial edge cells are used
    cells = np.floor(xy / CELL).astype(int)
    np.testing.assert_array_equal(np.asarray(out.labels)[:, 2],
                                  gt[0][cells[:, 1], cells[:, 0]].astype(np.int32))

    boxes = np.tile(np.array([[3 * CELL, 2 * CELL, 7 * CELL, 6 * CELL]], np.float32), (p, 1))
    prompts, use_box = sim.first_prompts(jax.random.key(5), jnp.asarray(gt), jnp.asarray(boxes),
                                         jnp.asarray(sizes), CELL)
    pts = np.asarray(prompts.coords)[~np.asarray(use_box), 0]
    c = np.floor(pts / CELL).astype(int)
    assert gt[0][c[:, 1], c[:, 0]].all()
    # uniform inside the mask's cells (x in [10.5, 24.5), y in [7, 21))
    assert pts[:, 0].min() >= 10.5 and pts[:, 0].max() < 24.5
    assert pts[:, 0].min() < 11.5 and pts[:, 0].max() > 23.5


def test_simulate_rejects_bad_click_rounds():
    gt = jnp.zeros((1, SIDE, SIDE), bool).at[0, 2:4, 2:4].set(True)
    decode = lambda c, l, m: (jnp.zeros((1, 4, SIDE, SIDE)), jnp.zeros((1, 4)))  # noqa: E731
    for bad in (0, 9):
        with pytest.raises(ValueError, match="click_rounds"):
            sim.simulate(decode, jax.random.key(0), gt, jnp.asarray([[7.0, 7.0, 14.0, 14.0]]),
                         jnp.asarray([True]), jnp.asarray([[S, S]]), cell=CELL,
                         click_rounds=bad)


# ---------------------------------------------------------------------------------------------
# loss_and_metrics on cached backbone features


def _small_dinov2():
    tiny = configs.tiny()
    return configs.SamConfig(
        image_encoder=configs.Dinov2EncoderConfig(img_size=56, depth=1, embed_dim=32,
                                                  num_heads=2, num_positions=16, out_chans=32),
        prompt_encoder=tiny.prompt_encoder, mask_decoder=tiny.mask_decoder)


def _head_params(params):
    """As experiments/train_default_model.py: neck + prompt encoder + mask decoder."""
    enc = {k: v for k, v in params["image_encoder"].items() if k.startswith("neck.")}
    return dict({k: v for k, v in params.items() if k != "image_encoder"}, image_encoder=enc)


def test_loss_on_cached_features_trains_neck_and_decoder_only():
    from sam_jax.training.train_step import StepConfig, loss_and_metrics

    cfg = _small_dinov2()
    assert (cfg.image_embedding_size, cfg.low_res_size, cfg.low_res_stride) == (4, 16, 3.5)
    variables = random_variables(cfg)
    head = _head_params(variables["params"])
    assert set(head["image_encoder"]) == {"neck.0", "neck.1", "neck.2", "neck.3"}
    assert set(head) == {"image_encoder", "prompt_encoder", "mask_decoder"}

    rng = np.random.default_rng(3)
    b, n = 2, 4
    sizes = np.array([[S, S], [S, 49]], np.int32)
    gt, boxes, _ = _batch(rng, b * n, np.repeat(sizes, n, axis=0))
    valid = np.ones((b, n), bool)
    valid[1, 3] = False
    batch = {"features": jnp.asarray(rng.normal(size=(b, 4, 4, 32)), jnp.float32),
             "input_size": jnp.asarray(sizes),
             "masks": jnp.asarray(gt.reshape(b, n, SIDE, SIDE)),
             "boxes": jnp.asarray(boxes.reshape(b, n, 4)),
             "mask_valid": jnp.asarray(valid)}
    step = StepConfig(click_rounds=3, remat_rounds=False)

    def loss_fn(params, batch):
        return jax.value_and_grad(
            lambda p: loss_and_metrics(p, variables["buffers"], batch, jax.random.key(7),
                                       model_config=cfg, step_config=step),
            has_aux=True)(params)

    # XLA's CPU backend optimizations off: the same computation, compiled in half the time
    value_and_grad = jax.jit(loss_fn).lower(head, batch).compile(
        compiler_options={"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True})
    (loss, metrics), grads = value_and_grad(head, batch)
    print(f"features batch: loss {float(loss):.4f}, clicks {float(metrics['clicks']):.2f}")
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert 0 < float(metrics["clicks"]) <= 3
    assert jax.tree.structure(grads) == jax.tree.structure(head)  # no backbone entries
    for name, g in _paths(grads["image_encoder"]).items():
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    # every leaf of the prompt encoder and the decoder gets a gradient, except the
    # hypernetwork MLPs of multimask outputs that no point prompt chose (only the lowest-loss
    # of the 3 is trained, and at random init the same one wins for both point prompts here)
    zero = [p for p, g in _paths(grads).items() if not np.asarray(g).any()]
    print("zero-gradient leaves:", zero)
    assert all(re.match(r"mask_decoder/output_hypernetworks_mlps\.[123]/", p) for p in zero), zero
    chosen = {re.match(r"mask_decoder/output_hypernetworks_mlps\.(\d)/", p).group(1)
              for p in _paths(grads) if "hypernetworks" in p and p not in zero}
    assert "0" in chosen and chosen & {"1", "2", "3"}, chosen  # single and multimask trained

    # the features are the batch's: other features give another loss and other gradients
    other = dict(batch, features=batch["features"][::-1])
    (loss2, _), grads2 = value_and_grad(head, other)
    assert float(loss2) != float(loss)
    assert np.abs(np.asarray(grads2["image_encoder"]["neck.0"]["kernel"])
                  - np.asarray(grads["image_encoder"]["neck.0"]["kernel"])).max() > 0


def test_background_clicks_land_only_where_the_batch_says_nothing_is_annotated():
    # every corrective round a background click: with the view's unannotated cells all False
    # there is nowhere to click; all True, each of the 3 rounds clicks (one compile, two batches)
    from sam_jax.training.train_step import BACKGROUND_KEY, StepConfig, loss_and_metrics

    cfg = _small_dinov2()
    variables = random_variables(cfg)
    head = _head_params(variables["params"])
    rng = np.random.default_rng(4)
    b, n = 2, 2
    sizes = np.full((b, 2), S, np.int32)
    gt, boxes, _ = _batch(rng, b * n, np.repeat(sizes, n, axis=0))
    batch = {"features": jnp.asarray(rng.normal(size=(b, 4, 4, 32)), jnp.float32),
             "input_size": jnp.asarray(sizes),
             "masks": jnp.asarray(gt.reshape(b, n, SIDE, SIDE)),
             "boxes": jnp.asarray(boxes.reshape(b, n, 4)),
             "mask_valid": jnp.ones((b, n), bool)}
    step = StepConfig(click_rounds=3, remat_rounds=False, background_click_prob=1.0)
    clicks = jax.jit(lambda batch: loss_and_metrics(
        head, variables["buffers"], batch, jax.random.key(2), model_config=cfg,
        step_config=step)[1]["clicks"]).lower(
            dict(batch, **{BACKGROUND_KEY: jnp.zeros((b, SIDE, SIDE), bool)})).compile(
        compiler_options={"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True})
    nowhere = clicks(dict(batch, **{BACKGROUND_KEY: jnp.zeros((b, SIDE, SIDE), bool)}))
    anywhere = clicks(dict(batch, **{BACKGROUND_KEY: jnp.ones((b, SIDE, SIDE), bool)}))
    assert float(nowhere) == 0.0 and float(anywhere) == 3.0
