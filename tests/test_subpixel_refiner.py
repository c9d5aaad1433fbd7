"""A mask refiner that also writes each cell's 2x2 pixels (`MaskRefinerConfig.subpixel_output`):
the sub-pixel layout, that a fresh sub-pixel layer gives the cell refiner's logits upsampled,
that every path that refines masks takes its full-resolution logits, and the training loss
taken against the full-size masks."""

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
from sam_jax.modeling.mask_refiner import MaskRefiner, depth_to_space
from sam_jax.predictor import SamPredictor

SUBPIXEL = MaskRefinerConfig(width=8, dilations=(1, 2), click_input=True, subpixel_output=True)



def test_depth_to_space_puts_channel_2i_plus_j_at_pixel_i_j_of_its_cell():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    out = np.asarray(depth_to_space(jnp.asarray(x)))
    assert out.shape == (1, 4, 6)
    for r in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    assert out[0, 2 * r + i, 2 * c + j] == x[0, r, c, 2 * i + j]


def test_a_fresh_subpixel_layer_gives_the_cell_logits_upsampled_then_writes_pixels():
    images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    low = 5 * jax.random.normal(jax.random.key(1), (1, 2, 16, 16))
    coords = jnp.array([[[[12.0, 40.0], [0.0, 0.0]], [[50.0, 10.0], [0.0, 0.0]]]])
    labels = jnp.array([[[1, -1], [0, -1]]])
    old = MaskRefiner(8, (1, 2), click_input=True)
    new = MaskRefiner(8, (1, 2), click_input=True, subpixel=True)
    old_params = perturbed(old.init(jax.random.key(2), images, low, None, coords,
                                     labels)["params"], 3)
    fresh = new.init(jax.random.key(4), images, low, None, coords, labels)["params"]
    assert set(fresh) == set(old_params) | {"subpixel_hidden", "out_subpixel"}
    assert not np.asarray(fresh["out_subpixel"]["kernel"]).any()
    grown = dict(old_params, subpixel_hidden=fresh["subpixel_hidden"],
                 out_subpixel=fresh["out_subpixel"])
    cells = np.asarray(old.apply({"params": old_params}, images, low, None, coords, labels))
    pixels = np.asarray(new.apply({"params": grown}, images, low, None, coords, labels))
    assert cells.shape == (1, 2, 32, 32) and pixels.shape == (1, 2, 64, 64)
    upsampled = np.asarray(jax.image.resize(cells, (1, 2, 64, 64), "linear", antialias=False))
    np.testing.assert_allclose(pixels, upsampled, rtol=0, atol=1e-5)
    # a bias alone writes the same 2x2 pattern into every cell, on top of the upsampled cells
    biased = dict(grown, out_subpixel=dict(fresh["out_subpixel"],
                                           bias=jnp.array([1.0, 2.0, 3.0, 4.0])))
    out = np.asarray(new.apply({"params": biased}, images, low, None, coords, labels))
    np.testing.assert_allclose(out - pixels, np.tile([[1.0, 2.0], [3.0, 4.0]], (32, 32))[None,
                               None].repeat(2, axis=1), rtol=0, atol=1e-5)
    # and the branch learns: the output layer gets gradients from a per-pixel loss at once,
    # the hidden layer once the output layer is no longer zero
    def grads(p):
        return jax.grad(lambda p: (new.apply({"params": p}, images, low, None, coords,
                                             labels) ** 2).sum())(p)

    first = grads(biased)
    assert np.abs(np.asarray(first["out_subpixel"]["kernel"])).sum() > 0
    assert not np.asarray(first["subpixel_hidden"]["kernel"]).any()
    stepped = dict(biased, out_subpixel=dict(biased["out_subpixel"],
                                             kernel=-1e-3 * first["out_subpixel"]["kernel"]))
    assert np.abs(np.asarray(grads(stepped)["subpixel_hidden"]["kernel"])).sum() > 0


@pytest.fixture(scope="module")
def subpixel_model():
    cfg = configs.tiny().replace(mask_refiner=SUBPIXEL)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params = dict(variables["params"])
    params["mask_refiner"] = perturbed(params["mask_refiner"], 1)
    return SamModel(cfg, {"params": params, "buffers": variables["buffers"]})


def test_the_predictor_shows_the_refiner_pixel_logits(subpixel_model):
    """Refined at the input resolution, then only the clicked components kept (at pixels)."""
    subpixel_model = SamModel(subpixel_model.config.replace(keep_clicked_components=True),
                              subpixel_model.variables)
    image = load_truck((150, 100))
    predictor = SamPredictor(subpixel_model)
    predictor.set_image(image)
    coords, labels = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    logits, _, low = predictor.predict(coords, labels, return_logits=True)
    cfg = subpixel_model.config
    frame = predictor.transform.apply_coords(coords, image.shape[:2])
    refined = inference.refine_low_res(
        subpixel_model.variables, predictor.refiner_features, jnp.asarray(low)[None],
        jnp.zeros((1,), jnp.int32), jnp.asarray(frame)[None], jnp.asarray(labels)[None],
        config=cfg)
    assert refined.shape[-2:] == (cfg.image_size, cfg.image_size)  # pixels, not cells
    shown = inference.keep_clicked_components(
        refined, jnp.asarray(frame)[None], jnp.asarray(labels)[None],
        image_size=cfg.image_size, threshold=cfg.mask_threshold)[0]
    by_hand = np.asarray(inference.postprocess_masks(
        shown, input_size=predictor.input_size, original_size=predictor.original_size,
        image_size=cfg.image_size))
    assert logits.shape == (3,) + image.shape[:2]
    np.testing.assert_allclose(logits, by_hand, rtol=0, atol=1e-4)


def test_generator_and_soft_edges_take_pixel_logits(subpixel_model):
    image = load_truck((150, 100))
    assert_generator_masks_are_predictor_masks(subpixel_model, image)
    edges = soft_edges(subpixel_model, image, EdgeOptions(points_per_side=4, edge_nms=False))
    assert edges.edges.shape == image.shape[:2] and edges.num_masks > 0


def test_mirror_averaging_takes_pixel_logits(subpixel_model):
    """A model that also decodes the mirror image averages the two refiners' pixel logits: the
    same shapes come out, and they differ from the unmirrored model's."""
    image = load_truck((150, 100))
    mirrored = SamModel(subpixel_model.config.replace(mirror_average=True),
                        subpixel_model.variables)
    out = {}
    for name, model in (("plain", subpixel_model), ("mirrored", mirrored)):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        out[name] = predictor.predict(np.array([[60.0, 40.0]]), np.array([1]),
                                      return_logits=True)[0]
    assert out["mirrored"].shape == out["plain"].shape == (3,) + image.shape[:2]
    assert np.abs(out["mirrored"] - out["plain"]).max() > 0.01


def test_config_round_trip():
    cfg = configs.dinov2_s().replace(mask_refiner=SUBPIXEL)
    assert SamConfig.from_json(cfg.to_json()) == cfg
