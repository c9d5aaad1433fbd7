"""Held-out click-to-mask mIoU of the bundled model, the old `mini` model and a training-free
DINOv2 baseline, per held-out dataset, with a picture grid.

    python experiments/evaluate_default_model.py --data ../shared/data \
        --model default --model mini=/tmp/sam_mini_davis --out experiments/results/default_model

Held-out split (`default_model_data.py`, never trained or tuned on): DAVIS-2016 sequences
blackswan, car-roundabout, dog, goat (every 3rd of their 275 frames, `--davis-stride`; the
neighbours are near-duplicates); 48 Weizmann horses; 100 Clothing Co-Parsing photos, scored as
the whole person (the union of the parts), and every part of the first 25 of them
(`--parts-photos`).
Click protocol: `sam_jax.training.evaluate.click_ious` (first click at the mask's
interior-most pixel, then at the larger error region's; previous logits fed back; mIoU@1 keeps
the mask with the highest predicted IoU, oracle@1 the best of the 3). The "box" column: one
prompt, the object's tight ground-truth box, single output.

`--replot` redraws OUT.png from OUT.json without scoring (the first model's predictions on the
drawn photos). `--image-size NAME=PX` runs a model at another input size with the same weights (the
input-size sweep: `experiments/results/default_model_input_size_validation.txt`).
`--split look-alikes` scores views of the validation photos with a look-alike pasted beside the
object, which negative clicks must remove (`experiments/results/default_model_look_alikes.txt`).

Baseline ("dinov2-cosine", 1 click only): the frozen DINOv2-S patch features; cosine similarity
of every patch to the clicked patch, upsampled bilinearly to the image, thresholded, and the
connected component holding the click. The threshold is chosen on training photos
(`--baseline-tune` of them, 40 by default), from 0.2 to 0.7 in steps of 0.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLICKS = 5
REPORTED = (1, 2, 3, 5)
THRESHOLDS = tuple(np.round(np.arange(0.2, 0.701, 0.05), 2))


def heldout_sets(root: str, limit: int | None, parts_photos: int,
                 davis_stride: int, heldout: bool = True,
                 only: set | None = None) -> dict[str, list]:
    """name -> list of (item, image, masks) for each held-out evaluation set: every
    `davis_stride`-th frame of the held-out DAVIS sequences, and the parts of only the first
    `parts_photos` held-out clothing photos (each has ~7). `heldout=False` builds the same
    sets from the training photos instead (for choices that must not see held-out data);
    `only`: keep just these (dataset, name) photos (e.g. `validation_names`)."""
    from default_model_data import list_items, load_example

    sets: dict[str, list] = {"davis": [], "horse": [], "person": [], "clothing-parts": []}
    davis_seen = 0
    for item in list_items(root):
        if item["heldout"] != heldout or (only is not None
                                          and (item["dataset"], item["name"]) not in only):
            continue
        if item["dataset"] == "davis":
            davis_seen += 1
            if (davis_seen - 1) % davis_stride:
                continue
        image, masks, whole = load_example(item)
        if item["dataset"] == "clothing":
            sets["person"].append((item, image, masks[whole]))
            if len(sets["clothing-parts"]) < parts_photos:
                sets["clothing-parts"].append((item, image, masks[~whole]))
        else:
            sets[item["dataset"]].append((item, image, masks))
    if limit:
        sets = {k: v[:: max(1, len(v) // limit)][:limit] for k, v in sets.items()}
    return sets


def validation_names(cache_dir: str) -> set:
    """(dataset, name) of the validation photos: `default_model_data.validation_photos` over
    the training photos in the order the feature cache stored them (its split.json)."""
    from default_model_data import validation_photos

    with open(os.path.join(cache_dir, "split.json")) as f:
        train = json.load(f)["train"]
    chosen = validation_photos(len(train))
    return {(item["dataset"], item["name"]) for item, c in zip(train, chosen) if c}


class CosineBaseline:
    """Training-free: similarity of DINOv2 patch features to the clicked patch."""

    def __init__(self):
        import jax

        from sam_jax import configs
        from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone
        from sam_jax.modeling import Sam
        from sam_jax.utils.transforms import ResizeLongestSide

        self.cfg = configs.dinov2_s()
        self.params = {"image_encoder": import_dinov2_backbone(self.cfg)}
        self.transform = ResizeLongestSide(self.cfg.image_size)
        self.features = jax.jit(lambda p, x: Sam(self.cfg).apply(
            {"params": p}, x, method="backbone_features"))

    def set_image(self, image: np.ndarray) -> None:
        resized = self.transform.apply_image(image)
        s = self.cfg.image_size
        x = np.zeros((1, s, s, 3), np.float32)
        x[0, :resized.shape[0], :resized.shape[1]] = (
            (resized - np.array(self.cfg.pixel_mean)) / np.array(self.cfg.pixel_std))
        f = np.asarray(self.features(self.params, x))[0]
        self.feat = f / np.linalg.norm(f, axis=-1, keepdims=True)
        self.input_hw = resized.shape[:2]
        self.original_hw = image.shape[:2]

    def similarity(self, xy) -> np.ndarray:
        """Cosine similarity to the clicked patch at the original resolution."""
        from PIL import Image

        patch = self.cfg.image_encoder.patch_size
        p = self.transform.apply_coords(np.array([xy], np.float64), self.original_hw)[0]
        g = self.feat.shape[0]
        col, row = min(int(p[0] // patch), g - 1), min(int(p[1] // patch), g - 1)
        sim = (self.feat @ self.feat[row, col]).astype(np.float32)
        s = self.cfg.image_size
        big = np.asarray(Image.fromarray(sim).resize((s, s), Image.BILINEAR))
        big = big[:self.input_hw[0], :self.input_hw[1]]
        h, w = self.original_hw
        return np.asarray(Image.fromarray(big).resize((w, h), Image.BILINEAR))

    @staticmethod
    def mask(sim: np.ndarray, xy, threshold: float) -> np.ndarray:
        from scipy import ndimage

        labels, _ = ndimage.label(sim >= threshold)
        at = labels[xy[1], xy[0]]
        return labels == at if at else np.zeros_like(sim, bool)


def tune_threshold(root: str, count: int) -> tuple[float, dict]:
    """The baseline's threshold with the best 1-click mIoU on `count` training photos' whole
    objects (seeded pick)."""
    from default_model_data import list_items, load_example
    from sam_jax.training.evaluate import _farthest_from_boundary, iou

    train = [it for it in list_items(root) if not it["heldout"]]
    pick = np.random.default_rng(1).choice(len(train), count, replace=False)
    base = CosineBaseline()
    scores = {t: [] for t in THRESHOLDS}
    for i in pick:
        image, masks, whole = load_example(train[i])
        base.set_image(image)
        for gt in masks[whole]:
            xy, _ = _farthest_from_boundary(gt)
            sim = base.similarity(xy)
            for t in THRESHOLDS:
                scores[t].append(iou(base.mask(sim, xy, t), gt))
    means = {float(t): float(np.mean(v)) for t, v in scores.items()}
    return max(means, key=means.get), means


def evaluate_model(name, path, sets, drawn, image_size=None, switches=()):
    """`switches`: SamConfig's boolean fields to turn on for this run (e.g.
    keep_clicked_components, mirror_average)."""
    import sam_jax
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import click_ious

    model = sam_jax.load(path)
    if image_size is not None:
        model = with_input_size(model, image_size)
    if switches:
        model = dataclasses.replace(model, config=model.config.replace(
            **{field: True for field in switches}))
    predictor = SamPredictor(model)
    out = {}
    t0 = time.time()
    for set_name, items in sets.items():
        rows, oracle, box = [], [], []
        for item, _, gt in set_masks(predictor, items, f"{name} {set_name}"):
            r = click_ious(predictor, gt, CLICKS)
            rows.append(r["ious"])
            oracle.append(r["oracle_1"])
            box.append(box_iou(predictor, gt))
            if (set_name, item["name"]) in drawn:
                drawn[(set_name, item["name"])][name] = r
        rows = np.array(rows)
        out[set_name] = {f"miou_{k}": float(rows[:, k - 1].mean()) for k in range(1, CLICKS + 1)}
        out[set_name].update(oracle_1=float(np.mean(oracle)), box=float(np.mean(box)),
                             masks=len(rows))
    out["seconds"] = time.time() - t0
    return out


def with_input_size(model, image_size: int):
    """The same weights run at another input size (a DINOv2 encoder only: its position table
    is resized to any grid, and the neck, decoder and refiner are convolutional or
    size-agnostic), e.g. 518 px, DINOv2's own 37x37 pretraining grid."""
    from default_model_data import with_image_size

    if getattr(model.config.image_encoder, "kind", None) != "dinov2":
        raise SystemExit("--image-size: only a DINOv2-encoder model runs at another input size")
    return dataclasses.replace(model, config=with_image_size(model.config, image_size))


def look_alike_sets(cache: str, count: int) -> dict[str, list]:
    """`count` look-alike views of the validation photos (`default_model_data.distractor_views`
    at `cache`'s input size: the object with a copy of itself or another object of its dataset
    pasted beside it), in the `heldout_sets` layout, each scored on the object alone (clothing
    photos as the whole person). Negative clicks must remove the look-alike: the held-out
    failure on DAVIS car-roundabout's second car."""
    from default_model_data import cache_image_size, distractor_views, validation_photos
    from default_model_data import with_image_size
    from sam_jax import configs

    with open(os.path.join(cache, "split.json")) as f:
        train = json.load(f)["train"]
    photos = [it for it, held in zip(train, validation_photos(len(train))) if held]
    cfg = with_image_size(configs.dinov2_s(), cache_image_size(cache))
    sets: dict[str, list] = {"davis": [], "horse": [], "person": []}
    for view in distractor_views(photos, count, cfg.image_size, cfg.low_res_size):
        dataset = view["name"].split("/")[0]
        h, w = view["input_size"]
        item = {"dataset": dataset, "name": view["name"]}
        sets["person" if dataset == "clothing" else dataset].append(
            (item, view["image"][:h, :w], view["full_masks"][:1, :h, :w]))
    return sets


def split_sets(data: str, split: str, cache: str, limit: int | None = None,
               parts_photos: int = 25, davis_stride: int = 3,
               look_alikes: int = 120) -> dict[str, list]:
    """The evaluation sets of `split`: "held-out", "validation" (the validation photos of
    the training split that `cache`'s split.json orders, every DAVIS frame among them), or
    "look-alikes" (`look_alike_sets` of those photos)."""
    if split == "look-alikes":
        return look_alike_sets(cache, look_alikes)
    if split == "validation":
        return heldout_sets(data, limit, parts_photos, 1, heldout=False,
                            only=validation_names(cache))
    return heldout_sets(data, limit, parts_photos, davis_stride)


def set_masks(predictor, items, desc: str):
    """Over one set's (item, image, masks): the image set on `predictor` (with a progress
    bar), then (item, image, mask) for each non-empty mask."""
    from tqdm import tqdm

    for item, image, masks in tqdm(items, desc=desc, unit="image"):
        predictor.set_image(image)
        for gt in masks:
            if gt.any():
                yield item, image, gt


def write_results(out: str, text: str, results: dict) -> None:
    """Prints the table and writes OUT.txt (the table) and OUT.json (every number)."""
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)


def box_iou(predictor, gt: np.ndarray) -> float:
    """IoU of the single mask prompted by the object's tight ground-truth box, with inclusive
    corners as SAM's `batched_mask_to_box` and the training simulation draw it."""
    from default_model_data import box_of
    from sam_jax.training.evaluate import iou

    masks, _, _ = predictor.predict(box=box_of(gt), multimask_output=False)
    return iou(masks[0], gt)


def evaluate_baseline(sets, threshold):
    from sam_jax.training.evaluate import _farthest_from_boundary, iou
    from tqdm import tqdm

    base = CosineBaseline()
    out = {}
    for set_name, items in sets.items():
        ious = []
        for _, image, masks in tqdm(items, desc=f"baseline {set_name}", unit="image"):
            base.set_image(image)
            for gt in masks:
                if not gt.any():
                    continue
                xy, _ = _farthest_from_boundary(gt)
                ious.append(iou(base.mask(base.similarity(xy), xy, threshold), gt))
        out[set_name] = {"miou_1": float(np.mean(ious)), "masks": len(ious)}
    return out


def table(results: dict, split: str = "held-out") -> str:
    lines = [f"| model | {split} set | masks | " + " | ".join(f"mIoU@{k}" for k in REPORTED)
             + " | oracle@1 | box |", "|---|---|---|" + "---|" * (len(REPORTED) + 2)]
    for model, per_set in results.items():
        for set_name, m in per_set.items():
            if not isinstance(m, dict):
                continue
            vals = [f"{m[f'miou_{k}']:.3f}" if f"miou_{k}" in m else "-" for k in REPORTED]
            orc = f"{m['oracle_1']:.3f}" if "oracle_1" in m else "-"
            box = f"{m['box']:.3f}" if "box" in m else "-"
            lines.append(f"| {model} | {set_name} | {m['masks']} | " + " | ".join(vals)
                         + f" | {orc} | {box} |")
    return "\n".join(lines)


def plot(results, sets, drawn, out_png, model_name, split="held-out"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sam_jax
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import _farthest_from_boundary, next_click

    names = list(sets)
    keys = list(drawn)
    cols = 4
    rows = 1 + -(-len(keys) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 3.4 * rows))
    ax = fig.add_subplot(rows, cols, 1)
    # up to 3 models as curves (the first one labelled), the baseline's 1-click square
    curves = list(zip([m for m in results if m != "dinov2-cosine"], ("-", "--", ":")))
    for i, set_name in enumerate(names):
        for model, ls in curves:
            ys = [results[model].get(set_name, {}).get(f"miou_{k}") for k in range(1, CLICKS + 1)]
            if None not in ys:
                ax.plot(range(1, CLICKS + 1), ys, ls, marker="o", color=f"C{i}",
                        label=set_name if ls == "-" else None)
        base = results.get("dinov2-cosine", {}).get(set_name, {}).get("miou_1")
        if base is not None:
            ax.plot([1], [base], "s", color=f"C{i}")
    ax.set_xlabel("clicks")
    ax.set_ylabel(f"{split} mIoU")
    ax.set_ylim(0, 1)
    # colours are the sets, line styles the models: long model names go in a wrapped title
    styles = [textwrap.fill(f"{word}: {model}", 70) for (model, _), word in
              zip(curves, ("solid", "dashed", "dotted"))]
    ax.set_title("\n".join(styles + ["squares: baseline"]), fontsize=5.5, loc="left")
    ax.legend(fontsize=6, loc="lower right")
    predictor = SamPredictor(sam_jax.load(results[model_name]["_path"]))
    lookup = {(s, it["name"]): (img, masks) for s, items in sets.items()
              for it, img, masks in items}
    for j, key in enumerate(keys):
        image, masks = lookup[key]
        gt = masks[0]
        predictor.set_image(image)
        points, labels = [], []
        xy, _ = _farthest_from_boundary(gt)
        click, logits = (xy, 1), None
        for k in range(3):
            points.append(click[0])
            labels.append(click[1])
            m, s, low = predictor.predict(point_coords=np.array(points, np.float32),
                                          point_labels=np.array(labels),
                                          mask_input=None if logits is None else logits[None],
                                          multimask_output=k == 0)
            best = int(np.argmax(s))
            pred, logits = m[best], low[best]
            if k == 0:
                first = pred
            click = next_click(pred, gt)
        a = fig.add_subplot(rows, cols, 2 + j)
        over = image.astype(np.float32) / 255
        over[first] = 0.45 * over[first] + 0.55 * np.array([0.1, 0.5, 1.0])
        a.imshow(over)
        a.contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
        a.plot([points[0][0]], [points[0][1]], "*", color="lime", markersize=11,
               markeredgecolor="k")
        inter = np.logical_and(first, gt).sum() / max(np.logical_or(first, gt).sum(), 1)
        a.set_title(f"{key[0]} {key[1]}: 1 click, IoU {inter:.2f}", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--model", action="append", default=[],
                        help="NAME=PATH of a checkpoint; 'default' or NAME=default for the "
                             "bundled model")
    parser.add_argument("--image-size", action="append", default=[], metavar="NAME=PX",
                        help="run the model NAME at this input size instead of its own "
                             "(a multiple of the patch size, 14)")
    parser.add_argument("--baseline-tune", type=int, default=40)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="images per set (quick look)")
    parser.add_argument("--davis-stride", type=int, default=3,
                        help="every n-th frame of the held-out DAVIS sequences")
    parser.add_argument("--parts-photos", type=int, default=25,
                        help="held-out clothing photos whose parts are scored")
    parser.add_argument("--split", default="held-out",
                        choices=("held-out", "validation", "look-alikes"),
                        help="validation: the validation photos (a fixed 10%% of the training "
                             "photos, every DAVIS frame among them), where settings are chosen; "
                             "look-alikes: views of them with a look-alike pasted beside the "
                             "object, which negative clicks must remove (--look-alikes views)")
    parser.add_argument("--keep-clicked-components", action="append", default=[],
                        metavar="NAME",
                        help="run the model NAME with SamConfig.keep_clicked_components: its "
                             "masks keep only their parts connected to a positive click")
    parser.add_argument("--mirror-average", action="append", default=[], metavar="NAME",
                        help="run the model NAME with SamConfig.mirror_average: its masks are "
                             "the mean over the image and its mirror image")
    parser.add_argument("--look-alikes", type=int, default=120, metavar="N",
                        help="--split look-alikes: how many views (default 120)")
    parser.add_argument("--cache", default="runs/default/cache",
                        help="--split validation: the feature cache whose split.json orders "
                             "the training photos")
    parser.add_argument("--out", default="experiments/results/default_model")
    parser.add_argument("--replot", action="store_true",
                        help="redraw OUT.png from OUT.json (its first model's predictions on the "
                             "same photos) without scoring anything")
    parser.add_argument("--previous", default=None,
                        help="a JSON this script wrote: its models and baseline are reused "
                             "(same held-out sets), not recomputed, unless named again here")
    args = parser.parse_args(argv)

    import sam_jax

    sam_jax.keep_freed_host_memory()
    sets = split_sets(args.data, args.split, args.cache, args.limit, args.parts_photos,
                      args.davis_stride, args.look_alikes)
    print({k: len(v) for k, v in sets.items()}, f"{args.split} images per set")
    drawn = {}
    for set_name, items in sets.items():
        for item, _, _ in items[:: max(1, len(items) // 3)][:3]:
            drawn[(set_name, item["name"])] = {}
    if args.replot:
        with open(args.out + ".json") as f:
            results = json.load(f)
        plot(results, sets, drawn, args.out + ".png", next(iter(results)), args.split)
        print(f"wrote {args.out}.png")
        return 0
    results: dict = {}
    models = args.model or ["default"]
    sizes = {}
    switches = {"keep_clicked_components": args.keep_clicked_components,
                "mirror_average": args.mirror_average}
    for field, names in switches.items():
        unknown = set(names) - {m.partition("=")[0] for m in models}
        if unknown:
            raise SystemExit(f"--{field.replace('_', '-')} {sorted(unknown)}: not a --model "
                             "NAME")
    for spec in args.image_size:
        name, _, px = spec.partition("=")
        if name not in {m.partition("=")[0] for m in models} or not px.isdigit():
            raise SystemExit(f"--image-size {spec!r}: expected NAME=PX for a --model NAME")
        sizes[name] = int(px)
    for spec in models:
        name, _, path = spec.partition("=")
        path = None if path in ("", "default") else path
        on = tuple(field for field, names in switches.items() if name in names)
        results[name] = evaluate_model(name, path, sets, drawn, sizes.get(name), on)
        results[name]["_path"] = path
        for field in on:
            results[name][f"_{field}"] = True
        if name in sizes:
            results[name]["_image_size"] = sizes[name]
        print(table({name: results[name]}, args.split))
    if args.previous:  # after this run's models, so the first drawn curves are theirs
        with open(args.previous) as f:
            for name, r in json.load(f).items():
                results.setdefault(name, r)
    if not args.no_baseline and "dinov2-cosine" not in results:
        threshold, tuning = tune_threshold(args.data, args.baseline_tune)
        print(f"baseline threshold {threshold} (training photos: {tuning})")
        results["dinov2-cosine"] = evaluate_baseline(sets, threshold)
        results["dinov2-cosine"]["_threshold"] = threshold
    write_results(args.out, table(results, args.split), results)
    plot(results, sets, drawn, args.out + ".png", models[0].partition("=")[0], args.split)
    # the first --model's predictions are drawn; the curves show every model
    print(f"wrote {args.out}.txt, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
