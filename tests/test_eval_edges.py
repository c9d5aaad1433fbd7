"""Zero-shot edges (sam_jax.evaluation.edges, SAM §7.2 / App. D.2): Sobel + boundary gating on
synthetic probability maps checked against scipy, the pixel-wise max and normalization, edge NMS
thinning blurred lines to their ridge in every orientation, keeping 1-px lines and ramping the
border down; then the whole recipe on the tiny model: equal to a host-side reference built from
`predict_batch` and `amg.nms`, deterministic, no retrace for a second image of one size, equal
under both device plans, and PNGs the benchmark can read."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import sam_jax
from random_weights import random_variables
from sam_jax.automatic_mask_generator import ACCELERATOR_PLAN, CPU_PLAN
from sam_jax.evaluation import edges as E
from sam_jax.inference import SamModel
from sam_jax.predictor import SamPredictor
from sam_jax.utils import amg

H, W = 48, 64  # non-square: catches H/W swaps


def _disc(h, w, cy, cx, radius, softness=1.0):
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx)
    return (1 / (1 + np.exp(-(radius - dist) / softness))).astype(np.float32), dist


def _reference_sobel(probs):
    """|Sobel| / 8 with replicated edges, from scipy."""
    p = probs.astype(np.float64)
    return np.hypot(ndimage.sobel(p, axis=1, mode="nearest"),
                    ndimage.sobel(p, axis=0, mode="nearest")) / 8


def _morph(mask):
    k = np.ones((3, 3), bool)
    padded = np.pad(mask, 1, mode="edge")
    dil = ndimage.binary_dilation(padded, k)[1:-1, 1:-1]
    ero = ndimage.binary_erosion(padded, k, border_value=1)[1:-1, 1:-1]
    return dil, ero


# ---- Sobel on the probability map, gated by the mask's boundary ------------------------------

def test_disc_gives_a_ring_at_its_boundary_only():
    prob, dist = _disc(64, 64, 31.3, 32.6, 14.0)
    mask = prob > 0.5
    edges = np.asarray(E.sobel_edges(prob, mask))
    dil, ero = _morph(mask)
    band = dil & ~ero
    # the kept pixels are exactly the band, with the Sobel magnitude there
    assert edges.dtype == np.float32
    np.testing.assert_array_equal(edges > 0, band)
    np.testing.assert_allclose(edges[band], _reference_sobel(prob)[band], rtol=1e-5)
    # a ring: within 1.5 px of the circle, nothing inside or outside
    assert np.all(np.abs(dist[edges > 0] - 14.0) < 1.5)
    assert not edges[dist < 12].any() and not edges[dist > 16].any()
    angles = np.arctan2(*np.nonzero(edges)[::-1] - np.array([[32.6], [31.3]]))
    assert np.histogram(angles, bins=36, range=(-np.pi, np.pi))[0].min() > 0  # closed
    # without the gate the sigmoid's tails give a response inside and outside too
    assert _reference_sobel(prob)[(dist > 16) & (dist < 18)].min() > 0.01
    # the one-sided readings: each side of the contour, together the band
    outer = np.asarray(E.sobel_edges(prob, mask, "outer"))
    inner = np.asarray(E.sobel_edges(prob, mask, "inner"))
    assert not (outer > 0)[mask].any() and not (inner > 0)[~mask].any()
    np.testing.assert_array_equal((outer > 0) | (inner > 0), band)
    np.testing.assert_array_equal(np.maximum(outer, inner), edges)


def test_soft_structure_that_does_not_cross_the_threshold_is_dropped():
    prob, dist = _disc(64, 64, 32, 32, 20.0)
    bump, _ = _disc(64, 64, 32, 32, 5.0)
    prob = prob - 0.25 * bump  # a dip to ~0.75 inside the mask: a gradient, no boundary
    mask = prob > 0.5
    edges = np.asarray(E.sobel_edges(prob, mask))
    assert _reference_sobel(prob)[dist < 10].max() > 0.02
    assert not edges[dist < 17].any()
    assert edges[np.abs(dist - 20) < 1].min() > 0


def test_the_image_frame_is_not_a_boundary():
    prob = np.zeros((H, W), np.float32)
    prob[:, :20] = 0.9  # a mask running off the image on three sides
    prob[:, 20] = 0.6
    edges = np.asarray(E.sobel_edges(prob, prob > 0.5))  # mask: columns 0..20
    assert set(np.nonzero(edges.any(0))[0]) == {20, 21}  # the band at the contour, no frame
    assert edges[:, 20:22].all() and _reference_sobel(prob)[:, 19].min() > 0


def test_pixelwise_max_then_linear_normalization():
    a, _ = _disc(H, W, 20, 25, 12.0, softness=0.5)
    b, _ = _disc(H, W, 26, 38, 10.0, softness=2.0)  # overlaps a: the rings cross
    ea, eb = (np.asarray(E.sobel_edges(p, p > 0.5)) for p in (a, b))
    merged = np.asarray(E.merge_edges(np.stack([ea, eb])))
    both = np.maximum(ea, eb)
    np.testing.assert_allclose(merged, both / both.max(), rtol=1e-6)
    assert merged.dtype == np.float32 and merged.min() == 0 and merged.max() == 1
    crossing = (ea > 0) & (eb > 0)
    assert crossing.any() and np.all(merged[crossing] >= np.minimum(ea, eb)[crossing] / both.max())
    # linear: min -> 0, max -> 1, ratios of differences kept; a constant map -> zeros
    x = np.array([[0.1, 0.2], [0.25, 0.4]], np.float32)
    np.testing.assert_allclose(np.asarray(E.normalize_edges(x)), (x - 0.1) / 0.3, rtol=1e-6)
    flat = np.asarray(E.normalize_edges(np.full((3, 4), 0.3, np.float32)))
    assert np.array_equal(flat, np.zeros((3, 4))) and not np.isnan(flat).any()


# ---- edge NMS ----------------------------------------------------------------------------------

def _blurred_line(orientation):
    profile = np.array([0.25, 0.5, 1.0, 0.5, 0.25], np.float32)
    e = np.zeros((40, 44), np.float32)
    if orientation == "vertical":
        e[:, 18:23] = profile
    elif orientation == "horizontal":
        e[18:23, :] = profile[:, None]
    else:  # diagonal, "/" or "\": a Gaussian ridge across the line, sigma 1
        yy, xx = np.mgrid[0:40, 0:44]
        d = (xx - yy if orientation == "\\" else xx + yy - 43) / np.sqrt(2)
        e = np.exp(-d ** 2 / 2).astype(np.float32)
    return e


@pytest.mark.parametrize("orientation,normal", [("vertical", 0.0), ("horizontal", np.pi / 2),
                                                ("\\", 3 * np.pi / 4), ("/", np.pi / 4)])
def test_edge_nms_thins_a_blurred_line_to_its_ridge(orientation, normal):
    e = _blurred_line(orientation)
    assert np.abs(E.edge_orientation(e)[20, 20 if orientation != "/" else 23] - normal) < 1e-3
    thin = E.edge_nms(e)
    inner = (slice(6, 34), slice(6, 38))
    kept = thin[inner] > 0
    if orientation == "vertical":
        assert np.array_equal(np.nonzero(kept)[1] + 6, np.full(28, 20))
    elif orientation == "horizontal":
        assert np.array_equal(np.nonzero(kept)[0] + 6, np.full(32, 20))
    else:  # one pixel a row, on the ridge
        ridge = e[inner] == e.max()
        assert np.array_equal(kept, ridge) and kept.sum(1).tolist() == [1] * 28
    np.testing.assert_array_equal(thin[inner][kept], e[inner][kept])  # kept values unchanged


def test_edge_nms_keeps_a_one_pixel_line_and_ramps_the_border():
    e = np.zeros((40, 44), np.float32)
    e[:, 20] = 0.8
    e[30, 28:] = 0.5  # apart from the first: at a junction the weaker line gives way
    thin = E.edge_nms(e)
    np.testing.assert_array_equal(thin[5:35, 20], e[5:35, 20])
    np.testing.assert_array_equal(thin[30, 28:39], 0.5)
    assert np.count_nonzero(thin[5:35, 5:39]) == 30 + 11
    # border: row/column i from the frame scaled by i / 5 (0 on the frame), corners by both
    ones = E.edge_nms(np.ones((40, 44), np.float32))
    ramp = lambda n: np.minimum(np.minimum(np.arange(n), np.arange(n)[::-1]), 5) / 5  # noqa
    np.testing.assert_allclose(ones, ramp(40)[:, None] * ramp(44)[None, :], rtol=1e-6)
    assert thin[0, 20] == 0 and thin[2, 20] == pytest.approx(0.8 * 2 / 5)
    # a map in [0, 1] stays there; NMS never raises a value
    rng = np.random.default_rng(0)
    noisy = rng.random((30, 50)).astype(np.float32)
    out = E.edge_nms(noisy)
    assert out.dtype == np.float32 and np.all(out <= noisy) and out.min() >= 0
    with pytest.raises(ValueError, match="2-D"):
        E.edge_nms(np.zeros((2, 3, 4)))


# ---- the recipe on the tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    cfg = sam_jax.tiny()
    return SamModel(cfg, random_variables(cfg, seed=3))


def _image(seed):
    rng = np.random.default_rng(seed)
    image = np.full((H, W, 3), 40, np.uint8)
    image[5:30, 8:40] = (200, 30, 30)
    image[20:44, 30:60] = (30, 200, 60)
    return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def _reference_soft_edges(model, image, nms_thresh):
    """The recipe on the host from public pieces: `predict_batch` logits (64 points a call, as
    the device function), `amg.nms`, `merge_edges` of `sobel_edges`."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    points = amg.build_point_grid(16) * np.array([W, H])
    logits, ious = [], []
    for s in range(0, len(points), 64):
        chunk = points[s:s + 64]
        out, iou, _ = predictor.predict_batch(chunk[:, None], np.ones((len(chunk), 1)),
                                              return_logits=True)
        logits.append(out.reshape(-1, H, W))
        ious.append(iou.reshape(-1))
    logits, ious = np.concatenate(logits), np.concatenate(ious)
    masks = logits > 0
    keep = amg.nms(np.asarray(amg.masks_to_boxes(masks)), ious, nms_thresh)
    # float32 sigmoid as on the device: the random model's probabilities saturate, its edges
    # are ~1e-4 before normalization, so float64 here would differ by ~1e-3 after it
    prob = jax.nn.sigmoid(logits[keep])
    return np.asarray(E.merge_edges(E.sobel_edges(prob, masks[keep]))), len(keep)


def test_soft_edges_equal_the_host_reference(model):
    image = _image(0)
    for nms_thresh in (0.7, 1.0):  # 1.0 suppresses nothing: all 768 masks, none filtered
        found = E.soft_edges(model, image, E.EdgeOptions(nms_thresh=nms_thresh))
        expected, kept = _reference_soft_edges(model, image, nms_thresh)
        assert found.num_masks == kept
        np.testing.assert_allclose(found.edges, expected, atol=2e-5)
    assert found.num_masks == 768


def test_edge_map_shape_range_determinism_and_no_retrace(model):
    first = E.edge_map(model, _image(0))
    assert first.shape == (H, W) and first.dtype == np.float32
    assert first.min() >= 0 and 0 < first.max() <= 1
    soft = E.edge_map(model, _image(0), edge_nms=False)
    np.testing.assert_array_equal(first, E.edge_nms(soft))
    assert soft.max() == 1
    cache = E._soft_edges._cache_size()
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = E.edge_map(model, _image(0))
        other = E.edge_map(model, _image(1))  # another image of the same size
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert np.array_equal(first, again)
    assert other.shape == (H, W)
    assert E._soft_edges._cache_size() == cache
    assert not [e for e in compiles if "backend_compile" in e], compiles


def test_device_plans_agree(model):
    # the default options, so the CPU plan (the default here) reuses the compiled function
    image = _image(2)
    options = E.EdgeOptions(nms_thresh=1.0)
    cpu = E.soft_edges(model, image, options, plan=CPU_PLAN)
    accel = E.soft_edges(model, image, options, plan=dataclasses.replace(ACCELERATOR_PLAN,
                                                                          mask_chunk=40))
    assert cpu.num_masks == accel.num_masks == 768  # 768 = 19 chunks of 40 + a partial one
    np.testing.assert_allclose(cpu.edges, accel.edges, atol=1e-6)


def test_write_edge_maps_writes_named_8bit_pngs(model, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(_image(3)).save(src / "12003.jpg", quality=95)
    rgba = np.dstack([_image(4), np.full((H, W), 255, np.uint8)])
    Image.fromarray(rgba).save(src / "100007.png")
    out = tmp_path / "edges"
    written = E.write_edge_maps(model, [src / "12003.jpg", str(src / "100007.png"),
                                        ("array_image", _image(5))], out, progress=False)
    assert written == [os.path.join(out, n + ".png") for n in ("12003", "100007", "array_image")]
    assert sorted(os.listdir(out)) == ["100007.png", "12003.png", "array_image.png"]
    for path in written:
        with Image.open(path) as png:
            assert png.mode == "L" and png.size == (W, H) and png.format == "PNG"
            pixels = np.asarray(png)
        assert pixels.dtype == np.uint8 and pixels.max() > 0
    with Image.open(written[2]) as png:
        np.testing.assert_array_equal(np.asarray(png), E.edge_png(E.edge_map(model, _image(5))))
    with pytest.raises(ValueError, match="12003"):
        E.write_edge_maps(model, [src / "12003.jpg", ("12003", _image(0))], out, progress=False)


def test_options_are_checked():
    for bad, word in ((dict(points_per_side=0), "points_per_side"),
                      (dict(points_per_batch=0), "points_per_batch"),
                      (dict(nms_thresh=1.5), "nms_thresh"),
                      (dict(boundary="outside"), "boundary")):
        with pytest.raises(ValueError, match=word):
            E.EdgeOptions(**bad)
    with pytest.raises(ValueError, match="boundary"):
        E.boundary_pixels(np.zeros((3, 3), bool), "ring")
    assert E.EdgeOptions() == E.EdgeOptions(16, 0.7, 64, True, "band")


def test_refined_model_edges_come_from_the_refined_masks():
    from sam_jax.configs import MaskRefinerConfig

    cfg = sam_jax.tiny().replace(mask_refiner=MaskRefinerConfig(width=8, dilations=(1, 2)))
    variables = random_variables(cfg, seed=3)
    refined = SamModel(cfg, variables)
    image = _image(0)
    # no suppression: the host reference's NMS (on refined boxes) and the device's (on the
    # decoder's) keep the same 768 masks, so the edge maps must agree
    found = E.soft_edges(refined, image, E.EdgeOptions(nms_thresh=1.0))
    expected, kept = _reference_soft_edges(refined, image, 1.0)
    assert found.num_masks == kept == 768
    np.testing.assert_allclose(found.edges, expected, atol=2e-5)
    plain_params = {k: v for k, v in variables["params"].items() if k != "mask_refiner"}
    plain = SamModel(sam_jax.tiny(), {"params": plain_params, "buffers": variables["buffers"]})
    unrefined = E.soft_edges(plain, image, E.EdgeOptions(nms_thresh=1.0))
    assert np.abs(found.edges - unrefined.edges).max() > 1e-3
