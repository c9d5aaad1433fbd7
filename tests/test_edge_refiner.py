"""The edge stage at the original image's resolution (`SamConfig.edge_refiner`): a fresh stage
changes nothing, it reads only pixels within its radius, every path that shows masks applies
it (predictor, device API, batched official API, generator, soft edges), bad inputs are
refused, and the training script learns to move an outline onto the image's edge."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from conftest import assert_generator_masks_are_predictor_masks, load_truck, perturbed
from sam_jax import configs, device_predict, inference
from sam_jax.configs import EdgeRefinerConfig, MaskRefinerConfig, SamConfig
from sam_jax.evaluation.edges import EdgeOptions, soft_edges
from sam_jax.inference import SamModel
from sam_jax.modeling.edge_refiner import (BAND, MAX_RESIDUAL, EdgeRefiner,
                                          default_tiles_per_step)
from sam_jax.predictor import SamPredictor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

EDGE = EdgeRefinerConfig(width=4, dilations=(1, 2))


def test_a_fresh_stage_returns_the_logits_and_reads_only_its_radius():
    net = EdgeRefiner(4, (1, 2))
    assert net.radius == 5
    images = jax.random.normal(jax.random.key(0), (1, 40, 40, 3))
    logits = 6 * jax.random.normal(jax.random.key(1), (1, 2, 40, 40))
    fresh = net.init(jax.random.key(2), images, logits)["params"]
    np.testing.assert_array_equal(np.asarray(net.apply({"params": fresh}, images, logits)),
                                  np.asarray(logits))
    params = {"params": perturbed(fresh, 3)}
    out = np.asarray(net.apply(params, images, logits))
    assert np.abs(out - np.asarray(logits)).max() > 0.1
    # one changed pixel moves the output only within the stage's radius of it
    moved = np.asarray(net.apply(params, images.at[0, 20, 20].add(5.0), logits))
    changed = np.argwhere(np.abs(moved - out).max(axis=(0, 1)) > 0)
    assert len(changed) and np.abs(changed - 20).max() == net.radius


def test_the_stage_changes_only_pixels_near_the_shown_outline():
    """However large its weights, the bounded residual reaches only the pixels within BAND of
    the shown outline: the stage moves outlines, it does not add or remove regions."""
    from scipy import ndimage

    net = EdgeRefiner(4, (1, 2))
    images = 3 * jax.random.normal(jax.random.key(0), (1, 40, 40, 3))
    yy, xx = np.mgrid[:40, :40]
    logits = np.stack([8.0 - np.hypot(yy - 20, xx - 18), np.hypot(yy - 10, xx - 30) - 6.0])
    logits = jnp.asarray(logits, jnp.float32)[None]
    params = {"params": perturbed(net.init(jax.random.key(2), images, logits)["params"], 3,
                                  scale=30.0)}
    out = np.asarray(net.apply(params, images, logits))[0]
    logits = np.asarray(logits)[0]
    assert np.abs(out - logits).max() <= MAX_RESIDUAL + 1e-5
    for shown, moved in zip(logits > 0, out != logits):
        assert moved.any()
        # Chebyshev distance of each pixel to the nearest pixel on the other side
        far = np.where(shown, ndimage.distance_transform_cdt(shown, "chessboard"),
                       ndimage.distance_transform_cdt(~shown, "chessboard"))
        assert far[moved].max() <= BAND
        assert (far <= BAND).sum() < 0.5 * far.size  # the band is not the whole image


@pytest.mark.parametrize("tile,steps", [(16, 1), (16, 5), (16, default_tiles_per_step("cpu")),
                                        (16, default_tiles_per_step("gpu")), (7, 3)])
def test_the_tiled_stage_equals_the_dense_stage(tile, steps):
    """`refine_tiles` (what inference runs: only the tiles around the outlines) gives the dense
    network's logits: tiles cut by the image's border, outlines touching it, masks without an
    outline, masks reading different images, and loops of one, several and a partly filled
    last step (the CPU's and the accelerator's step sizes both)."""
    net = EdgeRefiner(4, (1, 2))
    h, w = 45, 53
    images = jax.random.normal(jax.random.key(0), (2, h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    logits = jnp.asarray(np.stack([
        8.0 - np.hypot(yy - 20, xx - 18),       # inside
        np.hypot(yy - 3, xx - 50) - 6.0,        # cut by the top and right borders
        -np.ones((h, w)), np.ones((h, w)),      # no outline
        3.0 * np.sin(yy / 4.0) * np.cos(xx / 5.0),  # many outlines
    ]), jnp.float32)
    image_index = jnp.array([0, 1, 1, 0, 1])
    params = {"params": perturbed(net.init(jax.random.key(2), images[:1], logits[None])["params"],
                                  3)}
    dense = np.concatenate([np.asarray(net.apply(params, images[i][None], logits[j][None, None]))[0]
                            for j, i in enumerate(np.asarray(image_index))])
    tiled = np.asarray(net.apply(params, images, logits, image_index, tile=tile,
                                 tiles_per_step=steps, method="refine_tiles"))
    np.testing.assert_allclose(tiled, dense, rtol=0, atol=1e-5)
    moved = np.abs(dense - np.asarray(logits))
    assert moved[0].max() > 0.5 and moved[1].max() > 0.5 and moved[4].max() > 0.5
    assert moved[1][:, -1].max() > 0.1  # changed up to the border the outline touches
    assert moved[2].max() == 0 and moved[3].max() == 0
    # tiles of the same mask reading the wrong image would differ
    assert np.abs(dense[4] - np.asarray(net.apply(
        params, images[0][None], logits[4][None, None]))[0]).max() > 0.1


@pytest.fixture(scope="module")
def edge_model():
    cfg = configs.tiny().replace(mask_refiner=MaskRefinerConfig(width=8, dilations=(1, 2),
                                                                click_input=True),
                                 edge_refiner=EDGE, keep_clicked_components=True)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params = dict(variables["params"])
    params["mask_refiner"] = perturbed(params["mask_refiner"], 1)
    params["edge_refiner"] = perturbed(params["edge_refiner"], 2)
    return SamModel(cfg, {"params": params, "buffers": variables["buffers"]})


def without_stage(model):
    return dataclasses.replace(model, config=model.config.replace(edge_refiner=None))


def test_the_predictor_shows_the_stage_applied_to_the_upscaled_logits(edge_model):
    image = load_truck((150, 100))
    coords, labels = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    out = {}
    for name, model in (("edge", edge_model), ("plain", without_stage(edge_model))):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        out[name] = predictor.predict(coords, labels, return_logits=True)
        out[name + " masks"] = predictor.predict(coords, labels)[0]
    assert predictor.edge_features is None
    pixels = (image.astype(np.float32) - np.array(edge_model.config.pixel_mean)) / \
        np.array(edge_model.config.pixel_std)
    by_hand = EdgeRefiner(4, (1, 2)).apply(
        {"params": edge_model.variables["params"]["edge_refiner"]},
        jnp.asarray(pixels, jnp.float32)[None], jnp.asarray(out["plain"][0])[None])[0]
    np.testing.assert_allclose(out["edge"][0], np.asarray(by_hand), rtol=0, atol=1e-4)
    assert np.abs(out["edge"][0] - out["plain"][0]).max() > 0.1
    np.testing.assert_array_equal(out["edge masks"], out["edge"][0] > 0)
    # the IoU predictions and the next click's low-res logits are the decoder's, untouched
    for k in (1, 2):
        np.testing.assert_array_equal(out["edge"][k], out["plain"][k])


def test_the_device_api_and_the_batched_official_api_apply_it(edge_model):
    image = load_truck((128, 96))  # the tiny model's input size: no resizing in either API
    predictor = SamPredictor(edge_model)
    predictor.set_image(image)
    coords, labels = np.array([[[60.0, 40.0]], [[20.0, 70.0]]]), np.array([[1], [1]])
    masks, _, _ = predictor.predict_batch(coords, labels)
    frame = predictor.transform.apply_coords(coords, image.shape[:2])
    on_device = predictor.predict_jax(jnp.asarray(frame), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(on_device.masks), masks)
    batched = edge_model([{"image": image.transpose(2, 0, 1), "original_size": (96, 128),
                           "point_coords": frame, "point_labels": labels}], False)
    single, _, _ = predictor.predict_batch(coords, labels, multimask_output=False)
    np.testing.assert_array_equal(np.asarray(batched[0]["masks"]), single)


def test_generator_and_soft_edges_take_the_edge_stage(edge_model):
    image = load_truck((150, 100))
    assert_generator_masks_are_predictor_masks(without_clicked_components(edge_model), image)
    options = EdgeOptions(points_per_side=4, edge_nms=False)
    edges = soft_edges(edge_model, image, options)
    plain = soft_edges(without_stage(edge_model), image, options)
    assert edges.edges.shape == image.shape[:2] and edges.num_masks == plain.num_masks > 0
    assert np.abs(edges.edges - plain.edges).max() > 0.01


def without_clicked_components(model):
    # the generator does not keep only clicked components (the predictor does)
    return dataclasses.replace(model, config=model.config.replace(
        keep_clicked_components=False))


def test_bad_inputs_are_refused(edge_model):
    image = load_truck((150, 100))
    predictor = SamPredictor(edge_model)
    predictor.set_image(image)
    plain = without_stage(edge_model)
    logits = jnp.zeros((1, 3) + image.shape[:2])
    with pytest.raises(ValueError, match="without an edge stage"):
        inference.refine_edges(plain.variables, predictor.edge_features, logits,
                               config=plain.config)
    with pytest.raises(ValueError, match="cannot refine 50x50 masks"):
        inference.refine_edges(edge_model.variables, predictor.edge_features,
                               jnp.zeros((1, 3, 50, 50)), config=edge_model.config)
    with pytest.raises(ValueError, match="give input_size and original_size too"):
        device_predict.predict_on_device(
            edge_model.variables, predictor.features, jnp.zeros((1, 1, 2)),
            jnp.ones((1, 1), jnp.int32), config=edge_model.config,
            edge_features=predictor.edge_features)
    assert inference.edge_features(plain.variables, image, config=plain.config) is None


def test_config_round_trip():
    cfg = configs.dinov2_s().replace(edge_refiner=EdgeRefinerConfig(8, (1, 2, 4)))
    assert SamConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="width >= 1"):
        EdgeRefinerConfig(width=0)


def step_edge_patches(count, size, rng):
    """Patches of a vertical edge (bright left of column c) whose shown logits put the outline
    1-3 pixels off it, to one side or the other."""
    cols = rng.integers(size // 3, 2 * size // 3, count)
    x = np.arange(size)[None, None, :]
    truth = np.broadcast_to(x < cols[:, None, None], (count, size, size))
    image = np.where(truth[..., None], 200, 40).astype(np.uint8)
    image = np.broadcast_to(image, (count, size, size, 3))
    shift = rng.choice([-3, -2, -1, 1, 2, 3], count)[:, None, None]
    logits = np.broadcast_to(1.0 * (cols[:, None, None] + shift - x - 0.5),
                             (count, size, size))
    return image, logits.astype(np.float16), truth


def test_edge_training_moves_the_outline_onto_the_image_edge(tmp_path):
    from train_edge_refiner import main

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for shard in range(2):
        image, logits, truth = step_edge_patches(64, 32, rng)
        np.savez(data / f"shard_{shard:05d}.npz", image=image, logits=logits, truth=truth)
    work = tmp_path / "work"
    main(["--data", str(data), "--workdir", str(work), "--width", "8", "--dilations", "1", "2",
          "--steps", "300", "--batch", "16", "--peak-lr", "1e-2", "--check-every", "300"])
    from train_edge_refiner import errors_on, load_params, load_patches

    params = load_params(str(work / "edge_params.npz"))
    images, logits, truth, shard = load_patches(str(data))
    check = shard == 1
    after, before = errors_on(EdgeRefiner(8, (1, 2)), {"params": params}, images[check],
                              logits[check], truth[check])
    assert before > 0 and after < 0.2 * before, (after, before)


def test_training_from_a_checkpoint_with_an_edge_stage_keeps_it_frozen(edge_model):
    from sam_jax.training.config import from_dict
    from sam_jax.training.train import _keep_refiner

    cfg = from_dict({"model": "tiny", "optim": {"preset": "tiny"}, "data": {},
                     "init_from": "CKPT"})
    kept = _keep_refiner(cfg, edge_model.config)
    assert kept.model == cfg.model.replace(mask_refiner=edge_model.config.mask_refiner,
                                           edge_refiner=EDGE)
    assert {"mask_refiner", "edge_refiner"} <= set(kept.optim.freeze)
    assert _keep_refiner(kept, edge_model.config) == kept  # already kept
