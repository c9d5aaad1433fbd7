"""Per-channel int8 weights (sam_jax/checkpoints/quantize.py) and their checkpoint round trip."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import configs
from sam_jax.checkpoints import load_converted, save_converted
from sam_jax.checkpoints.quantize import (BACKBONE_KERNELS, SCALES, dequantize_variables,
                                          quantize, quantize_variables, saved_abstract)
from random_weights import random_variables  # noqa: E402


def _paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}




# ---------------------------------------------------------------------------------------------
# quantize


def test_quantize_round_trip_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 8, 16)).astype(np.float32) * rng.uniform(0.01, 3, 16)
    w[..., 5] = 0.0  # an all-zero output channel
    w[0, 0, 0, 7] = -40.0  # an outlier sets its channel's scale alone
    with np.errstate(all="raise"):  # no division by zero, no invalid value
        q, s = quantize(w)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert s.dtype == np.float32 and s.shape == (16,)
    amax = np.abs(w).max(axis=(0, 1, 2))
    np.testing.assert_allclose(s[amax > 0], amax[amax > 0] / 127, rtol=1e-7, atol=0)
    assert s[5] == 1.0 and (q[..., 5] == 0).all()
    assert np.abs(q.astype(np.int32)).max() <= 127
    # each nonzero channel uses the full range: its largest entry maps to +-127
    assert (np.abs(q.astype(np.int32)).max(axis=(0, 1, 2))[amax > 0] == 127).all()
    assert q[0, 0, 0, 7] == -127

    restored = q.astype(np.float32) * s
    err = np.abs(restored - w)
    bound = s / 2 * (1 + 1e-5)  # rounding to nearest, up to float32 rounding of w / s
    assert (err <= bound).all(), (err / s).max()
    print(f"max error / scale: {(err / s).max():.4f}")
    assert (err / s).max() > 0.45  # the bound is tight, not vacuous
    assert (restored[..., 5] == 0).all()

    # a 2-D kernel: one scale per column
    q2, s2 = quantize(w[0, 0])
    assert s2.shape == (16,) and q2.shape == (8, 16)
    np.testing.assert_array_equal(s2[5], 1.0)
    assert (np.abs(q2.astype(np.float32) * s2 - w[0, 0]) <= s2 / 2 * (1 + 1e-5)).all()


def test_quantize_variables_requires_a_selection():
    with pytest.raises(ValueError, match="no leaf"):
        quantize_variables({"params": {"w": np.ones((2, 2), np.float32)}}, lambda p: False)


# ---------------------------------------------------------------------------------------------
# checkpoint round trip


def _tiny_kernel(path):
    return path.startswith("params/image_encoder/") and path.endswith("/kernel")


def test_save_load_quantized_checkpoint(tmp_path):
    cfg = configs.tiny()
    variables = random_variables(cfg)
    flat = _paths(variables)
    selected = {p for p in flat if _tiny_kernel(p) and flat[p].ndim >= 2}
    assert len(selected) >= 10 and "params/image_encoder/patch_embed/proj/kernel" in selected
    quantized = quantize_variables(variables, lambda p: p in selected)
    assert SCALES in quantized
    qflat = _paths({k: v for k, v in quantized.items() if k != SCALES})
    assert {p for p, v in qflat.items() if v.dtype == np.int8} == selected
    assert set(_paths(quantized[SCALES])) == selected

    # the tree a loader expects, from the model's abstract tree and the scales
    want = _paths(saved_abstract(sam_jax.abstract_variables(cfg), quantized[SCALES]))
    got = _paths(quantized)
    assert set(want) == set(got)
    assert all(tuple(want[p].shape) == tuple(np.shape(got[p]))
               and np.dtype(want[p].dtype) == np.asarray(got[p]).dtype for p in want)

    out = tmp_path / "q"
    save_converted(quantized, cfg, out, metadata={"model_type": "tiny", "source": "test"})
    config, restored = load_converted(out)
    assert config == cfg
    restored = _paths(jax.device_get(restored))
    assert set(restored) == set(flat)  # the scales collection is gone
    expected = _paths(jax.device_get(dequantize_variables(quantized)))
    err = []
    for p, value in restored.items():
        assert value.dtype == np.float32, p
        if p in selected:
            s = _paths(quantized[SCALES])[p]
            ref = np.asarray(qflat[p], np.float32) * s
            np.testing.assert_array_equal(value, ref, err_msg=p)
            np.testing.assert_array_equal(value, expected[p], err_msg=p)
            assert (np.abs(value - flat[p]) <= s / 2 * (1 + 1e-5)).all(), p
            err.append(np.abs(value - flat[p]).max())
        else:
            np.testing.assert_array_equal(value.view(np.uint32), flat[p].view(np.uint32),
                                          err_msg=p)  # bit-identical
    print(f"quantized {len(selected)} kernels, max abs error {max(err):.2e}")

    # the restored model runs
    model = sam_jax.SamModel(config, jax.tree.map(jnp.asarray, jax.device_get(
        load_converted(out)[1])))
    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(np.full((40, 50, 3), 128, np.uint8))
    masks, iou, _ = predictor.predict(point_coords=np.array([[10.0, 10.0]]),
                                      point_labels=np.array([1]))
    assert masks.shape == (3, 40, 50) and np.isfinite(iou).all()


def test_backbone_kernels_selects_only_dinov2_backbone_kernels():
    abstract = _paths(sam_jax.abstract_variables(configs.dinov2_s()))
    chosen = {p for p in abstract if BACKBONE_KERNELS(p)}
    per_layer = {"attention/attention.query", "attention/attention.key",
                 "attention/attention.value", "attention/output.dense", "mlp.fc1", "mlp.fc2"}
    expected = {f"params/image_encoder/encoder.layer.{i}/{m}/kernel"
                for i in range(12) for m in per_layer}
    expected.add("params/image_encoder/embeddings/patch_embeddings.projection/kernel")
    assert chosen == expected and len(chosen) == 73
    assert all(abstract[p].ndim >= 2 for p in chosen)
    # never the neck, the prompt encoder, the decoder, biases, norms, or position tables
    for p in abstract:
        if (re.search(r"/neck\.|prompt_encoder|mask_decoder|/bias$|/scale$|lambda1|"
                      r"position_embeddings|cls_token", p)):
            assert p not in chosen, p
    assert {"params/image_encoder/neck.0/kernel", "params/image_encoder/neck.2/kernel"} <= (
        set(abstract) - chosen)
    # every other float leaf of the backbone is small: what stays float32
    backbone = [p for p in abstract if p.startswith("params/image_encoder/")
                and "/neck." not in p]
    kept = sum(int(np.prod(abstract[p].shape)) for p in backbone if p not in chosen)
    total = sum(int(np.prod(abstract[p].shape)) for p in backbone)
    assert kept / total < 0.05, kept / total
