"""Tests for the `sam-jax` command line (sam_jax/cli/) and sam_jax/utils/image_io.py.

End to end: a tiny official-architecture model with seeded weights is written with
`torch.save`, converted with `sam-jax convert` and used by `sam-jax segment` in a subprocess;
its mask must equal what `SamPredictor` gives in this process. Bad inputs are checked
in-process through `cli.main(argv)` (a jax start-up per subprocess would cost seconds each):
each must give a non-zero status and a `sam-jax: error:` line that names the problem, never a
traceback.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sam_jax
from conftest import assert_error, call
from sam_jax.utils.image_io import ImageError, load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUCK = os.path.join(REPO, "assets", "truck.jpg")
TRUCK_W, TRUCK_H = 1800, 1200


def run_cli(*args, cwd=None):
    """`python -m sam_jax ARGS` in a subprocess, float32 matmuls as in this process."""
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "sam_jax", *map(str, args)], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=300)



# ---- fixtures ------------------------------------------------------------------------------

def official_tiny(seed=0):
    """The official `Sam` for `sam_jax.tiny()`, every parameter perturbed by seeded noise."""
    pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    from official import seeded_official
    return seeded_official(sam_jax.tiny(), seed=seed)


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("pth") / "sam_tiny.pth"
    torch.save(official_tiny().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(pth, tmp_path_factory):
    """`sam-jax convert` of the tiny .pth, run as a subprocess."""
    out_dir = tmp_path_factory.mktemp("conv") / "sam_tiny"
    result = run_cli("convert", pth, out_dir, "--model-type", "tiny")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "official layout" in result.stdout and "model tiny" in result.stdout
    assert str(out_dir) in result.stdout
    assert (out_dir / "config.json").is_file() and (out_dir / "variables").is_dir()
    return out_dir


@pytest.fixture(scope="module")
def predictor(converted):
    """The in-process reference: our predictor on the converted checkpoint."""
    return sam_jax.SamPredictor(sam_jax.load(converted))


def read_outputs(prefix):
    mask = Image.open(f"{prefix}.png")
    overlay = Image.open(f"{prefix}_overlay.png")
    with open(f"{prefix}.json") as f:
        record = json.load(f)
    return mask, overlay, record


def check_outputs(prefix, width, height):
    mask, overlay, record = read_outputs(prefix)
    assert mask.mode == "L" and mask.size == (width, height)
    assert overlay.mode == "RGB" and overlay.size == (width, height)
    values = np.asarray(mask)
    assert set(np.unique(values).tolist()) <= {0, 255}
    assert record["image_size"] == {"width": width, "height": height}
    assert record["chosen_index"] == int(np.argmax(record["scores"]))
    assert record["mask_area"] == int((values == 255).sum())
    return values > 0, record


# ---- end to end ----------------------------------------------------------------------------

def test_segment_points_end_to_end(converted, predictor, tmp_path):
    prefix = tmp_path / "out" / "truck"  # the parent directory does not exist yet
    result = run_cli("segment", TRUCK, "--checkpoint", converted, "--point", "500,375",
                     "--point", "1100,600,0", "--multimask", "-o", prefix)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["truck.json", "truck.png",
                                                     "truck_overlay.png"]
    mask, record = check_outputs(prefix, TRUCK_W, TRUCK_H)
    assert len(record["scores"]) == 3 and record["multimask"] is True
    assert record["prompt"] == {"points": [{"x": 500.0, "y": 375.0, "label": 1},
                                           {"x": 1100.0, "y": 600.0, "label": 0}], "box": None}
    assert record["checkpoint"] == str(converted) and record["model_type"] == "tiny"
    assert f"{prefix}.png" in result.stdout and "scores:" in result.stdout

    image, notes = load_image(TRUCK)
    assert notes == [] and np.array_equal(image, np.asarray(Image.open(TRUCK).convert("RGB")))
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[500.0, 375.0], [1100, 600]]),
                                         point_labels=np.array([1, 0]), multimask_output=True)
    np.testing.assert_allclose(record["scores"], scores, rtol=1e-6, atol=1e-7)
    assert record["chosen_index"] == int(np.argmax(scores))
    np.testing.assert_array_equal(mask, masks[int(np.argmax(scores))])


def test_segment_mirror_average_in_process(converted, tmp_path, capsys):
    """--mirror-average: the masks of the model with `SamConfig.mirror_average` on, recorded in
    the JSON; without it the model's own setting (off for a converted official checkpoint)."""
    masks = {}
    for flag in ([], ["--mirror-average"]):
        prefix = tmp_path / ("mirror" if flag else "plain")
        status, out, err = call(capsys, "segment", TRUCK, "--checkpoint", converted,
                                "--point", "500,375", "--point", "1100,600,0", *flag,
                                "-o", prefix)
        assert status == 0, err
        masks[bool(flag)], record = check_outputs(prefix, TRUCK_W, TRUCK_H)
        assert record["mirror_average"] is bool(flag)
    model = sam_jax.load(converted).with_config(mirror_average=True)
    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(load_image(TRUCK)[0])
    want, _, _ = predictor.predict(point_coords=np.array([[500.0, 375.0], [1100, 600]]),
                                   point_labels=np.array([1, 0]), multimask_output=False)
    np.testing.assert_array_equal(masks[True], want[0])
    assert not np.array_equal(masks[True], masks[False])


def test_segment_box_in_process(converted, predictor, tmp_path, capsys):
    prefix = tmp_path / "box"
    status, out, err = call(capsys, "segment", TRUCK, "--checkpoint", converted,
                            "--box", "100,200,1500,1100", "-o", prefix)
    assert status == 0, err
    mask, record = check_outputs(prefix, TRUCK_W, TRUCK_H)
    assert record["multimask"] is False and len(record["scores"]) == 1
    assert record["prompt"] == {"points": [], "box": [100.0, 200.0, 1500.0, 1100.0]}
    predictor.set_image(load_image(TRUCK)[0])
    masks, _, _ = predictor.predict(box=np.array([100.0, 200, 1500, 1100]),
                                    multimask_output=False)
    np.testing.assert_array_equal(mask, masks[0])


def test_console_script_entry_point():
    """The installed `sam-jax` script, where an install put one next to this Python."""
    script = os.path.join(os.path.dirname(sys.executable), "sam-jax")
    if not os.path.isfile(script):
        pytest.skip("sam-jax console script not installed (pip install -e .)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"sam-jax {sam_jax.__version__}"


# ---- conversions of unusual images (succeed, with a note) ---------------------------------

def gradient(h=90, w=140):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1).astype(np.uint8)


@pytest.mark.parametrize("mode, note", [("L", "grayscale (L)"), ("RGBA", "alpha channel dropped"),
                                        ("I;16", "16-bit")])
def test_segment_converts_image_modes(mode, note, converted, tmp_path, capsys):
    rgb = gradient()
    if mode == "L":
        image = Image.fromarray(rgb).convert("L")
    elif mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], -1), "RGBA")
    else:
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert image.mode == "I;16"
    path = tmp_path / "in.png"
    image.save(path)
    status, out, err = call(capsys, "segment", path, "--checkpoint", converted,
                            "--point", "70,45", "-o", tmp_path / "res")
    assert status == 0, err
    assert "Traceback" not in err
    assert any(line.startswith("sam-jax: note: ") and note in line for line in err.splitlines())
    _, record = check_outputs(tmp_path / "res", 140, 90)
    assert any(note in n for n in record["notes"])


def test_load_image_conversions(tmp_path):
    rgb = gradient()
    # RGBA: the colour channels are kept as they are (alpha dropped, not composited).
    Image.fromarray(np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1), "RGBA").save(
        tmp_path / "a.png")
    got, notes = load_image(tmp_path / "a.png")
    assert np.array_equal(got, rgb) and "RGBA" in notes[0]
    # 16-bit: fixed mapping v * 255 / 65535 (not stretched to the image's own range).
    sixteen = np.array([[0, 257, 1000, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    got, notes = load_image(tmp_path / "s.png")
    assert got.shape == (1, 4, 3) and got[0, :, 0].tolist() == [0, 1, 4, 255]
    assert "16-bit" in notes[0] and "[0, 65535]" in notes[0]
    # Grayscale and palette.
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.png")
    got, notes = load_image(tmp_path / "g.png")
    assert got.shape == (90, 140, 3) and np.array_equal(got[..., 0], got[..., 2])
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert "palette" in load_image(tmp_path / "p.png")[1][0]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    assert "CMYK" in load_image(tmp_path / "c.jpg")[1][0]
    # EXIF orientation 6 (rotate 90 clockwise to display): width and height swap.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif.tobytes())
    got, notes = load_image(tmp_path / "o.jpg")
    assert got.shape == (140, 90, 3) and "orientation" in notes[0]
    # Refused: floating point.
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point"):
        load_image(tmp_path / "f.tif")


# ---- bad inputs ----------------------------------------------------------------------------

@pytest.fixture()
def fake_ckpt(tmp_path):
    """An existing path for checks that must fail before the checkpoint is read."""
    path = tmp_path / "unused.pth"
    path.write_bytes(b"")
    return path


def test_non_image_file(tmp_path, fake_ckpt, capsys):
    path = tmp_path / "x.jpg"
    path.write_text("this is not a picture\n")
    assert_error(call(capsys, "segment", path, "--checkpoint", fake_ckpt, "--point", "1,1",
                      "-o", tmp_path / "o"), 1, "x.jpg", "not an image")
    assert not list(tmp_path.glob("o*"))


def test_missing_image(tmp_path, fake_ckpt, capsys):
    assert_error(call(capsys, "segment", tmp_path / "nope.png", "--checkpoint", fake_ckpt,
                      "--point", "1,1", "-o", tmp_path / "o"), 1, "nope.png", "no such file")


def test_point_outside_image(tmp_path, fake_ckpt, capsys):
    assert_error(call(capsys, "segment", TRUCK, "--checkpoint", fake_ckpt, "--point", "1801,10",
                      "-o", tmp_path / "o"), 2, "1801", "outside", "1800x1200")
    assert_error(call(capsys, "segment", TRUCK, "--checkpoint", fake_ckpt,
                      "--box", "10,10,500,1300", "-o", tmp_path / "o"), 2, "box", "1800x1200")


@pytest.mark.parametrize("args, words", [
    (["--point", "10,10,2"], ["label must be 1", "'2'"]),
    (["--point", "1,2,3,4"], ["invalid point '1,2,3,4'", "X,Y"]),
    (["--point", "a,2"], ["'a' is not a number"]),
    (["--point", "nan,2"], ["not finite"]),
    (["--box", "1,2,3"], ["invalid box"]),
    (["--box", "50,50,10,10"], ["X0 < X1"]),
    ([], ["at least one --point"]),
    (["--point", "1,1", "--model-type", "vit_x"], ["--model-type", "invalid choice"]),
])
def test_bad_prompt_syntax(args, words, tmp_path, fake_ckpt, capsys):
    assert_error(call(capsys, "segment", TRUCK, "--checkpoint", fake_ckpt, *args,
                      "-o", tmp_path / "o"), 2, *words)


def test_usage_errors(tmp_path, capsys):
    assert_error(call(capsys), 2, "required")
    assert_error(call(capsys, "segment", TRUCK, "--point", "1,1"), 2, "-o/--output")
    assert_error(call(capsys, "frobnicate"), 2, "invalid choice")
    assert_error(call(capsys, "segment", TRUCK, "--checkpoint", TRUCK, "--point", "1,1",
                      "-o", str(tmp_path) + os.sep), 2, "not a directory")
    assert call(capsys, "--help")[0] == 0


def test_missing_checkpoint(tmp_path, capsys):
    assert_error(call(capsys, "segment", TRUCK, "--checkpoint", tmp_path / "none.pth",
                      "--point", "1,1", "-o", tmp_path / "o"), 1, "none.pth", "no such file")
    assert_error(call(capsys, "convert", tmp_path / "none.pth", tmp_path / "d"), 1,
                 "none.pth", "no such file")


def test_wrong_kind_checkpoints(tmp_path, capsys):
    seg = ["segment", TRUCK, "--point", "500,375", "-o", tmp_path / "o", "--checkpoint"]
    # An image passed as the checkpoint.
    assert_error(call(capsys, *seg, TRUCK), 1, "truck.jpg", "checkpoint extension")
    # A text file named .pth.
    text = tmp_path / "text.pth"
    text.write_text("hello")
    assert_error(call(capsys, *seg, text), 1, "text.pth", "not a torch checkpoint")
    # A directory that is no checkpoint.
    assert_error(call(capsys, *seg, tmp_path), 1, "neither a converted checkpoint")
    assert not list(tmp_path.glob("o*"))


def test_unrelated_pth(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, path)
    seg = ["segment", TRUCK, "--point", "500,375", "-o", tmp_path / "o", "--checkpoint", path]
    assert_error(call(capsys, *seg), 1, "other.pth", "not a SAM image encoder")
    # With the model named, the mismatch is listed (capped) under the one error line.
    code, out, err = call(capsys, *seg, "--model-type", "tiny")
    assert_error((code, out, err), 1, "other.pth", "does not match the model")
    assert "missing keys" in err and "more lines" in err
    assert_error(call(capsys, "convert", path, tmp_path / "d"), 1, "not a SAM image encoder")
    assert not (tmp_path / "d").exists()


def test_convert_refuses_to_overwrite(converted, pth, capsys):
    assert_error(call(capsys, "convert", pth, converted, "--model-type", "tiny"), 1,
                 "not empty", "--overwrite")
    status, out, err = call(capsys, "convert", pth, converted, "--model-type", "tiny",
                            "--overwrite", "-q")
    assert status == 0 and err == "" and "wrote" in out
