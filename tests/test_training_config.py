"""Training configs: the shipped files parse, overrides reach nested fields, mistakes are named;
and the model's training-only options (drop path, block remat) behave."""

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import cli
from sam_jax.modeling import Sam
from sam_jax.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.json")))


def test_shipped_configs_parse():
    assert len(CONFIGS) >= 4
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.steps > 0 and cfg.batch_size > 0
    vit_h = load_config(os.path.join(ROOT, "experiments", "configs", "sa1b_vit_h.json"))
    assert vit_h.fsdp and vit_h.model.image_encoder.depth == 32
    assert vit_h.model.image_encoder.drop_path_rate == 0.4  # from the optim preset
    assert vit_h.optim.decay_steps == (60_000, 86_666) and vit_h.batch_size == 256
    ft = load_config(os.path.join(ROOT, "experiments", "configs", "finetune_vit_b.json"))
    assert ft.optim.freeze == ("image_encoder",)


def test_overrides_reach_nested_fields(tmp_path):
    path = os.path.join(ROOT, "experiments", "configs", "davis_mini.json")
    cfg = load_config(path, ["steps=7", "optim.peak_lr=1e-3", "model.image_encoder.depth=2",
                             "data.holdout_groups=[\"a\",\"b\"]", "workdir=/tmp/x y"])
    assert cfg.steps == 7 and cfg.optim.peak_lr == 1e-3
    assert cfg.model.image_encoder.depth == 2 and cfg.model.image_encoder.embed_dim == 160
    assert cfg.data.holdout_groups == ("a", "b") and cfg.workdir == "/tmp/x y"


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown training config fields: ['stepz']"),
    ("optim.lr=3", "unknown optim fields: ['lr']"),
    ("data.rot=x", "unknown data fields: ['rot']"),
    ("steps", "must look like key=value"),
])
def test_bad_overrides_are_named(override, message):
    path = os.path.join(ROOT, "experiments", "configs", "davis_mini.json")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, [override])


def test_train_cli_reports_bad_config(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert cli.main(["train", "--config", str(missing)]) == 1
    assert "cannot read training config" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "tiny", "optim": "tiny", "data": {"root": ""}}))
    assert cli.main(["train", "--config", str(bad), f"workdir={tmp_path / 'w'}"]) == 1
    assert "data.root is empty" in capsys.readouterr().err


def _encoder_setup(**changes):
    cfg = sam_jax.tiny()
    cfg = cfg.replace(image_encoder=dataclasses.replace(cfg.image_encoder, **changes))
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    return Sam(cfg), variables, x


def _embed(model, variables, params, x, deterministic, seed=0):
    return model.apply({"params": params, "buffers": variables["buffers"]}, x, deterministic,
                       method="embed_image", rngs={"dropout": jax.random.key(seed)})


def test_drop_path_only_in_training_and_seeded():
    model, variables, x = _encoder_setup(drop_path_rate=0.5)
    plain, _, _ = _encoder_setup()
    p = variables["params"]
    inference = _embed(model, variables, p, x, True)
    reference = _embed(plain, variables, p, x, True)
    np.testing.assert_array_equal(inference, reference)  # no effect at inference
    a = _embed(model, variables, p, x, False, seed=0)
    b = _embed(model, variables, p, x, False, seed=0)
    c = _embed(model, variables, p, x, False, seed=1)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - reference).max()) > 1e-3
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_remat_blocks_same_values_and_gradients():
    model, variables, x = _encoder_setup(drop_path_rate=0.3)
    remat, _, _ = _encoder_setup(drop_path_rate=0.3, remat_blocks=True)

    def loss(m, params):
        return (_embed(m, variables, params, x, False) ** 2).mean()

    la, ga = jax.value_and_grad(lambda p: loss(model, p))(variables["params"])
    lb, gb = jax.value_and_grad(lambda p: loss(remat, p))(variables["params"])
    assert abs(float(la) - float(lb)) <= 1e-6 * abs(float(la))
    diffs = jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), ga, gb))
    assert max(diffs) < 1e-6
