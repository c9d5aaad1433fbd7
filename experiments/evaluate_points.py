"""Point-prompt mIoU of a checkpoint on a held-out split: the paper's 1..N click experiment.

    python experiments/evaluate_points.py --data runs/davis_mini/tfds --split validation \
        [--checkpoint DIR] [--clicks 5] [--out experiments/results/davis_mini_eval]

The split is one prepared by `sam-jax train` (sam_jax.training.datasets); the click protocol is
`sam_jax.training.evaluate` (first click at the mask's interior-most pixel, then at the larger
error region's; the previous logits fed back). Prints mIoU after 1..N clicks overall and per
group (e.g. DAVIS sequence), with the oracle (best of 3) for the first click, and writes
`<out>.txt` and `<out>.png` (mIoU against clicks, and a few predictions drawn over their
images).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared TFDS data_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--checkpoint", default=None,
                        help="converted checkpoint (default: the bundled model)")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--examples", type=int, default=4, help="predictions drawn in the PNG")
    parser.add_argument("--out", default="experiments/results/davis_mini_eval")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    import sam_jax
    from sam_jax.predictor import SamPredictor
    from sam_jax.training.data import eval_examples
    from sam_jax.training.datasets import load_source
    from sam_jax.training.evaluate import click_ious

    sam_jax.keep_freed_host_memory()
    model = sam_jax.load(args.checkpoint)
    source = load_source(args.data, args.split)
    predictor = SamPredictor(model)
    per_group = collections.defaultdict(list)
    oracle = collections.defaultdict(list)
    drawn = []
    examples = list(eval_examples(source, max_examples=args.max_images))
    step = max(1, len(examples) // max(args.examples, 1))
    for i, (image, masks, info) in enumerate(tqdm(examples, desc="evaluating", unit="image")):
        predictor.set_image(image)
        group = info.get("group", "all")
        for gt in np.asarray(masks, bool):
            if not gt.any():
                continue
            result = click_ious(predictor, gt, args.clicks)
            per_group[group].append(result["ious"])
            oracle[group].append(result["oracle_1"])
            if i % step == 0 and len(drawn) < args.examples:
                drawn.append((image, gt, result, info))

    all_ious = np.array([r for rows in per_group.values() for r in rows])
    all_oracle = np.array([o for rows in oracle.values() for o in rows])
    lines = [f"checkpoint: {args.checkpoint or sam_jax.DEFAULT_CHECKPOINT}",
             f"data: {args.data} split {args.split}: {len(examples)} images, "
             f"{len(all_ious)} masks", "",
             "| group | masks | " + " | ".join(f"mIoU@{k + 1}" for k in range(args.clicks))
             + " | oracle@1 |",
             "|---|---|" + "---|" * (args.clicks + 1)]

    def row(name, ious, orc):
        means = ious.mean(axis=0)
        return (f"| {name} | {len(ious)} | " + " | ".join(f"{m:.3f}" for m in means)
                + f" | {orc.mean():.3f} |")

    for group in sorted(per_group):
        lines.append(row(group, np.array(per_group[group]), np.array(oracle[group])))
    lines.append(row("**all**", all_ious, all_oracle))
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n")
    _plot(args, model, per_group, all_ious, drawn)
    print(f"wrote {args.out}.txt and {args.out}.png")
    return 0


def _plot(args, model, per_group, all_ious, drawn) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sam_jax.predictor import SamPredictor
    from sam_jax.training.evaluate import _farthest_from_boundary

    n = len(drawn)
    fig, axes = plt.subplots(1, 1 + n, figsize=(5 + 4 * n, 4))
    axes = np.atleast_1d(axes)
    clicks = np.arange(1, args.clicks + 1)
    for group, rows in sorted(per_group.items()):
        axes[0].plot(clicks, np.array(rows).mean(axis=0), color="0.7", lw=1)
    axes[0].plot(clicks, all_ious.mean(axis=0), "o-", color="C0", lw=2, label="all masks")
    axes[0].set_xticks(clicks)
    axes[0].set_xlabel("clicks")
    axes[0].set_ylabel("mIoU")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out mIoU (grey: per group)")
    axes[0].legend()
    predictor = SamPredictor(model)
    for ax, (image, gt, result, info) in zip(axes[1:], drawn):
        predictor.set_image(image)
        xy, _ = _farthest_from_boundary(gt)
        masks, scores, _ = predictor.predict(point_coords=np.array([xy], np.float32),
                                             point_labels=np.array([1]), multimask_output=True)
        best = masks[int(np.argmax(scores))]
        overlay = image.astype(np.float32) / 255
        overlay[best] = 0.5 * overlay[best] + 0.5 * np.array([0.1, 0.5, 1.0])
        ax.imshow(overlay)
        ax.contour(gt, levels=[0.5], colors="yellow", linewidths=1)
        ax.plot([xy[0]], [xy[1]], "r*", markersize=12)
        ax.set_title(f"{info.get('group', '')} {info.get('name', '')}: 1 click "
                     f"IoU {result['ious'][0]:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
