"""`SamConfig.mirror_average`: prompted masks are the mean of the model's on the image and on its
mirror image (`sam_jax.utils.mirror`, `inference.decode_shown`).

The reference every path is checked against is the same model without the switch, run by hand
on the image and on its mirror image (flipped with numpy, the prompts mirrored with x -> W-1-x),
the second result flipped back: an exact composition when the image needs no resizing (the
tiny model's 128 px) and its width spans whole low-res cells, up to float rounding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from conftest import load_truck
from sam_jax import configs, inference
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.configs import MaskRefinerConfig, SamConfig
from sam_jax.device_predict import predict_on_device
from sam_jax.inference import SamModel
from sam_jax.predictor import SamPredictor
from sam_jax.utils.mirror import mirror_columns, mirror_pixels, mirror_points

ATOL = 1e-4  # logits; observed ~1e-6 (the refiner's and the upscaling's sums in another order)


@pytest.fixture(scope="module")
def mirrored_and_plain():
    """A tiny model with a perturbed mask refiner that averages over the mirror image, and the
    same model without the switch."""
    cfg = configs.tiny().replace(mask_refiner=MaskRefinerConfig(width=8, dilations=(1, 2)))
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params = dict(variables["params"])
    leaves, tree = jax.tree.flatten(params["mask_refiner"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params["mask_refiner"] = jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    variables = {"params": params, "buffers": variables["buffers"]}
    return (SamModel(cfg.replace(mirror_average=True), variables), SamModel(cfg, variables))


# ---- the mirroring itself -----------------------------------------------------------------------

def test_mirror_columns_reverses_the_image_cells():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16, 16)), jnp.float32)
    # images as wide as the frame: the columns reversed, exactly
    np.testing.assert_array_equal(np.asarray(mirror_columns(x, jnp.array([64, 64]), 64)),
                                  np.asarray(x)[..., ::-1])
    # along another axis (the mask inputs' (P, 4h, 4w, 1) layout)
    np.testing.assert_array_equal(
        np.asarray(mirror_columns(x, jnp.array([64, 64]), 64, axis=-2)),
        np.asarray(x)[..., ::-1, :])
    # an image 40 of 64 px wide spans 10 of 16 cells: cell j's centre mirrors to cell 9 - j;
    # 38 px span 9.5 cells: between cells (8.5 - j), linear; padding cells clamp to cell 0
    ramp = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32), (2, 4, 16))
    out = np.asarray(mirror_columns(ramp, jnp.array([40, 38]), 64))
    np.testing.assert_allclose(out[0, :, :10], np.tile(9.0 - np.arange(10), (4, 1)))
    np.testing.assert_allclose(out[1, :, :9], np.tile(8.5 - np.arange(9), (4, 1)))
    assert (out[0, :, 10:] == 0).all() and (out[1, :, 9:] == 0).all()
    # whole cells: mirroring twice gives the image's cells back
    twice = mirror_columns(mirror_columns(x, jnp.array([40, 64]), 64), jnp.array([40, 64]), 64)
    np.testing.assert_array_equal(np.asarray(twice)[0, ..., :10], np.asarray(x)[0, ..., :10])


def test_mirror_pixels_reverses_each_image_inside_its_width():
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    out = np.asarray(mirror_pixels(pixels, jnp.array([8, 5])))
    p = np.asarray(pixels)
    np.testing.assert_array_equal(out[0], p[0, :, ::-1])
    np.testing.assert_array_equal(out[1, :, :5], p[1, :, 4::-1])
    np.testing.assert_array_equal(out[1, :, 5:], p[1, :, 5:])  # the padding stays


def test_mirror_points_maps_pixel_x_to_w_minus_1_minus_x_and_keeps_boxes_xyxy():
    # prompt 0: two points and the not-a-point token; prompt 1: a point and a box's corners
    coords = jnp.array([[[3.0, 1.0], [10.0, 2.0], [0.0, 0.0]],
                        [[4.0, 5.0], [2.0, 6.0], [9.0, 7.0]]])
    labels = jnp.array([[1, 0, -1], [1, 2, 3]])
    out = np.asarray(mirror_points(coords, labels, jnp.array([20, 12])))
    np.testing.assert_array_equal(out[0, :2], [[16.0, 1.0], [9.0, 2.0]])
    # a box over pixels x 2..9 of an image 12 wide covers 11-9 .. 11-2 mirrored: x0 <= x1 still
    np.testing.assert_array_equal(out[1], [[7.0, 5.0], [2.0, 6.0], [9.0, 7.0]])
    # mirroring twice gives the prompts back (the not-a-point token's ignored x aside)
    again = np.asarray(mirror_points(jnp.asarray(out), labels, jnp.array([20, 12])))
    np.testing.assert_array_equal(again[0, :2], np.asarray(coords)[0, :2])
    np.testing.assert_array_equal(again[1], np.asarray(coords)[1])


# ---- the predictor against the composition by hand --------------------------------------------

def _by_hand(plain, image, **prompt):
    """The plain model on the image and on its mirror image (prompts mirrored by hand), the
    second flipped back, averaged: (logits at the original size, IoU, low-res logits)."""
    w = image.shape[1]
    cells = w * plain.config.low_res_size // plain.config.image_size  # low-res cells over it
    a, b = SamPredictor(plain), SamPredictor(plain)
    a.set_image(image)
    b.set_image(np.ascontiguousarray(image[:, ::-1]))
    flipped = dict(prompt)
    if "point_coords" in prompt:
        flipped["point_coords"] = prompt["point_coords"] * [-1, 1] + [w - 1, 0]
    if "box" in prompt:
        x0, y0, x1, y1 = prompt["box"]
        flipped["box"] = np.array([w - 1 - x1, y0, w - 1 - x0, y1], np.float32)
    if "mask_input" in prompt:
        flipped["mask_input"] = prompt["mask_input"].copy()
        flipped["mask_input"][..., :cells] = prompt["mask_input"][..., :cells][..., ::-1]
    la, ia, lowa = a.predict(**prompt, return_logits=True)
    lb, ib, lowb = b.predict(**flipped, return_logits=True)
    low = lowa.copy()  # the low-res cells over the image; the padding cells are not compared
    low[..., :cells] = (lowa[..., :cells] + lowb[..., :cells][..., ::-1]) / 2
    return (la + lb[..., ::-1]) / 2, (ia + ib) / 2, low, cells


PROMPTS = {
    "points": dict(point_coords=np.array([[30.0, 40.0], [90.0, 20.0]], np.float32),
                   point_labels=np.array([1, 0])),
    "box": dict(box=np.array([20.0, 10.0, 70.0, 60.0], np.float32)),
}


@pytest.mark.parametrize("size", [(128, 96), (96, 128)], ids=["landscape", "portrait"])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_predictor_averages_the_image_and_its_mirror_image(mirrored_and_plain, size, kind):
    """Landscape: the image fills the frame's width; portrait: 96 of 128 px, padding to its
    right, which the mirror must keep out of the image (24 whole low-res cells)."""
    mirrored, plain = mirrored_and_plain
    image = load_truck(size)
    prompt = PROMPTS[kind]
    predictor = SamPredictor(mirrored)
    predictor.set_image(image)
    logits, iou, low = predictor.predict(**prompt, return_logits=True)
    want_logits, want_iou, want_low, cells = _by_hand(plain, image, **prompt)
    # portrait: the upscaling's last image column reads a padding cell too; by hand, the
    # mirror image's lands in the first column, while averaged in the frame the padding cells
    # are the plain image's (the mirrored-back ones clamp to the edge): all else is exact
    edge = 1 if size[0] < size[1] else 0
    np.testing.assert_allclose(logits[..., edge:], want_logits[..., edge:], rtol=0, atol=ATOL)
    np.testing.assert_allclose(logits[..., :edge], want_logits[..., :edge], rtol=0, atol=0.5)
    np.testing.assert_allclose(iou, want_iou, rtol=0, atol=1e-6)
    np.testing.assert_allclose(low[..., :cells], want_low[..., :cells], rtol=0, atol=1e-5)
    # and it is not the plain model's result
    alone = SamPredictor(plain)
    alone.set_image(image)
    assert np.abs(alone.predict(**prompt, return_logits=True)[0] - logits).max() > 0.05
    masks, _, _ = predictor.predict(**prompt)
    np.testing.assert_array_equal(masks, logits > mirrored.config.mask_threshold)


def test_a_fed_back_mask_prompt_is_mirrored_for_the_mirror_image(mirrored_and_plain):
    mirrored, plain = mirrored_and_plain
    image = load_truck((128, 96))
    predictor = SamPredictor(mirrored)
    predictor.set_image(image)
    first = dict(point_coords=np.array([[40.0, 50.0]], np.float32), point_labels=np.array([1]))
    _, _, low = predictor.predict(**first, multimask_output=False)
    follow = dict(point_coords=np.array([[40.0, 50.0], [100.0, 30.0]], np.float32),
                  point_labels=np.array([1, 0]), mask_input=low)
    logits, iou, _ = predictor.predict(**follow, multimask_output=False, return_logits=True)
    want_logits, want_iou, _, _ = _by_hand(plain, image, **follow, multimask_output=False)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=ATOL)
    np.testing.assert_allclose(iou, want_iou, rtol=0, atol=1e-6)


def test_symmetric_image_gives_mirrored_masks_for_mirrored_clicks(mirrored_and_plain):
    """On a left-right symmetric image, clicks at x and at W-1-x see mirror images of one scene:
    the averaged outputs are exact mirrors (a click mirrored one pixel off breaks it)."""
    mirrored, _ = mirrored_and_plain
    half = np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)
    predictor = SamPredictor(mirrored)
    predictor.set_image(np.concatenate([half, half[:, ::-1]], axis=1))
    left, _, low_l = predictor.predict(np.array([[13.0, 20.0]]), np.array([1]),
                                       return_logits=True)
    right, _, low_r = predictor.predict(np.array([[127 - 13.0, 20.0]]), np.array([1]),
                                        return_logits=True)
    np.testing.assert_allclose(left, right[..., ::-1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(low_l, low_r[..., ::-1], rtol=0, atol=1e-5)
    assert np.abs(left - right).max() > 0.05  # the clicks do matter


# ---- every entry point gives the predictor's masks ---------------------------------------------

def test_device_api_and_batched_forward_equal_the_predictor(mirrored_and_plain):
    mirrored, _ = mirrored_and_plain
    model = dataclasses.replace(mirrored, config=mirrored.config.replace(
        keep_clicked_components=True))
    image = load_truck((150, 100))
    predictor = SamPredictor(model)
    predictor.set_image(image)
    coords, labels = np.array([[60.0, 40.0], [20.0, 70.0]], np.float32), np.array([1, 0])
    masks, iou, low = predictor.predict(coords, labels)
    frame = predictor.transform.apply_coords(coords, image.shape[:2])
    out = predictor.predict_jax(jnp.asarray(frame[None]), jnp.asarray(labels[None]))
    np.testing.assert_array_equal(np.asarray(out.masks)[0], masks)
    np.testing.assert_allclose(np.asarray(out.iou_predictions)[0], iou, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.low_res_logits)[0], low, rtol=0, atol=1e-5)
    resized = predictor.transform.apply_image(image)
    second = load_truck((90, 120))  # another size: each image keeps its own width
    other = SamPredictor(model)
    other.set_image(second)
    box = other.transform.apply_boxes(np.array([[10.0, 10, 60, 50]]), second.shape[:2])
    batched = model([{"image": resized.transpose(2, 0, 1), "original_size": image.shape[:2],
                      "point_coords": frame[None], "point_labels": labels[None]},
                     {"image": other.transform.apply_image(second).transpose(2, 0, 1),
                      "original_size": second.shape[:2], "boxes": box}],
                    multimask_output=True)
    np.testing.assert_array_equal(np.asarray(batched[0]["masks"])[0], masks)
    np.testing.assert_allclose(np.asarray(batched[0]["low_res_logits"])[0], low, rtol=0,
                               atol=1e-5)
    # the second image's box, against the predictor on that image
    want = other.predict_jax(boxes=jnp.asarray(box))
    np.testing.assert_array_equal(np.asarray(batched[1]["masks"]), np.asarray(want.masks))


def test_device_api_refuses_a_missing_or_unwanted_mirror_image(mirrored_and_plain):
    mirrored, plain = mirrored_and_plain
    predictor = SamPredictor(mirrored)
    predictor.set_image(load_truck((150, 100)))
    assert isinstance(predictor.mirrored, inference.MirroredImages)
    args = (predictor.features, jnp.zeros((1, 1, 2)), jnp.ones((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="averages its masks over the mirror image"):
        predict_on_device(mirrored.variables, *args, config=mirrored.config)
    with pytest.raises(ValueError, match="without mirror averaging"):
        predict_on_device(plain.variables, *args, config=plain.config,
                          mirrored=predictor.mirrored)
    with pytest.raises(ValueError, match="must be the mirror images'"):
        predict_on_device(mirrored.variables, *args, config=mirrored.config,
                          mirrored=predictor.mirrored._replace(
                              embeddings=jnp.concatenate([predictor.mirrored.embeddings] * 2)))
    # low-res outputs alone need no output size: the widths travel with the mirror images
    out = predict_on_device(mirrored.variables, *args, config=mirrored.config,
                            mirrored=predictor.mirrored)
    assert out.masks is None and out.low_res_logits.shape == (1, 3, 32, 32)


def test_generator_decodes_the_image_as_given(mirrored_and_plain):
    mirrored, plain = mirrored_and_plain
    generator = SamAutomaticMaskGenerator(mirrored, points_per_side=4)
    assert not generator.predictor.model.config.mirror_average
    image = load_truck((120, 90))
    ours = generator.generate(image)
    want = SamAutomaticMaskGenerator(plain, points_per_side=4).generate(image)
    assert [m["area"] for m in ours] == [m["area"] for m in want]


def test_config_round_trip():
    cfg = configs.dinov2_s().replace(mirror_average=True)
    assert SamConfig.from_json(cfg.to_json()).mirror_average
    assert not SamConfig.from_json(configs.dinov2_s().to_json()).mirror_average
    assert configs.preset_name(cfg) == "dinov2_s"
    from sam_jax.cli.common import model_name
    assert model_name(cfg) == "dinov2_s"
