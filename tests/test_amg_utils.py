"""sam_jax.utils.amg against the official segment_anything.utils.amg, pycocotools (COCO RLE
strings, byte for byte) and torchvision's nms, on seeded random inputs."""

import jax
import numpy as np
import pytest
import torch

from segment_anything.utils import amg as official
from sam_jax.utils import amg


def random_masks(rng, n, h, w, blobs=3):
    """Blobby masks (runs of every length, masks touching the border, an empty one)."""
    masks = np.zeros((n, h, w), bool)
    for i in range(1, n):
        for _ in range(blobs):
            y, x = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(1, h // 2), rng.integers(1, w // 2)
            masks[i, max(0, y - ry):y + ry, max(0, x - rx):x + rx] ^= True
        masks[i] ^= rng.random((h, w)) < 0.02  # speckle: single-pixel runs and holes
    return masks


@pytest.mark.parametrize("n", [1, 4, 32])
def test_point_grids(n):
    np.testing.assert_array_equal(amg.build_point_grid(n), official.build_point_grid(n))
    for a, b in zip(amg.build_all_layer_point_grids(4 * n, 2, 2),
                    official.build_all_layer_point_grids(4 * n, 2, 2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(1200, 1800), (683, 1024), (1024, 1024), (77, 301)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes(size, layers):
    assert amg.generate_crop_boxes(size, layers, 512 / 1500) == \
        official.generate_crop_boxes(size, layers, 512 / 1500)


def test_stability_score_and_boxes():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 37, 53)) * 3).astype(np.float32)
    logits[0] = -5  # empty at every threshold: 0/0
    ours = np.asarray(amg.stability_score(logits, 0.0, 1.0))
    theirs = official.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_array_equal(ours, theirs)
    masks = random_masks(rng, 8, 37, 53)
    np.testing.assert_array_equal(
        np.asarray(amg.masks_to_boxes(masks)),
        official.batched_mask_to_box(torch.from_numpy(masks)).numpy())


def test_box_near_crop_edge():
    rng = np.random.default_rng(1)
    boxes = rng.integers(0, 400, (200, 4)).astype(np.float32)
    for crop in ([0, 0, 500, 400], [100, 50, 400, 300], [0, 120, 260, 400]):
        np.testing.assert_array_equal(
            amg.is_box_near_crop_edge(boxes, crop, [0, 0, 500, 400]),
            official.is_box_near_crop_edge(torch.from_numpy(boxes), crop,
                                           [0, 0, 500, 400]).numpy())


def test_nms_equals_torchvision():
    from torchvision.ops import batched_nms
    rng = np.random.default_rng(2)
    for n, thr in ((1, 0.7), (37, 0.7), (300, 0.5), (700, 0.9)):
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(0, 80, (n, 2))
        boxes = np.round(np.concatenate([xy, xy + wh], 1)).astype(np.float32)
        boxes[::17] = 0  # empty masks have all-zero boxes
        scores = rng.random(n).astype(np.float32)
        scores[1::5] = scores[0]  # ties
        expected = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                               torch.zeros(n), thr).numpy()
        np.testing.assert_array_equal(amg.nms(boxes, scores, thr), expected)


@pytest.mark.parametrize("n, thr, valid_share", [(1, 0.7, 1.0), (64, 0.5, 0.7),
                                                  (500, 0.7, 0.7), (500, 0.98, 0.9),
                                                  (50, 0.5, 0.0)])
def test_greedy_nms_on_device_equals_torchvision(n, thr, valid_share):
    """The jitted NMS the generator runs per crop: boxes flagged invalid take no part, the
    kept indices come by decreasing score (ties: lower index) and are padded with 0 to N."""
    from torchvision.ops import nms as torchvision_nms
    rng = np.random.default_rng(n)
    xy = rng.integers(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.integers(0, 80, (n, 2))], 1).astype(np.int32)
    boxes[::13] = 0  # empty masks have all-zero boxes
    scores = rng.random(n).astype(np.float32)
    scores[1::4] = scores[0]  # ties, among valid and invalid boxes
    scores[2::7] = scores[-1]
    valid = rng.random(n) < valid_share
    kept, count = jax.jit(amg.greedy_nms)(boxes, scores, valid, np.float32(thr))
    kept, count = np.asarray(kept), int(count)
    idx = np.flatnonzero(valid)
    expected = idx[torchvision_nms(torch.from_numpy(boxes[idx]).float(),
                                   torch.from_numpy(scores[idx]), thr).numpy()]
    assert count == len(expected) and (count > 0) == (valid_share > 0)
    np.testing.assert_array_equal(kept[:count], expected)
    assert not kept[count:].any()


def test_rle_round_trip_and_official_encoding():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 6, 45, 61)
    masks[1, 0, 0] = True  # starts with a foreground pixel: counts begin with 0
    ours = amg.mask_to_rle(masks)
    assert ours == official.mask_to_rle_pytorch(torch.from_numpy(masks))
    for m, rle in zip(masks, ours):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), m)
        assert amg.area_from_rle(rle) == m.sum() == official.area_from_rle(rle)


def test_coco_rle_strings_equal_pycocotools():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(4)
    masks = random_masks(rng, 12, 300, 217, blobs=6)
    masks[2] = True
    for m, rle in zip(masks, amg.mask_to_rle(masks)):
        ours = amg.coco_encode_rle(rle)
        theirs = official.coco_encode_rle(rle)
        assert ours == theirs
        assert ours["counts"] == mask_utils.encode(np.asfortranarray(m))["counts"].decode()
        assert amg.coco_decode_counts(ours["counts"]) == rle["counts"]
        np.testing.assert_array_equal(amg.rle_to_mask(ours), m)
        compressed = {"size": ours["size"], "counts": ours["counts"].encode()}
        assert amg.area_from_rle(ours) == int(mask_utils.area(compressed)) == m.sum()
        np.testing.assert_array_equal(mask_utils.decode(compressed).astype(bool), m)


def test_bad_rle_is_refused():
    with pytest.raises(ValueError, match="sum to 5"):
        amg.rle_to_mask({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="truncated"):
        amg.coco_decode_counts("P")  # continuation bit set, then nothing


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 10, 60, 10_000])
def test_remove_small_regions(mode, area):
    rng = np.random.default_rng(5)
    for m in random_masks(rng, 6, 64, 80, blobs=5):
        ours, changed = amg.remove_small_regions(m, area, mode)
        theirs, their_changed = official.remove_small_regions(m, area, mode)
        assert changed == their_changed
        np.testing.assert_array_equal(ours, theirs)
