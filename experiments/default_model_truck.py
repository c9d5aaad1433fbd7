"""The bundled model on the README's photo (assets/truck.jpg): the README command's click with
its 3 candidate masks, the official notebook's boxes (the truck, its rear wheel), and a click
followed by a negative click, drawn as one PNG.

    python experiments/default_model_truck.py [--checkpoint DIR] \
        [--out experiments/results/default_model_truck.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUCK = os.path.join(REPO, "assets", "truck.jpg")


def cases():
    """(title, predict kwargs, prompt to draw) in the official notebook's coordinates."""
    point = np.array([[500, 375]], np.float32)
    yield "click (500, 375), 3 candidates", dict(
        point_coords=point, point_labels=np.array([1]), multimask_output=True)
    yield "box: the truck", dict(box=np.array([75, 275, 1725, 850], np.float32),
                                 multimask_output=False)
    yield "box: the rear wheel", dict(box=np.array([425, 600, 700, 875], np.float32),
                                      multimask_output=False)
    yield "click (1000, 500) + negative click on the wheel", dict(
        point_coords=np.array([[1000, 500], [560, 740]], np.float32),
        point_labels=np.array([1, 0]), multimask_output=False)


def draw_prompt(ax, kw):
    from matplotlib.patches import Rectangle

    if "box" in kw:
        x0, y0, x1, y1 = kw["box"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime",
                               linewidth=1.5))
    if "point_coords" in kw:
        for (x, y), label in zip(kw["point_coords"], kw["point_labels"]):
            ax.plot([x], [y], "*" if label else "X", color="lime" if label else "red",
                    markersize=12, markeredgecolor="k")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--out", default="experiments/results/default_model_truck.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    import sam_jax

    predictor = sam_jax.SamPredictor(sam_jax.load(args.checkpoint))
    image = np.asarray(Image.open(TRUCK).convert("RGB"))
    predictor.set_image(image)
    panels = []
    for title, kw in cases():
        masks, scores, _ = predictor.predict(**kw)
        for k, (m, s) in enumerate(zip(masks, scores)):
            name = f"{title}: #{k} " if len(masks) > 1 else f"{title} "
            panels.append((name + f"(predicted IoU {s:.2f})", m, kw))
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.9 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, mask, kw) in zip(axes.ravel(), panels):
        over = image.astype(np.float32) / 255
        over[mask] = 0.45 * over[mask] + 0.55 * np.array([0.1, 0.5, 1.0])
        ax.imshow(over)
        draw_prompt(ax, kw)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
