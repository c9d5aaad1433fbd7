"""Box-prompted instance segmentation (sam_jax.evaluation.instances, SAM §7.4): ground-truth
boxes through a stand-in predictor that answers with the ground-truth masks score AP 1, any
result scores what pycocotools' COCOeval gives, every image's boxes go in one batched call (or
chunks of `boxes_per_call`), the refinement pass feeds the logits back, bad input is named;
the tiny model end to end for the result format."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.instances import evaluate_instances, masks_from_detections
from test_eval_proposals import H, W, gt_masks, load_coco_gt_from, synthetic_gt


@pytest.fixture
def dataset(tmp_path):
    """(annotation path, images dir, the GT dict, per-annotation masks); LVIS style."""
    data = synthetic_gt(lvis=True)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(images / f"im{i}.png")
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path, images, data, gt_masks(data)


def detections_from_gt(data, scores=None):
    """The ground truth as detector output: its boxes (XYWH), categories, given scores."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9 if scores is None else scores[k]}
            for k, a in enumerate(data["annotations"])]


class _BoxOracle:
    """Stand-in predictor: a box XYXY -> the ground-truth mask of that box (empty if none)."""

    def __init__(self, masks_by_box):
        self.masks_by_box = masks_by_box
        self.calls = []

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output=True):
        assert point_coords is None and not multimask_output
        self.calls.append((len(boxes), None if mask_input is None else mask_input.shape))
        empty = np.zeros(self.shape, bool)
        masks = np.stack([self.masks_by_box.get(tuple(b), empty) for b in boxes.tolist()])
        n = len(boxes)
        return masks[:, None], np.ones((n, 1), np.float32), np.zeros((n, 1, 8, 8), np.float32)


def _oracle(data, masks):
    return _BoxOracle({(float(x), float(y), float(x + w), float(y + h)): m
                       for (x, y, w, h), m in ((a["bbox"], m) for a, m in
                                               zip(data["annotations"], masks))})


def pycocotools_stats(data, results):
    from pycocotools.cocoeval import COCOeval
    gt = load_coco_gt_from(data)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def test_ground_truth_boxes_and_masks_score_ap_one_in_one_call_per_image(dataset):
    path, images, data, masks = dataset
    oracle = _oracle(data, masks)
    results = masks_from_detections(oracle, detections_from_gt(data), images, path)
    assert [n for n, _ in oracle.calls] == [3, 2, 2]  # one call per image, all its boxes
    assert len(results) == 7
    result = evaluate_instances(path, results)
    assert result.table() == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0,
                                            "AP_small": 1.0, "AP_medium": 1.0,
                                            "AP_large": 1.0}, abs=1e-12)
    assert result.images == 3 and result.detections == 7
    assert result.stats == pytest.approx(pycocotools_stats(data, results), abs=1e-12)
    assert "| 3 | 7 | 100.0 | 100.0 |" in result.format_table()
    assert json.loads(json.dumps(result.to_json()))["results"]["AP"] == pytest.approx(1.0)


def test_imperfect_results_score_what_cocoeval_gives(dataset):
    path, images, data, masks = dataset
    dets = detections_from_gt(data, scores=[0.9, 0.3, 0.8, 0.7, 0.6, 0.95, 0.5])
    dets[1]["category_id"] = 1  # a wrong class: a false positive and a miss
    dets.append({"image_id": 2, "category_id": 2, "bbox": [100, 100, 50, 40], "score": 0.99})
    results = masks_from_detections(_oracle(data, masks), dets, images, path)
    result = evaluate_instances(path, results)
    assert 0.0 < result.ap < 1.0
    assert result.stats == pytest.approx(pycocotools_stats(data, results), abs=1e-12)
    # results keep the detections' image, class and score, best first per image
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results[:3]] == [
        (1, 1, 0.9), (1, 1, 0.8), (1, 1, 0.3)]


def test_chunks_threshold_max_per_image_and_refinement(dataset):
    path, images, data, masks = dataset
    dets = detections_from_gt(data, scores=[0.9, 0.3, 0.8, 0.7, 0.6, 0.95, 0.5])
    oracle = _oracle(data, masks)
    results = masks_from_detections(oracle, dets, images, path, boxes_per_call=2)
    assert [n for n, _ in oracle.calls] == [2, 1, 2, 2]
    oracle.calls.clear()
    results = masks_from_detections(oracle, dets, images, path, score_threshold=0.55,
                                    max_per_image=1)
    assert [(r["image_id"], r["score"]) for r in results] == [(1, 0.9), (2, 0.7), (3, 0.95)]
    oracle.calls.clear()
    refined = masks_from_detections(oracle, dets, images, path, refine=True)
    # each image: the box alone, then the box with the previous logits as the mask prompt
    assert oracle.calls == [(3, None), (3, (3, 1, 8, 8)), (2, None), (2, (2, 1, 8, 8)),
                            (2, None), (2, (2, 1, 8, 8))]
    assert evaluate_instances(path, refined).ap == pytest.approx(1.0)


def test_boxes_without_area_are_skipped_with_a_count(dataset):
    path, images, data, masks = dataset
    dets = detections_from_gt(data)
    dets.append({"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "score": 0.9})
    dets.append({"image_id": 2, "category_id": 1, "bbox": [W + 5, 10, 10, 5], "score": 0.9})
    # a box reaching past the image is clipped to it
    dets.append({"image_id": 3, "category_id": 1, "bbox": [W - 10, H - 10, 30, 30],
                 "score": 0.9})
    oracle = _oracle(data, masks)
    with pytest.warns(UserWarning, match=r"skipped 2 detection\(s\).*image 1, bbox \[10, 10"):
        results = masks_from_detections(oracle, dets, images, path)
    assert len(results) == 8


def test_bad_input_names_the_problem(dataset, tmp_path):
    path, images, data, masks = dataset
    oracle = _oracle(data, masks)
    dets = detections_from_gt(data)
    with pytest.raises(ValueError, match="detections name 1 image id.*: 99"):
        masks_from_detections(oracle, dets + [dict(dets[0], image_id=99)], images, path)
    with pytest.raises(ValueError, match="entry 0 has no 'bbox'"):
        masks_from_detections(oracle, [{"image_id": 1, "category_id": 1, "score": 1.0}],
                              images, path)
    with pytest.raises(ValueError, match=r"bbox \[1, 2, 3\]"):
        masks_from_detections(oracle, [dict(dets[0], bbox=[1, 2, 3])], images, path)
    bad = tmp_path / "dets.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not a JSON file"):
        masks_from_detections(oracle, bad, images, path)
    bad.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match="a JSON list"):
        masks_from_detections(oracle, bad, images, path)
    with pytest.raises(ValueError, match="is not at"):
        masks_from_detections(oracle, dets, tmp_path, path)
    with pytest.raises(ValueError, match="'category_id'"):
        evaluate_instances(path, [{"image_id": 1, "segmentation": {}, "score": 1.0}])
    no_cats = dict(data, categories=[])
    (tmp_path / "nocats.json").write_text(json.dumps(no_cats))
    with pytest.raises(ValueError, match="categories"):
        evaluate_instances(tmp_path / "nocats.json", [])


def test_tiny_model_end_to_end(dataset):
    import sam_jax
    from random_weights import random_variables
    from sam_jax.inference import SamModel

    path, images, data, _ = dataset
    cfg = sam_jax.tiny()
    model = SamModel(cfg, random_variables(cfg, seed=3))
    # images 2 and 3: two boxes each, so one compiled decode shape
    dets = [d for d in detections_from_gt(data) if d["image_id"] in (2, 3)]
    for refine in (False, True):
        results = masks_from_detections(model, dets, images, str(path), refine=refine)
        assert len(results) == 4
        for r, d in zip(results, dets):
            assert (r["image_id"], r["category_id"], r["score"]) == (
                d["image_id"], d["category_id"], d["score"])
            assert r["segmentation"]["size"] == [H, W]
            assert isinstance(r["segmentation"]["counts"], str)
        result = evaluate_instances(path, results, image_ids=[2, 3])
        assert result.images == 2 and -1.0 <= result.ap <= 1.0
