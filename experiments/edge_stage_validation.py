"""The bundled model's masks with and without its edge stage (`SamConfig.edge_refiner`), on
the same photos in the same run: each image is embedded once and both click simulations
(`click_ious`, 5 clicks) read it, the second with the stage's image features removed.

    python experiments/edge_stage_validation.py --split validation --cache runs/cache518 \
        --out experiments/results/default_model_edge_stage_validation

Whole-object masks only (DAVIS objects, horses, whole people), as the 0.92-at-3-clicks target.
`--workdir DIR` scores a stage a training run saved (`train_edge_refiner.py`) on top of the
model instead of the bundled model's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPORTED = (1, 2, 3, 5)


def compare(model, sets) -> dict:
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import click_ious
    from tqdm import tqdm

    predictor = SamPredictor(model)
    results = {"without the edge stage": {}, "with the edge stage": {}}
    for name, items in sets.items():
        rows = {k: [] for k in results}
        for _, image, masks in tqdm(items, desc=name, unit="image"):
            predictor.set_image(image)
            features = predictor.edge_features
            for gt in masks:
                if not gt.any():
                    continue
                for key in results:
                    predictor.edge_features = features if key.startswith("with ") else None
                    rows[key].append(click_ious(predictor, gt, 5)["ious"])
        for key in results:
            a = np.array(rows[key])
            results[key][name] = {"miou": a.mean(0).tolist(), "masks": len(a)}
    for key, per_set in results.items():
        total = sum(m["masks"] for m in per_set.values())
        per_set["pooled"] = {"miou": (sum(np.array(m["miou"]) * m["masks"]
                                          for m in per_set.values()) / total).tolist(),
                             "masks": total}
    return results


def table(results: dict, split: str) -> str:
    lines = [f"| model | {split} set | masks | " + " | ".join(f"mIoU@{k}" for k in REPORTED)
             + " |", "|---|---|---|" + "---|" * len(REPORTED)]
    for key, per_set in results.items():
        for name, m in per_set.items():
            lines.append(f"| {key} | {name} | {m['masks']} | "
                         + " | ".join(f"{m['miou'][k - 1]:.3f}" for k in REPORTED) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--split", default="validation", choices=("validation", "held-out"))
    p.add_argument("--cache", default="runs/cache518",
                   help="a feature cache whose split.json names the validation photos")
    p.add_argument("--workdir", default=None, help="a training run's stage instead")
    p.add_argument("--limit", type=int, default=None, help="photos per set (a quick look)")
    p.add_argument("--out", default=None, help="write OUT.txt and OUT.json")
    args = p.parse_args(argv)

    import sam_jax
    from evaluate_default_model import split_sets

    model = sam_jax.load()
    if args.workdir:
        from train_edge_refiner import with_edge_stage
        model = with_edge_stage(model, args.workdir)
    if model.config.edge_refiner is None:
        raise SystemExit("the model has no edge stage: give --workdir")
    sets = split_sets(args.data, args.split, args.cache, limit=args.limit)
    sets.pop("clothing-parts", None)
    start = time.time()
    results = compare(model, sets)
    text = table(results, args.split)
    print(text)
    print(f"{time.time() - start:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".txt", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
