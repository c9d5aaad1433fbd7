"""`SamConfig.keep_clicked_components`: shown masks keep only their 8-connected components that
hold a positive click (`sam_jax.utils.clicked_components`), checked against scipy's labelling,
and wired into the predictor and the official-style batched call."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import ndimage

import sam_jax
from sam_jax.utils.clicked_components import clicked_component_masks, keep_clicked_components

EIGHT = np.ones((3, 3))


def reference(mask, seeds):
    """scipy: the components of `mask` holding a seed; the whole mask when none does."""
    components, _ = ndimage.label(mask, EIGHT)
    hit = sorted(set(components[seeds & mask].tolist()) - {0})
    return np.isin(components, hit) if hit else mask


@pytest.mark.parametrize("smooth,threshold", [(1.0, 0.1), (2.5, 0.0), (0.0, 0.8)])
def test_components_equal_scipy_labelling(smooth, threshold):
    rng = np.random.default_rng(int(10 * smooth))
    noise = rng.normal(size=(3, 4, 48, 56))
    masks = ndimage.gaussian_filter(noise, (0, 0, smooth, smooth)) > threshold * noise.std()
    seeds = rng.random(masks.shape) < 0.003
    seeds[0, 0] = False  # one map without seeds: returned whole
    out = np.asarray(jax.jit(clicked_component_masks)(masks, seeds))
    changed = 0
    for i in range(3):
        for j in range(4):
            expected = reference(masks[i, j], seeds[i, j])
            np.testing.assert_array_equal(out[i, j], expected, err_msg=f"{i}, {j}")
            changed += int((expected != masks[i, j]).any())
    np.testing.assert_array_equal(out[0, 0], masks[0, 0])
    assert changed >= 6  # most maps lose components: the test is not vacuous


def test_spiral_needs_many_turns():
    """A path with many turns joins the click to the far end; a separate block is dropped."""
    mask = np.zeros((21, 21), bool)
    mask[1, 1:20] = mask[1:20, 19] = mask[19, 1:20] = mask[5:20, 1] = True
    mask[5, 1:16] = mask[5:16, 15] = mask[15, 5:16] = mask[9:16, 5] = mask[9, 5:12] = True
    mask[12:14, 8:12] = True  # inside the spiral, touching nothing
    seeds = np.zeros_like(mask)
    seeds[1, 1] = True
    out = np.asarray(clicked_component_masks(mask, seeds))
    np.testing.assert_array_equal(out, reference(mask, seeds))
    assert out[9, 11] and not out[12:14, 8:12].any()


def test_logits_of_unclicked_components_are_mirrored_below_the_threshold():
    logits = np.full((2, 3, 16, 16), -4.0, np.float32)
    logits[:, :, 1:5, 1:5] = 3.0  # clicked at (x, y) = (12, 10) px: cell (2, 3), 4 px a cell
    logits[:, :, 10:14, 10:14] = 5.0  # apart
    logits[:, 2, 10:14, 10:14] = 0.25  # just above the threshold 0.2
    coords = np.array([[[12.0, 10.0], [50.0, 50.0]], [[50.0, 50.0], [12.0, 10.0]]], np.float32)
    labels = np.array([[1, 0], [0, 2]])  # prompt 1: a negative click and a box corner only
    out = np.asarray(keep_clicked_components(logits, coords, labels, image_size=64,
                                             threshold=0.2))
    expected = logits.copy()
    expected[0, :, 10:14, 10:14] = 2 * 0.2 - logits[0, :, 10:14, 10:14]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert (out[0, :, 10:14, 10:14] < 0.2).all() and (out[1] == logits[1]).all()


@pytest.fixture(scope="module")
def tiny_pair():
    from random_weights import random_variables
    from sam_jax.inference import SamModel

    cfg = sam_jax.tiny()
    off = SamModel(cfg, random_variables(cfg, seed=3))
    on = dataclasses.replace(off, config=cfg.replace(keep_clicked_components=True))
    return off, on


def test_predictor_shows_only_clicked_components(tiny_pair):
    from sam_jax.inference import postprocess_masks
    from sam_jax.predictor import SamPredictor

    off, on = (SamPredictor(m) for m in tiny_pair)
    image = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    off.set_image(image)
    on.set_image(image)
    points, labels = np.array([[40.0, 30.0], [10.0, 50.0]], np.float32), np.array([1, 0])
    m_off, s_off, low_off = off.predict(points, labels)
    m_on, s_on, low_on = on.predict(points, labels)
    # scores and the next click's mask prompt stay the decoder's
    np.testing.assert_array_equal(s_on, s_off)
    np.testing.assert_array_equal(low_on, low_off)
    cfg = on.model.config
    model_frame = on.transform.apply_coords(points, image.shape[:2])
    kept = keep_clicked_components(low_off[None], model_frame[None], labels[None],
                                   image_size=cfg.image_size, threshold=cfg.mask_threshold)
    expected = np.asarray(postprocess_masks(kept, input_size=tuple(on.input_size),
                                            original_size=image.shape[:2],
                                            image_size=cfg.image_size, threshold=0.0))[0]
    np.testing.assert_array_equal(m_on, expected)
    assert (m_on <= m_off).all() and (m_on != m_off).any()
    # a box prompt has no positive click: the masks are the official ones
    box = np.array([5, 5, 70, 50])
    np.testing.assert_array_equal(on.predict(box=box)[0], off.predict(box=box)[0])


def test_batched_call_matches_the_predictor(tiny_pair):
    from sam_jax.predictor import SamPredictor

    _, on = tiny_pair
    image = (np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(on)
    predictor.set_image(image)
    points = np.array([[20.0, 20.0]], np.float32)
    masks, _, _ = predictor.predict(points, np.array([1]), multimask_output=False)
    model_frame = predictor.transform.apply_coords(points, image.shape[:2])
    out = on([{"image": np.transpose(predictor.transform.apply_image(image), (2, 0, 1)),
               "original_size": image.shape[:2], "point_coords": model_frame[None],
               "point_labels": np.array([[1]])}], multimask_output=False)
    np.testing.assert_array_equal(np.asarray(out[0]["masks"])[0], masks)


def test_config_keeps_the_switch():
    cfg = sam_jax.tiny().replace(keep_clicked_components=True)
    assert sam_jax.SamConfig.from_json(cfg.to_json()).keep_clicked_components
    old = sam_jax.tiny().to_dict()
    del old["keep_clicked_components"]  # a config saved before the switch existed
    assert sam_jax.SamConfig.from_dict(old) == sam_jax.tiny()
