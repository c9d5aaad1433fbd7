"""The model bundled in the package (sam_jax/weights/sam_mini_davis, trained by
`sam-jax train --config experiments/configs/davis_mini.json`): it loads with no path, the CLI
uses it when no --checkpoint is given, and it segments real frames."""

import json
import os

import numpy as np
from PIL import Image

import sam_jax
from sam_jax import cli
from sam_jax.training.evaluate import evaluate_clicks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUCK = os.path.join(REPO, "assets", "truck.jpg")
DAVIS = os.path.join(REPO, "tests", "data", "davis_mini")


def _size_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files) / 2 ** 20


def test_bundled_model_loads_and_is_small():
    assert os.path.isdir(sam_jax.DEFAULT_CHECKPOINT)
    assert _size_mb(sam_jax.DEFAULT_CHECKPOINT) < 25
    model = sam_jax.load()
    assert model.config == sam_jax.get_config("mini")


def test_bundled_model_segments_davis_frames():
    examples = []
    for seq, frame in (("camel", "00000"), ("camel", "00040"), ("cows", "00000"),
                       ("cows", "00050")):
        image = np.asarray(Image.open(f"{DAVIS}/JPEGImages/480p/{seq}/{frame}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(f"{DAVIS}/Annotations/480p/{seq}/{frame}.png")) > 127
        examples.append((image, mask[None], {}))
    result = evaluate_clicks(sam_jax.load(), examples, num_clicks=3)
    print(result)
    # frames of training sequences (downscaled): a check that the shipped weights segment,
    # not a held-out score (README reports that)
    assert result["miou_1"] > 0.5 and result["miou_3"] > 0.6


def test_segment_without_checkpoint_uses_bundled_model(tmp_path, capsys):
    prefix = tmp_path / "truck"
    status = cli.main(["segment", TRUCK, "--point", "500,375", "--multimask", "-o",
                       str(prefix)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "bundled mini model" in err
    record = json.loads((tmp_path / "truck.json").read_text())
    assert record["checkpoint"] == sam_jax.DEFAULT_CHECKPOINT
    mask = np.asarray(Image.open(tmp_path / "truck.png")) > 0
    assert mask.shape == (1200, 1800) and 0.001 < mask.mean() < 0.9


def test_missing_bundled_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sam_jax, "DEFAULT_CHECKPOINT", str(tmp_path / "gone"))
    status = cli.main(["segment", TRUCK, "--point", "500,375", "-o", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert status == 1
    assert "bundled default model is missing" in err and "--checkpoint" in err
