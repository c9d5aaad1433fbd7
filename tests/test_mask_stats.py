"""SA-1B dataset statistics (sam_jax/evaluation/mask_stats.py): hand-made masks with answers
worked out here, a brute-force check of the run-based geometry against pycocotools-decoded
pixels, a folder written by the project's SA-1B writer, the released SA-1B record, the PNG,
and bad input."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import ConvexHull

from sam_jax import sa1b
from sam_jax.evaluation import mask_stats
from sam_jax.utils import amg

SA1B_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "sa_226381_subset12.json")


def _rle(mask):
    """A bool (H, W) mask as the COCO-string RLE that SA-1B files hold."""
    return amg.coco_encode_rle(amg.mask_to_rle(np.asarray(mask, bool)[None])[0])


def _record(mask):
    """A generator record (what `sa1b.to_sa1b` takes) for a bool mask."""
    return {"segmentation": np.asarray(mask, bool), "bbox": [0, 0, 1, 1],
            "area": int(np.sum(mask)), "predicted_iou": 0.9, "point_coords": [[0.0, 0.0]],
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]], "stability_score": 0.95}


def _write_image(folder, name, masks, width, height):
    records = [_record(m) for m in masks]
    sa1b.write_json_atomic(str(folder / f"{name}.json"),
                           sa1b.to_sa1b(records, f"{name}.jpg", width, height))


def _brute_force(mask):
    """(area, center x, center y, hull area) from every pixel: the hull of all four corners of
    every foreground pixel."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return len(xs), xs.mean() + 0.5, ys.mean() + 0.5, ConvexHull(corners).volume


def _l_shape(height, width, x, y):
    """An L with its corner at (x, y): a 2-wide, 4-tall bar plus a 4-wide, 2-tall foot."""
    mask = np.zeros((height, width), bool)
    mask[y:y + 4, x:x + 2] = True
    mask[y + 2:y + 4, x:x + 4] = True
    return mask


# ---- one mask ---------------------------------------------------------------------------------

def test_rectangles_pixels_and_lines_are_not_concave():
    h, w = 9, 13  # not square: an H/W swap changes the answers
    for y0, y1, x0, x1 in [(2, 7, 3, 11), (0, 9, 0, 13), (4, 5, 6, 7), (3, 4, 0, 13),
                           (0, 9, 5, 6), (0, 9, 2, 8)]:  # the last three wrap across columns
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        g = mask_stats.mask_geometry(_rle(mask))
        assert g.area == (y1 - y0) * (x1 - x0)
        assert g.hull_area == pytest.approx(g.area, abs=1e-9)
        assert g.concavity == pytest.approx(0.0, abs=1e-12)
        assert (g.center_x, g.center_y) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2))


def test_l_shape_concavity_and_center_by_hand():
    # The L (corner at the origin) is the union of [0,2]x[0,4] and [0,4]x[2,4]: area 8 + 8 - 4
    # = 12. Its hull has vertices (0,0) (2,0) (4,2) (4,4) (0,4): the 4x4 square less the
    # triangle (2,0) (4,0) (4,2) of area 2, so 14. Concavity 1 - 12/14 = 1/7.
    # Center of mass: the bar's 8 pixels average (1, 2), the foot's other 4 pixels (3, 3):
    # ((8*1 + 4*3) / 12, (8*2 + 4*3) / 12) = (5/3, 7/3), then shifted by the corner (5, 1).
    g = mask_stats.mask_geometry(_rle(_l_shape(7, 11, x=5, y=1)))
    assert g.area == 12
    assert g.hull_area == pytest.approx(14.0)
    assert g.concavity == pytest.approx(1 / 7)
    assert (g.center_x, g.center_y) == pytest.approx((5 + 5 / 3, 1 + 7 / 3))


def test_empty_mask_has_no_center_and_no_concavity():
    g = mask_stats.mask_geometry(_rle(np.zeros((4, 6), bool)))
    assert g.area == 0 and g.hull_area == 0.0 and g.concavity == 0.0
    assert np.isnan(g.center_x) and np.isnan(g.center_y)


def test_run_geometry_equals_brute_force_on_every_pixel():
    """Random masks (speckle, blobs, full columns, both RLE encodings), and the released
    record decoded by pycocotools, an independent decoder."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(1, 25, 2)
        if trial % 3 == 0:
            mask = ndimage.binary_dilation(rng.random((h, w)) < 0.05, iterations=2)
        else:
            mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        if not mask.any():
            continue
        expected = _brute_force(mask)
        for rle in (amg.mask_to_rle(mask[None])[0], _rle(mask)):
            assert tuple(mask_stats.mask_geometry(rle)) == pytest.approx(expected)

    data = sa1b.read_sa1b(SA1B_SAMPLE)
    for ann in data["annotations"]:
        rle = ann["segmentation"]
        pixels = mask_utils.decode(dict(rle, counts=rle["counts"].encode())).astype(bool)
        assert tuple(mask_stats.mask_geometry(rle)) == pytest.approx(_brute_force(pixels))


# ---- a folder ---------------------------------------------------------------------------------

def test_round_trip_through_the_project_writer(tmp_path):
    h, w = 8, 12
    quarter = np.zeros((h, w), bool)
    quarter[4:8, 6:12] = True  # bottom-right quarter: 24 of 96 pixels, center (9, 6)
    columns = np.zeros((h, w), bool)
    columns[:, 0:3] = True  # 3 full columns, also a quarter: center (1.5, 4)
    pixel = np.zeros((h, w), bool)
    pixel[0, 11] = True
    _write_image(tmp_path, "a", [quarter, columns, _l_shape(h, w, x=1, y=2)], w, h)
    _write_image(tmp_path, "b", [pixel], w, h)
    _write_image(tmp_path, "c", [], w, h)
    (tmp_path / ".tmp-killed.json").write_text("{")  # a killed writer's leftover: skipped
    (tmp_path / "a.png").write_bytes(b"")  # --visualize output beside the JSON: skipped

    stats = mask_stats.collect_mask_stats(tmp_path)
    assert stats.num_images == 3 and stats.num_masks == 4
    np.testing.assert_array_equal(stats.masks_per_image, [3, 1, 0])
    np.testing.assert_array_equal(stats.area, [24, 24, 12, 1])
    np.testing.assert_allclose(stats.relative_size,
                               [0.5, 0.5, np.sqrt(12 / 96), np.sqrt(1 / 96)])
    np.testing.assert_allclose(stats.concavity, [0, 0, 1 / 7, 0], atol=1e-12)
    np.testing.assert_allclose(stats.centers, [[9 / 12, 6 / 8], [1.5 / 12, 4 / 8],
                                               [(1 + 5 / 3) / 12, (2 + 7 / 3) / 8],
                                               [11.5 / 12, 0.5 / 8]])
    heat = stats.center_heatmap(bins=4)  # [row = y, column = x]
    assert heat.sum() == 4 and heat[3, 3] == 1 and heat[2, 0] == 2 and heat[0, 3] == 1

    summary = stats.summary()
    json.dumps(summary)  # JSON-able as it is
    assert summary["images"] == 3 and summary["masks"] == 4
    assert summary["masks_per_image"]["mean"] == pytest.approx(4 / 3)
    assert summary["masks_per_image"]["median"] == 1.0
    assert summary["masks_per_image"]["histogram"] == {
        "0-10": 3, "11-50": 0, "51-100": 0, "101-200": 0, ">200": 0}
    assert summary["relative_size"]["quantiles"]["p50"] == pytest.approx(
        np.median([0.5, 0.5, np.sqrt(12 / 96), np.sqrt(1 / 96)]))
    assert summary["area_classes"]["small"] == 1.0  # all under 32^2 pixels
    assert summary["concavity"]["mean"] == pytest.approx(1 / 28)

    first = mask_stats.collect_mask_stats(tmp_path, max_images=1)
    np.testing.assert_array_equal(first.masks_per_image, [3])
    listed = mask_stats.collect_mask_stats([tmp_path / "b.json", tmp_path / "a.json"])
    np.testing.assert_array_equal(listed.masks_per_image, [1, 3])


def test_coco_area_classes_and_masks_per_image_bins(tmp_path):
    h, w = 100, 120

    def box(bh, bw):
        mask = np.zeros((h, w), bool)
        mask[:bh, :bw] = True
        return mask

    # 1023 px small; 1024 = 32^2 and 9215 medium; 9216 = 96^2 large: COCO's [low, high)
    _write_image(tmp_path, "sizes", [box(31, 33), box(32, 32), box(95, 97), box(96, 96)], w, h)
    _write_image(tmp_path, "many", [box(1, 1)] * 11, w, h)  # 11 masks: the second bin
    _write_image(tmp_path, "ten", [box(1, 1)] * 10, w, h)  # 10: still the first
    stats = mask_stats.collect_mask_stats(tmp_path)  # many, sizes, ten
    assert stats.masks_per_image_histogram() == {
        "0-10": 2, "11-50": 1, "51-100": 0, "101-200": 0, ">200": 0}
    np.testing.assert_array_equal(stats.area_class()[11:15], [0, 1, 1, 2])
    summary = stats.summary()
    assert summary["area_classes"]["small"] == pytest.approx(22 / 25)
    assert summary["area_classes"]["medium"] == pytest.approx(2 / 25)
    assert summary["area_classes"]["large"] == pytest.approx(1 / 25)
    assert summary["concavity"]["by_area_class"]["large"]["masks"] == 1


def test_released_sa1b_record():
    data = json.load(open(SA1B_SAMPLE))
    width, height = data["image"]["width"], data["image"]["height"]
    stats = mask_stats.collect_mask_stats(SA1B_SAMPLE)
    assert stats.num_images == 1 and stats.num_masks == 12
    np.testing.assert_array_equal(stats.masks_per_image, [12])
    areas = np.array([a["area"] for a in data["annotations"]])
    np.testing.assert_array_equal(stats.area, areas)
    np.testing.assert_allclose(stats.relative_size, np.sqrt(areas / (width * height)))
    assert ((stats.centers > 0) & (stats.centers < 1)).all()
    # each center of mass lies in its mask's box (SA-1B's bbox: max pixel inclusive)
    for (cx, cy), ann in zip(stats.centers, data["annotations"]):
        x, y, bw, bh = ann["bbox"]
        assert x <= cx * width <= x + bw + 1 and y <= cy * height <= y + bh + 1
    assert ((stats.concavity >= 0) & (stats.concavity < 1)).all()
    assert stats.concavity.max() > 0.05  # real object outlines are not all convex


# ---- the figure -------------------------------------------------------------------------------

def test_plot_writes_a_png_without_pyplot(tmp_path):
    # pyplot is what switches the global backend (even matplotlib.get_backend() imports it
    # to resolve "auto", so it is not asked here); plotting must leave it unimported
    pyplot_before = "matplotlib.pyplot" in sys.modules
    for name, source in (("real", SA1B_SAMPLE), ("empty", None)):
        if source is None:  # an image without masks: empty panels, no crash
            _write_image(tmp_path, "none", [], 5, 4)
            source = tmp_path / "none.json"
        path = tmp_path / f"{name}.png"
        mask_stats.plot_mask_stats(mask_stats.collect_mask_stats(source), path, title=name)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1600, 400)
            assert np.asarray(image.convert("L")).std() > 10  # something was drawn
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before


# ---- bad input --------------------------------------------------------------------------------

_IMAGE = {"image_id": 1, "width": 3, "height": 2, "file_name": "x.jpg"}


@pytest.mark.parametrize("content, problem", [
    ("{", "not valid JSON"),
    (json.dumps({"image": _IMAGE}), "'annotations'"),
    (json.dumps({"image": _IMAGE, "annotations": [
        {"segmentation": {"size": [3, 2], "counts": [6]}}]}), "has size"),
    (json.dumps({"image": _IMAGE, "annotations": [
        {"segmentation": {"size": [2, 3], "counts": [2, 3]}}]}), "annotation 0: RLE counts sum"),
    (json.dumps({"image": _IMAGE, "annotations": [
        {"segmentation": {"size": [2, 3], "counts": "P"}}]}), "annotation 0: truncated"),
    (json.dumps({"image": dict(_IMAGE, width=0), "annotations": []}), "positive integers"),
])
def test_bad_file_is_a_value_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "sa_bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as error:
        mask_stats.collect_mask_stats(tmp_path)
    assert str(path) in str(error.value)


def test_bad_folder_or_arguments(tmp_path):
    with pytest.raises(ValueError, match="no SA-1B .json files") as error:
        mask_stats.collect_mask_stats(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="no such file or folder"):
        mask_stats.collect_mask_stats(tmp_path / "missing")
    with pytest.raises(ValueError, match="no SA-1B files given"):
        mask_stats.collect_mask_stats([])
    with pytest.raises(ValueError, match="max_images"):
        mask_stats.collect_mask_stats(SA1B_SAMPLE, max_images=0)


def test_cli_eval_stats_writes_summary_and_plot(tmp_path, capsys):
    from conftest import assert_error, call

    h, w = 8, 12
    quarter = np.zeros((h, w), bool)
    quarter[4:8, 6:12] = True
    _write_image(tmp_path, "a", [quarter, quarter], w, h)
    _write_image(tmp_path, "b", [quarter], w, h)
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "stats", tmp_path, "-o", out, "-q")
    assert status == 0, err
    summary = json.loads((out / "stats.json").read_text())
    assert summary == json.loads(stdout)
    assert summary["images"] == 2 and summary["masks"] == 3
    assert Image.open(out / "stats.png").size == (1600, 400)
    assert_error(call(capsys, "eval", "stats", tmp_path / "none", "-o", out), 1, "none")
