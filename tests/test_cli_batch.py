"""`sam-jax segment` on several images / several prompts, and the friendlier `generate`.

In-process through `cli.main(argv)` with the tiny official-architecture model (seeded weights,
written with torch.save and read through the real .pth path); the reference masks come from
`SamPredictor` on the same weights in this process, so they must be equal, not close.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sam_jax
from conftest import assert_error, call, load_truck
from sam_jax import cli, sa1b
from sam_jax.utils.transforms import ResizeLongestSide

TINY = ["--model-type", "tiny", "-q"]
GEN_FAST = ["--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--box-nms-thresh", "0.98"]


@pytest.fixture(scope="module")
def checkpoint(tiny_official, tmp_path_factory):
    path = tmp_path_factory.mktemp("batch_ckpt") / "tiny.pth"
    torch.save(tiny_official.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def predictor(tiny_sam):
    return sam_jax.SamPredictor(tiny_sam)



def mask_png(path):
    values = np.asarray(Image.open(path))
    assert set(np.unique(values).tolist()) <= {0, 255}
    return values > 0


def save(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(load_truck(size)).save(path)
    return path


# ---- several images ------------------------------------------------------------------------

def test_folder_and_files_write_one_set_per_image(checkpoint, predictor, tmp_path, capsys):
    folder = tmp_path / "in"
    save(folder / "a.png", (180, 120))
    save(folder / "b.png", (120, 160))
    extra = save(tmp_path / "c.png", (100, 100))
    out = tmp_path / "out"  # does not exist yet
    status, stdout, err = call(capsys, "segment", folder, extra, "--checkpoint", checkpoint,
                               "--box", "10,10,90,70", "-o", out, *TINY)
    assert status == 0, err
    assert sorted(os.listdir(out)) == sorted(f"{s}{suffix}" for s in "abc"
                                             for suffix in (".png", "_overlay.png", ".json"))
    for stem, path, (w, h) in (("a", folder / "a.png", (180, 120)),
                               ("b", folder / "b.png", (120, 160)), ("c", extra, (100, 100))):
        record = json.load(open(out / f"{stem}.json"))
        assert record["image"] == str(path)
        assert record["image_size"] == {"width": w, "height": h}
        assert record["prompt"] == {"points": [], "box": [10.0, 10.0, 90.0, 70.0]}
        assert record["outputs"] == {"mask": str(out / f"{stem}.png"),
                                     "overlay": str(out / f"{stem}_overlay.png"),
                                     "json": str(out / f"{stem}.json")}
        assert record["model_type"] == "tiny" and record["compute_dtype"] == "float32"
        predictor.set_image(np.asarray(Image.open(path).convert("RGB")))
        masks, scores, _ = predictor.predict(box=np.array([10.0, 10, 90, 70]),
                                             multimask_output=False)
        assert record["scores"] == [float(s) for s in scores]
        np.testing.assert_array_equal(mask_png(out / f"{stem}.png"), masks[0])
        assert f"{path}: 1 mask(s), score(s) {scores[0]:.4f} -> {out / f'{stem}.json'}" \
            in stdout
    assert stdout.splitlines()[-1].startswith(f"segmented 3 of 3 image(s) into {out}")


def test_model_loaded_once_for_all_images(checkpoint, tmp_path, capsys, monkeypatch):
    from sam_jax.cli import segment
    loads = []
    real = segment.load_model
    monkeypatch.setattr(segment, "load_model", lambda args: loads.append(1) or real(args))
    folder = tmp_path / "in"
    for i in range(3):
        save(folder / f"img{i}.jpg", (64, 48))
    status, _, err = call(capsys, "segment", folder, "--checkpoint", checkpoint,
                          "--point", "30,20", "-o", tmp_path / "out", *TINY)
    assert status == 0, err
    assert len(loads) == 1


def test_same_stem_or_output_name_refused_before_work(checkpoint, tmp_path, capsys):
    save(tmp_path / "x" / "truck.jpg", (64, 48))
    save(tmp_path / "y" / "truck.png", (64, 48))
    result = call(capsys, "segment", tmp_path / "x", tmp_path / "y", "--checkpoint",
                  checkpoint, "--point", "5,5", "-o", tmp_path / "out", *TINY)
    assert_error(result, 2, "truck.jpg", "truck.png", "would both be written as truck.png")
    assert not (tmp_path / "out").exists()
    # not only stems: a.jpg's overlay is a_overlay.png, the mask of a_overlay.jpg
    save(tmp_path / "z" / "a.jpg", (64, 48))
    save(tmp_path / "z" / "a_overlay.jpg", (64, 48))
    assert_error(call(capsys, "segment", tmp_path / "z", "--checkpoint", checkpoint,
                      "--point", "5,5", "-o", tmp_path / "out", *TINY), 2,
                 "would both be written as a_overlay.png")


def test_folder_skips_unreadable_image_and_prompt_outside(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    save(folder / "big.png", (120, 90))
    save(folder / "small.png", (40, 30))
    (folder / "broken.png").write_bytes(b"not an image")
    status, out, err = call(capsys, "segment", folder, "--checkpoint", checkpoint,
                            "--point", "100,80", "-o", tmp_path / "out", *TINY)
    assert status == 1 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("sam-jax: warning: ")]
    assert len(warnings) == 2
    assert "broken.png" in warnings[0] and "not an image" in warnings[0]
    assert "small.png" in warnings[1] and "outside the 40x30 image" in warnings[1]
    assert sorted(os.listdir(tmp_path / "out")) == ["big.json", "big.png", "big_overlay.png"]
    assert "segmented 1 of 3 image(s)" in out and "skipped 2" in out


def test_output_that_is_a_file(checkpoint, tmp_path, capsys):
    save(tmp_path / "in" / "a.png", (64, 48))
    save(tmp_path / "in" / "b.png", (64, 48))
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert_error(call(capsys, "segment", tmp_path / "in", "--checkpoint", checkpoint,
                      "--point", "5,5", "-o", target, *TINY), 2, "file.txt", "is a file")


# ---- several prompts -----------------------------------------------------------------------

BOXES = [(10.0, 10.0, 90.0, 70.0), (50.0, 20.0, 170.0, 110.0), (0.0, 0.0, 180.0, 120.0)]


def test_several_boxes_are_one_batched_call(checkpoint, predictor, tmp_path, capsys,
                                            monkeypatch):
    image = save(tmp_path / "truck.png", (180, 120))
    calls = []
    real = sam_jax.SamPredictor.predict_batch

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(sam_jax.SamPredictor, "predict_batch", counting)
    prefix = tmp_path / "out" / "truck"
    status, out, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                            *[a for b in BOXES for a in ("--box", ",".join(map(str, b)))],
                            "--multimask", "-o", prefix, *TINY)
    assert status == 0, err
    assert len(calls) == 1  # three prompts, one decode
    monkeypatch.undo()
    assert sorted(os.listdir(prefix.parent)) == ["truck.json", "truck_overlay.png",
                                                 "truck_prompt0.png", "truck_prompt1.png",
                                                 "truck_prompt2.png"]
    record = json.load(open(f"{prefix}.json"))
    assert "prompt" not in record and "scores" not in record
    assert record["outputs"] == {"masks": [f"{prefix}_prompt{i}.png" for i in range(3)],
                                 "overlay": f"{prefix}_overlay.png", "json": f"{prefix}.json"}
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    all_masks, all_scores, _ = predictor.predict_batch(boxes=np.array(BOXES),
                                                       multimask_output=True)
    for i, box in enumerate(BOXES):
        entry = record["prompts"][i]
        assert entry["prompt"] == {"points": [], "box": list(box)}
        masks, scores = all_masks[i], all_scores[i]
        assert entry["scores"] == [float(s) for s in scores]
        chosen = int(np.argmax(scores))
        assert entry["chosen_index"] == chosen and entry["mask"] == f"{prefix}_prompt{i}.png"
        got = mask_png(entry["mask"])
        np.testing.assert_array_equal(got, masks[chosen])
        assert entry["mask_area"] == int(got.sum())
        assert f"prompt {i}: scores: " in out and f"-> {prefix}_prompt{i}.png" in out
    overlay = Image.open(f"{prefix}_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (180, 120)


def test_prompt_groups(checkpoint, predictor, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (180, 120))
    prefix = tmp_path / "g"
    status, out, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                            "--prompt", "box=10,10,90,70/point=40,40",
                            "--prompt", "point=120,60/point=20,100,0",
                            "--prompt", "point=150,30", "-o", prefix, *TINY)
    assert status == 0, err
    record = json.load(open(f"{prefix}.json"))
    expected = [
        ({"points": [{"x": 40.0, "y": 40.0, "label": 1}], "box": [10.0, 10.0, 90.0, 70.0]},
         dict(point_coords=np.array([[40.0, 40]]), point_labels=np.array([1]),
              box=np.array([10.0, 10, 90, 70]))),
        ({"points": [{"x": 120.0, "y": 60.0, "label": 1}, {"x": 20.0, "y": 100.0, "label": 0}],
          "box": None},
         dict(point_coords=np.array([[120.0, 60], [20, 100]]), point_labels=np.array([1, 0]))),
        ({"points": [{"x": 150.0, "y": 30.0, "label": 1}], "box": None},
         dict(point_coords=np.array([[150.0, 30]]), point_labels=np.array([1]))),
    ]
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    assert len(record["prompts"]) == 3
    for i, (entry, (prompt, kwargs)) in enumerate(zip(record["prompts"], expected)):
        assert entry["prompt"] == prompt
        masks, scores, _ = predictor.predict(multimask_output=False, **kwargs)
        np.testing.assert_allclose(entry["scores"], scores, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mask_png(f"{prefix}_prompt{i}.png"), masks[0])


def test_points_with_one_box_stay_one_prompt(checkpoint, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (180, 120))
    status, _, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                          "--point", "40,40", "--box", "10,10,90,70", "--point", "50,50,0",
                          "-o", tmp_path / "one", *TINY)
    assert status == 0, err
    record = json.load(open(tmp_path / "one.json"))
    assert record["prompt"] == {"points": [{"x": 40.0, "y": 40.0, "label": 1},
                                           {"x": 50.0, "y": 50.0, "label": 0}],
                                "box": [10.0, 10.0, 90.0, 70.0]}
    assert sorted(os.listdir(tmp_path)) == ["one.json", "one.png", "one_overlay.png",
                                            "truck.png"]


@pytest.mark.parametrize("args, words", [
    (["--point", "5,5", "--box", "1,1,9,9", "--box", "2,2,8,8"],
     ["1 --point with 2 --box", "ambiguous", "--prompt box="]),
    (["--prompt", "point=5,5", "--point", "6,6"], ["--prompt", "not both"]),
    (["--prompt", "point=5,5", "--box", "1,1,9,9"], ["--prompt", "not both"]),
    (["--prompt", "box=1,1,9,9/box=2,2,8,8"], ["one box per prompt"]),
    (["--prompt", "circle=1,2,3"], ["invalid prompt", "box=X0,Y0,X1,Y1 or point=X,Y"]),
    (["--prompt", "point=1"], ["invalid point '1'"]),
    (["--prompt", "box=9,9,1,1"], ["X0 < X1"]),
    ([], ["at least one --point", "--prompt"]),
])
def test_ambiguous_or_bad_prompts(args, words, checkpoint, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (64, 48))
    assert_error(call(capsys, "segment", image, "--checkpoint", checkpoint, *args,
                      "-o", tmp_path / "o", *TINY), 2, *words)
    assert not list(tmp_path.glob("o*"))


# ---- --save-all, --compute-dtype, --model-type -----------------------------------------------

def test_save_all_writes_every_candidate(checkpoint, predictor, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (180, 120))
    prefix = tmp_path / "all"
    status, out, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                            "--point", "60,50", "--multimask", "--save-all", "-o", prefix,
                            *TINY)
    assert status == 0, err
    record = json.load(open(f"{prefix}.json"))
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    masks, scores, _ = predictor.predict(point_coords=np.array([[60.0, 50]]),
                                         point_labels=np.array([1]), multimask_output=True)
    assert [c["index"] for c in record["candidates"]] == [0, 1, 2]
    for j, cand in enumerate(record["candidates"]):
        assert cand["mask"] == f"{prefix}_candidate{j}.png"
        assert cand["score"] == record["scores"][j]
        got = mask_png(cand["mask"])
        np.testing.assert_array_equal(got, masks[j])
        assert cand["mask_area"] == int(got.sum())
    np.testing.assert_array_equal(mask_png(f"{prefix}.png"),
                                  mask_png(f"{prefix}_candidate{record['chosen_index']}.png"))
    assert f"candidates: {prefix}_candidate0.png, {prefix}_candidate1.png" in out
    # several prompts: prompt i's candidates are OUT_prompt<i>_candidate<j>.png
    status, _, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                          "--box", "10,10,90,70", "--box", "50,20,170,110", "--save-all",
                          "-o", tmp_path / "two", *TINY)
    assert status == 0, err
    record = json.load(open(tmp_path / "two.json"))
    for i in range(2):
        assert [c["mask"] for c in record["prompts"][i]["candidates"]] == \
            [str(tmp_path / f"two_prompt{i}_candidate0.png")]
        assert (tmp_path / f"two_prompt{i}_candidate0.png").is_file()


def test_compute_dtype(checkpoint, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (180, 120))
    results = {}
    for dtype in ("float32", "bfloat16"):
        status, _, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                              "--point", "60,50", "--compute-dtype", dtype,
                              "-o", tmp_path / dtype, *TINY)
        assert status == 0, err
        results[dtype] = json.load(open(tmp_path / f"{dtype}.json"))
        assert results[dtype]["compute_dtype"] == dtype
        assert results[dtype]["model_type"] == "tiny"  # the preset, whatever the dtype
    # bfloat16 matmuls give another score: the option really reached the model
    assert results["float32"]["scores"] != results["bfloat16"]["scores"]
    assert_error(call(capsys, "segment", image, "--checkpoint", checkpoint, "--point", "6,5",
                      "--compute-dtype", "float16", "-o", tmp_path / "x", *TINY), 2,
                 "--compute-dtype", "invalid choice")


def test_model_type_for_converted_dir_is_ignored_with_a_note(checkpoint, tmp_path, capsys):
    converted = tmp_path / "conv"
    assert cli.main(["convert", checkpoint, str(converted), "--model-type", "tiny", "-q"]) == 0
    image = save(tmp_path / "truck.png", (64, 48))
    status, _, err = call(capsys, "segment", image, "--checkpoint", converted, "--point", "6,5",
                          "--model-type", "vit_b", "-o", tmp_path / "o")
    assert status == 0, err
    assert f"note: --model-type vit_b ignored: {converted} is a converted directory" in err
    assert json.load(open(tmp_path / "o.json"))["model_type"] == "tiny"
    assert_error(call(capsys, "segment", image, "--point", "6,5", "--model-type", "mini",
                      "-o", tmp_path / "o"), 2, "invalid choice: 'mini'")


# ---- unwritable outputs ----------------------------------------------------------------------

def test_unwritable_output_reported_before_any_work(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "some_file.txt"
    blocker.write_text("a file, so nothing can be created under it (also for root)")
    image = save(tmp_path / "truck.png", (64, 48))
    code, out, err = call(capsys, "segment", image, "--checkpoint", checkpoint,
                          "--point", "6,5", "-o", blocker / "out" / "truck")
    assert_error((code, out, err), 1, "cannot write to the output folder",
                 str(blocker / "out"))
    assert "loading checkpoint" not in err  # before the model
    other = save(tmp_path / "other.png", (64, 48))  # several images: -o is a folder
    code, out, err = call(capsys, "segment", image, other, "--checkpoint", checkpoint,
                          "--point", "6,5", "-o", blocker / "dir")
    assert_error((code, out, err), 1, "cannot write to the output folder",
                 str(blocker / "dir"))
    code, out, err = call(capsys, "generate", image, "--checkpoint", checkpoint,
                          "-o", blocker / "out")
    assert_error((code, out, err), 1, "cannot write to the output folder",
                 str(blocker / "out"))
    assert "loading checkpoint" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_output_folder(checkpoint, tmp_path, capsys):
    image = save(tmp_path / "truck.png", (64, 48))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_error(call(capsys, "generate", image, "--checkpoint", checkpoint, "-o", locked,
                          "-q"), 1, "cannot write to the output folder", "permission denied")
        assert_error(call(capsys, "segment", image, "--checkpoint", checkpoint,
                          "--point", "6,5", "-o", locked / "t", "-q"), 1,
                     "cannot write to the output folder", "permission denied")
    finally:
        locked.chmod(0o755)


# ---- extreme aspect ratios -------------------------------------------------------------------

def test_preprocess_shape_never_zero_and_otherwise_official():
    assert ResizeLongestSide.get_preprocess_shape(2, 40000, 1024) == (1, 1024)
    assert ResizeLongestSide.get_preprocess_shape(40000, 2, 1024) == (1024, 1)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 5000, size=(2000, 2)).tolist():
        scale = 1024 * 1.0 / max(h, w)
        official = (int(h * scale + 0.5), int(w * scale + 0.5))
        if min(official) >= 1:
            assert ResizeLongestSide.get_preprocess_shape(h, w, 1024) == official


@pytest.mark.parametrize("size", [(40000, 2), (2, 40000)])  # (width, height)
def test_extreme_aspect_ratio(size, checkpoint, tmp_path, capsys):
    w, h = size
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((h, w), 128, np.uint8)).save(path)
    status, out, err = call(capsys, "segment", path, "--checkpoint", checkpoint,
                            "--point", f"{w // 2},{h // 2}", "-o", tmp_path / "seg", *TINY)
    assert status == 0, err
    assert "error" not in err
    assert np.asarray(Image.open(tmp_path / "seg.png")).shape == (h, w)
    record = json.load(open(tmp_path / "seg.json"))
    assert record["image_size"] == {"width": w, "height": h}
    status, out, err = call(capsys, "generate", path, "--checkpoint", checkpoint,
                            "-o", tmp_path / "gen", *TINY, *GEN_FAST)
    assert status == 0, err
    data = sa1b.read_sa1b(str(tmp_path / "gen" / "strip.json"))
    assert data["image"]["width"] == w and data["image"]["height"] == h
    assert f"{path}: {len(data['annotations'])} mask" in out


# ---- generate: per-image summary, no-mask hint, options record -------------------------------

def test_generate_prints_mask_counts_and_warns_on_none(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    save(folder / "img0.jpg", (120, 90))
    out_dir = tmp_path / "out"
    status, out, err = call(capsys, "generate", folder, "--checkpoint", checkpoint,
                            "-o", out_dir, *TINY, *GEN_FAST)
    assert status == 0, err
    n = len(sa1b.read_sa1b(str(out_dir / "img0.json"))["annotations"])
    assert n > 1 and f"{folder / 'img0.jpg'}: {n} masks\n" in out
    assert "warning" not in err
    # thresholds no mask passes: written (empty), counted, and a hint on stderr
    status, out, err = call(capsys, "generate", folder, "--checkpoint", checkpoint,
                            "-o", out_dir, *TINY, *GEN_FAST, "--pred-iou-thresh", "1.5")
    assert status == 0, err
    assert f"{folder / 'img0.jpg'}: 0 masks\n" in out
    warnings = [line for line in err.splitlines() if line.startswith("sam-jax: warning: ")]
    assert len(warnings) == 1 and "img0.jpg: no mask passed the thresholds" in warnings[0]
    assert "(--pred-iou-thresh 1.5, --stability-score-thresh 0)" in warnings[0]
    assert warnings[0].endswith("try --pred-iou-thresh 0.7")
    assert sa1b.read_sa1b(str(out_dir / "img0.json"))["annotations"] == []


def test_generate_records_options_and_reruns_when_they_change(checkpoint, tmp_path, capsys):
    from sam_jax.cli.generate import RECORD_KEY
    image = save(tmp_path / "in" / "img0.jpg", (120, 90))
    out_dir = tmp_path / "out"
    json_path = out_dir / "img0.json"
    argv = ["generate", image, "--checkpoint", checkpoint, "-o", out_dir, *TINY, *GEN_FAST]

    status, out, err = call(capsys, *argv)
    assert status == 0 and "wrote 1 SA-1B JSON file(s)" in out, err
    data = json.load(open(json_path))
    assert list(data) == ["image", "annotations", RECORD_KEY]
    assert data[RECORD_KEY] == {
        "version": sam_jax.__version__, "model_type": "tiny",
        "options": {"checkpoint": os.path.abspath(checkpoint), "compute_dtype": "float32",
                    "points_per_side": 6, "points_per_batch": 64, "pred_iou_thresh": 0.0,
                    "stability_score_thresh": 0.0, "stability_score_offset": 1.0,
                    "box_nms_thresh": 0.98, "crop_n_layers": 0, "crop_nms_thresh": 0.7,
                    "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1,
                    "min_mask_region_area": 0}}
    sa1b.read_sa1b(str(json_path))  # the extra key is fine for the SA-1B reader
    first = json_path.read_bytes()

    # same options: skipped, the file untouched
    status, out, _ = call(capsys, *argv)
    assert status == 0 and out.startswith("nothing to do") and json_path.read_bytes() == first

    # other options: redone, with the new options recorded
    status, out, err = call(capsys, *argv, "--points-per-side", "4")
    assert status == 0 and "wrote 1 SA-1B JSON file(s)" in out, err
    data = json.load(open(json_path))
    assert data[RECORD_KEY]["options"]["points_per_side"] == 4
    assert len(data["annotations"]) <= 16
    status, out, _ = call(capsys, *argv, "--points-per-side", "4")
    assert out.startswith("nothing to do")
    status, out, _ = call(capsys, *argv, "--points-per-side", "4", "--compute-dtype",
                          "bfloat16")
    assert "wrote 1 SA-1B JSON file(s)" in out
    assert json.load(open(json_path))[RECORD_KEY]["options"]["compute_dtype"] == "bfloat16"

    # --overwrite: redone although the options are the same
    status, out, err = call(capsys, *argv, "--overwrite")
    assert status == 0 and "wrote 1 SA-1B JSON file(s)" in out, err
    assert json_path.read_bytes() == first  # same options, same masks

    # a JSON without our record (another tool's, or a released SA-1B file): redone
    data = json.load(open(json_path))
    del data[RECORD_KEY]
    json_path.write_text(json.dumps(data))
    status, out, _ = call(capsys, *argv)
    assert "wrote 1 SA-1B JSON file(s)" in out and json_path.read_bytes() == first
