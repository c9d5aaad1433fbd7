"""The DINOv2 encoder's detail branch (`Dinov2EncoderConfig.detail_layer`, HQ-SAM's early-layer
fusion): its features ride in the image embedding after SAM's 256 channels and are added to the
mask decoder's 4x-upscaled features. Tested: the config, the backbone's layout, the pixel each
sub-pixel feature lands on, that a new branch changes nothing until trained, the clear errors,
and the training tools' detail cache."""

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import configs
from sam_jax.modeling import Sam
from random_weights import random_variables  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
from train_default_model import FeatureCache  # noqa: E402


def _small(detail_layer=0):
    tiny = configs.tiny()
    return configs.SamConfig(image_encoder=configs.Dinov2EncoderConfig(
        img_size=56, depth=3, embed_dim=32, num_heads=2, num_positions=25, out_chans=32,
        detail_layer=detail_layer),
        prompt_encoder=tiny.prompt_encoder, mask_decoder=tiny.mask_decoder)


def _pixels(n=1, seed=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 56, 56, 3)), jnp.float32)


def _with_branch(plain_vars, cfg, seed=5, zero=False):
    """plain_vars (a model without the branch) plus a detail branch, random or as trained
    from zero."""
    branch = random_variables(cfg, seed)["params"]["image_encoder"]["neck.detail"]
    if zero:
        branch = dict(branch, up1={k: np.zeros_like(v) for k, v in branch["up1"].items()})
    params = dict(plain_vars["params"])
    params["image_encoder"] = dict(params["image_encoder"], **{"neck.detail": branch})
    return dict(plain_vars, params=params)


def test_config_checks_and_round_trips():
    cfg = _small(2)
    assert cfg.image_encoder.feature_channels == 64
    assert cfg.image_encoder.detail_channels == 16 * 4  # 4x4 sub-pixels x out_chans / 8
    assert cfg.embedding_channels == 32 + 64 and _small().embedding_channels == 32
    assert configs.vit_b().embedding_channels == 256
    assert configs.SamConfig.from_json(cfg.to_json()) == cfg
    old = configs.dinov2_s().to_dict()
    del old["image_encoder"]["detail_layer"]  # a config saved before the option
    assert configs.SamConfig.from_dict(old).image_encoder.detail_layer == 0
    for bad in (-1, 3, 12):
        with pytest.raises(ValueError, match="detail_layer"):
            configs.Dinov2EncoderConfig(depth=3, detail_layer=bad)


def test_backbone_appends_the_detail_blocks_stream():
    plain_cfg, cfg = _small(), _small(2)
    variables = random_variables(plain_cfg, seed=1)
    pixels = _pixels(2)
    plain = Sam(plain_cfg).apply(variables, pixels, method="backbone_features")
    both = Sam(cfg).apply(variables, pixels, method="backbone_features")
    detail = Sam(cfg).apply(variables, pixels, method="detail_features")
    assert plain.shape == (2, 4, 4, 32) and both.shape == (2, 4, 4, 64)
    np.testing.assert_array_equal(np.asarray(both[..., :32]), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(both[..., 32:]), np.asarray(detail), rtol=0,
                               atol=1e-6)
    # block 2's stream, not the last block's nor its layer norm
    assert float(jnp.abs(detail - plain).max()) > 0.1


def test_a_new_branch_changes_nothing_until_trained():
    plain_cfg, cfg = _small(), _small(2)
    plain_vars = random_variables(plain_cfg, seed=1)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    outs = []
    for c, v in ((plain_cfg, plain_vars), (cfg, _with_branch(plain_vars, cfg, zero=True)),
                 (cfg, _with_branch(plain_vars, cfg))):
        model = sam_jax.SamModel(c, v)
        assert ("detail branch from block 2" in repr(model)) == bool(c.image_encoder.detail_layer)
        predictor = sam_jax.SamPredictor(model)
        predictor.set_image(image)
        assert predictor.get_image_embedding().shape == (1, c.embedding_channels, 4, 4)
        outs.append(predictor.predict(point_coords=np.array([[20.0, 15.0]]),
                                      point_labels=np.array([1]), return_logits=True))
    for a, b in zip(outs[0], outs[1]):  # equal but for the compiler's rounding order
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())
    assert np.abs(outs[2][2] - outs[0][2]).max() > 1e-3  # a trained branch does act
    np.testing.assert_array_equal(outs[2][1], outs[0][1])  # on the masks, not the IoUs' input


def _to_sub_pixels(dense):
    """(h*4, w*4, C) -> (h, w, 2, 2, 2, 2, C) with [i, j, a, c, d, e] = pixel
    (4i + 2a + d, 4j + 2c + e): the decoder's layout of its upscaled features."""
    H, W, C = dense.shape
    x = dense.reshape(H // 4, 2, 2, W // 4, 2, 2, C)  # i, a, d, j, c, e
    return x.transpose(0, 3, 1, 4, 2, 5, 6)


def test_each_sub_pixel_feature_lands_on_its_pixel():
    """A detail feature at one pixel of the upscaled grid changes the masks at that pixel
    only: the branch's layout is the decoder's."""
    cfg = _small(2)
    variables = random_variables(cfg, seed=3)
    model = Sam(cfg)
    emb = model.apply(variables, _pixels(), method="embed_image")[..., :32]
    coords = jnp.array([[[20.0, 12.0]]])
    sparse = model.apply(variables, coords, jnp.array([[1]]), method="encode_tokens")
    dense = model.apply(variables, 1, method="no_mask_dense")
    zero = np.zeros((16, 16, 4), np.float32)
    base = model.apply(variables, jnp.concatenate([emb, jnp.zeros((1, 4, 4, 64))], -1),
                       sparse, dense, method="decode_all")[0]
    for r, c in ((0, 0), (5, 9), (14, 3)):
        one = zero.copy()
        one[r, c] = 10.0
        detail = _to_sub_pixels(one).reshape(1, 4, 4, 64)
        masks = model.apply(variables, jnp.concatenate([emb, jnp.asarray(detail)], -1),
                            sparse, dense, method="decode_all")[0]
        changed = np.argwhere(np.abs(np.asarray(masks - base)).max(axis=(0, 1)) > 1e-6)
        assert changed.tolist() == [[r, c]]


def test_branch_output_is_two_transposed_convolutions():
    """DetailBranch against a direct numpy computation of its layers on the dense grid (each
    2x2/stride-2 transposed convolution writes pixel (2i + a, 2j + c) from input (i, j))."""
    from sam_jax.modeling.dinov2_encoder import DetailBranch

    p = random_variables(_small(2), seed=4)["params"]["image_encoder"]["neck.detail"]
    x = np.random.default_rng(1).normal(size=(1, 3, 2, 32)).astype(np.float32)
    out = np.asarray(DetailBranch(4).apply({"params": p}, jnp.asarray(x)))
    assert out.shape == (1, 3, 2, 2, 2, 2, 2, 4)

    def norm(y, q):
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def up(y, q):  # (H, W, i) -> (2H, 2W, o)
        k = q["kernel"]
        H, W, _ = y.shape
        z = np.zeros((2 * H, 2 * W, k.shape[-1]), np.float32)
        for a in range(2):
            for c in range(2):
                z[a::2, c::2] = y @ k[a, c] + q["bias"]
        return z

    from scipy.special import erf
    y = up(norm(x[0], p["norm_in"]), p["up0"])
    y = norm(y, p["norm_mid"])
    y = up(0.5 * y * (1 + erf(y / np.sqrt(2))), p["up1"])
    np.testing.assert_allclose(out[0], _to_sub_pixels(y), rtol=1e-4, atol=1e-5)


def test_wrong_embedding_or_features_are_clear_errors():
    cfg = _small(2)
    variables = random_variables(cfg, seed=1)
    model = Sam(cfg)
    with pytest.raises(ValueError, match="backbone features have 32 channels.*takes 64"):
        model.apply(variables, jnp.zeros((1, 4, 4, 32)), method="embed_features")
    sparse = model.apply(variables, jnp.zeros((1, 1, 2)), jnp.ones((1, 1), jnp.int32),
                         method="encode_tokens")
    dense = model.apply(variables, 1, method="no_mask_dense")
    with pytest.raises(ValueError, match="embeddings have 32 channels.*takes 96"):
        model.apply(variables, jnp.zeros((1, 4, 4, 32)), sparse, dense, True, method="decode")


def test_feature_cache_appends_the_detail_cache(tmp_path):
    from detail_cache import detail_path

    cache, detail = tmp_path / "cache", tmp_path / "detail"
    cache.mkdir()
    detail.mkdir()
    names = np.array(["horse/a#0", "davis/b#0"])
    for i in range(2):
        np.savez(cache / f"train_{i:04d}.npz",
                 features=np.full((2, 2, 2, 3), i, np.float16),
                 masks=np.packbits(np.ones((2, 1, 16, 16), bool), axis=-1),
                 boxes=np.ones((2, 1, 4), np.float32), mask_valid=np.ones((2, 1), bool),
                 input_size=np.full((2, 2), 448, np.int32), names=names)
    assert detail_path(str(detail), str(cache / "train_0001.npz")).endswith("detail_0001.npz")
    np.savez(detail / "detail_0000.npz", detail=np.full((2, 2, 2, 3), 7, np.float16),
             names=names, layer=3)
    merged = FeatureCache(str(cache), detail=str(detail))
    assert merged.detail_layer() == 3
    assert merged.rescan() == 1  # shard 1 waits for its detail file
    assert merged.arrays["features"].shape == (2, 2, 2, 6)
    np.testing.assert_array_equal(merged.arrays["features"][..., 3:], 7)
    np.testing.assert_array_equal(merged.arrays["features"][..., :3], 0)
    np.savez(detail / "detail_0001.npz", detail=np.full((2, 2, 2, 3), 8, np.float16),
             names=names[::-1], layer=3)
    with pytest.raises(SystemExit, match="views are not"):
        merged.rescan()
    assert FeatureCache(str(cache)).detail_layer() == 0
    with pytest.raises(SystemExit, match="no detail_"):
        FeatureCache(str(cache), detail=str(tmp_path)).detail_layer()
