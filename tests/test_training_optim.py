"""sam_jax.training.optim: schedule values, layer-wise lr decay scales, weight-decay mask, frozen
params (no update, no state), a hand-written AdamW step, the paper's presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.training import optim


def tiny_tree():
    f = np.float32
    return {
        "image_encoder": {
            "patch_embed": {"proj": {"kernel": np.full((2, 2, 1, 3), 0.5, f),
                                     "bias": np.full((3,), 0.1, f)}},
            "pos_embed": np.full((1, 2, 2, 3), 0.2, f),
            "blocks.0": {"norm1": {"scale": np.ones((3,), f), "bias": np.zeros((3,), f)},
                         "attn": {"qkv": {"kernel": np.full((3, 9), 0.3, f)},
                                  "rel_pos_h": np.full((3, 1), 0.4, f)}},
            "blocks.1": {"mlp": {"lin1": {"kernel": np.full((3, 4), -0.3, f),
                                          "bias": np.zeros((4,), f)}}},
            "neck.0": {"kernel": np.full((1, 1, 3, 2), 0.7, f)},
        },
        "prompt_encoder": {"point_embeddings.0": {"embedding": np.full((1, 2), 0.6, f)}},
        "mask_decoder": {"lin": {"kernel": np.full((2, 2), -0.5, f), "bias": np.ones((2,), f)}},
    }


def test_schedule():
    cfg = optim.OptimConfig(peak_lr=1.0, total_steps=100, decay_steps=(60, 80), warmup_steps=10)
    s = optim.learning_rate_schedule(cfg)
    got = [float(s(i)) for i in (0, 5, 10, 30, 59, 60, 79, 80, 99)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    h = optim.learning_rate_schedule(optim.PRESETS["vit_h"])
    np.testing.assert_allclose(
        [float(h(i)) for i in (0, 125, 250, 59_999, 60_000, 86_665, 86_666, 89_999)],
        [0, 4e-4, 8e-4, 8e-4, 8e-5, 8e-5, 8e-6, 8e-6], rtol=1e-5)
    z = optim.learning_rate_schedule(dataclasses.replace(cfg, warmup_steps=0))
    np.testing.assert_allclose([float(z(i)) for i in (0, 59, 60, 80)], [1, 1, 0.1, 0.01],
                               rtol=1e-6)


def test_layer_scales_tiny_tree():
    s = optim.layer_scales(tiny_tree(), 0.5)  # depth 2: ids 0, 1, 2, 3 -> 0.5**3, **2, **1, 1
    enc = s["image_encoder"]
    assert enc["patch_embed"]["proj"]["kernel"] == enc["patch_embed"]["proj"]["bias"] == 0.125
    assert enc["pos_embed"] == 0.125
    assert enc["blocks.0"]["norm1"]["scale"] == enc["blocks.0"]["attn"]["rel_pos_h"] == 0.25
    assert enc["blocks.1"]["mlp"]["lin1"]["kernel"] == 0.5
    assert enc["neck.0"]["kernel"] == 1.0
    assert s["prompt_encoder"]["point_embeddings.0"]["embedding"] == 1.0
    assert s["mask_decoder"]["lin"]["bias"] == 1.0


def test_layer_scales_real_tree():
    params = jax.eval_shape(lambda: sam_jax.init_variables(sam_jax.tiny(),
                                                           jax.random.key(0))["params"])
    depth = sum(k.startswith("blocks.") for k in params["image_encoder"])
    s = optim.layer_scales(params, 0.8)
    assert s["image_encoder"]["pos_embed"] == pytest.approx(0.8 ** (depth + 1))
    assert s["image_encoder"][f"blocks.{depth - 1}"]["norm1"]["scale"] == pytest.approx(0.8)
    assert set(jax.tree.leaves(s["mask_decoder"])) == {1.0}
    assert set(jax.tree.leaves(s["image_encoder"]["neck.0"])) == {1.0}


def test_weight_decay_mask():
    m = optim.weight_decay_mask(tiny_tree())
    enc = m["image_encoder"]
    assert enc["patch_embed"]["proj"]["kernel"] and not enc["patch_embed"]["proj"]["bias"]
    assert not enc["pos_embed"]
    assert not enc["blocks.0"]["norm1"]["scale"] and not enc["blocks.0"]["norm1"]["bias"]
    assert enc["blocks.0"]["attn"]["qkv"]["kernel"]
    assert not enc["blocks.0"]["attn"]["rel_pos_h"]
    assert enc["neck.0"]["kernel"]
    assert not m["prompt_encoder"]["point_embeddings.0"]["embedding"]
    assert m["mask_decoder"]["lin"]["kernel"] and not m["mask_decoder"]["lin"]["bias"]


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def test_frozen_params_unchanged_and_stateless():
    params = sam_jax.init_variables(sam_jax.tiny(), jax.random.key(0))["params"]
    cfg = optim.PRESETS["finetune"]
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths and not any("image_encoder" in p for p in paths)
    n_train = len(jax.tree.leaves(params)) - len(jax.tree.leaves(params["image_encoder"]))
    assert sum(".mu" in p for p in paths) == sum(".nu" in p for p in paths) == n_train

    update = jax.jit(tx.update)
    p = params
    for i in range(3):
        u, state = update(_grads(p, i), state, p)
        p = optax.apply_updates(p, u)
    jax.tree.map(np.testing.assert_array_equal, p["image_encoder"], params["image_encoder"])
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), p["mask_decoder"],
                           params["mask_decoder"])
    assert all(jax.tree.leaves(changed))


def test_make_optimizer_on_abstract_params():
    params = jax.eval_shape(lambda: sam_jax.init_variables(sam_jax.tiny(),
                                                           jax.random.key(0))["params"])
    tx = optim.make_optimizer(optim.PRESETS["tiny"], params)
    state = jax.eval_shape(tx.init, params)
    assert len(jax.tree.leaves(state)) > 0


def test_adamw_step_by_hand():
    params = tiny_tree()
    cfg = optim.OptimConfig(peak_lr=1e-2, total_steps=10, decay_steps=(8, 9), warmup_steps=2,
                            weight_decay=0.1, layer_decay=0.5, b1=0.8, b2=0.95, eps=1e-6,
                            freeze=("mask_decoder",))
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    path = ("image_encoder", "blocks.0", "attn", "qkv", "kernel")  # layer 1 of 2: scale 0.25

    def leaf(t):
        for k in path:
            t = t[k]
        return np.asarray(t, np.float64)

    p = params
    w = leaf(params)
    m = v = np.zeros_like(w)
    for t in range(1, 4):
        g_tree = _grads(p, t)
        u, state = tx.update(g_tree, state, p)
        p = optax.apply_updates(p, u)
        g = leaf(g_tree)
        lr = cfg.peak_lr * min((t - 1) / cfg.warmup_steps, 1.0)
        m = cfg.b1 * m + (1 - cfg.b1) * g
        v = cfg.b2 * v + (1 - cfg.b2) * g * g
        mh, vh = m / (1 - cfg.b1 ** t), v / (1 - cfg.b2 ** t)
        want_u = -lr * 0.25 * (mh / (np.sqrt(vh) + cfg.eps) + cfg.weight_decay * w)
        np.testing.assert_allclose(leaf(u), want_u, rtol=1e-5, atol=1e-9)
        w = w + want_u
    np.testing.assert_allclose(leaf(p), w, rtol=1e-5)
    np.testing.assert_array_equal(p["mask_decoder"]["lin"]["kernel"],
                                  params["mask_decoder"]["lin"]["kernel"])


def test_weight_decay_applied_only_where_masked():
    params = tiny_tree()
    cfg = optim.OptimConfig(peak_lr=1.0, total_steps=10, decay_steps=(), warmup_steps=0,
                            weight_decay=0.5)
    tx = optim.make_optimizer(cfg, params)
    zeros = jax.tree.map(np.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)  # zero grads: update = -lr * wd * p * mask
    mask = optim.weight_decay_mask(params)
    jax.tree.map(lambda uu, pp, mm: np.testing.assert_allclose(uu, -0.5 * pp * mm, rtol=1e-6),
                 u, params, mask)


def test_grad_clip_over_trainable_only():
    params = tiny_tree()
    # eps=1 makes Adam's first step depend on the gradient's scale: u = -g / (|g| + 1).
    cfg = optim.OptimConfig(peak_lr=1.0, total_steps=10, decay_steps=(), warmup_steps=0,
                            weight_decay=0.0, grad_clip=1e-3, eps=1.0, freeze=("image_encoder",))
    tx = optim.make_optimizer(cfg, params)
    g = _grads(params, 0)
    g_big = dict(g, image_encoder=jax.tree.map(lambda x: x * 1e6, g["image_encoder"]))
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = tx.update(g_big, tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    trainable = {k: g[k] for k in ("prompt_encoder", "mask_decoder")}
    clipped = jax.tree.map(lambda x: x * 1e-3 / optax.tree.norm(trainable), trainable)
    want = jax.tree.map(lambda x: -x / (jnp.abs(x) + 1.0), clipped)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 {k: u1[k] for k in trainable}, want)


def test_presets():
    h, large, b = (optim.PRESETS[k] for k in ("vit_h", "vit_l", "vit_b"))
    assert (h.peak_lr, large.peak_lr, b.peak_lr) == (8e-4, 4e-4, 8e-4)
    assert (h.drop_path, large.drop_path, b.drop_path) == (0.4, 0.4, 0.6)
    assert (h.layer_decay, large.layer_decay, b.layer_decay) == (0.8, 0.8, 0.6)
    assert (h.batch_size, large.batch_size, b.batch_size) == (256, 128, 128)
    assert h.total_steps == 90_000 and h.decay_steps == (60_000, 86_666)
    assert large.total_steps == b.total_steps == 180_000
    assert large.decay_steps == b.decay_steps == (120_000, 173_332)
    for c in (h, large, b):
        assert (c.b1, c.b2, c.warmup_steps, c.weight_decay, c.freeze) == (
            0.9, 0.999, 250, 0.1, ())
    ft = optim.PRESETS["finetune"]
    assert ft.freeze == ("image_encoder",) and ft.layer_decay == 1.0 and ft.warmup_steps == 250
