"""Output parity with the official PyTorch Segment Anything, stage by stage and end to end.

Every model here is the official one (`tests/official.py`) with seeded, perturbed weights
(no exact zeros or ones left, so any mis-mapped, transposed or swapped tensor shows), saved with
`torch.save` and loaded with `sam_jax.load`: the conversion path users take.

- tiny config: image embeddings, sparse/dense prompt embeddings and decoder outputs through the
  module methods (`embed_image`, `encode_prompts`, `decode`), and the whole predictor
  (`SamPredictor.set_image/predict`) against the official predictor on non-square images
  (landscape 1800x1200, portrait 700x1000, and small ones where the last resize up- or
  down-samples), for points, mixed labels, a box, box + points, mask inputs, multimask on/off;
- `postprocess_masks` against the official `Sam.postprocess_masks` at full size (1024);
- full-size vit_b (auto-detected from the .pth) on assets/truck.jpg;
- vit_l and vit_h widths and heads at reduced depth and input size.

Max abs differences are printed (run with `-s`). Tolerances assume float32 matmuls
(`jax_default_matmul_precision="highest"`, set in conftest.py).
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

import sam_jax  # noqa: E402
from conftest import load_truck  # noqa: E402
from official import (max_abs_diff, official_predictor, perturb, save_and_load,  # noqa: E402
                      seeded_official, to_numpy)
from sam_jax.build_sam import build_module  # noqa: E402

EMB_ATOL = 1e-4
LOGIT_ATOL = 1e-4
IOU_ATOL = 1e-5
MIN_AGREEMENT = 0.9999


def report(tag, **diffs):
    print(f"\n[parity] {tag}: " + " ".join(f"{k}={v:.3g}" for k, v in diffs.items()))


def assert_close(name, actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=0,
                               err_msg=name)


# ---- prompts in relative coordinates (fractions of W and H), scaled per image -------------

PROMPTS = {
    "one_point": dict(point_coords=[[0.3, 0.4]], point_labels=[1]),
    "mixed_points": dict(point_coords=[[0.3, 0.4], [0.7, 0.8], [0.05, 0.9], [0.5, 0.1]],
                         point_labels=[1, 0, 1, 0]),
    "box": dict(box=[0.1, 0.2, 0.8, 0.9]),
    "box_points": dict(box=[0.1, 0.2, 0.8, 0.9], point_coords=[[0.5, 0.5], [0.2, 0.3]],
                       point_labels=[1, 0]),
    "mask_points": dict(point_coords=[[0.6, 0.4]], point_labels=[1], mask=True),
    "mask_only": dict(mask=True),
}


def scaled_prompt(name, width, height, mask_input=None):
    spec = PROMPTS[name]
    kw = {}
    if "point_coords" in spec:
        kw["point_coords"] = np.asarray(spec["point_coords"], np.float64) * [width, height]
        kw["point_labels"] = np.asarray(spec["point_labels"], np.int64)
    if "box" in spec:
        kw["box"] = np.asarray(spec["box"], np.float64) * [width, height, width, height]
    if spec.get("mask"):
        kw["mask_input"] = mask_input
    return kw


def previous_low_res(official_pred, width, height):
    """A realistic mask input: the official best low-res logits for a one-point prompt."""
    masks, scores, logits = official_pred.predict(**scaled_prompt("one_point", width, height),
                                                  multimask_output=True)
    return logits[np.argmax(scores)][None]


def check_predict_matches(tag, tp, jp, kw, multimask):
    """Official vs our `predict` (logits, binary masks, IoU, low-res logits)."""
    t_up, t_iou, t_low = tp.predict(**kw, multimask_output=multimask, return_logits=True)
    j_up, j_iou, j_low = jp.predict(**kw, multimask_output=multimask, return_logits=True)
    j_masks, j_iou2, j_low2 = jp.predict(**kw, multimask_output=multimask)
    assert j_up.shape == t_up.shape and j_low.shape == t_low.shape and j_iou.shape == t_iou.shape
    assert j_masks.dtype == np.bool_ and j_masks.shape == t_up.shape
    np.testing.assert_array_equal(j_iou2, j_iou)
    np.testing.assert_array_equal(j_low2, j_low)
    np.testing.assert_array_equal(j_masks, j_up > 0.0)
    t_masks = t_up > tp.model.mask_threshold
    agreement = float((t_masks == j_masks).mean())
    diffs = dict(low_res=max_abs_diff(t_low, j_low), iou=max_abs_diff(t_iou, j_iou),
                 upscaled=max_abs_diff(t_up, j_up), disagree=1 - agreement)
    report(tag, **diffs)
    assert_close(f"{tag} low-res logits", j_low, t_low, LOGIT_ATOL)
    assert_close(f"{tag} upscaled logits", j_up, t_up, LOGIT_ATOL)
    assert_close(f"{tag} iou", j_iou, t_iou, IOU_ATOL)
    assert agreement >= MIN_AGREEMENT, (tag, agreement)
    return diffs


# ==== tiny config: module by module ==========================================================

@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    return build_module(tiny_config)


@pytest.fixture(scope="module")
def tiny_apply(tiny_model):
    """Jitted `Sam.apply` of one method (eager dispatch of every op is slower on CPU)."""
    return jax.jit(tiny_model.apply, static_argnames=("method", "multimask_output"))


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_official, tiny_sam, tiny_model, tiny_config):
    """Official and our image embeddings of two normalized random inputs, (B, C, h, w)."""
    s = tiny_config.image_size
    x = np.random.default_rng(0).normal(size=(2, 3, s, s)).astype(np.float32)
    with torch.no_grad():
        ref = tiny_official.image_encoder(torch.from_numpy(x)).numpy()
    ours = tiny_model.apply(tiny_sam.variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                            method="embed_image")
    return ref, np.asarray(ours).transpose(0, 3, 1, 2)


def test_tiny_image_embeddings(tiny_embeddings, tiny_config):
    ref, ours = tiny_embeddings
    n = tiny_config.image_embedding_size
    assert ours.shape == ref.shape == (2, tiny_config.image_encoder.out_chans, n, n)
    report("tiny embed_image", embedding=max_abs_diff(ref, ours), scale=np.abs(ref).max())
    assert_close("image embeddings", ours, ref, EMB_ATOL)


def _low_level_prompts(config, kind, seed=0):
    """Batched prompts (B=2) in the model input frame, official (NCHW) layout."""
    rng = np.random.default_rng(seed)
    s, grid = config.image_size, 4 * config.image_embedding_size
    points = (rng.uniform(0, s, (2, 3, 2)).astype(np.float32),
              np.array([[1, 0, 1], [0, 1, -1]], np.int64))  # -1: an explicit padding point
    corners = np.sort(rng.uniform(0, s, (2, 2, 2)).astype(np.float32), axis=1)
    boxes = corners.reshape(2, 4)
    masks = rng.normal(size=(2, 1, grid, grid)).astype(np.float32) * 3
    return (points if "points" in kind else None, boxes if "boxes" in kind else None,
            masks if "masks" in kind else None)


LOW_LEVEL_KINDS = ["points", "boxes", "points+boxes", "masks", "points+masks",
                   "points+boxes+masks", "nothing"]


@pytest.mark.parametrize("kind", LOW_LEVEL_KINDS)
def test_tiny_prompt_encoder_and_decoder(kind, tiny_official, tiny_sam, tiny_apply, tiny_config,
                                         tiny_embeddings):
    points, boxes, masks = _low_level_prompts(tiny_config, kind)
    with torch.no_grad():
        t_sparse, t_dense = tiny_official.prompt_encoder(
            None if points is None else tuple(torch.from_numpy(a) for a in points),
            None if boxes is None else torch.from_numpy(boxes),
            None if masks is None else torch.from_numpy(masks))
    j_sparse, j_dense = tiny_apply(
        tiny_sam.variables,
        None if points is None else (jnp.asarray(points[0]), jnp.asarray(points[1])),
        None if boxes is None else jnp.asarray(boxes),
        None if masks is None else jnp.asarray(masks.transpose(0, 2, 3, 1)),
        method="encode_prompts")
    j_dense = np.asarray(j_dense).transpose(0, 3, 1, 2)
    assert j_sparse.shape == t_sparse.shape and j_dense.shape == t_dense.shape
    report(f"tiny encode_prompts {kind}", sparse=max_abs_diff(to_numpy(t_sparse), j_sparse),
           dense=max_abs_diff(to_numpy(t_dense), j_dense))
    assert_close("sparse embeddings", j_sparse, to_numpy(t_sparse), EMB_ATOL)
    assert_close("dense embeddings", j_dense, to_numpy(t_dense), EMB_ATOL)

    # Decode against the same (official) image embedding, so the decoder is tested alone.
    t_emb = tiny_embeddings[0][:1]
    for multimask in (True, False):
        with torch.no_grad():
            t_logits, t_iou = tiny_official.mask_decoder(
                torch.from_numpy(t_emb), tiny_official.prompt_encoder.get_dense_pe(),
                t_sparse, t_dense, multimask)
        j_logits, j_iou = tiny_apply(
            tiny_sam.variables, jnp.asarray(t_emb.transpose(0, 2, 3, 1)), j_sparse,
            jnp.asarray(j_dense.transpose(0, 2, 3, 1)), multimask_output=multimask,
            method="decode")
        assert j_logits.shape == t_logits.shape and j_iou.shape == t_iou.shape
        report(f"tiny decode {kind} multimask={multimask}",
               logits=max_abs_diff(to_numpy(t_logits), j_logits),
               iou=max_abs_diff(to_numpy(t_iou), j_iou))
        assert_close("low-res logits", j_logits, to_numpy(t_logits), LOGIT_ATOL)
        assert_close("iou", j_iou, to_numpy(t_iou), IOU_ATOL)


def test_tiny_dense_positional_encoding(tiny_official, tiny_sam, tiny_model):
    ref = to_numpy(tiny_official.prompt_encoder.get_dense_pe())  # (1, C, h, w)
    ours = np.asarray(tiny_model.apply(tiny_sam.variables, method="dense_pe"))  # (h, w, C)
    assert_close("dense positional encoding", ours.transpose(2, 0, 1)[None], ref, EMB_ATOL)


# ==== tiny config: the predictor end to end, non-square images =============================

# (W, H). The tiny model's input is 128 px: 1800x1200 and 700x1000 (portrait) and 300x200
# upsample in the last resize, 90x60 downsamples (so does 300x200 at 1024 px, see below).
IMAGE_SIZES = [(1800, 1200), (700, 1000), (300, 200), (90, 60)]


@pytest.fixture(scope="module", params=IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def tiny_predictors(request, tiny_official, tiny_sam):
    width, height = request.param
    image = load_truck((width, height))
    assert image.shape == (height, width, 3)
    tp, jp = official_predictor(tiny_official), sam_jax.SamPredictor(tiny_sam)
    tp.set_image(image)
    jp.set_image(image)
    return tp, jp, width, height, previous_low_res(tp, width, height)


def test_tiny_predictor_embedding(tiny_predictors):
    tp, jp, width, height, _ = tiny_predictors
    assert jp.original_size == tp.original_size == (height, width)
    assert tuple(jp.input_size) == tuple(tp.input_size)
    ref, ours = to_numpy(tp.get_image_embedding()), jp.get_image_embedding()
    report(f"tiny set_image {width}x{height}", embedding=max_abs_diff(ref, ours))
    assert_close("image embedding", ours, ref, EMB_ATOL)


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_tiny_predictor_masks(tiny_predictors, prompt, multimask):
    tp, jp, width, height, mask_input = tiny_predictors
    kw = scaled_prompt(prompt, width, height, mask_input)
    check_predict_matches(f"tiny predict {width}x{height} {prompt} multimask={multimask}", tp,
                          jp, kw, multimask)


# ==== postprocessing at full size ============================================================

@pytest.mark.parametrize("original_size", [(200, 300), (1200, 1800), (1000, 700), (1024, 1024),
                                           (37, 1500)], ids=str)
def test_postprocess_masks_full_size(original_size):
    """Upscaling/cropping/resizing of `Sam.postprocess_masks` at 1024 px, including a final
    downsample (300x200) and extreme aspect ratios; no model needed. Rough inputs (white noise
    x 5, values up to ~20) make any misplaced sample position visible. We sample where torch's
    float32 kernel does; the two resizes are composed into one map, so the roundings differ:
    measured up to 1.6e-4 on this noise (1200x1800), under 1e-5 on real decoder outputs (see the
    vit_b tests), and the binary masks agree."""
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide(1024).get_preprocess_shape(*original_size, 1024)
    low = np.random.default_rng(0).normal(size=(2, 3, 256, 256)).astype(np.float32) * 5
    fake = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))
    ref64 = to_numpy(Sam.postprocess_masks(fake, torch.from_numpy(low).double(), input_size,
                                           original_size))
    ref32 = to_numpy(Sam.postprocess_masks(fake, torch.from_numpy(low), input_size,
                                           original_size))
    ours = np.asarray(sam_jax.inference.postprocess_masks(
        jnp.asarray(low), input_size=tuple(input_size), original_size=tuple(original_size),
        image_size=1024))
    assert ours.shape == ref32.shape == (2, 3, *original_size)
    agreement = float(((ours > 0) == (ref32 > 0)).mean())
    report(f"postprocess 1024 -> {original_size}", vs_float64=max_abs_diff(ref64, ours),
           vs_float32=max_abs_diff(ref32, ours), official32_vs_64=max_abs_diff(ref32, ref64),
           disagree=1 - agreement)
    assert_close("upscaled logits vs official in float32", ours, ref32, 2e-4)
    assert agreement >= MIN_AGREEMENT
    binary = np.asarray(sam_jax.inference.postprocess_masks(
        jnp.asarray(low), input_size=tuple(input_size), original_size=tuple(original_size),
        image_size=1024, threshold=0.0))
    assert binary.dtype == np.bool_
    np.testing.assert_array_equal(binary, ours > 0)


# ==== full-size vit_b =========================================================================

@pytest.fixture(scope="module")
def vit_b_predictors(tmp_path_factory):
    """The official build_sam_vit_b() with perturbed weights and ours loaded from its .pth
    (model type auto-detected), each with assets/truck.jpg set: one encoder forward each."""
    from segment_anything import build_sam_vit_b
    torch.manual_seed(1)
    official_model = perturb(build_sam_vit_b().eval(), seed=1, scale=VIT_B_NOISE)
    sam = save_and_load(official_model, tmp_path_factory.mktemp("vit_b"))
    assert sam.config == sam_jax.vit_b()
    image = load_truck()
    tp, jp = official_predictor(official_model), sam_jax.SamPredictor(sam)
    tp.set_image(image)
    jp.set_image(image)
    return tp, jp


VIT_B_NOISE = 0.02  # ~ the init scale of 768-wide linears (1/sqrt(768) = 0.036)


def test_vit_b_embedding(vit_b_predictors):
    tp, jp = vit_b_predictors
    ref, ours = to_numpy(tp.get_image_embedding()), jp.get_image_embedding()
    assert ours.shape == ref.shape == (1, 256, 64, 64)
    report("vit_b set_image truck 1800x1200", embedding=max_abs_diff(ref, ours),
           scale=np.abs(ref).max())
    assert_close("vit_b image embedding", ours, ref, EMB_ATOL)


VIT_B_PROMPTS = {
    "point": dict(point_coords=np.array([[500.0, 375.0]]), point_labels=np.array([1])),
    "box": dict(box=np.array([425.0, 600.0, 700.0, 875.0])),
    "box_points": dict(box=np.array([75.0, 275.0, 1725.0, 850.0]),
                       point_coords=np.array([[575.0, 750.0], [1375.0, 550.0]]),
                       point_labels=np.array([0, 1])),
}


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", list(VIT_B_PROMPTS))
def test_vit_b_predict(vit_b_predictors, prompt, multimask):
    tp, jp = vit_b_predictors
    check_predict_matches(f"vit_b predict truck {prompt} multimask={multimask}", tp, jp,
                    VIT_B_PROMPTS[prompt], multimask)


def test_vit_b_mask_input(vit_b_predictors):
    tp, jp = vit_b_predictors
    _, scores, logits = tp.predict(**VIT_B_PROMPTS["point"], multimask_output=True)
    kw = dict(VIT_B_PROMPTS["point"], mask_input=logits[np.argmax(scores)][None])
    check_predict_matches("vit_b predict truck point+mask_input", tp, jp, kw, False)


# ==== vit_l / vit_h widths and heads at reduced depth =========================================

def reduced(name, depth=2, img_size=256):
    """The preset's widths and heads (encoder and decoder) with `depth` blocks (the last one
    global) on `img_size` px: a 16x16 embedding under 14x14 windows (so windows are padded)."""
    config = sam_jax.get_config(name)
    enc = dataclasses.replace(config.image_encoder, depth=depth,
                              global_attn_indexes=(depth - 1,), img_size=img_size)
    return config.replace(image_encoder=enc)


@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_reduced_depth_parity(name, tmp_path):
    config = reduced(name)
    official_model = seeded_official(config, seed=3, scale=VIT_B_NOISE)
    sam = save_and_load(official_model, tmp_path, config=config)
    width, height = 700, 1000
    image = load_truck((width, height))
    tp, jp = official_predictor(official_model), sam_jax.SamPredictor(sam)
    tp.set_image(image)
    jp.set_image(image)
    ref, ours = to_numpy(tp.get_image_embedding()), jp.get_image_embedding()
    assert ours.shape == ref.shape == (1, 256, 16, 16)
    report(f"{name} depth=2 256px set_image {width}x{height}",
           embedding=max_abs_diff(ref, ours), scale=np.abs(ref).max())
    assert_close(f"{name} image embedding", ours, ref, EMB_ATOL)
    mask_input = previous_low_res(tp, width, height)
    for prompt in ("one_point", "box_points", "mask_points"):
        for multimask in (True, False):
            check_predict_matches(f"{name} reduced predict {prompt} multimask={multimask}", tp, jp,
                            scaled_prompt(prompt, width, height, mask_input), multimask)
