"""The image-encoder size ablation (SAM §7.6 / App. A, Fig. 13: ViT-B vs ViT-L vs ViT-H): the same
point evaluation over several checkpoints, with each encoder's size and time, as one table and
one plot."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import numpy as np

from .points import DEFAULT_CLICKS, PointsResult, evaluate_points


@dataclasses.dataclass
class ModelRow:
    name: str
    encoder_params: int
    total_params: int
    result: PointsResult

    def miou(self, n: int) -> float:
        """mIoU after n points, averaged over the datasets (each weighted equally)."""
        return float(np.mean([self.result.miou(d, n) for d in self.result.objects]))

    def oracle(self) -> float:
        return float(np.mean([self.result.oracle(d) for d in self.result.objects]))


def count_params(model) -> tuple[int, int]:
    """(image encoder, whole model) parameter counts."""
    import jax

    params = model.variables["params"]
    size = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
    return size(params["image_encoder"]), size(params)


def compare_models(models: Dict[str, object], datasets: Dict[str, object],
                   clicks: Sequence[int] = DEFAULT_CLICKS, *, first_point: str = "center",
                   seed: int = 0, objects_per_call: int = 16,
                   progress: bool = False) -> List[ModelRow]:
    """Evaluates every model on the same datasets (re-iterated per model)."""
    rows = []
    for name, model in models.items():
        result, _ = evaluate_points(model, datasets, clicks, first_point=first_point, seed=seed,
                                    objects_per_call=objects_per_call, progress=progress)
        rows.append(ModelRow(name, *count_params(model), result))
    return rows


def format_rows(rows: List[ModelRow]) -> str:
    clicks = rows[0].result.clicks
    head = (["model", "encoder params", "encoder s/image", "images/s"]
            + [f"mIoU@{n}" for n in clicks] + ["oracle@1"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        total = sum(r.result.images.values())
        cells = [r.name, f"{r.encoder_params / 1e6:.1f}M", f"{r.result.embed_median:.3f}",
                 f"{total / r.result.seconds:.2f}"]
        cells += [f"{r.miou(n):.3f}" for n in clicks] + [f"{r.oracle():.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_to_json(rows: List[ModelRow]) -> dict:
    return {r.name: {"encoder_params": r.encoder_params, "total_params": r.total_params,
                     "embed_seconds_median": r.result.embed_median,
                     "miou": {str(n): r.miou(n) for n in r.result.clicks},
                     "oracle@1": r.oracle(), "per_dataset": r.result.table()} for r in rows}


def plot_model_sizes(rows: List[ModelRow], path: str) -> None:
    """Left: mIoU against points, one line per model; right: mIoU at 1 point and at the most
    points against encoder time per image."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.subplots(1, 2)
    clicks = rows[0].result.clicks
    for r in rows:
        left.plot(clicks, [r.miou(n) for n in clicks], marker="o",
                  label=f"{r.name} ({r.encoder_params / 1e6:.0f}M)")
    left.set_xlabel("number of points")
    left.set_ylabel("mIoU (mean over datasets)")
    left.set_xticks(clicks)
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    times = [r.result.embed_median for r in rows]
    for n, marker in ((clicks[0], "o"), (clicks[-1], "s")):
        right.plot(times, [r.miou(n) for r in rows], marker=marker, linestyle="",
                   label=f"{n} point{'s' if n > 1 else ''}")
    for r, t in zip(rows, times):
        right.annotate(r.name, (t, r.miou(clicks[0])), fontsize=8,
                       xytext=(4, 4), textcoords="offset points")
    right.set_xlabel("image encoder, seconds per image")
    right.set_ylabel("mIoU")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
