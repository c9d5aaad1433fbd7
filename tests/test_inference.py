"""The inference API on the tiny model: input validation with errors that name the problem,
official shapes and dtypes, BGR input, batching (mixed prompt structures, several images,
padding) and that nothing traces again for a new prompt count in the same bucket or a new image
of the same size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from conftest import load_truck
from sam_jax import inference

W, H = 300, 200  # non-square on purpose


@pytest.fixture(scope="module")
def image():
    return load_truck((W, H))


@pytest.fixture(scope="module")
def predictor(tiny_sam, image):
    p = sam_jax.SamPredictor(tiny_sam)
    p.set_image(image)
    return p


@pytest.fixture
def fresh_predictor(tiny_sam):
    return sam_jax.SamPredictor(tiny_sam)


def grid(config):
    return 4 * config.image_embedding_size


POINT = dict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]))


# ---- errors -------------------------------------------------------------------------------

def test_predict_before_set_image(fresh_predictor):
    with pytest.raises(RuntimeError, match=r"set_image"):
        fresh_predictor.predict(**POINT)
    with pytest.raises(RuntimeError, match=r"set_image"):
        fresh_predictor.get_image_embedding()
    with pytest.raises(RuntimeError, match=r"set_image"):
        fresh_predictor.predict_batch(boxes=np.array([[0, 0, 10, 10]]))


def test_predictor_rejects_non_model():
    with pytest.raises(TypeError, match=r"sam_jax.load"):
        sam_jax.SamPredictor(object())


@pytest.mark.parametrize("bad, match", [
    (np.zeros((H, W, 3), np.float32), r"uint8.*float32"),
    (np.zeros((H, W, 3), np.float64) + 0.5, r"uint8.*float64"),
    (np.zeros((H, W, 3), np.uint16), r"uint8.*uint16"),
    (np.zeros((H, W), np.uint8), r"\(H, W, 3\).*\(200, 300\)"),
    (np.zeros((H, W, 4), np.uint8), r"\(H, W, 3\).*\(200, 300, 4\)"),
    (np.zeros((H, W, 1), np.uint8), r"\(H, W, 3\).*\(200, 300, 1\)"),
    (np.zeros((0, W, 3), np.uint8), r"empty"),
], ids=["float32", "float64", "uint16", "grayscale", "rgba", "one-channel", "empty"])
def test_bad_images(fresh_predictor, tiny_config, bad, match):
    with pytest.raises(ValueError, match=match):
        fresh_predictor.set_image(bad)
    with pytest.raises(ValueError, match=match):
        inference.prepare_image(bad, tiny_config)
    assert not fresh_predictor.is_image_set


def test_bad_image_format(fresh_predictor, image):
    with pytest.raises(ValueError, match=r"image_format.*'RGBA'"):
        fresh_predictor.set_image(image, image_format="RGBA")


@pytest.mark.parametrize("kwargs, match", [
    (dict(point_coords=np.array([[W + 1.0, 10.0]]), point_labels=np.array([1])),
     r"point_coords lie outside the 300x200 image.*\(301, 10\)"),
    (dict(point_coords=np.array([[10.0, -1.0]]), point_labels=np.array([1])),
     r"point_coords lie outside the 300x200 image"),
    (dict(point_coords=np.array([[10.0, H + 5.0]]), point_labels=np.array([0])),
     r"point_coords lie outside"),
    (dict(point_coords=np.array([[10.0, np.nan]]), point_labels=np.array([1])),
     r"point_coords contain NaN"),
    (dict(point_coords=np.array([[10.0, 10.0], [20, 20]]), point_labels=np.array([1, 2])),
     r"point_labels must be 0 \(background\) or 1 \(foreground\), got \[2\]"),
    (dict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([-1])),
     r"point_labels must be 0 \(background\) or 1"),
    (dict(point_coords=np.array([[10.0, 10.0]])), r"point_labels must be supplied"),
    (dict(point_coords=np.array([[10.0, 10.0], [5, 5]]), point_labels=np.array([1])),
     r"point_coords must be \(N, 2\) with point_labels \(N,\)"),
    (dict(point_coords=np.array([10.0, 10.0, 5.0]), point_labels=np.array([1])),
     r"point_coords must be \(N, 2\)"),
    (dict(box=np.array([100.0, 10.0, 50.0, 40.0])), r"x0 <= x1"),
    (dict(box=np.array([10.0, 100.0, 50.0, 40.0])), r"y0 <= y1"),
    (dict(box=np.array([10.0, 10.0, 50.0])), r"box must be \(4,\) XYXY"),
    (dict(box=np.array([10.0, 10.0, W + 50.0, 40.0])), r"box corners lie outside"),
    (dict(mask_input=np.zeros((1, 256, 256), np.float32)), r"mask_input must be \(1, 32, 32\)"),
    (dict(mask_input=np.zeros((32, 32), np.float32)), r"mask_input must be \(1, 32, 32\)"),
], ids=["x-right", "y-negative", "y-below", "nan", "label-2", "label-minus-1", "no-labels",
        "labels-count", "coords-shape", "box-x", "box-y", "box-shape", "box-outside",
        "mask-256", "mask-2d"])
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_predict_batch_mismatched_sizes(predictor, tiny_config):
    g = grid(tiny_config)
    with pytest.raises(ValueError, match=r"disagree on the batch size: \[2, 3\]"):
        predictor.predict_batch(point_coords=np.full((2, 1, 2), 10.0),
                                point_labels=np.ones((2, 1), int),
                                boxes=np.tile([[10.0, 10.0, 50.0, 50.0]], (3, 1)))
    with pytest.raises(ValueError, match=r"disagree on the batch size"):
        predictor.predict_batch(boxes=np.tile([[10.0, 10.0, 50.0, 50.0]], (2, 1)),
                                mask_input=np.zeros((1, 1, g, g), np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 1, 2\) and \(3, 1\)"):
        predictor.predict_batch(point_coords=np.full((2, 1, 2), 10.0),
                                point_labels=np.ones((3, 1), int))


def test_make_prompt_batch_errors(tiny_config):
    g = grid(tiny_config)
    with pytest.raises(ValueError, match=r"no prompt given"):
        inference.make_prompt_batch(tiny_config)
    with pytest.raises(ValueError, match=r"labels must be given"):
        inference.make_prompt_batch(tiny_config, coords=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match=r"disagree on the number of prompts: 1 vs 2"):
        inference.make_prompt_batch(tiny_config, coords=[np.zeros((1, 2))] * 2, labels=[[1]] * 2,
                                    boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match=r"prompt 1: mask input must have shape \(1, 32, 32\)"):
        inference.make_prompt_batch(tiny_config, mask_inputs=[np.zeros((1, g, g)),
                                                              np.zeros((1, 64, 64))])
    with pytest.raises(ValueError, match=r"prompt 0: point coordinates must be \(N, 2\)"):
        inference.make_prompt_batch(tiny_config, coords=[np.zeros((2, 2))], labels=[[1]])


# ---- official shapes and dtypes --------------------------------------------------------------

@pytest.mark.parametrize("multimask, channels", [(True, 3), (False, 1)])
def test_predict_shapes_and_dtypes(predictor, tiny_config, multimask, channels):
    g = grid(tiny_config)
    masks, scores, logits = predictor.predict(**POINT, multimask_output=multimask)
    assert masks.shape == (channels, H, W) and masks.dtype == np.bool_
    assert scores.shape == (channels,) and scores.dtype == np.float32
    assert logits.shape == (channels, g, g) and logits.dtype == np.float32
    up, scores2, logits2 = predictor.predict(**POINT, multimask_output=multimask,
                                             return_logits=True)
    assert up.shape == (channels, H, W) and up.dtype == np.float32
    np.testing.assert_array_equal(up > tiny_config.mask_threshold, masks)
    np.testing.assert_array_equal(scores2, scores)
    np.testing.assert_array_equal(logits2, logits)
    # the low-res logits feed back as a mask input, as in the official predictor
    m2, s2, l2 = predictor.predict(**POINT, mask_input=logits[:1], multimask_output=False)
    assert m2.shape == (1, H, W) and l2.shape == (1, g, g)


def test_predict_batch_shapes(predictor, tiny_config):
    g = grid(tiny_config)
    masks, scores, logits = predictor.predict_batch(
        point_coords=np.tile([[[100.0, 50.0], [20.0, 30.0]]], (3, 1, 1)),
        point_labels=np.tile([[1, 0]], (3, 1)),
        boxes=np.tile([[10.0, 10.0, 250.0, 150.0]], (3, 1)))
    assert masks.shape == (3, 3, H, W) and masks.dtype == np.bool_
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    assert logits.shape == (3, 3, g, g) and logits.dtype == np.float32


def test_image_embedding_and_reset(tiny_sam, tiny_config, image):
    p = sam_jax.SamPredictor(tiny_sam)
    p.set_image(image)
    n = tiny_config.image_embedding_size
    emb = p.get_image_embedding()
    assert emb.shape == (1, tiny_config.image_encoder.out_chans, n, n)
    assert p.is_image_set and p.original_size == (H, W)
    assert tuple(p.input_size) == (85, 128)  # longest side 300 -> 128
    p.reset_image()
    assert not p.is_image_set and p.features is None
    assert p.original_size is None and p.input_size is None
    with pytest.raises(RuntimeError, match=r"set_image"):
        p.predict(**POINT)


def test_bgr_equals_rgb(tiny_sam, predictor, image):
    p = sam_jax.SamPredictor(tiny_sam)
    p.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    np.testing.assert_array_equal(p.get_image_embedding(), predictor.get_image_embedding())
    for a, b in zip(p.predict(**POINT), predictor.predict(**POINT)):
        np.testing.assert_array_equal(a, b)


# ---- batching ---------------------------------------------------------------------------------

def _decode(variables, embeddings, prompts, config, multimask=True):
    low, iou = inference.decode_prompts(variables, embeddings, prompts, config=config,
                                        multimask_output=multimask)
    n = prompts.num_prompts
    return np.asarray(low)[:n], np.asarray(iou)[:n]


MIXED = [  # one of each structure, in the model input frame (128 px for tiny)
    dict(coords=np.array([[30.0, 40.0], [90.0, 20.0], [60.0, 60.0]]), labels=np.array([1, 0, 1])),
    dict(box=np.array([10.0, 15.0, 100.0, 70.0])),
    dict(coords=np.array([[50.0, 50.0]]), labels=np.array([0]),
         box=np.array([20.0, 5.0, 120.0, 80.0])),
    dict(mask=True),
    dict(coords=np.array([[70.0, 30.0], [10.0, 10.0]]), labels=np.array([1, 1]), mask=True),
]


def _mixed_batch(config, prompts, mask, image_index=None):
    return inference.make_prompt_batch(
        config,
        coords=[p.get("coords") for p in prompts], labels=[p.get("labels") for p in prompts],
        boxes=[p.get("box") for p in prompts],
        mask_inputs=[mask if p.get("mask") else None for p in prompts],
        image_index=image_index)


@pytest.mark.parametrize("multimask", [True, False])
def test_mixed_prompt_batch_equals_one_at_a_time(predictor, tiny_sam, tiny_config, multimask):
    rng = np.random.default_rng(0)
    g = grid(tiny_config)
    mask = rng.normal(size=(1, g, g)).astype(np.float32) * 4
    batch = _mixed_batch(tiny_config, MIXED, mask)
    assert batch.coords.shape[0] == 8 and batch.num_prompts == len(MIXED)
    low, iou = _decode(tiny_sam.variables, predictor.features, batch, tiny_config, multimask)
    for i, prompt in enumerate(MIXED):
        one = _mixed_batch(tiny_config, [prompt], mask)
        low1, iou1 = _decode(tiny_sam.variables, predictor.features, one, tiny_config, multimask)
        np.testing.assert_allclose(low[i], low1[0], atol=1e-5, rtol=0, err_msg=f"prompt {i}")
        np.testing.assert_allclose(iou[i], iou1[0], atol=1e-5, rtol=0, err_msg=f"prompt {i}")


def test_multi_image_decode(tiny_sam, tiny_config):
    config = tiny_config
    images = [load_truck((W, H)), load_truck((160, 240))]
    pixels = np.stack([inference.prepare_image(im, config).pixels for im in images])
    emb = inference.embed_images(tiny_sam.variables, jnp.asarray(pixels), config=config)
    assert emb.shape == (2, config.image_embedding_size, config.image_embedding_size,
                         config.image_encoder.out_chans)
    mask = np.random.default_rng(1).normal(size=(1, grid(config), grid(config))).astype(
        np.float32)
    index = [0, 1, 1, 0, 1]
    low, iou = _decode(tiny_sam.variables, emb, _mixed_batch(config, MIXED, mask, index), config)
    for img in (0, 1):
        mine = [i for i, k in enumerate(index) if k == img]
        single = _mixed_batch(config, [MIXED[i] for i in mine], mask)
        low1, iou1 = _decode(tiny_sam.variables, emb[img:img + 1], single, config)
        np.testing.assert_allclose(low[mine], low1, atol=1e-5, rtol=0, err_msg=f"image {img}")
        np.testing.assert_allclose(iou[mine], iou1, atol=1e-5, rtol=0, err_msg=f"image {img}")
    # each image embedded alone equals its row of the batch
    for img, im in enumerate(images):
        alone = inference.embed_images(tiny_sam.variables, jnp.asarray(pixels[img:img + 1]),
                                       config=config)
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(emb[img]), atol=1e-5, rtol=0)


# ---- no retracing -------------------------------------------------------------------------------

def test_no_retrace_within_bucket(tiny_sam, tiny_config):
    """Prompt counts 3..8 (buckets 4 and 8) with 1..3 points (token buckets 2 and 4) compile
    `decode_prompts` and `postprocess_masks` at most once per bucket, a second image of the
    same size does not trace `embed_images` again, and padded results equal unpadded ones
    prompt by prompt."""
    p = sam_jax.SamPredictor(tiny_sam)
    width, height = 250, 170
    first, second = load_truck((width, height)), load_truck((width, height))[::-1].copy()
    p.set_image(first)
    embed_before = inference.embed_images._cache_size()
    p.set_image(second)
    assert inference.embed_images._cache_size() == embed_before, "set_image traced again"

    rng = np.random.default_rng(0)
    caches = lambda: (inference.decode_shown._cache_size(),  # noqa: E731
                      inference.postprocess_masks._cache_size())
    for multimask in (True, False):
        outputs, seen_buckets = {}, set()
        for b in (3, 4, 5, 6, 7, 8):  # prompt buckets 4 (3, 4) and 8 (5..8)
            for n in (1, 2, 3):  # 2..4 tokens with the not-a-point token: token buckets 2, 4
                coords = rng.uniform(0, [width, height], size=(b, n, 2))
                labels = rng.integers(0, 2, size=(b, n))
                before = caches()
                outputs[b, n] = (coords, labels, p.predict_batch(coords, labels,
                                                                 multimask_output=multimask))
                bucket = (4 if b <= 4 else 8, 2 if n == 1 else 4)
                new = tuple(a - c for a, c in zip(caches(), before))
                # at most one compilation of each function per bucket, on its first call
                assert new in ((0, 0), (1, 1), (0, 1), (1, 0)), (b, n, new)
                assert new == (0, 0) or bucket not in seen_buckets, (b, n, new)
                seen_buckets.add(bucket)
        for b, n in ((3, 1), (7, 3)):
            coords, labels, (masks, iou, low) = outputs[b, n]
            assert masks.shape[0] == iou.shape[0] == low.shape[0] == b
            for i in range(b):  # padded batch (4 or 8 prompts) vs one prompt (bucket 1)
                m1, iou1, low1 = p.predict(coords[i], labels[i], multimask_output=multimask)
                np.testing.assert_allclose(low[i], low1, atol=1e-5, rtol=0)
                np.testing.assert_allclose(iou[i], iou1, atol=1e-5, rtol=0)
                assert (masks[i] == m1).mean() >= 0.9999
    assert inference.embed_images._cache_size() == embed_before


def test_no_retrace_counted_by_side_effect(tiny_sam, tiny_config):
    """The same property counted directly: a Python side effect runs once per trace."""
    traces = []

    @jax.jit
    def decode(variables, embeddings, prompts):
        traces.append(prompts.coords.shape)
        return inference.decode_prompts.__wrapped__(variables, embeddings, prompts,
                                                    config=tiny_config)

    emb = jnp.zeros((1, tiny_config.image_embedding_size, tiny_config.image_embedding_size,
                     tiny_config.image_encoder.out_chans), jnp.float32)
    rng = np.random.default_rng(1)
    for b in (5, 6, 7, 8):
        for n in (1, 2, 3):
            batch = inference.make_prompt_batch(
                tiny_config, coords=rng.uniform(0, 128, (b, n, 2)),
                labels=rng.integers(0, 2, (b, n)))
            decode(tiny_sam.variables, emb, batch)
    assert traces == [(8, 2, 2), (8, 4, 2)]  # token buckets 2 (one point) and 4 (2-3 points)


def test_decode_without_mask_inputs_shares_image_work_exactly(tiny_sam):
    """with_masks=False (the no-mask fast path: one dense embedding, first-layer image-side
    projections shared by all prompts) gives the general path's outputs."""
    cfg = tiny_sam.config
    rng = np.random.default_rng(3)
    emb = inference.embed_images(tiny_sam.variables,
                                 rng.normal(size=(1, cfg.image_size, cfg.image_size, 3))
                                 .astype(np.float32), config=cfg)
    prompts = inference.make_prompt_batch(
        cfg, coords=[rng.uniform(0, cfg.image_size, (n, 2)) for n in (1, 2, 3)],
        labels=[np.ones(n) for n in (1, 2, 3)], boxes=[None, [10, 10, 90, 100], None])
    for multimask in (True, False):
        general = inference.decode_prompts(tiny_sam.variables, emb, prompts, config=cfg,
                                           multimask_output=multimask)
        shared = inference.decode_prompts(tiny_sam.variables, emb, prompts, config=cfg,
                                          multimask_output=multimask, with_masks=False)
        for a, b in zip(general, shared):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_predict_refuses_a_batch_instead_of_returning_its_first_result(predictor):
    """predict is for one prompt: two boxes, or (B, N, 2) points, must not be decoded as a
    batch of which only the first result comes back."""
    with pytest.raises(ValueError, match=r"box must be \(4,\) XYXY for one prompt"):
        predictor.predict(box=np.array([[0, 0, 10, 10], [5, 5, 20, 20]]))
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 2\) for one prompt"):
        predictor.predict(point_coords=np.ones((2, 1, 2)), point_labels=np.ones((2, 1)))


@pytest.mark.parametrize("with_masks", [True, False])
def test_decoding_in_prompt_groups_equals_all_at_once(tiny_sam, with_masks):
    """decode_group_size decodes the prompts group by group (lax.map); the outputs, order
    included, equal decoding all of them at once, with shared or per-prompt image work."""
    rng = np.random.default_rng(4)
    emb = inference.embed_images(
        tiny_sam.variables, rng.normal(size=(2, 128, 128, 3)).astype(np.float32),
        config=tiny_sam.config)
    prompts = inference.make_prompt_batch(
        tiny_sam.config, coords=[rng.uniform(0, 128, (n, 2)) for n in (1, 2, 3, 1, 2, 1, 3)],
        labels=[rng.integers(0, 2, n) for n in (1, 2, 3, 1, 2, 1, 3)],
        image_index=[0, 1, 0, 0, 1, 1, 0] if with_masks else None)
    emb = emb if with_masks else emb[:1]
    outputs = {}
    for group in (0, 2, 4):
        config = tiny_sam.config.replace(decode_group_size=group)
        outputs[group] = [np.asarray(x) for x in inference.decode_prompts(
            tiny_sam.variables, emb, prompts, config=config, with_masks=with_masks)]
    assert outputs[0][0].shape == (8, 3, 32, 32)
    for group in (2, 4):
        for a, b in zip(outputs[group], outputs[0]):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"group {group}")
