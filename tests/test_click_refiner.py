"""A mask refiner that reads the prompt's clicks (`MaskRefinerConfig.click_input`): the click
maps it reads, that a fresh click branch changes nothing, that a click acts near itself, and
that every path that refines masks hands it the prompt's own points (the predictor, the
automatic generator, soft edges)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from conftest import assert_generator_masks_are_predictor_masks, load_truck, perturbed
from sam_jax import configs, inference
from sam_jax.configs import MaskRefinerConfig, SamConfig
from sam_jax.evaluation.edges import EdgeOptions, soft_edges
from sam_jax.inference import SamModel
from sam_jax.modeling.mask_refiner import CLICK_SIGMAS, MaskRefiner, click_maps
from sam_jax.predictor import SamPredictor

CLICKS = MaskRefinerConfig(width=8, dilations=(1, 2), click_input=True)



def test_click_maps_peak_at_the_click_and_follow_the_formula():
    # one prompt: a positive click at input pixel (10, 6), a negative at (30, 20), a box
    # corner and padding (not clicks)
    coords = jnp.array([[[[10.0, 6.0], [30.0, 20.0], [4.0, 4.0], [0.0, 0.0]]]])
    labels = jnp.array([[[1, 0, 2, -2]]])
    maps = np.asarray(click_maps(coords, labels, (20, 24)))
    assert maps.shape == (1, 1, 20, 24, 2 * len(CLICK_SIGMAS))
    # the pixel's centre (10.5, 6.5) is 5.25 / 3.25 cells in: cell (3, 5) holds it
    for k, sigma in enumerate(CLICK_SIGMAS):
        pos, neg = maps[0, 0, ..., 2 * k], maps[0, 0, ..., 2 * k + 1]
        assert np.unravel_index(pos.argmax(), pos.shape) == (3, 5)
        assert np.unravel_index(neg.argmax(), neg.shape) == (10, 15)
        r, c = 7, 2  # centre (7.5, 2.5) cells; the click at (3.25, 5.25)
        expected = np.exp(-((7.5 - 3.25) ** 2 + (2.5 - 5.25) ** 2) / (2 * sigma ** 2))
        np.testing.assert_allclose(pos[r, c], expected, rtol=1e-6)
    # the box corner at (4, 4) is no click: nothing peaks there in the positive map
    far = np.asarray(click_maps(coords[:, :, :1], labels[:, :, :1], (20, 24)))
    np.testing.assert_array_equal(maps[..., 0], far[..., 0])
    # no click of a label: its map is zero
    none = np.asarray(click_maps(coords, jnp.array([[[1, -1, 2, 3]]]), (20, 24)))
    assert none[..., 1].max() == 0 and none[..., 3].max() == 0
    # a window of the frame is the same window of the frame's maps (training's crops)
    window = np.asarray(click_maps(coords, labels, (8, 6), jnp.array([[5, 11]])))
    np.testing.assert_allclose(window, maps[:, :, 5:13, 11:17], rtol=0, atol=1e-7)


def test_click_branch_starts_as_the_refiner_without_it_then_acts_near_the_click():
    images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    low = 5 * jax.random.normal(jax.random.key(1), (1, 2, 16, 16))
    coords = jnp.array([[[[12.0, 40.0], [0.0, 0.0]], [[50.0, 10.0], [0.0, 0.0]]]])
    labels = jnp.array([[[1, -1], [0, -1]]])
    old = MaskRefiner(8, (1, 2))
    new = MaskRefiner(8, (1, 2), click_input=True)
    old_params = perturbed(old.init(jax.random.key(2), images, low)["params"], 3)
    fresh = new.init(jax.random.key(4), images, low, None, coords, labels)["params"]
    assert set(fresh) == set(old_params) | {"click_in"}
    grown = dict(old_params, click_in=fresh["click_in"])
    before = np.asarray(old.apply({"params": old_params}, images, low))
    np.testing.assert_array_equal(
        np.asarray(new.apply({"params": grown}, images, low, None, coords, labels)), before)
    trained = dict(grown, click_in=perturbed(fresh["click_in"], 5))
    out = np.asarray(new.apply({"params": trained}, images, low, None, coords, labels))
    change = np.abs(out - before)
    # mask 0's click sits at cell (20, 6): the change is largest near it, and the cells
    # far beyond the bumps and the network's reach are untouched
    assert change[0, 0, 14:27, 0:13].max() > 0.1
    assert change[0, 0, 14:27, 0:13].max() == change[0, 0].max()
    # without clicks (a box alone) the maps are empty, not absent
    no_clicks = np.asarray(new.apply({"params": trained}, images, low))
    empty = np.asarray(new.apply({"params": trained}, images, low, None, coords,
                                 jnp.full_like(labels, 2)))
    np.testing.assert_allclose(no_clicks, empty, rtol=0, atol=1e-6)
    assert np.abs(no_clicks - out).max() > 0.1


@pytest.fixture(scope="module")
def click_model():
    cfg = configs.tiny().replace(mask_refiner=CLICKS)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params = dict(variables["params"])
    refiner = dict(perturbed(params["mask_refiner"], 1))
    # strong clicks: a path that dropped them would move every mask clearly
    refiner["click_in"] = jax.tree.map(lambda x: 10 * x, refiner["click_in"])
    params["mask_refiner"] = refiner
    return SamModel(cfg, {"params": params, "buffers": variables["buffers"]})


def test_the_predictor_refines_with_its_prompt_clicks(click_model):
    image = load_truck((150, 100))
    predictor = SamPredictor(click_model)
    predictor.set_image(image)
    coords, labels = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    logits, _, low = predictor.predict(coords, labels, return_logits=True)
    cfg = click_model.config
    frame = predictor.transform.apply_coords(coords, image.shape[:2])

    def by_hand(points, point_labels):
        refined = inference.refine_low_res(
            click_model.variables, predictor.refiner_features, jnp.asarray(low)[None],
            jnp.zeros((1,), jnp.int32), points, point_labels, config=cfg)[0]
        return np.asarray(inference.postprocess_masks(
            refined, input_size=predictor.input_size, original_size=predictor.original_size,
            image_size=cfg.image_size))

    np.testing.assert_allclose(logits, by_hand(jnp.asarray(frame)[None],
                                               jnp.asarray(labels)[None]), rtol=0, atol=1e-4)
    # the clicks matter: refined without them the masks differ
    assert np.abs(logits - by_hand(None, None)).max() > 0.1


def test_generator_masks_are_the_predictor_masks_of_their_point(click_model):
    image = load_truck((150, 100))
    assert_generator_masks_are_predictor_masks(click_model, image)


def test_soft_edges_run_with_a_click_refiner(click_model):
    image = load_truck((150, 100))
    edges = soft_edges(click_model, image, EdgeOptions(points_per_side=4, edge_nms=False))
    assert edges.edges.shape == image.shape[:2] and edges.num_masks > 0
    assert 0 < float(np.asarray(edges.edges).max()) <= 1


def test_config_round_trip():
    cfg = configs.dinov2_s().replace(mask_refiner=MaskRefinerConfig(click_input=True))
    assert SamConfig.from_json(cfg.to_json()) == cfg
    old = json.loads(configs.dinov2_s().replace(mask_refiner=MaskRefinerConfig()).to_json())
    del old["mask_refiner"]["click_input"]  # written before the option
    assert not SamConfig.from_json(json.dumps(old)).mask_refiner.click_input
