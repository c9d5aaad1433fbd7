"""A converted checkpoint with its backbone in `backbone.safetensors` beside the Orbax
variables (sam_jax/checkpoints/converted.py, `save_converted(separate=...)`)."""

import os
import re

import jax
import numpy as np
import pytest

import sam_jax
from sam_jax import configs
from sam_jax.checkpoints import CheckpointError, load_converted, save_converted
from sam_jax.checkpoints.converted import BACKBONE_FILE
from sam_jax.checkpoints.quantize import (BACKBONE_KERNELS, BACKBONE_LEAVES, SCALES,
                                          quantize_variables)
from safetensors.numpy import load_file, save_file
from random_weights import random_variables  # noqa: E402


def _paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tiny_backbone(path):  # the tiny SAM's ViT without its neck, and the kernels' scales
    return bool(re.fullmatch(rf"({SCALES}/)?params/image_encoder/(?!neck).+", path))


def _quantized_tiny(seed=0):
    cfg = configs.tiny()
    variables = random_variables(cfg, seed=seed)
    kernel = lambda p: p.startswith("params/image_encoder/") and p.endswith("/kernel") \
        and "/neck" not in p  # noqa: E731
    return cfg, quantize_variables(variables, kernel)


def _orbax_bytes(ckpt):
    out = {}
    for root, _, files in os.walk(os.path.join(ckpt, "variables", "ocdbt.process_0", "d")):
        for f in files:
            out[f] = open(os.path.join(root, f), "rb").read()
    return b"".join(sorted(out.values()))


def test_backbone_file_round_trip_is_bit_exact(tmp_path):
    cfg, quantized = _quantized_tiny()
    save_converted(quantized, cfg, tmp_path / "whole", metadata={"model_type": "tiny"})
    save_converted(quantized, cfg, tmp_path / "split", metadata={"model_type": "tiny"},
                   separate=_tiny_backbone)
    assert not (tmp_path / "whole" / BACKBONE_FILE).exists()
    apart = load_file(str(tmp_path / "split" / BACKBONE_FILE))
    flat = _paths(quantized)
    expected = {p for p in flat if _tiny_backbone(p)}
    assert set(apart) == expected and len(expected) > 20
    assert any(p.startswith(SCALES + "/") for p in apart)
    assert not any("/neck" in p or "mask_decoder" in p for p in apart)
    for p, a in apart.items():  # stored as given: int8 kernels stay int8
        assert a.dtype == flat[p].dtype and a.shape == flat[p].shape, p
        np.testing.assert_array_equal(a, flat[p], err_msg=p)

    config, whole = load_converted(tmp_path / "whole")
    config2, split = load_converted(tmp_path / "split")
    assert config == config2 == cfg
    whole, split = _paths(jax.device_get(whole)), _paths(jax.device_get(split))
    assert set(whole) == set(split) and SCALES not in {p.split("/")[0] for p in split}
    for p in whole:
        assert split[p].dtype == np.float32, p
        np.testing.assert_array_equal(split[p].view(np.uint32), whole[p].view(np.uint32),
                                      err_msg=p)


def test_backbone_file_bytes_depend_only_on_the_backbone(tmp_path):
    cfg, quantized = _quantized_tiny()
    retrained = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 1 if "mask_decoder" in jax.tree_util.keystr(path) else leaf,
        quantized)
    for name, tree in (("a", quantized), ("b", quantized), ("c", retrained)):
        save_converted(tree, cfg, tmp_path / name, separate=_tiny_backbone)
    backbone = {n: (tmp_path / n / BACKBONE_FILE).read_bytes() for n in "abc"}
    assert backbone["a"] == backbone["b"] == backbone["c"]
    # Orbax's own files differ even for the same arrays: why the backbone is kept out of them
    assert _orbax_bytes(tmp_path / "a") != _orbax_bytes(tmp_path / "c")
    got = _paths(jax.device_get(load_converted(tmp_path / "c")[1]))
    np.testing.assert_array_equal(
        got["params/mask_decoder/iou_token/embedding"],
        np.asarray(quantized["params"]["mask_decoder"]["iou_token"]["embedding"]) + 1)


def test_overwrite_without_separate_removes_the_backbone_file(tmp_path):
    cfg, quantized = _quantized_tiny()
    out = tmp_path / "ckpt"
    save_converted(quantized, cfg, out, separate=_tiny_backbone)
    (out / "notes.txt").write_text("mine")
    save_converted(quantized, cfg, out, overwrite=True)
    assert not (out / BACKBONE_FILE).exists()
    assert (out / "notes.txt").read_text() == "mine"  # nothing else in the folder is touched
    assert set(_paths(jax.device_get(load_converted(out)[1]))) == set(
        _paths(sam_jax.abstract_variables(cfg)))


def test_separate_must_select_some_leaves_but_not_all(tmp_path):
    cfg, quantized = _quantized_tiny()
    for select in (lambda p: False, lambda p: True):
        with pytest.raises(CheckpointError, match="must select some leaves"):
            save_converted(quantized, cfg, tmp_path / "x", separate=select)


def test_a_wrong_or_duplicated_backbone_file_is_refused(tmp_path):
    cfg, quantized = _quantized_tiny()
    out = tmp_path / "ckpt"
    save_converted(quantized, cfg, out, separate=_tiny_backbone)
    path = str(out / BACKBONE_FILE)
    good = load_file(path)

    name = "params/image_encoder/patch_embed/proj/kernel"
    save_file({**good, name: good[name][..., :-1].copy()}, path)
    with pytest.raises(CheckpointError, match=re.escape(name) + ": expected"):
        load_converted(out)

    save_file({k: v for k, v in good.items() if k != name}, path)
    with pytest.raises(CheckpointError, match="missing: " + re.escape(name)):
        load_converted(out)

    # a leaf the Orbax part also holds
    decoder = "params/mask_decoder/iou_token/embedding"
    save_file({**good, decoder: np.zeros((1, cfg.mask_decoder.transformer_dim), np.float32)},
              path)
    with pytest.raises(CheckpointError, match="also in .*" + re.escape(decoder)):
        load_converted(out)

    save_file(good, path)  # restored: loads again
    load_converted(out)


def test_backbone_leaves_select_dinov2_backbone_not_its_neck():
    abstract = _paths(jax.tree.map(lambda a: np.zeros((0,)), sam_jax.abstract_variables(
        configs.dinov2_s())))
    chosen = {p for p in abstract if BACKBONE_LEAVES(p)}
    backbone = {p for p in abstract
                if p.startswith("params/image_encoder/") and "/neck." not in p}
    assert chosen == backbone and len(chosen) > 150
    assert {p for p in abstract if BACKBONE_KERNELS(p)} <= chosen
    for p in ("int8_scales/params/image_encoder/encoder.layer.3/mlp.fc1/kernel",
              "int8_scales/params/image_encoder/embeddings/patch_embeddings.projection/kernel"):
        assert BACKBONE_LEAVES(p), p
    for p in ("params/image_encoder/neck.0/kernel", "int8_scales/params/image_encoder/neck.2/"
              "kernel", "params/mask_decoder/iou_token/embedding", "buffers/x",
              "params/prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"):
        assert not BACKBONE_LEAVES(p), p


def test_bundled_model_keeps_its_backbone_apart():
    ckpt = sam_jax.DEFAULT_CHECKPOINT
    apart = load_file(os.path.join(ckpt, BACKBONE_FILE))
    assert all(BACKBONE_LEAVES(p) for p in apart)
    assert len([p for p in apart if p.startswith(SCALES)]) == 73  # the int8 kernels' scales
    assert sum(a.nbytes for a in apart.values()) > 20e6  # the backbone, in int8
