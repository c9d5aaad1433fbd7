"""`sam-jax eval points` (sam_jax.evaluation): the click protocol on hand-worked cases, known
answers (a perfect predictor scores 1, an empty one 0), the dataset readers, batched decoding
equal to one object at a time, and the command end to end on a tiny model."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import assert_error, call
from sam_jax.evaluation.clicks import first_click, mask_iou, next_click
from sam_jax.evaluation.datasets import (CocoInstances, EvalImage, MaskFolder, Sa1bFolder,
                                         instance_masks, parse_dataset)
from sam_jax.evaluation.points import PointsResult, evaluate_image


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---- the click rule ---------------------------------------------------------------------------

def test_first_click_center_hand_worked():
    # rows 2..6, cols 1..7: the distance to the nearest outside pixel is at most 3 (row 4 is 3
    # from rows 1 and 7); on row 4, cols 3, 4, 5 reach it (col 2 is 2 from col 0); the first
    # in row-major order wins
    gt = _rect(9, 10, 2, 7, 1, 8)
    assert first_click(gt, "center") == (3, 4)
    # the image border is a boundary: a mask filling the image has its center in the middle
    assert first_click(np.ones((5, 5), bool), "center") == (2, 2)


def test_first_click_random_is_in_the_mask_and_seeded():
    gt = _rect(20, 20, 3, 9, 11, 17)
    picks = [first_click(gt, "random", np.random.default_rng(s)) for s in range(30)]
    assert all(gt[y, x] for x, y in picks)
    assert len(set(picks)) > 10  # spread over the mask, not one pixel
    assert first_click(gt, "random", np.random.default_rng(4)) == picks[4]
    with pytest.raises(ValueError, match="rng"):
        first_click(gt, "random")
    with pytest.raises(ValueError, match="mode"):
        first_click(gt, "middle")
    with pytest.raises(ValueError, match="no pixel"):
        first_click(np.zeros((4, 4), bool))


def test_next_click_larger_error_region_wins():
    gt = _rect(20, 20, 2, 12, 2, 12)
    # a 5x5 miss in the corner (depth 3) against a one-pixel-wide spill (depth 1)
    pred = gt & ~_rect(20, 20, 7, 12, 7, 12)
    pred |= _rect(20, 20, 15, 16, 0, 20)
    assert next_click(pred, gt) == ((9, 9), 1)
    # a 7x7 spill (depth 4) now beats a 3x3 miss (depth 2): negative click at its center
    pred = gt & ~_rect(20, 20, 2, 5, 2, 5)
    pred |= _rect(20, 20, 13, 20, 13, 20)
    assert next_click(pred, gt) == ((16, 16), 0)
    # equal depths: the false negative wins
    pred = gt & ~_rect(20, 20, 2, 3, 2, 12) | _rect(20, 20, 15, 16, 0, 20)
    assert next_click(pred, gt)[1] == 1


def test_ignore_pixels_count_neither_way():
    gt = _rect(10, 10, 0, 10, 0, 5)
    pred = _rect(10, 10, 0, 10, 0, 7)  # spills 2 columns
    ignore = _rect(10, 10, 0, 10, 5, 7)
    assert mask_iou(pred, gt) == pytest.approx(50 / 70)
    assert mask_iou(pred, gt, ~ignore) == 1.0
    # the spill is ignored, so the only error left is none; a click never lands on ignore
    (x, y), _ = next_click(pred, gt, ~ignore)
    assert not ignore[y, x]


# ---- known answers through the evaluator, with stand-in predictors ---------------------------

class _Oracle:
    """Returns, for prompt row i, `answer(i)` as all three candidates."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_batch(self, coords, labels, mask_input=None, multimask_output=True):
        self.calls.append((coords.copy(), labels.copy(), mask_input is not None,
                           multimask_output))
        c = 3 if multimask_output else 1
        masks = np.stack([np.repeat(a[None], c, 0) for a in self.answers[:len(coords)]])
        return masks, np.ones((len(coords), c), np.float32), np.zeros((len(coords), c, 8, 8))


def test_perfect_and_empty_predictors_score_one_and_zero():
    h, w = 24, 30
    gts = np.stack([_rect(h, w, 2, 10, 3, 12), _rect(h, w, 12, 22, 15, 28)])
    image = EvalImage("x", np.zeros((h, w, 3), np.uint8), gts, None)
    perfect = evaluate_image(_Oracle(list(gts)), image, 3)
    assert [r.ious for r in perfect] == [[1.0, 1.0, 1.0]] * 2
    assert [r.oracle_1 for r in perfect] == [1.0, 1.0]
    empty_predictor = _Oracle([np.zeros((h, w), bool)] * 2)
    empty = evaluate_image(empty_predictor, image, 3)
    assert [r.ious for r in empty] == [[0.0, 0.0, 0.0]] * 2
    # nothing predicted: every click is positive, at the miss's center (rows 2..9, cols 3..11:
    # depth 4 first reached at row 5, col 6); one batched
    # call per round for both objects, multimask only in the first, mask prompts after it
    assert [r.clicks for r in empty][0] == [((6, 5), 1)] * 3
    assert [(len(c), m, mm) for c, _, m, mm in empty_predictor.calls] == [
        (2, False, True), (2, True, False), (2, True, False)]


def test_objects_per_call_groups_and_skips_fully_ignored_objects():
    h, w = 16, 16
    gts = np.stack([_rect(h, w, 0, 4, 0, 4), _rect(h, w, 5, 9, 5, 9), _rect(h, w, 10, 14, 0, 4)])
    ignore = _rect(h, w, 5, 9, 5, 9)  # the second object is all void
    predictor = _Oracle([gts[0], gts[2]])
    rows = evaluate_image(predictor, EvalImage("x", np.zeros((h, w, 3), np.uint8), gts, ignore),
                          2, objects_per_call=1)
    assert [r.index for r in rows] == [0, 2]
    assert len(predictor.calls) == 4  # 2 groups x 2 rounds


def test_points_result_table_and_mean():
    from sam_jax.evaluation.points import ObjectClicks
    objs = {"a": [ObjectClicks("i", 0, [0.5, 0.7, 0.9], 0.6, []),
                  ObjectClicks("i", 1, [0.7, 0.9, 1.0], 0.8, [])],
            "b": [ObjectClicks("j", 0, [0.2, 0.4, 0.6], 0.4, [])]}
    result = PointsResult((1, 3), "center", objs, {"a": 1, "b": 1}, 2.0)
    table = result.table()
    assert table["a"]["miou@1"] == pytest.approx(0.6)
    assert table["a"]["miou@3"] == pytest.approx(0.95)
    assert table["b"]["oracle@1"] == pytest.approx(0.4)
    assert table["mean"]["miou@1"] == pytest.approx(0.4)  # datasets weigh equally
    assert "| a | 1 | 2 | 0.600 | 0.950 | 0.700 |" in result.format_table()
    assert json.loads(json.dumps(result.to_json()))["images_per_second"] == 1.0


# ---- datasets --------------------------------------------------------------------------------

def test_instance_masks_binary_instances_rgb_and_ignore():
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    masks, ignore = instance_masks(binary)
    assert masks.shape == (1, 2, 2) and ignore is None
    labels = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
    masks, ignore = instance_masks(labels, ignore_value=255)
    np.testing.assert_array_equal(masks, [labels == 1, labels == 2])
    np.testing.assert_array_equal(ignore, labels == 255)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 0, 9)
    assert instance_masks(rgb)[0].shape == (2, 2, 2)


def _mask_folder(tmp_path, n=2, size=(40, 32)):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(
            images / f"im{i}.jpg")
        label = np.zeros((size[1], size[0]), np.uint8)
        label[4:14, 5:20] = 1
        label[18:30, 22:38] = 2
        label[0:2, :] = 255
        Image.fromarray(label).save(masks / f"im{i}.png")
    return str(images), str(masks)


def test_mask_folder_pairs_by_stem_and_reports_problems(tmp_path):
    images, masks = _mask_folder(tmp_path)
    items = list(MaskFolder(images, masks, ignore_value=255))
    assert [e.name for e in items] == ["im0", "im1"]
    assert items[0].masks.shape == (2, 32, 40) and items[0].ignore.sum() == 80
    assert len(MaskFolder(images, masks, max_images=1)) == 1
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(os.path.join(masks, "stray.png"))
    with pytest.raises(ValueError, match="stray"):
        MaskFolder(images, masks)
    os.remove(os.path.join(masks, "stray.png"))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(os.path.join(masks, "im1.png"))
    with pytest.raises(ValueError, match="im1.png: mask is 5x5, its image 40x32"):
        list(MaskFolder(images, masks))
    with pytest.raises(ValueError, match="does not exist"):
        MaskFolder(str(tmp_path / "nope"), masks)


def test_coco_instances_match_pycocotools_and_crowd_is_ignored(tmp_path):
    from pycocotools import mask as mask_utils

    h, w = 30, 40
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.jpg")
    crowd = _rect(h, w, 20, 28, 2, 12)
    rle = mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    data = {"images": [{"id": 7, "file_name": "a.jpg", "height": h, "width": w}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 50,
                 "bbox": [5, 5, 10, 5], "segmentation": [[5, 5, 15, 5, 15, 10, 5, 10]]},
                {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 80,
                 "bbox": [2, 20, 10, 8], "segmentation": rle}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    (item,) = list(CocoInstances(str(path), str(tmp_path)))
    assert item.masks.shape == (1, h, w)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
        data["annotations"][0]["segmentation"], h, w))).astype(bool)
    np.testing.assert_array_equal(item.masks[0], expected)
    np.testing.assert_array_equal(item.ignore, crowd)
    path.write_text("{}")
    with pytest.raises(ValueError, match="'images'"):
        CocoInstances(str(path), str(tmp_path))


def test_sa1b_folder_round_trip(tmp_path):
    from sam_jax.sa1b import to_sa1b, write_json_atomic

    h, w = 20, 24
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "pic.png")
    m = _rect(h, w, 3, 9, 4, 16)
    rec = {"segmentation": m, "bbox": [4, 3, 11, 5], "area": int(m.sum()), "predicted_iou": 0.9,
           "point_coords": [[5, 5]], "crop_box": [0, 0, w, h], "stability_score": 0.95}
    write_json_atomic(str(tmp_path / "pic.json"), to_sa1b([rec], "pic.png", w, h))
    (item,) = list(Sa1bFolder(str(tmp_path)))
    np.testing.assert_array_equal(item.masks, m[None])
    name, ds = parse_dataset(f"mine=sa1b:{tmp_path}")
    assert name == "mine" and len(ds) == 1


def test_parse_dataset_errors():
    with pytest.raises(ValueError, match="expected"):
        parse_dataset("masks:only_one")
    with pytest.raises(ValueError, match="expected"):
        parse_dataset("folder:/a,/b")


# ---- with a model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    import sam_jax
    from random_weights import random_variables
    from sam_jax.inference import SamModel

    cfg = sam_jax.tiny()
    return SamModel(cfg, random_variables(cfg, seed=3))


DAVIS_MINI = os.path.join(os.path.dirname(__file__), "data", "davis_mini")


def test_batched_objects_equal_one_object_at_a_time(tiny_model, tmp_path):
    """The evaluator's one call for all objects gives what the per-object loop of
    sam_jax.training.evaluate (one predictor call per object and click) gives; on a real
    DAVIS frame (tests/data/davis_mini: a 0/255 mask PNG is one object), with a synthetic
    second object added so the batch holds two."""
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import click_ious

    folder = MaskFolder(os.path.join(DAVIS_MINI, "JPEGImages", "480p", "camel"),
                        os.path.join(DAVIS_MINI, "Annotations", "480p", "camel"), max_images=1)
    (item,) = list(folder)
    assert item.image.shape == (240, 427, 3) and item.masks.shape == (1, 240, 427)
    h, w = item.masks.shape[1:]
    item = item._replace(masks=np.concatenate([item.masks, _rect(h, w, 10, 60, 10, 90)[None]]))
    predictor = SamPredictor(tiny_model)
    batched = evaluate_image(predictor, item, 3)
    assert len(batched) == 2
    for r in batched:
        single = click_ious(predictor, item.masks[r.index], 3)
        np.testing.assert_allclose(r.ious, single["ious"], atol=1e-6)
        assert r.oracle_1 == pytest.approx(single["oracle_1"], abs=1e-6)


def test_cli_points_writes_json_and_plots(tiny_model, tmp_path, capsys):
    from sam_jax.checkpoints import save_converted

    save_converted(tiny_model.variables, tiny_model.config, tmp_path / "ckpt")
    images, masks = _mask_folder(tmp_path)
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "points", "--data", f"toy=masks:{images},{masks}",
                               "--ignore-value", "255", "--clicks", "1,3", "-o", out, "-q",
                               "--checkpoint", tmp_path / "ckpt")
    assert status == 0, err
    report = json.loads((out / "points.json").read_text())
    assert report["protocol"]["clicks"] == [1, 3]
    assert report["results"]["toy"]["objects"] == 4 and report["results"]["toy"]["images"] == 2
    assert all(len(o["ious"]) == 3 for o in report["objects"]["toy"])
    assert "| toy | 2 | 4 |" in stdout and "images/s" in stdout
    for png in ("points_curve.png", "points_examples.png"):
        assert Image.open(out / png).size[0] > 100
    assert report["mirror_average"] is False
    # --mirror-average: the same protocol on the model averaged over the mirror image
    status, _, err = call(capsys, "eval", "points", "--data", f"toy=masks:{images},{masks}",
                          "--ignore-value", "255", "--clicks", "1,3", "-o", tmp_path / "m",
                          "-q", "--checkpoint", tmp_path / "ckpt", "--mirror-average")
    assert status == 0, err
    mirrored = json.loads((tmp_path / "m" / "points.json").read_text())
    assert mirrored["mirror_average"] is True
    assert mirrored["objects"]["toy"] != report["objects"]["toy"]


def test_cli_points_bad_input_is_one_line(tmp_path, capsys):
    assert_error(call(capsys, "eval", "points", "-o", tmp_path), 2, "no dataset")
    assert_error(call(capsys, "eval", "points", "--masks", tmp_path, "-o", tmp_path), 2,
                 "--images")
    assert_error(call(capsys, "eval", "points", "--data", f"masks:{tmp_path}/a,{tmp_path}/b",
                      "-o", tmp_path), 1, "does not exist")
    assert_error(call(capsys, "eval", "points", "--clicks", "0,2", "--sa1b", tmp_path,
                      "-o", tmp_path), 2, "--clicks")


def test_cli_sizes_compares_checkpoints_in_one_table(tiny_model, tmp_path, capsys):
    import dataclasses

    from random_weights import random_variables
    from sam_jax.checkpoints import save_converted

    other = dataclasses.replace(tiny_model, variables=random_variables(tiny_model.config, 5))
    save_converted(tiny_model.variables, tiny_model.config, tmp_path / "a")
    save_converted(other.variables, other.config, tmp_path / "b")
    images, masks = _mask_folder(tmp_path, n=3)
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "sizes", "--model", f"first={tmp_path / 'a'}",
                               "--model", f"second={tmp_path / 'b'}", "--images", images,
                               "--masks", masks, "--clicks", "1,2", "-o", out, "-q")
    assert status == 0, err
    report = json.loads((out / "sizes.json").read_text())
    assert list(report) == ["first", "second"]
    params = sum(np.size(x) for x in
                 __import__("jax").tree.leaves(tiny_model.variables["params"]["image_encoder"]))
    assert report["first"]["encoder_params"] == params
    assert report["first"]["embed_seconds_median"] > 0  # 2 timed images (the first compiles)
    # different weights, different answers: each row is its own model's evaluation
    assert report["first"]["miou"] != report["second"]["miou"]
    assert "| first |" in stdout and "| second |" in stdout
    assert Image.open(out / "sizes.png").size == (1200, 480)
    assert_error(call(capsys, "eval", "sizes", "--model", f"x={tmp_path / 'a'}", "--model",
                      f"x={tmp_path / 'b'}", "--images", images, "--masks", masks, "-o", out),
                 2, "named 'x'")
