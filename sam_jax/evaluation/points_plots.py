"""Pictures of a point evaluation: mIoU against the number of points per dataset (the SAM
paper's Fig. 9 c/d), and a grid of example objects with their clicks and masks."""

from __future__ import annotations

import numpy as np


def plot_points_curve(result, path: str, title: str = "") -> None:
    """mIoU after 1..N points, one line per dataset (and the mean over datasets)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), dpi=120)
    ax = fig.add_subplot()
    table = result.table()
    for name, row in table.items():
        ys = [row[f"miou@{n}"] for n in result.clicks]
        style = dict(color="black", linewidth=2.5) if name == "mean" else {}
        ax.plot(result.clicks, ys, marker="o", label=name, **style)
    ax.set_xlabel("number of points")
    ax.set_ylabel("mIoU")
    ax.set_xticks(result.clicks)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"point to mask ({result.first_point} first point)")
    fig.tight_layout()
    fig.savefig(path)


def plot_points_examples(examples, path: str, clicks: tuple) -> None:
    """One row per example object: the truth, the mask after 1 point and after the most
    points, with the clicks (green positive, red negative)."""
    from matplotlib.figure import Figure

    if not examples:
        return
    n_last = clicks[-1]
    fig = Figure(figsize=(9, 3 * len(examples)), dpi=100)
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, (dataset, image, obj) in enumerate(examples):
        gt = image.masks[obj.index]
        panels = [(gt, "truth", 0), (obj.masks[0], f"1 point: IoU {obj.ious[0]:.2f}", 1),
                  (obj.masks[n_last - 1], f"{n_last} points: IoU {obj.ious[n_last - 1]:.2f}",
                   n_last)]
        for col, (mask, label, shown) in enumerate(panels):
            ax = axes[row, col]
            overlay = image.image.astype(np.float32) / 255
            overlay[mask] = 0.5 * overlay[mask] + 0.5 * np.array([0.1, 0.4, 1.0])
            ax.imshow(overlay)
            for (x, y), positive in obj.clicks[:shown]:
                ax.plot(x, y, marker="*", markersize=12, markeredgecolor="white",
                        color="limegreen" if positive else "red")
            ax.set_title(f"{dataset}/{image.name}: {label}" if col == 0 else label,
                         fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
