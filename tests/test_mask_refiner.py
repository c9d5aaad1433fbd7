"""The learned mask refiner (`modeling/mask_refiner.py`, `SamConfig.mask_refiner`): what it
computes, and that every path that shows masks (predictor, device API, official batched
forward, automatic generator) shows the refined ones while the low-res logits stay the
decoder's."""

import dataclasses
import json

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
from sam_jax.modeling.mask_refiner import MaskRefiner, upsample_logits
from sam_jax.predictor import SamPredictor

REFINER = MaskRefinerConfig(width=8, dilations=(1, 2))
# a refiner that also reads the image embedding (an option; the bundled one reads the image only)
REFINER_EMB = MaskRefinerConfig(width=8, dilations=(1, 2), embedding_input=True)
# and one that also reads the prompt's clicks
REFINER_CLICK = MaskRefinerConfig(width=8, dilations=(1, 2), embedding_input=True,
                                  click_input=True)


def _perturbed(params, seed):
    """Random non-zero values in every refiner leaf (a fresh one starts as the identity)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=[REFINER, REFINER_EMB, REFINER_CLICK],
                ids=["pixels", "pixels+embedding", "pixels+embedding+clicks"])
def refined_and_plain(request):
    """A tiny model with a trained-looking refiner (of each kind), and the same model without
    one."""
    cfg = configs.tiny().replace(mask_refiner=request.param)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params = dict(variables["params"])
    params["mask_refiner"] = _perturbed(params["mask_refiner"], 1)
    plain = {k: v for k, v in params.items() if k != "mask_refiner"}
    return (SamModel(cfg, {"params": params, "buffers": variables["buffers"]}),
            SamModel(configs.tiny(), {"params": plain, "buffers": variables["buffers"]}))


def test_fresh_refiner_returns_the_upsampled_decoder_logits():
    refiner = MaskRefiner(8, (1, 2))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    low = 5 * jax.random.normal(jax.random.key(1), (2, 3, 8, 8))
    params = refiner.init(jax.random.key(2), images, low)
    out = refiner.apply(params, images, low)
    assert out.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(upsample_logits(low, 16)))


def test_masks_of_one_image_are_refined_independently():
    refiner = MaskRefiner(8, (1, 2))
    images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    low = 5 * jax.random.normal(jax.random.key(1), (1, 3, 8, 8))
    params = {"params": _perturbed(refiner.init(jax.random.key(2), images, low)["params"], 3)}
    together = np.asarray(refiner.apply(params, images, low))
    for i in range(3):
        alone = np.asarray(refiner.apply(params, images, low[:, i:i + 1]))
        np.testing.assert_allclose(alone[:, 0], together[:, i], rtol=0, atol=1e-5)
    # and the refinement does change the masks once trained
    assert np.abs(together - np.asarray(upsample_logits(low, 16))).max() > 0.1


def test_embedding_branch_starts_as_the_refiner_without_it():
    """A refiner with `embedding_input` whose projection is still zero (how training adds it
    to a trained refiner) gives the old refiner's logits exactly; once trained, the embedding
    changes them, and a missing embedding is an error, not a silent colour-only refiner."""
    images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
    low = 5 * jax.random.normal(jax.random.key(1), (2, 3, 8, 8))
    emb = jax.random.normal(jax.random.key(2), (2, 2, 2, 16))
    old = MaskRefiner(8, (1, 2))
    new = MaskRefiner(8, (1, 2), embedding_input=True)
    old_params = _perturbed(old.init(jax.random.key(3), images, low)["params"], 4)
    fresh = new.init(jax.random.key(5), images, low, emb)["params"]
    assert set(fresh) == set(old_params) | {"embedding_proj"}
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(fresh["embedding_proj"]))
    grown = dict(old_params, embedding_proj=fresh["embedding_proj"])
    np.testing.assert_array_equal(np.asarray(new.apply({"params": grown}, images, low, emb)),
                                  np.asarray(old.apply({"params": old_params}, images, low)))
    trained = dict(grown, embedding_proj=_perturbed(fresh["embedding_proj"], 6))
    out = np.asarray(new.apply({"params": trained}, images, low, emb))
    assert out.shape == (2, 3, 14, 14)
    assert np.abs(out - np.asarray(old.apply({"params": old_params}, images, low))).max() > 0.1
    # the embedding's branch is upsampled over the frame: a crop of the full frame's branch
    # is what training adds to a crop's colour features
    full = new.apply({"params": trained}, images, emb, method="image_features")
    parts = (new.apply({"params": trained}, images, method="pixel_features")
             + new.apply({"params": trained}, emb, (14, 14), method="embedding_features"))
    np.testing.assert_allclose(np.asarray(full), np.asarray(parts), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reads the image embedding"):
        new.apply({"params": trained}, images, low)


def test_refiner_features_need_the_embedding_when_the_refiner_reads_it(refined_and_plain):
    refined, _ = refined_and_plain
    cfg = refined.config
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    emb = inference.embed_images(refined.variables, pixels, config=cfg)
    with_emb = inference.refiner_features(refined.variables, pixels, emb, config=cfg)
    assert with_emb.shape == (1, cfg.image_size // 2, cfg.image_size // 2, 8)
    if cfg.mask_refiner.embedding_input:
        with pytest.raises(ValueError, match="reads the image embedding"):
            inference.refiner_features(refined.variables, pixels, config=cfg)
        with pytest.raises(ValueError, match="2 images but 1 embeddings"):
            inference.refiner_features(refined.variables, jnp.concatenate([pixels] * 2), emb,
                                       config=cfg)
    else:  # a colour-only refiner ignores an embedding it is given
        np.testing.assert_array_equal(
            np.asarray(inference.refiner_features(refined.variables, pixels, config=cfg)),
            np.asarray(with_emb))


def test_config_round_trip_and_checks():
    cfg = configs.dinov2_s().replace(mask_refiner=MaskRefinerConfig())
    again = SamConfig.from_json(cfg.to_json())
    assert again == cfg and again.mask_refiner.dilations == (1, 2, 4, 8, 1)
    assert not again.mask_refiner.embedding_input
    emb = cfg.replace(mask_refiner=MaskRefinerConfig(embedding_input=True))
    assert SamConfig.from_json(emb.to_json()) == emb
    # a config.json written before the option has no key: a colour-only refiner
    old = json.loads(cfg.to_json())
    del old["mask_refiner"]["embedding_input"]
    assert SamConfig.from_json(json.dumps(old)).mask_refiner == MaskRefinerConfig()
    assert SamConfig.from_json(configs.dinov2_s().to_json()).mask_refiner is None
    with pytest.raises(ValueError, match="dilations"):
        MaskRefinerConfig(width=8, dilations=(0,))
    # the refiner is an add-on: the preset stays the one of its architecture
    assert configs.preset_name(cfg) == "dinov2_s"


def _prompt():
    return np.array([[60.0, 40.0], [20.0, 70.0]], np.float32), np.array([1, 0])


def test_predictor_shows_refined_masks_and_returns_decoder_logits(refined_and_plain):
    refined, plain = refined_and_plain
    image = load_truck((150, 100))
    p_ref, p_plain = SamPredictor(refined), SamPredictor(plain)
    p_ref.set_image(image)
    p_plain.set_image(image)
    coords, labels = _prompt()
    logits_ref, iou_ref, low_ref = p_ref.predict(coords, labels, return_logits=True)
    logits_plain, iou_plain, low_plain = p_plain.predict(coords, labels, return_logits=True)
    # the decoder is the same model: same IoU and low-res logits (the next click's prompt)
    np.testing.assert_array_equal(low_ref, low_plain)
    np.testing.assert_array_equal(iou_ref, iou_plain)
    # the shown masks are the refined logits, upscaled as the decoder's would be
    cfg = refined.config
    frame = p_ref.transform.apply_coords(coords, image.shape[:2])  # the prompt's points
    by_hand = inference.postprocess_masks(
        inference.refine_low_res(refined.variables, p_ref.refiner_features,
                                 jnp.asarray(low_ref)[None], jnp.zeros((1,), jnp.int32),
                                 jnp.asarray(frame)[None], jnp.asarray(labels)[None],
                                 config=cfg)[0],
        input_size=p_ref.input_size, original_size=p_ref.original_size,
        image_size=cfg.image_size)
    np.testing.assert_allclose(logits_ref, np.asarray(by_hand), rtol=0, atol=1e-4)
    assert np.abs(logits_ref - logits_plain).max() > 0.1
    masks, _, _ = p_ref.predict(coords, labels)
    np.testing.assert_array_equal(masks, logits_ref > cfg.mask_threshold)


def test_device_api_and_batched_forward_equal_the_predictor(refined_and_plain):
    refined, _ = refined_and_plain
    image = load_truck((150, 100))
    predictor = SamPredictor(refined)
    predictor.set_image(image)
    coords, labels = _prompt()
    masks, iou, low = predictor.predict(coords, labels)
    frame = predictor.transform.apply_coords(coords, image.shape[:2])
    out = predictor.predict_jax(jnp.asarray(frame[None]), jnp.asarray(labels[None]))
    np.testing.assert_array_equal(np.asarray(out.masks)[0], masks)
    np.testing.assert_allclose(np.asarray(out.low_res_logits)[0], low, rtol=0, atol=1e-5)
    resized = predictor.transform.apply_image(image)
    batched = refined([{"image": resized.transpose(2, 0, 1), "original_size": image.shape[:2],
                        "point_coords": frame[None], "point_labels": labels[None]}],
                      multimask_output=True)
    np.testing.assert_array_equal(np.asarray(batched[0]["masks"])[0], masks)


def test_refiner_features_for_a_model_without_refiner_are_refused(refined_and_plain):
    refined, plain = refined_and_plain
    predictor = SamPredictor(refined)
    predictor.set_image(load_truck((150, 100)))
    emb = predictor.features
    with pytest.raises(ValueError, match="without a mask refiner"):
        predict_on_device(plain.variables, emb, jnp.zeros((1, 1, 2)), jnp.ones((1, 1), int),
                          config=plain.config, input_size=predictor.input_size,
                          original_size=predictor.original_size,
                          refiner_features=predictor.refiner_features)


def test_generator_keeps_refined_masks_with_their_own_boxes(refined_and_plain):
    refined, _ = refined_and_plain
    gen = SamAutomaticMaskGenerator(refined, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0)
    records = gen.generate(load_truck((150, 100)))
    assert records, "the tiny model's generator kept nothing with the filters off"
    for r in records:
        rows, cols = np.flatnonzero(r["segmentation"].any(1)), np.flatnonzero(
            r["segmentation"].any(0))
        assert r["bbox"] == [cols[0], rows[0], cols[-1] - cols[0], rows[-1] - rows[0]]
        assert r["area"] == int(r["segmentation"].sum())


def test_many_prompts_are_refined_in_groups_with_equal_results(refined_and_plain):
    refined, _ = refined_and_plain
    cfg = refined.config
    predictor = SamPredictor(refined)
    predictor.set_image(load_truck((150, 100)))
    p = 2 * inference.REFINE_GROUP
    low = 5 * jax.random.normal(jax.random.key(4), (p, 3) + (cfg.low_res_size,) * 2)
    index = jnp.zeros((p,), jnp.int32)
    # each prompt its own clicks (read by a refiner with click_input)
    coords = jax.random.uniform(jax.random.key(5), (p, 4, 2), maxval=cfg.image_size)
    labels = jax.random.randint(jax.random.key(6), (p, 4), -1, 2)
    grouped = inference.refine_low_res(refined.variables, predictor.refiner_features, low,
                                       index, coords, labels, config=cfg)
    for rows in (slice(0, 1), slice(p - 3, p)):  # fewer than a group: one shot
        alone = inference.refine_low_res(refined.variables, predictor.refiner_features,
                                         low[rows], index[rows], coords[rows], labels[rows],
                                         config=cfg)
        np.testing.assert_allclose(np.asarray(grouped[rows]), np.asarray(alone), rtol=0,
                                   atol=1e-5)


def test_training_from_a_dinov2_checkpoint_keeps_its_input_size():
    """The bundled model runs at 518 px and the `dinov2_s` preset at 448: fine-tuning it with
    `model: dinov2_s` trains at the checkpoint's size; other encoders and equal sizes pass."""
    from sam_jax.training.config import from_dict
    from sam_jax.training.train import _keep_input_size

    cfg = from_dict({"model": "dinov2_s", "optim": {"preset": "finetune"}, "data": {},
                     "init_from": "CKPT"})
    assert cfg.model.image_encoder.img_size == 448
    bundled = cfg.model.replace(image_encoder=dataclasses.replace(cfg.model.image_encoder,
                                                                  img_size=518))
    kept = _keep_input_size(cfg, bundled)
    assert kept.model == bundled and kept.optim == cfg.optim
    assert (kept.model.image_embedding_size, kept.model.low_res_size) == (37, 148)
    assert _keep_input_size(cfg, cfg.model) == cfg  # same size
    tiny = from_dict({"model": "tiny", "optim": {"preset": "tiny"}, "data": {},
                      "init_from": "CKPT"})
    assert _keep_input_size(tiny, bundled) == tiny  # not a DINOv2 model: its own rules
    assert _keep_input_size(cfg, configs.tiny()) == cfg


def test_training_from_a_refined_checkpoint_keeps_its_refiner_frozen(refined_and_plain):
    from sam_jax.training.config import from_dict
    from sam_jax.training.optim import make_optimizer
    from sam_jax.training.train import _keep_refiner

    refined, _ = refined_and_plain
    cfg = from_dict({"model": "tiny", "optim": {"preset": "tiny"}, "data": {},
                     "init_from": "CKPT"})
    kept = _keep_refiner(cfg, refined.config)
    assert kept.model == cfg.model.replace(mask_refiner=refined.config.mask_refiner)
    assert "mask_refiner" in kept.optim.freeze
    assert _keep_refiner(cfg, configs.tiny()) == cfg  # nothing to keep
    assert _keep_refiner(kept, refined.config) == kept  # already kept
    # one optimizer step with non-zero gradients everywhere: the refiner does not move
    # (no update, no weight decay), the decoder does
    params = refined.variables["params"]
    opt = make_optimizer(kept.optim, params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, opt.init(params), params)  # step 0: warmup's zero lr
    updates, _ = opt.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["mask_refiner"]))
    assert float(jnp.abs(updates["mask_decoder"]["output_upscaling.0"]["kernel"]).max()) > 0
