"""Object proposals (sam_jax.evaluation.proposals, SAM §7.3): class-agnostic mask AR on a
synthetic COCO/LVIS ground truth with known answers (perfect 1, empty 0, a hand-counted
partial score), equal to pycocotools' own COCOeval.summarize on the same inputs; the ranking by
the mean of predicted IoU and stability; the tiny model end to end for the record format."""

import json
import math

import numpy as np
import pytest

from sam_jax.evaluation.coco import load_coco_gt
from sam_jax.evaluation.proposals import (evaluate_proposals, generate_proposals,
                                          proposal_settings, rank_proposals)

W, H = 200, 160
# (image_id, category_id, x0, y0, x1, y1): rectangles, COCO sizes small < 32² <= medium < 96²
OBJECTS = [
    (1, 1, 5, 5, 115, 105),     # large 110x100
    (1, 2, 140, 10, 180, 50),   # medium 40x40
    (1, 1, 150, 120, 160, 130),  # small 10x10
    (2, 2, 10, 10, 30, 35),     # small 20x25
    (2, 1, 60, 60, 110, 90),    # medium 50x30
    (3, 2, 20, 20, 140, 110),   # large 120x90
    (3, 1, 170, 140, 175, 148),  # small 5x8
]


def rect(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask):
    from pycocotools import mask as mask_utils
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()}


def synthetic_gt(lvis=True):
    """3 images, 7 objects of 2 categories; the first two objects as polygons, the rest RLE.
    LVIS style (no `iscrowd`, images named by `coco_url`) unless lvis=False."""
    images, anns = [], []
    for i in (1, 2, 3):
        name = f"im{i}.png"
        images.append({"id": i, "height": H, "width": W,
                       **({"coco_url": f"http://x/val/{name}"} if lvis and i > 1 else
                          {"file_name": name})})
    for k, (image_id, cat, x0, y0, x1, y1) in enumerate(OBJECTS):
        m = rect(x0, y0, x1, y1)
        seg = [[x0, y0, x1, y0, x1, y1, x0, y1]] if k < 2 else rle(m)
        ann = {"id": k + 1, "image_id": image_id, "category_id": cat, "segmentation": seg,
               "area": float(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0]}
        if not lvis:
            ann["iscrowd"] = 0
        anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def gt_masks(data):
    """Each annotation's mask as pycocotools rasterises it (polygons included)."""
    coco = load_coco_gt_from(data)
    return [coco.annToMask(coco.anns[a["id"]]).astype(bool) for a in data["annotations"]]


def load_coco_gt_from(data):
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))
    for a in coco.dataset["annotations"]:
        a.setdefault("iscrowd", 0)
    coco.createIndex()
    return coco


@pytest.fixture
def gt_path(tmp_path):
    path = tmp_path / "lvis_like.json"
    path.write_text(json.dumps(synthetic_gt(lvis=True)))
    return path


def _result(image_id, mask, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle(mask),
            "score": score}


def pycocotools_ar(data, results, max_dets=(1, 100, 1000)):
    """pycocotools' own reading: COCOeval.summarize, whose stats[6:12] are AR at maxDets[0],
    [1], [2] and AR small/medium/large at maxDets[2]."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval
    gt = load_coco_gt_from(data)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iouType="segm")
        ev.params.useCats = 0
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[6:12]


# ---- known answers ---------------------------------------------------------------------------

def test_ground_truth_as_proposals_recalls_everything(gt_path):
    data = synthetic_gt()
    results = [_result(a["image_id"], m, 0.5, category_id=1)  # categories ignored
               for a, m in zip(data["annotations"], gt_masks(data))]
    result = evaluate_proposals(str(gt_path), results)
    assert result.table() == {"AR@100": 1.0, "AR@1000": 1.0, "AR_small@1000": 1.0,
                              "AR_medium@1000": 1.0, "AR_large@1000": 1.0}
    assert result.images == 3 and result.proposals == 7
    assert result.recall.shape == (10, 4, 2)
    assert "| 3 | 7 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in result.format_table()
    report = json.loads(json.dumps(result.to_json()))
    assert report["results"]["AR@1000"] == 1.0 and report["protocol"]["max_dets"] == [100, 1000]


def test_no_proposals_recall_nothing(gt_path):
    result = evaluate_proposals(gt_path, [])
    assert set(result.table().values()) == {0.0}
    assert result.proposals == 0


def test_partial_recall_is_hand_counted_and_equals_pycocotools(gt_path):
    data = synthetic_gt()
    masks = gt_masks(data)
    results = [
        _result(1, masks[1], 0.9),  # medium, exact
        _result(1, masks[2], 0.8),  # small, exact
        # large object 0 shifted right by 18 px: IoU 92/128 = 0.72, a match at IoU
        # thresholds 0.50..0.70 (5 of 10)
        _result(1, rect(23, 5, 133, 105), 0.7),
        _result(2, rect(150, 100, 190, 150), 0.99),  # matches nothing
        _result(3, masks[5], 0.6),  # large, exact
    ]
    result = evaluate_proposals(gt_path, results, max_dets=(1, 100, 1000))
    table = result.table()
    assert table["AR@1000"] == pytest.approx(3.5 / 7)
    assert table["AR@100"] == pytest.approx(3.5 / 7)
    assert table["AR_small@1000"] == pytest.approx(1 / 3)
    assert table["AR_medium@1000"] == pytest.approx(1 / 2)
    assert table["AR_large@1000"] == pytest.approx(1.5 / 2)
    # one proposal per image: image 1 keeps its best (the medium), image 2 its miss, image 3
    # its large
    assert table["AR@1"] == pytest.approx(2 / 7)
    ours = [table[k] for k in ("AR@1", "AR@100", "AR@1000", "AR_small@1000",
                               "AR_medium@1000", "AR_large@1000")]
    np.testing.assert_allclose(ours, pycocotools_ar(data, results), rtol=0, atol=1e-12)


def test_only_the_given_images_are_scored(gt_path):
    data = synthetic_gt()
    masks = gt_masks(data)
    results = [_result(2, masks[3], 0.5), _result(2, masks[4], 0.5)]
    assert evaluate_proposals(gt_path, results, image_ids=[2]).table()["AR@1000"] == 1.0
    assert evaluate_proposals(gt_path, results).table()["AR@1000"] == pytest.approx(2 / 7)


# ---- ranking ---------------------------------------------------------------------------------

class _Generator:
    """Stand-in for SamAutomaticMaskGenerator: the same records for every image."""

    def __init__(self, records):
        self.records = records
        self.images = []

    def generate(self, image):
        self.images.append(image.shape)
        return self.records


def _record(segmentation, iou, stability):
    return {"segmentation": segmentation, "predicted_iou": iou, "stability_score": stability,
            "area": 1, "bbox": [0, 0, 1, 1], "point_coords": [[0, 0]], "crop_box": [0, 0, W, H]}


def test_ranking_by_mean_of_iou_and_stability_decides_what_survives(gt_path):
    from sam_jax.utils import amg

    data = synthetic_gt()
    masks = gt_masks(data)
    wrong = rect(0, 120, 40, 160)
    records = [
        _record(rle(wrong), 0.95, 0.3),  # the most confident by predicted IoU: mean 0.625
        _record(masks[5], 0.7, 0.9),  # the object (a binary mask record): mean 0.8
        _record(amg.mask_to_rle(wrong[None])[0], 0.6, 0.95),  # uncompressed RLE: 0.775
        _record(rle(wrong), 0.99, float("nan")),  # an empty mask's stability: dropped
    ]
    generator = _Generator(records)
    image = np.zeros((H, W, 3), np.uint8)
    results = generate_proposals(generator, [(3, image)], max_proposals=2)
    assert [r["score"] for r in results] == pytest.approx([0.8, 0.775])
    assert all(r["image_id"] == 3 and r["category_id"] == 1 for r in results)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert results[0]["segmentation"] == rle(masks[5])
    assert results[1]["segmentation"] == rle(wrong)
    # keeping one proposal: the mean's choice is the object; predicted IoU alone would miss it
    top1 = generate_proposals(generator, {3: image}, max_proposals=1)
    result = evaluate_proposals(gt_path, top1, image_ids=[3])
    assert result.table()["AR@1000"] == 0.5  # one of image 3's two objects
    by_iou = [rank_proposals([records[0]], 3, 1)[0]]
    assert evaluate_proposals(gt_path, by_iou, image_ids=[3]).table()["AR@1000"] == 0.0


def test_proposal_settings_are_the_papers():
    s = proposal_settings()
    assert (s["points_per_side"], s["box_nms_thresh"], s["crop_n_layers"]) == (64, 0.9, 0)
    assert (s["pred_iou_thresh"], s["stability_score_thresh"]) == (0.0, 0.0)
    assert s["min_mask_region_area"] == 0 and s["output_mode"] == "coco_rle"
    assert proposal_settings(points_per_side=8)["points_per_side"] == 8
    with pytest.raises(ValueError, match="points_per_side"):
        proposal_settings(points_per_side=0)


# ---- bad input -------------------------------------------------------------------------------

def test_bad_input_names_the_problem(tmp_path, gt_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        evaluate_proposals(gt_path, bad)
    with pytest.raises(ValueError, match="not a JSON file"):
        evaluate_proposals(bad, [])
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        evaluate_proposals(bad, [])
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_proposals(tmp_path / "nope.json", [])
    seg = rle(rect(0, 0, 4, 4))
    with pytest.raises(ValueError, match="'score'"):
        evaluate_proposals(gt_path, [{"image_id": 1, "segmentation": seg}])
    with pytest.raises(ValueError, match="image id.*: 42"):
        evaluate_proposals(gt_path, [{"image_id": 42, "segmentation": seg, "score": 1.0}])
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_proposals(gt_path, [], max_dets=(0,))
    with pytest.raises(ValueError, match="pairs"):
        generate_proposals(_Generator([]), [np.zeros((4, 4, 3), np.uint8)])


def test_lvis_style_ground_truth_gets_crowd_flags_and_areas(gt_path):
    data = synthetic_gt()
    for a in data["annotations"]:
        del a["area"]
    coco = load_coco_gt(load_coco_gt_from(data))
    assert all(a["iscrowd"] == 0 for a in coco.dataset["annotations"])
    assert coco.anns[3]["area"] == 100.0
    assert all(a["iscrowd"] == 0 for a in load_coco_gt(gt_path).anns.values())


# ---- with the tiny model ---------------------------------------------------------------------

def test_generate_proposals_with_the_tiny_model(gt_path, tmp_path):
    import sam_jax
    from random_weights import random_variables
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_jax.inference import SamModel
    from PIL import Image

    cfg = sam_jax.tiny()
    model = SamModel(cfg, random_variables(cfg, seed=3))
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "im1.png")
    settings = proposal_settings(points_per_side=4)
    results = generate_proposals(model, [(1, str(tmp_path / "im1.png"))], max_proposals=5,
                                 settings=settings)
    assert 0 < len(results) <= 5
    for r in results:
        assert set(r) == {"image_id", "category_id", "segmentation", "score"}
        assert r["image_id"] == 1 and r["category_id"] == 1
        assert r["segmentation"]["size"] == [H, W]
        assert isinstance(r["segmentation"]["counts"], str) and math.isfinite(r["score"])
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # the scores are the generator's own records' mean of predicted IoU and stability
    records = SamAutomaticMaskGenerator(model, **settings).generate(image)
    means = sorted(((r["predicted_iou"] + r["stability_score"]) / 2 for r in records),
                   reverse=True)
    np.testing.assert_allclose(scores, means[:len(scores)], rtol=1e-6)
    result = evaluate_proposals(gt_path, results, image_ids=[1])
    assert 0.0 <= result.table()["AR@1000"] <= 1.0
