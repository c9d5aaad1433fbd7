"""The model bundled in the package (sam_jax/weights/sam_dinov2_s: the pretrained DINOv2
ViT-S/14 backbone stored as int8, SAM's head trained by experiments/train_default_model.py):
it loads with no path, the CLI uses it when no --checkpoint is given, and it segments real
photos: the object under a click, what a box holds, less after a negative click."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

import sam_jax
from sam_jax import cli
from sam_jax.configs import EdgeRefinerConfig, MaskRefinerConfig
from sam_jax.evaluation.clicks import farthest_from_boundary, mask_iou, next_click
from sam_jax.training.evaluate import evaluate_clicks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUCK = os.path.join(REPO, "assets", "truck.jpg")
DAVIS = os.path.join(REPO, "tests", "data", "davis_mini")
# a held-out Clothing Co-Parsing photo and its whole-person mask (tests/data/README.md)
PERSON = os.path.join(REPO, "tests", "data", "ccp_person", "0441")
# the truck's body and one of its wheels in assets/truck.jpg (1800 x 1200), by hand
TRUCK_BOX = (75, 275, 1725, 850)
WHEEL_BOX = (425, 600, 700, 875)


def _size_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files) / 2 ** 20


@pytest.fixture(scope="module")
def model():
    return sam_jax.load()


@pytest.fixture(scope="module")
def truck_predictor(model):
    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(np.asarray(Image.open(TRUCK).convert("RGB")))
    return predictor


def _box_stats(mask, box):
    """(share of the mask inside the box, share of the box the mask covers)."""
    x0, y0, x1, y1 = box
    inside = mask[y0:y1, x0:x1].sum()
    return inside / max(mask.sum(), 1), inside / ((x1 - x0) * (y1 - y0))


def test_bundled_model_loads_and_is_small(model):
    assert os.path.isdir(sam_jax.DEFAULT_CHECKPOINT)
    assert _size_mb(sam_jax.DEFAULT_CHECKPOINT) < 45
    # the dinov2_s architecture with the learned mask refiner on top, run at 518 px (DINOv2's
    # own 37x37 grid; the preset's 448 px is what the head was first trained at); its masks
    # keep only the parts connected to a positive click; the refiner reads the clicks too; an
    # edge stage sharpens the outlines on the original image's pixels
    preset = sam_jax.get_config("dinov2_s")
    assert model.config == preset.replace(
        image_encoder=dataclasses.replace(preset.image_encoder, img_size=518),
        mask_refiner=MaskRefinerConfig(click_input=True), keep_clicked_components=True,
        edge_refiner=EdgeRefinerConfig())
    assert (model.config.image_embedding_size, model.config.low_res_size) == (37, 148)
    # a DINOv2 encoder's input size does not change its weights: still the dinov2_s preset
    # (SAM's ViT stores a position table per grid: another size is another model)
    assert sam_jax.configs.preset_name(model.config) == "dinov2_s"
    assert repr(model).startswith("SamModel(dinov2_s: image encoder DINOv2 ViT width 384 "
                                  "depth 12 at 518 px")
    vit = sam_jax.get_config("vit_b")
    assert sam_jax.configs.preset_name(vit.replace(image_encoder=dataclasses.replace(
        vit.image_encoder, img_size=512))) is None


def test_bundled_model_segments_davis_frames(model):
    examples = []
    for seq, frame in (("camel", "00000"), ("camel", "00040"), ("cows", "00000"),
                       ("cows", "00050")):
        image = np.asarray(Image.open(f"{DAVIS}/JPEGImages/480p/{seq}/{frame}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(f"{DAVIS}/Annotations/480p/{seq}/{frame}.png")) > 127
        examples.append((image, mask[None], {}))
    result = evaluate_clicks(model, examples, num_clicks=3)
    print(result)
    # frames of training sequences (downscaled): a check that the shipped weights segment,
    # not a held-out score (the README reports those)
    assert result["miou_1"] > 0.75 and result["miou_3"] > 0.75


# Measured (inside, cover): truck box (1.00, 0.63), wheel box (0.93, 0.57) (phase 10 head:
# (1.00, 0.62), (0.93, 0.52); the 448 px head:
# (1.00, 0.60), (0.86, 0.51)). The wheel's mask
# spills onto the wheel arch (phase 3's head: 0.85 inside; phase 2's kept 0.93 but scored lower
# on held-out box prompts overall: DAVIS 0.724 vs 0.759 on 24 images per set).
@pytest.mark.parametrize("box, min_inside, min_cover", [(TRUCK_BOX, 0.9, 0.3),
                                                        (WHEEL_BOX, 0.8, 0.3)])
def test_box_gives_what_the_box_holds(truck_predictor, box, min_inside, min_cover):
    masks, scores, _ = truck_predictor.predict(box=np.array(box, np.float32),
                                               multimask_output=False)
    inside, cover = _box_stats(masks[0], box)
    assert inside > min_inside and cover > min_cover, (inside, cover, scores)


def test_negative_click_changes_the_mask(truck_predictor):
    # a click on the truck, then a negative click on its rear wheel. The mask changes by more
    # than 5% of its area (the old mini model: 3%) and loses part of the wheel. The shipped
    # click-reading refiner takes the whole wheel out, as SAM does (wheel box covered 0.81 ->
    # 0.06; README, "The bundled model"); the assertion asks only for a change. Measured with
    # the refiner before it read the clicks: phase 11 head changed 6.0%, wheel box covered
    # 0.70 -> 0.64; phase 10 head 7.2%, 0.70 -> 0.55. Phase 11 trained the single
    # output on whole objects only, which ended the collapse of whole people after a negative
    # click beside them (the test below) and costs what a negative click on a part removes
    # (README: parts' corrective clicks).
    point = np.array([[1000, 500]], np.float32)
    masks, scores, logits = truck_predictor.predict(point_coords=point,
                                                    point_labels=np.array([1]))
    first = masks[int(np.argmax(scores))]
    x0, y0, x1, y1 = WHEEL_BOX
    wheel = (560, 740)
    before = first[y0:y1, x0:x1].mean()
    assert before > 0.5, before  # the truck's mask holds most of the wheel
    masks2, _, _ = truck_predictor.predict(
        point_coords=np.array([[1000, 500], wheel], np.float32), point_labels=np.array([1, 0]),
        mask_input=logits[int(np.argmax(scores))][None], multimask_output=False)
    changed = (first != masks2[0]).sum() / first.sum()
    after = masks2[0][y0:y1, x0:x1].mean()
    assert changed > 0.05 and after < before - 0.05, (changed, before, after)
    assert not masks2[0][wheel[1], wheel[0]]  # the negative click's own pixel is out


def test_negative_click_beside_a_person_keeps_the_person(model):
    # The evaluation's click protocol on a held-out Clothing Co-Parsing photo (never trained
    # on): the first click at the person's interior-most pixel, the second at the larger error
    # region's, which here is background the mask spilled onto beside the outline, so it is a
    # negative click. The phase 10 head collapsed the person to a part after it (IoU 0.945 ->
    # 0.594); the phase 11 head (its single-output token trained on whole objects) keeps the
    # person: 0.945 -> 0.911 with the refiner before it read the clicks. The click-reading
    # refiner carves around the negative click, between the arm and the body, into the top:
    # 0.943 -> 0.836 after its second stage, 0.942 -> 0.850 after the shipped background-click
    # stage; still the person, not a part (the README gives this cost).
    image = np.asarray(Image.open(f"{PERSON}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(f"{PERSON}.png")) > 127
    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(image)
    xy, _ = farthest_from_boundary(gt)
    masks, scores, logits = predictor.predict(point_coords=np.array([xy], np.float32),
                                              point_labels=np.array([1]))
    best = int(np.argmax(scores))
    first = mask_iou(masks[best], gt)
    click, label = next_click(masks[best], gt)
    assert label == 0 and not gt[click[1], click[0]], (click, label)
    masks2, _, _ = predictor.predict(point_coords=np.array([xy, click], np.float32),
                                     point_labels=np.array([1, 0]),
                                     mask_input=logits[best][None], multimask_output=False)
    second = mask_iou(masks2[0], gt)
    assert first > 0.9 and second > 0.8, (first, second)


def test_segment_without_checkpoint_uses_bundled_model(tmp_path, capsys):
    prefix = tmp_path / "truck"
    status = cli.main(["segment", TRUCK, "--point", "500,375", "--multimask", "-o",
                       str(prefix)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "bundled default model" in err
    record = json.loads((tmp_path / "truck.json").read_text())
    assert record["checkpoint"] == sam_jax.DEFAULT_CHECKPOINT
    assert record["model_type"] == "dinov2_s"
    mask = np.asarray(Image.open(tmp_path / "truck.png")) > 0
    assert mask.shape == (1200, 1800)
    # the README's first command clicks the truck's side: the mask is the truck (or a
    # large part of it), not the wall behind it
    inside, cover = _box_stats(mask, TRUCK_BOX)
    assert inside > 0.9 and cover > 0.3, (inside, cover)


def test_generate_with_default_settings_finds_the_truck(tmp_path, capsys):
    # SAM's thresholds (predicted IoU 0.88, stability 0.95) keep nothing of this model's masks
    # (soft foreground logits); its checkpoint recommends the thresholds that
    # experiments/generator_thresholds.py chose on training photos, and generate uses them
    assert sam_jax.load().generator_defaults == {"pred_iou_thresh": 0.61,
                                                 "stability_score_thresh": 0.6}
    status = cli.main(["generate", TRUCK, "-o", str(tmp_path / "out"), "-q"])
    assert status == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "truck.json").read_text())
    assert record["sam_jax"]["options"]["pred_iou_thresh"] == 0.61
    assert len(record["annotations"]) >= 1
    from pycocotools import mask as mask_utils
    largest = max(record["annotations"], key=lambda a: a["area"])
    truck = mask_utils.decode(largest["segmentation"]) > 0
    inside, cover = _box_stats(truck, TRUCK_BOX)
    assert inside > 0.9 and cover > 0.5, (inside, cover)


def test_missing_bundled_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sam_jax, "DEFAULT_CHECKPOINT", str(tmp_path / "gone"))
    status = cli.main(["segment", TRUCK, "--point", "500,375", "-o", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert status == 1
    assert "bundled default model is missing" in err and "--checkpoint" in err


def test_bundled_model_has_a_trained_refiner(model):
    assert model.config.mask_refiner == MaskRefinerConfig(click_input=True)
    refiner = model.variables["params"]["mask_refiner"]
    assert set(refiner) == ({"image_in", "image_mid", "fuse", "out", "out_norm", "click_in"}
                            | {f"blocks_{i}" for i in range(5)}
                            | {f"norms_{i}" for i in range(5)})
    # trained: its last layer (zero at initialization) is not the identity's
    assert float(np.abs(np.asarray(refiner["out"]["kernel"])).max()) > 1e-3
    # and it learned to read the clicks: the click convolution starts at zero
    assert float(np.abs(np.asarray(refiner["click_in"]["kernel"])).max()) > 1e-3
