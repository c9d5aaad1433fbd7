"""The bundled model's training tools in experiments/: the data engine's automatic stage on
cached training views (data_engine_pseudo_labels.py), how train_default_model.py merges its
output, and train_default_model.py's head averaging (--average-with), validation views and
background maps; train_mask_refiner.py's data helpers; evaluate_default_model.py's validation
photos."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

from data_engine_pseudo_labels import grid_points, select_new_masks  # noqa: E402
from train_default_model import FeatureCache  # noqa: E402

L = 32


def square(r0, c0, size, value=8.0, background=-8.0):
    logits = np.full((L, L), background, np.float32)
    logits[r0:r0 + size, c0:c0 + size] = value
    return logits


FILTERS = dict(iou_thresh=0.6, stability_thresh=0.6, nms=0.7, known_iou=0.5, min_cells=9,
               max_fraction=0.9)


def test_only_confident_stable_new_masks_are_kept():
    annotated = square(2, 2, 8)
    new = square(16, 16, 10)
    duplicate = square(16, 16, 9)  # IoU 0.81 with `new`, scored lower: removed by NMS
    low_score = square(2, 20, 6)
    unstable = square(20, 2, 8, value=0.5, background=-0.5)  # all of it within the +-1 band
    tiny = square(28, 28, 2)
    logits = np.stack([annotated, new, duplicate, low_score, unstable, tiny])
    iou = np.array([0.95, 0.9, 0.8, 0.3, 0.9, 0.9], np.float32)
    inside = np.ones((L, L), bool)
    known = (annotated > 0)[None]
    masks, counts = select_new_masks(logits, iou, known, inside, 5, **FILTERS)
    assert counts == {"candidates": 6, "confident_stable": 4, "sized": 3, "after_nms": 2,
                      "new": 1, "kept": 1}
    np.testing.assert_array_equal(masks, (new > 0)[None])


def test_free_slots_and_the_image_area_bound_the_output():
    a, b = square(0, 0, 6), square(20, 20, 6)
    logits = np.stack([a, b])
    iou = np.array([0.7, 0.9], np.float32)
    inside = np.zeros((L, L), bool)
    inside[:, :L // 2] = True  # the view's image is the left half; the rest is padding
    masks, counts = select_new_masks(logits, iou, np.zeros((0, L, L), bool), inside, 1,
                                     **FILTERS)
    # b lies in the padding: nothing of it counts; a is the only mask and fits the one slot
    assert counts["sized"] == 1 and counts["kept"] == 1
    np.testing.assert_array_equal(masks[0], a > 0)
    none, counts = select_new_masks(logits, iou, np.zeros((0, L, L), bool), inside, 0,
                                    **FILTERS)
    assert none.shape == (0, L, L) and counts["new"] == 1 and counts["kept"] == 0


def test_grid_points_cover_the_image_not_the_padding():
    points = grid_points(np.array([100, 448]), 4)  # h 100, w 448
    assert points.shape == (16, 2)
    np.testing.assert_allclose(sorted(set(points[:, 0])), [56, 168, 280, 392])
    np.testing.assert_allclose(sorted(set(points[:, 1])), [12.5, 37.5, 62.5, 87.5])


def _write_shard(path, valid, masks_bits):
    n, slots = valid.shape
    np.savez(path, features=np.zeros((n, 2, 2, 3), np.float16),
             masks=np.packbits(masks_bits, axis=-1), boxes=np.ones((n, slots, 4), np.float32),
             mask_valid=valid, input_size=np.full((n, 2), 448, np.int32),
             names=np.array(["horse/a#0", "davis/b#0"]))


def test_feature_cache_fills_free_slots_with_pseudo_labels(tmp_path):
    cache, pseudo = tmp_path / "cache", tmp_path / "pseudo"
    cache.mkdir()
    pseudo.mkdir()
    gt = np.zeros((2, 3, 16, 16), bool)
    gt[:, 0, :4, :4] = True
    _write_shard(cache / "train_0000.npz", np.array([[1, 0, 0], [1, 0, 0]], bool), gt)
    extra = np.zeros((2, 3, 16, 16), bool)
    extra[0, 1, 8:, 8:] = True  # 64 cells, in view 0's first free slot
    np.savez(pseudo / "pseudo_0000.npz", masks=np.packbits(extra, axis=-1),
             boxes=np.full((2, 3, 4), 7, np.float32),
             mask_valid=np.array([[0, 1, 0], [0, 0, 0]], bool), names=np.array(["", ""]))
    plain = FeatureCache(str(cache))
    plain.rescan()
    merged = FeatureCache(str(cache), str(pseudo))
    merged.rescan()
    assert merged.pseudo_masks == 1
    # background: the view's cells outside all of its valid masks, pseudo-labels included
    with_bg = merged.batch(0, 4, 1, seed=0, background=True)
    views = np.random.default_rng([0, 0]).integers(0, 2, 4)
    for row, v in enumerate(views):
        expected = ~gt[v, 0] & ~(extra[v, 1] if v == 0 else np.zeros_like(gt[v, 0]))
        np.testing.assert_array_equal(with_bg["background"][row], expected)
    np.testing.assert_array_equal(merged.arrays["mask_valid"],
                                  [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(merged.arrays["area"][0], [16, 64, 0])
    np.testing.assert_array_equal(merged.arrays["boxes"][0, :, 0], [1, 7, 1])
    np.testing.assert_array_equal(plain.arrays["mask_valid"], [[1, 0, 0], [1, 0, 0]])
    batch = merged.batch(0, 4, 3, seed=0)
    assert batch["mask_valid"].sum() in range(4, 9)


def test_held_out_validation_views_are_never_drawn(tmp_path):
    from default_model_data import validation_views

    n = 40  # 20 photos, 2 views each; 2 of the photos are validation photos
    masks = np.zeros((n, 1, 16, 16), bool)
    masks[:, 0, :4, :4] = True
    _write_shard(tmp_path / "train_0000.npz", np.ones((n, 1), bool), masks)
    with np.load(tmp_path / "train_0000.npz") as shard:  # each view's features: its index
        data = dict(shard)
    data["features"] = np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3))
    np.savez(tmp_path / "train_0000.npz", **data)
    val = validation_views(n)
    assert val.sum() == 4 and (val[0::2] == val[1::2]).all()  # both views of a photo
    cache = FeatureCache(str(tmp_path))
    cache.rescan()
    cache.pool = cache.training_pool(hold_out_validation=True)
    drawn = {int(cache.batch(step, 8, 1, seed=0)["features"][i, 0, 0, 0])
             for step in range(60) for i in range(8)}
    assert drawn == set(np.flatnonzero(~val).tolist())
    cache.pool = cache.training_pool(hold_out_validation=False)  # every view
    assert cache.pool is None
    everything = {int(cache.batch(step, 8, 1, seed=0)["features"][i, 0, 0, 0])
                  for step in range(60) for i in range(8)}
    assert everything == set(range(n))


def _indexed_shard(path, first, n):
    """A shard of n one-mask views whose features hold their number, first..first+n-1."""
    masks = np.zeros((n, 1, 16, 16), bool)
    masks[:, 0, :4, :4] = True
    np.savez(path, features=(np.arange(first, first + n, dtype=np.float16).reshape(n, 1, 1, 1)
                             * np.ones((1, 2, 2, 3), np.float16)),
             masks=np.packbits(masks, axis=-1), boxes=np.ones((n, 1, 4), np.float32),
             mask_valid=np.ones((n, 1), bool), input_size=np.full((n, 2), 448, np.int32),
             names=np.array([f"v{i}" for i in range(first, first + n)]))


def test_extra_cache_views_come_after_the_main_ones_and_are_never_held_out(tmp_path):
    from default_model_data import validation_views

    main, extra = tmp_path / "main", tmp_path / "extra"
    main.mkdir()
    extra.mkdir()
    _indexed_shard(main / "train_0000.npz", 0, 40)
    _indexed_shard(extra / "train_0000.npz", 100, 6)
    cache = FeatureCache(str(main), extra=(str(extra),))
    cache.rescan()
    assert cache.main_views == 40 and len(cache) == 46
    np.testing.assert_array_equal(cache.arrays["features"][:, 0, 0, 0],
                                  list(range(40)) + list(range(100, 106)))
    # a main shard written later goes before the extra views: main indices never move
    _indexed_shard(main / "train_0001.npz", 40, 4)
    assert cache.rescan() == 1
    assert cache.main_views == 44 and len(cache) == 50
    np.testing.assert_array_equal(cache.arrays["features"][:, 0, 0, 0],
                                  list(range(44)) + list(range(100, 106)))
    cache.pool = cache.training_pool(hold_out_validation=True)
    drawn = {int(cache.batch(step, 8, 1, seed=0)["features"][i, 0, 0, 0])
             for step in range(80) for i in range(8)}
    held = set(np.flatnonzero(validation_views(44)).tolist())
    assert held and not held & drawn
    assert drawn == (set(range(44)) - held) | set(range(100, 106))
    with pytest.raises(SystemExit, match="no train_"):
        FeatureCache(str(main), extra=(str(tmp_path / "missing"),)).rescan()


def _photo_item(tmp_path, name, color, box, dataset="horse"):
    """A 60x80 photo on disk with one whole object, a filled rectangle of one colour."""
    from PIL import Image

    image = np.full((60, 80, 3), 30, np.uint8)
    label = np.zeros((60, 80), np.uint8)
    r0, c0, r1, c1 = box
    image[r0:r1, c0:c1] = color
    label[r0:r1, c0:c1] = 255
    Image.fromarray(image).save(tmp_path / f"{name}.png")
    Image.fromarray(label).save(tmp_path / f"{name}_mask.png")
    return dict(dataset=dataset, group=dataset, name=name, heldout=False,
                image=str(tmp_path / f"{name}.png"), mask=str(tmp_path / f"{name}_mask.png"))


def test_paste_copy_puts_a_look_alike_beside_the_object():
    from default_model_data import paste_copy

    canvas = np.full((64, 64, 3), 30, np.uint8)
    own = np.zeros((64, 64), bool)
    own[20:40, 4:20] = True
    canvas[own] = 200
    obj = np.full((20, 16, 3), 200, np.uint8)
    obj_mask = np.ones((20, 16), bool)
    out, masks = paste_copy(canvas.copy(), [own], obj, obj_mask, np.random.default_rng(0))
    assert len(masks) == 2
    copy = masks[1]
    # the copy's pixels are the object's; the object's mask loses what the copy covers
    assert (out[copy] == 200).all() and not (masks[0] & copy).any()
    np.testing.assert_array_equal(masks[0], own & ~copy)
    # 0.7-1.2 x the object's size (rounding aside), and as far off the object as 8 tries find
    assert 0.45 * obj_mask.sum() <= copy.sum() <= 1.5 * obj_mask.sum()
    assert (own & copy).sum() < 0.5 * own.sum()


def test_distractor_views_pair_each_object_with_a_look_alike(tmp_path):
    from default_model_data import distractor_views, low_res

    items = [_photo_item(tmp_path, "a", (200, 40, 40), (10, 5, 40, 30)),
             _photo_item(tmp_path, "b", (40, 200, 40), (20, 40, 50, 70)),
             _photo_item(tmp_path, "c", (40, 40, 200), (5, 5, 25, 25), dataset="davis")]
    views = list(distractor_views(items, 6, 112, 32))
    again = list(distractor_views(items, 6, 112, 32))
    assert len(views) == 6
    for v, w in zip(views, again):  # a fixed draw
        np.testing.assert_array_equal(v["image"], w["image"])
        np.testing.assert_array_equal(v["full_masks"], w["full_masks"])
    for v in views:
        h, w = v["input_size"]
        assert (h, w) == (84, 112)  # the photo fitted to the frame, the rest padding
        assert not v["image"][h:].any()
        valid = v["full_masks"][v["mask_valid"]]
        assert len(valid) == 2  # the object, then its look-alike
        own, copy = valid
        assert not (own & copy).any()
        assert own.sum() > 0 and copy.sum() > 0
        # the copy is an object of the same dataset: its colour is one of theirs
        colours = {"davis": {(40, 40, 200)}, "horse": {(200, 40, 40), (40, 200, 40)}}
        dataset = v["name"].split("/")[0]
        median = tuple(int(x) for x in np.median(v["image"][copy], axis=0))  # edges blend
        assert median in colours[dataset], (v["name"], median)
        for k in range(2):
            np.testing.assert_array_equal(v["masks"][k], low_res(v["full_masks"][k], 32))


def test_pseudo_labels_may_not_overwrite_annotations(tmp_path):
    cache, pseudo = tmp_path / "cache", tmp_path / "pseudo"
    cache.mkdir()
    pseudo.mkdir()
    valid = np.array([[1, 0, 0], [1, 0, 0]], bool)
    _write_shard(cache / "train_0000.npz", valid, np.zeros((2, 3, 16, 16), bool))
    np.savez(pseudo / "pseudo_0000.npz", masks=np.zeros((2, 3, 16, 2), np.uint8),
             boxes=np.zeros((2, 3, 4), np.float32), mask_valid=valid, names=np.array(["", ""]))
    with pytest.raises(SystemExit, match="does not fit"):
        FeatureCache(str(cache), str(pseudo)).rescan()


def test_average_with_an_exported_head(tmp_path):
    """`train_default_model.py --average-with`: the bundled model's head is read back with
    every array of a fresh head, and the export is the weighted mean leaf by leaf."""
    import jax

    import sam_jax
    from sam_jax import configs
    from train_default_model import average_heads, head_from

    cfg = configs.dinov2_s()
    fresh = _random_head(cfg)
    bundled = head_from(sam_jax.DEFAULT_CHECKPOINT, cfg, fresh)
    mixed = average_heads(fresh, bundled, 0.25)
    for path, a in jax.tree_util.tree_leaves_with_path(mixed):
        f = _leaf(fresh, path)
        b = _leaf(bundled, path)
        np.testing.assert_allclose(a, 0.25 * f + 0.75 * b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(_leaf(fresh, path), _leaf(bundled, path))  # a real mix
    with pytest.raises(SystemExit, match="average-weight"):
        average_heads(fresh, bundled, 1.5)
    small = jax.tree.map(lambda x: x[..., :1], fresh)
    with pytest.raises(SystemExit, match="differ"):
        head_from(sam_jax.DEFAULT_CHECKPOINT, cfg, small)


def test_a_cache_at_another_input_size_trains_that_size_from_a_448_head(tmp_path):
    """`default_model_data.py --image-size 518` records its size in split.json (older caches:
    448), the head trainer builds its model at that size, and a head exported at 448 px starts
    it (the weights do not depend on the input size; another encoder still refuses)."""
    import dataclasses

    import sam_jax
    from default_model_data import cache_image_size, with_image_size
    from sam_jax import configs
    from train_default_model import head_from

    assert cache_image_size(str(tmp_path)) == 448  # no cache yet
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "heldout": []}))
    assert cache_image_size(str(tmp_path)) == 448  # written before the option
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "heldout": [],
                                                     "image_size": 518}))
    assert cache_image_size(str(tmp_path)) == 518
    cfg = with_image_size(configs.dinov2_s(), 518)
    assert (cfg.image_embedding_size, cfg.low_res_size) == (37, 148)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        with_image_size(configs.dinov2_s(), 520)
    fresh = _random_head(cfg)
    head = head_from(sam_jax.DEFAULT_CHECKPOINT, cfg, fresh)
    assert head.keys() == fresh.keys()
    shallower = dataclasses.replace(cfg, image_encoder=dataclasses.replace(cfg.image_encoder,
                                                                      depth=11))
    with pytest.raises(SystemExit, match="image encoder is not"):
        head_from(sam_jax.DEFAULT_CHECKPOINT, shallower, fresh)


def _random_head(cfg) -> dict:
    """A head with the model's tree and shapes, seeded random values: what these tests need
    of a fresh head. Traced, not run: initializing dinov2_s (its 22 M-parameter backbone
    included) takes ~12 s on a 2-core CPU."""
    import jax

    from sam_jax.build_sam import init_variables
    from train_default_model import head_params

    variables = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    shapes = head_params(variables["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def test_train_only_freezes_the_rest_of_the_head():
    """`train_default_model.py --train-only PREFIX`: every head leaf outside the prefixes is
    frozen, and one optimizer step moves only the leaves under them."""
    import jax
    import jax.numpy as jnp

    from sam_jax import configs
    from sam_jax.training.optim import OptimConfig, make_optimizer
    from train_default_model import frozen_outside

    params = _random_head(configs.dinov2_s())
    paths = ["/".join(str(k.key) for k in kp)
             for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert frozen_outside(params, []) == ()
    frozen = frozen_outside(params, ["mask_decoder/iou_prediction_head"])
    trained = sorted(set(paths) - set(frozen))
    assert trained == [f"mask_decoder/iou_prediction_head/layers.{i}/{n}"
                       for i in range(3) for n in ("bias", "kernel")]
    assert "mask_decoder/iou_token/embedding" in frozen  # the token shapes the masks: frozen
    assert len(frozen_outside(params, ["prompt_encoder", "image_encoder/neck.0"])) < len(paths)
    with pytest.raises(SystemExit, match="no head parameter"):
        frozen_outside(params, ["mask_decoder/iou_head"])

    optimizer = make_optimizer(OptimConfig(peak_lr=1e-2, total_steps=10, decay_steps=(8,),
                                           warmup_steps=0, freeze=frozen), params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    for path, u in zip(paths, jax.tree_util.tree_leaves(updates)):
        assert (np.abs(np.asarray(u)).max() > 0) == (path in trained), path


def test_refiner_training_refuses_a_head_at_another_input_size(tmp_path):
    """train_mask_refiner.py trains on views regenerated at the feature cache's input size: a
    head at another size (the bundled one runs at 518 px) is refused with the way out named,
    before the cache is read; no data at all is named too."""
    import sam_jax
    from train_mask_refiner import main

    args = ["--model", sam_jax.DEFAULT_CHECKPOINT, "--cache", str(tmp_path / "none"),
            "--data", str(tmp_path / "data"), "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit, match="images.npy: run --build-data"):
        main(args)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", np.zeros((0, 448, 448, 3), np.uint8))
    with pytest.raises(SystemExit, match="runs at 518 px.*holds 448 px views.*--refiner-from"):
        main(args)


@pytest.mark.parametrize("side", [224, 259])  # 448 and 518 px views: an odd side packs a tail
def test_mask_refiner_data_helpers(side):
    from default_model_data import validation_photos
    from train_mask_refiner import CROP, crop_origin, halve, unpack_target

    # a cell is in the halved mask when at least 2 of its 4 pixels are
    full = np.zeros((4, 4), bool)
    full[0, 0] = full[0, 1] = True  # 2 of the first cell's pixels
    full[2, 2] = True  # 1 of the last cell's
    np.testing.assert_array_equal(halve(full), [[True, False], [False, False]])
    # the validation photos: a fixed 10%, the same on every call
    val = validation_photos(1462)
    assert val.sum() == 146 and np.array_equal(val, validation_photos(1462))
    # crop windows lie inside the frame and contain the outline point they were drawn around
    target = np.zeros((side, side), bool)
    target[100:140, 30:60] = True
    target[200:, side - 3:] = True  # up to the last column: the packed tail's bits
    rng = np.random.default_rng(0)
    for _ in range(20):
        r, c = crop_origin(target, rng)
        assert 0 <= r <= side - CROP and 0 <= c <= side - CROP
        window = target[r:r + CROP, c:c + CROP]
        assert window.any() and not window.all()  # the outline is inside the window
    # targets are stored bit-packed along the last axis and read back to their side
    np.testing.assert_array_equal(unpack_target(np.packbits(target, axis=-1), side), target)


def test_validation_names_follow_the_cache_order(tmp_path):
    from default_model_data import validation_photos
    from evaluate_default_model import validation_names

    train = [{"dataset": "horse" if i % 2 else "clothing", "name": f"{i:04d}"}
             for i in range(30)]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "heldout": []}))
    chosen = np.flatnonzero(validation_photos(30))
    assert len(chosen) == 3
    assert validation_names(str(tmp_path)) == {(train[i]["dataset"], train[i]["name"])
                                               for i in chosen}


def test_look_alike_sets_score_the_object_of_validation_photos_alone(tmp_path):
    """`evaluate_default_model.py --split look-alikes`: views of the validation photos only,
    each with its look-alike pasted beside the object; the target is the object's mask alone."""
    from default_model_data import validation_photos
    from evaluate_default_model import look_alike_sets

    train = [_photo_item(tmp_path, f"p{i:02d}", (60 + 9 * i, 200 - 7 * i, 40 + 5 * i),
                         (10, 5 + i, 40, 30 + i), dataset="davis" if i % 2 else "horse")
             for i in range(20)]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "heldout": [],
                                                     "image_size": 112}))
    chosen = {train[i]["name"]: train[i] for i in np.flatnonzero(validation_photos(20))}
    # one validation photo per dataset (photos 1 and 10), so every look-alike is a copy
    assert sorted(p["dataset"] for p in chosen.values()) == ["davis", "horse"]
    sets = look_alike_sets(str(tmp_path), 6)
    assert set(sets) == {"davis", "horse", "person"} and not sets["person"]
    assert sum(len(v) for v in sets.values()) == 6
    for set_name, views in sets.items():
        for item, image, masks in views:
            photo = chosen[item["name"].split("/")[1].split("#")[0]]
            assert item["dataset"] == photo["dataset"] == set_name
            assert image.shape == (84, 112, 3)  # the view's image without its padding
            assert masks.shape == (1, 84, 112) and masks[0].any()
            # the object's colour fills its mask, and its copy (0.7-1.2x, edges blended) the
            # same colour outside it
            colour = np.median(image[masks[0]], axis=0)
            same = np.abs(image.astype(int) - colour).sum(-1) < 6
            assert same[masks[0]].mean() > 0.8  # resized: the rim blends
            assert 0.3 < (same & ~masks[0]).sum() / masks[0].sum() < 1.6, item["name"]


def test_generator_thresholds_rule():
    """The lowest predicted-IoU threshold at which 80% of the kept candidates are good (true IoU
    >= 0.80), then the highest stability threshold keeping 90% of the good ones above it."""
    from generator_thresholds import choose
    # 20 good candidates (pred 0.8, true 0.9) with stabilities 0.605, 0.625, ..., 0.985, and 20
    # bad ones (pred 0.6, true 0.3): at pred >= 0.61 only the good ones are kept
    pred = np.r_[np.full(20, 0.8), np.full(20, 0.6)]
    true = np.r_[np.full(20, 0.9), np.full(20, 0.3)]
    stab = np.r_[0.605 + 0.02 * np.arange(20), np.full(20, 0.99)]
    pred_t, stab_t = choose(pred, stab, true)
    assert pred_t == 0.61
    # 90% of the 20 good ones: at most 2 removed, so just below the 3rd-lowest stability
    # (0.645), whatever the bad ones' stabilities
    assert stab_t == 0.64
    # none good enough at any threshold: SAM's own 0.88, and no stability filtering
    assert choose(np.full(5, 0.9), np.full(5, 0.9), np.full(5, 0.1)) == (0.88, 0.50)
    # the share of good masks decides, not their mean: at pred >= 0.50 the kept ones average a
    # true IoU of 0.83 with 3 bad in 9; from 0.51 to 0.70, 2 bad in 6; from 0.71, 1 in 5
    pred = np.array([0.5, 0.5, 0.5, 0.7, 0.9, 0.9, 0.9, 0.9, 0.9])
    true = np.array([0.99, 0.99, 0.5, 0.5, 0.99, 0.99, 0.99, 0.99, 0.5])
    assert choose(pred, np.full(9, 0.9), true)[0] == 0.71


def test_input_size_sweep_runs_the_same_weights_on_another_grid():
    """`evaluate_default_model.py --image-size`: the bundled weights (518 px, DINOv2's own
    37x37 grid) at 448 px give a 32x32 grid, 128x128 low-res masks and masks at the photo's
    size; only a DINOv2 encoder can change its input size."""
    import sam_jax
    from evaluate_default_model import with_input_size
    from sam_jax import configs
    from sam_jax.inference import SamModel
    from sam_jax.predictor import SamPredictor

    model = sam_jax.load()
    assert model.config.image_encoder.img_size == 518
    resized = with_input_size(model, 448)
    assert resized.config.image_encoder.img_size == 448
    assert resized.config.image_embedding_size == 32
    assert resized.variables is model.variables
    assert resized.generator_defaults == model.generator_defaults
    predictor = SamPredictor(resized)
    image = np.zeros((60, 90, 3), np.uint8)
    image[20:45, 30:70] = (200, 40, 40)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[50.0, 32.0]]),
                                               point_labels=np.array([1]))
    assert masks.shape == (3, 60, 90) and scores.shape == (3,)
    assert low_res.shape == (3, 128, 128)
    inside = masks[int(np.argmax(scores))][20:45, 30:70].mean()
    assert inside > 0.9, inside  # the red block, clicked at its centre
    vit = SamModel(configs.tiny(), {"params": {}})
    with pytest.raises(SystemExit, match="DINOv2"):
        with_input_size(vit, 518)


def test_negative_click_rules_choose_between_single_and_multimask_outputs():
    """experiments/negative_click_collapse.py: after a negative click the `negative` rule
    takes the best-scored multimask output, `stability` does so only when the single output's
    logits are unstable, `single` never."""
    from negative_click_collapse import run_rule, stability

    gt = np.zeros((20, 20), bool)
    gt[4:16, 4:16] = True
    spill = gt.copy()
    spill[4:16, 16:19] = True  # the first mask spills right: the 2nd click is negative
    part = np.zeros_like(gt)
    part[4:8, 4:8] = True

    def logits(mask, sharp):
        return np.where(mask, sharp, -sharp).astype(np.float32)

    def fake_predict(sharp):
        def predict(points, labels, prev, multimask):
            if multimask:
                # the whole object scored first, then the spilled mask
                masks = np.stack([gt, spill, part]) if len(points) > 1 else np.stack(
                    [part, spill, gt])
                scores = np.array([0.9, 0.5, 0.2]) if len(points) > 1 else np.array(
                    [0.1, 0.9, 0.2])
                return masks, scores, np.stack([logits(m, 5.0) for m in masks])
            return part[None], np.array([0.8]), logits(part, sharp)[None]  # collapsed
        return predict

    assert stability(logits(part, 5.0)) == 1.0
    assert stability(np.full((4, 4), 0.01, np.float32)) == 0.0
    ious, compared = run_rule(fake_predict(5.0), gt, "single")
    assert ious[0] == pytest.approx(144 / 180) and ious[1] == pytest.approx(16 / 144)
    label, before, single, best, oracle = compared[0]
    assert label == 0 and before == pytest.approx(144 / 180)
    assert single == pytest.approx(16 / 144) and best == oracle == 1.0
    assert run_rule(fake_predict(5.0), gt, "negative")[0][1] == 1.0
    # stable collapsed logits: kept; logits within +-0.05 of 0 are unstable: replaced
    assert run_rule(fake_predict(5.0), gt, "stability")[0][1] == pytest.approx(16 / 144)
    assert run_rule(fake_predict(0.01), gt, "stability")[0][1] == 1.0


class _FixedMaskPredictor:
    """A predictor that returns the same mask whatever the clicks (3 copies for multimask),
    so only the click-local oracle can change the IoU."""

    def __init__(self, mask):
        self.mask = mask
        self.calls = []

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        self.calls.append((np.array(point_coords), np.array(point_labels)))
        n = 3 if multimask_output else 1
        return (np.repeat(self.mask[None], n, 0), np.linspace(0.9, 0.5, n),
                np.zeros((n, 8, 8), np.float32))


def test_click_local_oracle_fixes_only_around_corrective_clicks():
    from click_local_oracle import local_oracle_ious
    from sam_jax.evaluation.clicks import mask_iou
    from sam_jax.training.evaluate import click_ious

    gt = np.zeros((60, 60), bool)
    gt[10:50, 10:50] = True
    pred = gt.copy()
    pred[10:50, 10:24] = False  # a 14-px strip missed on the left
    # R = 0 is the protocol itself
    plain = click_ious(_FixedMaskPredictor(pred), gt, 3)["ious"]
    assert local_oracle_ious(_FixedMaskPredictor(pred), gt, 0, 3)["ious"] == plain
    assert plain == pytest.approx([mask_iou(pred, gt)] * 3)
    # the second click lands in the strip's middle (a positive click); a radius of 5 fixes a
    # disk of 81 of its pixels there; the first click (the object's centre) fixes nothing
    fake = _FixedMaskPredictor(pred)
    out = local_oracle_ious(fake, gt, 5, 3)
    assert out["ious"][0] == plain[0]
    assert fake.calls[1][1].tolist() == [1, 1]
    assert 15 <= fake.calls[1][0][1][0] <= 18
    assert out["ious"][1] == pytest.approx((1040 + 81) / 1600)
    assert out["ious"][2] > out["ious"][1]
    # a radius covering the image makes the mask exact from the second click on
    assert local_oracle_ious(_FixedMaskPredictor(pred), gt, 100, 3)["ious"][1:] == [1.0, 1.0]


def test_flip_averaging_mirrors_clicks_onto_the_same_pixels(tiny_sam):
    """On a left-right symmetric image, clicks at x and at W-1-x see mirror images of one
    scene: the averaged masks must be exact mirrors of each other (a click mirrored to the
    wrong pixel breaks it), and each chain is fed its own low-res logits back."""
    from flip_averaging import FlipAveragedPredictor

    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 48x80, symmetric
    predictor = FlipAveragedPredictor(tiny_sam)
    predictor.set_image(image)
    left = np.array([[13.0, 20.0]], np.float32)
    right = np.array([[80 - 1 - 13.0, 20.0]], np.float32)
    masks_l, iou_l, low_l = predictor.predict(left, np.array([1]))
    masks_r, iou_r, low_r = predictor.predict(right, np.array([1]))
    assert masks_l.shape == (3, 48, 80) and low_l.shape[:2] == (3, 2)
    np.testing.assert_allclose(iou_l, iou_r, atol=1e-5)
    assert (masks_l != masks_r[..., ::-1]).mean() < 1e-3
    assert not np.array_equal(masks_l, masks_r)  # the clicks do matter
    # a later click with each chain's logits fed back
    follow_l = predictor.predict(np.concatenate([left, [[30.0, 30.0]]]), np.array([1, 0]),
                                 mask_input=low_l[:1], multimask_output=False)
    follow_r = predictor.predict(np.concatenate([right, [[49.0, 30.0]]]), np.array([1, 0]),
                                 mask_input=low_r[:1], multimask_output=False)
    assert (follow_l[0] != follow_r[0][..., ::-1]).mean() < 1e-3


def test_clicks_honoured_checks_each_corrective_click_against_the_next_mask():
    from clicks_honoured import RecordingPredictor, honoured
    from sam_jax.training.evaluate import click_ious

    # the truth is a 20x20 square, the model always returns a 20x28 rectangle spilling right:
    # the protocol's corrective clicks are then negative, on the spill, which stays in the mask
    gt = np.zeros((40, 40), bool)
    gt[10:30, 5:25] = True
    pred = np.zeros((40, 40), bool)
    pred[10:30, 5:33] = True
    recorder = RecordingPredictor(_FixedMaskPredictor(pred))
    click_ious(recorder, gt, 3)
    assert len(recorder.calls) == 3
    (x, y), label, mask = recorder.calls[1]
    assert label == 0 and 25 <= x < 33 and pred[int(y), int(x)]
    assert honoured(recorder.calls) == [(0, False), (0, False)]
    # a mask that drops the clicked pixel honours the negative click; the first click is never
    # counted (it is no correction)
    fixed = pred.copy()
    fixed[:, 25:] = False
    assert honoured([recorder.calls[0], ((x, y), 0, fixed), ((x, y), 1, fixed)]) == [
        (0, True), (1, False)]


def test_refiner_run_config_round_trip(tmp_path):
    """train_mask_refiner.py --width/--dilations: the run's refiner config is saved beside its
    parameters and read back by --validate/--export; a run from before the file is the
    default refiner."""
    import dataclasses as dc

    from sam_jax.configs import MaskRefinerConfig
    from train_mask_refiner import read_refiner_config

    assert read_refiner_config(str(tmp_path), True) == MaskRefinerConfig(embedding_input=True)
    wide = MaskRefinerConfig(64, (1, 2, 4, 8, 16, 1), False)
    (tmp_path / "refiner_config.json").write_text(json.dumps(dc.asdict(wide)))
    assert read_refiner_config(str(tmp_path), False) == wide
    # --click-input: which inputs it reads is said by the run's parameters
    clicks = dc.replace(wide, click_input=True)
    (tmp_path / "refiner_config.json").write_text(json.dumps(dc.asdict(clicks)))
    assert read_refiner_config(str(tmp_path), False, True) == clicks


def test_refiner_training_windows_follow_half_of_the_clicks():
    """train_mask_refiner.py --click-input: half of the masks with a corrective click train on
    a window around it (inside the frame), the rest keep their outline window."""
    from train_mask_refiner import CROP, around_clicks

    side = 259
    origin = np.zeros((400, 2), np.int32)
    last = np.tile(np.array([[300.0, 100.0]]), (400, 1))  # (x, y) input px: cell (50, 150)
    placed = np.arange(400) % 2 == 0
    out = around_clicks(origin, last, placed, side, np.random.default_rng(0))
    moved = (out != 0).any(1)
    assert not moved[~placed].any()
    assert 0.4 < moved[placed].mean() < 0.6
    # the window holds the click's cell, within the jitter, and stays inside the frame
    assert ((out[moved] <= [50, 150]) & (out[moved] + CROP > [50, 150])).all()
    assert (out >= 0).all() and (out <= side - CROP).all()


def test_refiner_background_clicks_are_negatives_beside_the_target():
    """train_mask_refiner.py --background-click-prob 1: every corrective click is a negative
    click on the view's background (outside every annotated mask) within the head's band of
    the target, whatever the mask's error; without the option the click lands on the error."""
    import jax

    import sam_jax
    from sam_jax.checkpoints.converted import load_converted
    from sam_jax.modeling.mask_refiner import MaskRefiner
    from sam_jax.training.simulation import BACKGROUND_BAND_CELLS
    from train_default_model import head_params
    from train_mask_refiner import make_functions

    cfg, variables = load_converted(sam_jax.DEFAULT_CHECKPOINT)
    head = {"params": head_params(variables["params"]), "buffers": variables["buffers"]}
    refiner = MaskRefiner(click_input=True)
    side, low = cfg.image_size // 2, cfg.low_res_size
    target = np.zeros((2, side, side), bool)
    target[:, 100:160, 80:140] = True  # the clicked object
    other = np.zeros((side, side), bool)
    other[100:160, 140:200] = True  # an annotated neighbour touching its right side
    cells = low / side
    masks = np.zeros((2, 1, low, low), bool)
    masks[:, 0, int(100 * cells):int(160 * cells), int(80 * cells):int(140 * cells)] = True
    batch = {"features": np.random.default_rng(0).normal(
                 size=(2, cfg.image_embedding_size, cfg.image_embedding_size, 384)
             ).astype(np.float32),
             "input_size": np.full((2, 2), cfg.image_size, np.int32),
             "masks": masks,
             "boxes": np.tile(np.array([[[160.0, 200.0, 280.0, 320.0]]], np.float32), (2, 1, 1)),
             "target": target,
             "background": np.stack([~(target[0] | other)] * 2)}
    rounds = np.full(2, 3, np.int32)
    band = int(round(BACKGROUND_BAND_CELLS * cfg.low_res_stride / 2))  # in refiner cells
    for prob in (1.0, 0.0):
        coarse_clicks = make_functions(cfg, head, refiner, prob)[1]
        _, _, coords, labels, _, placed = coarse_clicks(batch, jax.random.key(0), rounds)
        coords, labels = np.asarray(coords)[:, 2:5], np.asarray(labels)[:, 2:5]
        assert np.asarray(placed).all()
        if prob:
            assert (labels == 0).all()
            rc = (coords[..., ::-1] / 2).astype(int)  # (x, y) input px -> (row, col) cells
            assert batch["background"][0][rc[..., 0], rc[..., 1]].all()
            assert ((rc >= [100 - band, 80 - band]) & (rc < [160 + band, 140 + band])).all()
        else:  # the error of a random-feature head's masks: clicks inside the object too
            assert (labels == 1).any()


def test_a_grown_refiner_starts_as_the_loaded_one(tmp_path):
    """train_mask_refiner.py --init-from a refiner with fewer --dilations: the new blocks add
    nothing at step 0 (same logits as the loaded refiner), yet are trainable (their kernels get
    gradients); a saved config whose dilations are not a prefix of the new ones is refused."""
    import jax
    import jax.numpy as jnp

    from sam_jax.modeling.mask_refiner import MaskRefiner
    from train_mask_refiner import grow_blocks, load_params, main, save_params, saved_dilations

    small, big = MaskRefiner(8, (1, 2)), MaskRefiner(8, (1, 2, 1, 4))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
    low = rng.normal(size=(1, 2, 8, 8)).astype(np.float32)
    loaded = small.init(jax.random.key(0), images, low)["params"]
    # a trained last layer (it starts at zero, which would hide the blocks' effect)
    loaded = dict(loaded, out={k: jnp.full_like(v, 0.1) for k, v in loaded["out"].items()})
    path = tmp_path / "stage_params.npz"
    save_params(str(path), loaded)
    fresh = big.init(jax.random.key(1), images, low)["params"]
    grown = grow_blocks(load_params(str(path)), fresh)
    assert jax.tree.map(np.shape, grown) == jax.tree.map(np.shape, fresh)
    want = small.apply({"params": loaded}, images, low)
    got = big.apply({"params": grown}, images, low)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    grads = jax.grad(lambda p: big.apply({"params": p}, images, low).sum())(grown)
    assert np.abs(np.asarray(grads["blocks_3"]["kernel"])).sum() > 0
    # the loaded blocks are kept, not re-initialized
    np.testing.assert_array_equal(np.asarray(grown["blocks_1"]["kernel"]),
                                  np.asarray(loaded["blocks_1"]["kernel"]))
    assert saved_dilations(str(path)) is None
    (tmp_path / "stage_config.json").write_text(json.dumps({"dilations": [1, 2]}))
    assert saved_dilations(str(path)) == (1, 2)
    with pytest.raises(SystemExit, match="must start with them"):
        main(["--init-from", str(path), "--dilations", "2,1,1", "--data", str(tmp_path),
              "--cache", str(tmp_path), "--workdir", str(tmp_path / "run")])


def test_outline_band_fixes_only_the_error_near_the_true_outline():
    """click_local_oracle.py --outline-band: the error within PX of the true outline is set to
    the truth, the error farther away stays."""
    from click_local_oracle import outline_fixed_iou
    from sam_jax.evaluation.clicks import mask_iou

    gt = np.zeros((60, 60), bool)
    gt[10:50, 10:50] = True
    pred = gt.copy()
    pred[10:50, 48:52] = [False, False, True, True]  # 2 columns lost inside, 2 spilled out
    pred[30, 30] = False  # a hole 20 px from the outline
    assert mask_iou(pred, gt) == pytest.approx((1600 - 80 - 1) / 1680)
    # within 2 px of the outline: both strips (the spill's far column is 2 px out)
    assert outline_fixed_iou(pred, gt, 2) == pytest.approx(1599 / 1600)
    # within 1 px: the columns next to the outline, and the lost column's two end pixels
    # (on the top and bottom rows, 1 px from the outline there)
    assert outline_fixed_iou(pred, gt, 1) == pytest.approx((1600 - 38 - 1) / 1640)
    assert outline_fixed_iou(pred, gt, 30) == 1.0


def test_a_subpixel_refiner_trains_on_the_full_size_masks():
    """train_mask_refiner.py --subpixel-output: the loss reads the window of the full-size
    target at twice the cell window's origin, over the image's pixels only, and the refiner's
    logits cover the window's pixels."""
    import jax

    from sam_jax import configs
    from sam_jax.modeling.mask_refiner import MaskRefiner
    from train_mask_refiner import CROP, inside_image, make_functions

    cfg = configs.dinov2_s()
    size, side, low = cfg.image_size, cfg.image_size // 2, cfg.low_res_size
    refiner = MaskRefiner(8, (1,), click_input=True, subpixel=True)
    loss_fn = make_functions(cfg, None, refiner)[3]
    rng = np.random.default_rng(0)
    target_full = np.zeros((2, size, size), bool)
    target_full[0, 101:203, 87:301] = True  # edges on odd pixels: not whole cells
    target_full[1, 10:50, 10:50] = True
    batch = {"image": rng.integers(0, 255, (2, size, size, 3)).astype(np.uint8),
             "input_size": np.array([[size, size], [size - 45, size]], np.int32),
             "target": np.zeros((2, side, side), bool), "target_full": target_full,
             "origin": np.array([[40, 30], [side - CROP, 0]], np.int32)}
    inside = np.asarray(inside_image(batch, "target_full"))
    assert inside.shape == (2, size, size)
    assert inside[1].sum() == (size - 45) * size and inside[0].all()
    assert np.asarray(inside_image(batch))[1].sum() == ((size - 45 + 1) // 2) * side
    coords = np.array([[[300.0, 200.0]] * 4] * 2, np.float32)
    labels = np.array([[1, -1, -1, -1]] * 2, np.int32)
    params = refiner.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32),
                          np.zeros((1, 1, 16, 16), np.float32), None, coords[:1, None],
                          labels[:1, None])["params"]
    low_res = rng.normal(size=(2, low, low)).astype(np.float32)
    loss, (logits, t, w, coarse) = loss_fn(params, batch, low_res, None, coords, labels)
    assert np.isfinite(float(loss))
    assert logits.shape == t.shape == w.shape == coarse.shape == (2, 2 * CROP, 2 * CROP)
    np.testing.assert_array_equal(np.asarray(t[0]) > 0, target_full[0, 80:80 + 2 * CROP,
                                                                     60:60 + 2 * CROP])
    r0 = 2 * (side - CROP)  # the second window ends at the frame's last row: 45 padding rows
    np.testing.assert_array_equal(np.asarray(w[1]), inside[1, r0:r0 + 2 * CROP, :2 * CROP])
    assert not np.asarray(w[1])[-45:].any() and np.asarray(w[1])[:-45].all()


def test_refiner_training_can_train_only_the_named_layers():
    """train_mask_refiner.py --train-only: the named layers move, the rest keep their values
    (and get no Adam state); a name that is no layer is refused."""
    import jax
    import optax

    from sam_jax.modeling.mask_refiner import MaskRefiner
    from train_mask_refiner import refiner_optimizer

    refiner = MaskRefiner(8, (1,), subpixel=True)
    params = refiner.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                          np.zeros((1, 1, 4, 4), np.float32))["params"]
    opt = refiner_optimizer(params, 1e-2, 10, ["subpixel_hidden", "out_subpixel"])
    state = opt.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        params_new = optax.apply_updates(params, updates)
    for name in params:
        moved = any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
            jax.tree.leaves(params_new[name]), jax.tree.leaves(params[name])))
        assert moved == (name in ("subpixel_hidden", "out_subpixel")), name
    with pytest.raises(SystemExit, match="not a layer"):
        refiner_optimizer(params, 1e-2, 10, ["out_subpixels"])
