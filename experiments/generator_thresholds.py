"""Chooses the automatic mask generator's thresholds for a model whose predicted IoUs and
logits are not scaled like SAM's (the bundled model), on training photos, by a stated rule.

    python experiments/generator_thresholds.py --model PATH --out experiments/results/generator_thresholds

SAM's 0.88 (predicted IoU) and 0.95 (stability: the mask's area at logit > +1 over its area at
logit > -1) were set for SAM's weights. The bundled model's IoU head is roughly calibrated but
its foreground logits are soft (+2 to +6 inside objects where background is -10 to -17), so its
stability scores are low for good and bad masks alike and the official 0.95 removes every mask.

Candidates: the 3 masks of one click at the centre of every object of `--limit` training
photos per set (`evaluate_default_model.py`'s sets built from the training split: the held-out
photos are never used to choose anything), each with its predicted IoU, its
stability score (computed as the generator does, on the upscaled logits) and its true IoU.
Rule:
  pred_iou_thresh: the lowest t (0.50 ... 0.88, steps of 0.01) at which the candidates with
      predicted IoU >= t have a mean true IoU of at least 0.80;
  stability_score_thresh: the highest s (0.50 ... 0.95, steps of 0.01) that keeps at least 90%
      of the good candidates (true IoU >= 0.80) passing pred_iou_thresh: the filter may
      remove unstable masks but must not remove good ones at a higher rate than 1 in 10.
Prints the table behind the choice and writes it with the choice to --out (.txt, .json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GOOD = 0.80
KEEP_GOOD = 0.90


def candidates(model_path, data: str, limit: int):
    import jax.numpy as jnp
    from tqdm import tqdm

    import sam_jax
    from evaluate_default_model import heldout_sets
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import _farthest_from_boundary, iou
    from sam_jax.utils import amg

    predictor = SamPredictor(sam_jax.load(model_path))
    rows = []
    for set_name, items in heldout_sets(data, limit, 25, 3, heldout=False).items():
        for _, image, masks in tqdm(items, desc=set_name, unit="image"):
            predictor.set_image(image)
            for gt in masks:
                if not gt.any():
                    continue
                xy, _ = _farthest_from_boundary(gt)
                logits, scores, _ = predictor.predict(
                    point_coords=np.array([xy], np.float32), point_labels=np.array([1]),
                    return_logits=True)
                stability = np.asarray(amg.stability_score(jnp.asarray(logits), 0.0, 1.0))
                for k in range(len(scores)):
                    rows.append((set_name, float(scores[k]), float(stability[k]),
                                 iou(logits[k] > 0, gt)))
    return rows


def choose(pred, stab, true):
    grid = np.round(np.arange(0.50, 0.8801, 0.01), 2)
    pred_t = next((float(t) for t in grid if (pred >= t).any()
                   and true[pred >= t].mean() >= GOOD), 0.88)
    good = (pred >= pred_t) & (true >= GOOD)
    stab_t = 0.50
    for s in np.round(np.arange(0.50, 0.9501, 0.01), 2):
        if good.any() and (stab[good] >= s).mean() >= KEEP_GOOD:
            stab_t = float(s)
    return pred_t, stab_t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled one)")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--limit", type=int, default=24, help="training photos per set")
    parser.add_argument("--out", default="experiments/results/generator_thresholds")
    args = parser.parse_args(argv)

    rows = candidates(args.model, args.data, args.limit)
    pred = np.array([r[1] for r in rows])
    stab = np.array([r[2] for r in rows])
    true = np.array([r[3] for r in rows])
    pred_t, stab_t = choose(pred, stab, true)
    lines = [f"{len(rows)} candidates (3 per object of training photos, 1 centre click); "
             f"good = true IoU >= {GOOD}",
             "| predicted IoU >= | kept | mean true IoU of kept | good among kept |",
             "|---|---|---|---|"]
    for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88):
        k = pred >= t
        lines.append(f"| {t:.2f} | {k.mean():.3f} | "
                     f"{true[k].mean() if k.any() else float('nan'):.3f} | "
                     f"{(true[k] >= GOOD).mean() if k.any() else float('nan'):.2f} |")
    good = (pred >= pred_t) & (true >= GOOD)
    lines += ["", f"| stability >= (with predicted IoU >= {pred_t:.2f}) | good kept | "
                  "all kept |", "|---|---|---|"]
    for s in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        passing = pred >= pred_t
        lines.append(f"| {s:.2f} | {(stab[good] >= s).mean() if good.any() else float('nan'):.2f}"
                     f" | {(stab[passing] >= s).mean() if passing.any() else float('nan'):.2f} |")
    lines += ["", f"chosen: pred_iou_thresh {pred_t:.2f}, stability_score_thresh {stab_t:.2f}"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"model": args.model or "bundled", "candidates": len(rows),
                   "pred_iou_thresh": pred_t, "stability_score_thresh": stab_t}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
