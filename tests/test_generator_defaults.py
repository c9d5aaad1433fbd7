"""Generator thresholds a checkpoint recommends for its model (config.json
"generator_defaults"): `sam_jax.load` carries them, `SamAutomaticMaskGenerator` and
`sam-jax generate` use them where the caller sets nothing, explicit values win, and SAM's own
weights (no recommendation) keep the official 0.88 / 0.95 / 1.0."""

import json

import jax
import numpy as np
import pytest

import sam_jax
from conftest import call
from sam_jax.automatic_mask_generator import OFFICIAL_THRESHOLDS, SamAutomaticMaskGenerator
from sam_jax.checkpoints import CheckpointError, save_converted

RECOMMENDED = {"pred_iou_thresh": 0.61, "stability_score_thresh": 0.73}


@pytest.fixture(scope="module")
def tiny_variables(tiny_config):
    from sam_jax.build_sam import init_variables
    return jax.device_get(init_variables(tiny_config, jax.random.key(0)))


def _save(tiny_config, variables, path, recommended):
    metadata = {"model_type": "tiny"}
    if recommended is not None:
        metadata["generator_defaults"] = recommended
    save_converted(variables, tiny_config, path, metadata=metadata)
    return path


def test_cli_constants_equal_the_generator_defaults():
    from sam_jax.cli import generate
    assert generate.OFFICIAL_THRESHOLDS == OFFICIAL_THRESHOLDS == {
        "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "stability_score_offset": 1.0}


def test_load_carries_recommendation_and_generator_uses_it(tiny_config, tiny_variables,
                                                           tmp_path):
    model = sam_jax.load(_save(tiny_config, tiny_variables, tmp_path / "rec", RECOMMENDED))
    assert model.generator_defaults == RECOMMENDED
    gen = SamAutomaticMaskGenerator(model)
    assert (gen.pred_iou_thresh, gen.stability_score_thresh, gen.stability_score_offset) == (
        0.61, 0.73, 1.0)
    explicit = SamAutomaticMaskGenerator(model, pred_iou_thresh=0.9,
                                         stability_score_thresh=0.5)
    assert (explicit.pred_iou_thresh, explicit.stability_score_thresh) == (0.9, 0.5)

    plain = sam_jax.load(_save(tiny_config, tiny_variables, tmp_path / "plain", None))
    assert plain.generator_defaults == {}
    gen = SamAutomaticMaskGenerator(plain)
    assert (gen.pred_iou_thresh, gen.stability_score_thresh) == (0.88, 0.95)


def test_bad_recommendation_is_a_clear_error(tiny_config, tiny_variables, tmp_path):
    path = _save(tiny_config, tiny_variables, tmp_path / "bad", {"pred_iou": 0.5})
    with pytest.raises(CheckpointError, match="generator_defaults must map"):
        sam_jax.load(path)


def test_generate_cli_records_the_thresholds_it_used(tiny_config, tiny_variables, tmp_path,
                                                    capsys):
    from PIL import Image
    image = tmp_path / "img.png"
    Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(image)
    ckpt = _save(tiny_config, tiny_variables, tmp_path / "rec", RECOMMENDED)
    small = ["--points-per-side", "2", "-q"]
    status, _, err = call(capsys, "generate", image, "--checkpoint", ckpt, "-o",
                          tmp_path / "a", *small)
    assert status == 0, err
    used = json.loads((tmp_path / "a" / "img.json").read_text())["sam_jax"]["options"]
    assert (used["pred_iou_thresh"], used["stability_score_thresh"],
            used["stability_score_offset"]) == (0.61, 0.73, 1.0)
    status, _, err = call(capsys, "generate", image, "--checkpoint", ckpt, "-o",
                          tmp_path / "b", "--pred-iou-thresh", "0.9", *small)
    assert status == 0, err
    used = json.loads((tmp_path / "b" / "img.json").read_text())["sam_jax"]["options"]
    assert (used["pred_iou_thresh"], used["stability_score_thresh"]) == (0.9, 0.73)
