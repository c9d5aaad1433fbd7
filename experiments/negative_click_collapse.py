"""Why a second click can make the bundled model's mask worse: the single-output mask after a
negative click, against the multimask outputs for the same prompt, and two inference rules
that fall back to the multimask outputs.

    python experiments/negative_click_collapse.py --out experiments/results/negative_click_collapse

On the validation photos (`evaluate_default_model.py --split validation`; the held-out ones
with `--split held-out`) it runs the evaluation's click protocol (`click_ious`: multimask at the
first click, the single output after it, the previous logits fed back) and at every later
click also asks for the 3 multimask outputs. Per set and per kind of click (positive: the
error region was missed object; negative: it was spilled background) it reports the mIoU
before the click, of the single output, of the multimask output with the highest predicted IoU
and of the best multimask output. Then the whole 5-click protocol under three rules for the
clicks after the first:
- `single`: the protocol's single output;
- `stability`: SAM 2's dynamic multimask (the single output unless its stability score, the
  area over +0.05 divided by the area over -0.05 of its low-res logits, is under 0.98; then
  the multimask output with the highest predicted IoU);
- `negative`: the multimask output with the highest predicted IoU after a negative click.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLICKS = 5
RULES = ("single", "stability", "negative")
STABILITY_DELTA, STABILITY_THRESHOLD = 0.05, 0.98  # SAM 2's defaults


def stability(low_res: np.ndarray) -> float:
    inner = (low_res > STABILITY_DELTA).sum()
    outer = (low_res > -STABILITY_DELTA).sum()
    return float(inner / outer) if outer else 1.0


def run_rule(predict, gt: np.ndarray, rule: str):
    """One mask's clicks under `rule`: IoU after each click, and for clicks 2.. the click's
    label with the IoUs of the single and the multimask outputs (for the protocol's path)."""
    from sam_jax.evaluation.clicks import farthest_from_boundary, mask_iou, next_click

    xy, _ = farthest_from_boundary(gt)
    points, labels, logits = [xy], [1], None
    ious, compared = [], []
    for k in range(CLICKS):
        multi = predict(points, labels, logits, True)
        if k == 0:
            chosen = int(np.argmax(multi[1]))
            mask, logits_next = multi[0][chosen], multi[2][chosen]
        else:
            single = predict(points, labels, logits, False)
            mask, logits_next = single[0][0], single[2][0]
            best = int(np.argmax(multi[1]))
            fall_back = (rule == "stability" and stability(single[2][0]) < STABILITY_THRESHOLD
                         or rule == "negative" and labels[-1] == 0)
            if fall_back:
                mask, logits_next = multi[0][best], multi[2][best]
            compared.append((labels[-1], ious[-1], mask_iou(single[0][0], gt),
                             mask_iou(multi[0][best], gt),
                             max(mask_iou(m, gt) for m in multi[0])))
        ious.append(mask_iou(mask, gt))
        logits = logits_next
        click_xy, label = next_click(mask, gt)
        points.append(click_xy)
        labels.append(label)
    return ious, compared


def by_label(compared: np.ndarray, label: int) -> dict:
    """Mean IoUs over the later clicks with this label (None where there were none)."""
    rows = compared[compared[:, 0] == label] if len(compared) else compared
    out = {"clicks": len(rows)}
    for col, key in ((1, "before"), (2, "single"), (3, "multimask_best_score"),
                     (4, "multimask_oracle")):
        out[key] = float(rows[:, col].mean()) if len(rows) else None
    return out


def evaluate(sets) -> dict:
    import sam_jax
    from sam_jax.predictor import SamPredictor
    from tqdm import tqdm

    predictor = SamPredictor(sam_jax.load())
    out = {}
    for set_name, items in sets.items():
        curves = {rule: [] for rule in RULES}
        compared = []
        for _, image, masks in tqdm(items, desc=set_name, unit="image"):
            predictor.set_image(image)
            for gt in masks:
                if not gt.any():
                    continue
                memo = {}  # the rules share every call until their choices differ

                def predict(points, labels, logits, multimask):
                    key = (np.asarray(points).tobytes(), tuple(labels),
                           None if logits is None else logits.tobytes(), multimask)
                    if key not in memo:
                        memo[key] = predictor.predict(
                            point_coords=np.asarray(points, np.float32),
                            point_labels=np.asarray(labels),
                            mask_input=None if logits is None else logits[None],
                            multimask_output=multimask)
                    return memo[key]

                for rule in RULES:
                    ious, pairs = run_rule(predict, gt, rule)
                    curves[rule].append(ious)
                    if rule == "single":
                        compared.extend(pairs)
        c = np.array(compared, np.float64)
        out[set_name] = {
            "masks": len(curves["single"]),
            "rules": {rule: np.mean(v, axis=0).tolist() for rule, v in curves.items()},
            "by_label": {name: by_label(c, label)
                         for label, name in ((1, "positive"), (0, "negative"))},
        }
    return out


def table(results: dict, split: str) -> str:
    lines = [f"Clicks 2-{CLICKS} by kind, {split} photos: mIoU before the click and after it",
             "| set | click | clicks | before | single output | multimask, best score | "
             "multimask, oracle |", "|---|---|---|---|---|---|---|"]
    for set_name, r in results.items():
        for name, b in r["by_label"].items():
            cells = ["-" if b[k] is None else f"{b[k]:.3f}" for k in
                     ("before", "single", "multimask_best_score", "multimask_oracle")]
            lines.append(f"| {set_name} | {name} | {b['clicks']} | " + " | ".join(cells) + " |")
    lines += ["", f"mIoU after 1..{CLICKS} clicks under each rule for clicks 2..",
              "| set | masks | rule | " + " | ".join(f"@{k}" for k in range(1, CLICKS + 1)) + " |",
              "|---|---|---|" + "---|" * CLICKS]
    for set_name, r in results.items():
        for rule, curve in r["rules"].items():
            lines.append(f"| {set_name} | {r['masks']} | {rule} | "
                         + " | ".join(f"{v:.3f}" for v in curve) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--split", default="validation", choices=("validation", "held-out"))
    parser.add_argument("--cache", default="runs/default/cache",
                        help="--split validation: the feature cache whose split.json orders "
                             "the training photos")
    parser.add_argument("--limit", type=int, default=None, help="images per set (quick look)")
    parser.add_argument("--out", default="experiments/results/negative_click_collapse")
    args = parser.parse_args(argv)

    from evaluate_default_model import split_sets, write_results

    import sam_jax

    sam_jax.keep_freed_host_memory()
    results = evaluate(split_sets(args.data, args.split, args.cache, args.limit))
    write_results(args.out, table(results, args.split), results)
    print(f"wrote {args.out}.txt and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
