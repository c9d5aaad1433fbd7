"""Pictures of the COCO-style evaluations: proposal recall against the IoU threshold per object
size (the curves whose mean is AR), and the instance AP breakdown."""

from __future__ import annotations

import numpy as np

from .proposals import AREA_RANGES


def plot_proposal_recall(result, path: str) -> None:
    """Recall at each IoU threshold with the most proposals, one line per size (AR is the mean
    of each line), and AR against the number of proposals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.subplots(1, 2)
    for a, area in enumerate(AREA_RANGES):
        r = result.recall[:, a, -1]
        if (r > -1).any():
            left.plot(result.iou_thresholds, np.where(r > -1, r, np.nan), marker="o",
                      label=f"{area}: AR {result.ar(area):.3f}")
    left.set_xlabel("IoU threshold")
    left.set_ylabel(f"recall @ {result.max_dets[-1]} proposals")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(result.max_dets, [result.ar("all", m) for m in result.max_dets], marker="o")
    right.set_xscale("log")
    right.set_xlabel("proposals per image")
    right.set_ylabel("mask AR (all sizes)")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    fig.suptitle(f"object proposals: {result.images} images")
    fig.tight_layout()
    fig.savefig(path)


def plot_instance_ap(result, path: str) -> None:
    """COCO mask AP and its breakdown as bars."""
    from matplotlib.figure import Figure

    table = result.table()
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    names = list(table)
    values = [0.0 if np.isnan(v) else 100 * v for v in table.values()]
    bars = ax.bar(names, values, color="tab:blue")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("mask AP (%)")
    ax.set_title(f"box-prompted instances: {result.images} images, {result.detections} masks")
    fig.tight_layout()
    fig.savefig(path)
