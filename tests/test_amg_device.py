"""The automatic mask generator's device work: the accelerator plan (whole batches at once) run
on this CPU gives the CPU plan's records exactly, and each crop size compiles the per-crop
functions once."""

import jax
import pytest

from conftest import load_truck
from sam_jax import automatic_mask_generator as amg_gen
from sam_jax.automatic_mask_generator import (ACCELERATOR_PLAN, CPU_PLAN,
                                              SamAutomaticMaskGenerator, plan_for_backend)
from sam_jax.utils import amg


def test_plan_per_backend():
    assert plan_for_backend("cpu") == CPU_PLAN
    assert plan_for_backend("gpu") == plan_for_backend("tpu") == ACCELERATOR_PLAN
    assert plan_for_backend() == plan_for_backend(jax.default_backend())
    assert CPU_PLAN.stats_group and ACCELERATOR_PLAN.stats_group is None


def _generate(model, image, plan, **options):
    generator = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **options)
    generator.plan = plan
    return generator.generate(image)


@pytest.mark.parametrize("options", [
    # partial and bucket-padded batches: 64 points in 3 batches of 24, decoded as rows of 32
    dict(points_per_side=8, points_per_batch=24, pred_iou_thresh=0.0,
         stability_score_thresh=0.0, box_nms_thresh=0.98),
    # real filters, crops (the near-crop-edge filter, NMS across crops), small regions
    dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.25,
         stability_score_offset=0.01, box_nms_thresh=0.98, crop_n_layers=1,
         crop_nms_thresh=0.98, min_mask_region_area=30),
], ids=["padded-batches", "filtered-crops"])
def test_accelerator_plan_equals_cpu_plan(tiny_sam, options):
    image = load_truck((300, 200))
    cpu = _generate(tiny_sam, image, CPU_PLAN, **options)
    accelerator = _generate(tiny_sam, image, ACCELERATOR_PLAN, **options)
    assert len(cpu) >= 4
    assert accelerator == cpu  # RLEs, scores, boxes, points: every field, exactly


def test_one_compile_per_crop_size(tiny_sam):
    """Two images of one size: the per-crop functions compile once per crop size on the first
    and never on the second, whatever the masks found."""
    size = (302, 202)  # no other test uses this size: every compile here is counted
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                   crop_n_layers=1)
    generator = SamAutomaticMaskGenerator(tiny_sam, **options)
    boxes, layers = amg.generate_crop_boxes(size[::-1], 1, generator.crop_overlap_ratio)
    crop_sizes = {(layer, y1 - y0, x1 - x0) for (x0, y0, x1, y1), layer in zip(boxes, layers)}
    assert len(crop_sizes) < len(boxes)  # several crops share a size

    def caches():
        return amg_gen._crop_candidates._cache_size(), amg_gen._kept_masks._cache_size()

    before = caches()
    first = generator.generate(load_truck(size))
    after_first = caches()
    second = generator.generate(load_truck(size)[::-1].copy())
    assert first and second
    assert after_first[0] - before[0] == len(crop_sizes)
    assert after_first[1] - before[1] <= len(crop_sizes)
    assert caches() == after_first  # no retrace for a new image of the same size
