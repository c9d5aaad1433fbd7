"""Point-to-mask evaluation (SAM §7.1, Fig. 9): mIoU after 1..N clicks per dataset.

Protocol: `evaluation.clicks` (first point at the mask's center or a random mask pixel, each
next at the error region's center). The first click asks for the 3 multimask outputs and keeps
the one with the highest predicted IoU (mIoU@1) or the best against the truth (oracle@1);
later clicks ask for the single output with the previous low-res logits as the mask prompt
(the paper's and the official code's interactive use). IoU is measured at the original
resolution through `SamPredictor`, i.e. what a user of the model gets.

Speed: the image is embedded once; every click round decodes all objects of the image in one
batched call (`SamPredictor.predict_batch`, groups of `objects_per_call`), and only the click
placement (a distance transform per object) runs on the host between rounds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .clicks import first_click, mask_iou, next_click
from .datasets import EvalImage

DEFAULT_CLICKS = (1, 2, 3, 5, 9)


@dataclasses.dataclass
class ObjectClicks:
    """One object's run: IoU after each click, the oracle at 1, and the clicks made."""

    image: str
    index: int
    ious: List[float]
    oracle_1: float
    clicks: List[tuple]  # ((x, y), label) per click
    masks: Optional[List[np.ndarray]] = None  # predictions after each click, if kept


def evaluate_image(predictor, image: EvalImage, num_clicks: int, *,
                   first_point: str = "center", rng: Optional[np.random.Generator] = None,
                   objects_per_call: int = 16, keep_masks: bool = False,
                   image_is_set: bool = False) -> List[ObjectClicks]:
    """Runs the protocol for every object of `image` (embedding it first unless
    `image_is_set`)."""
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    if not image_is_set:
        predictor.set_image(image.image)
    valid = None if image.ignore is None else ~image.ignore
    out: List[ObjectClicks] = []
    keep = [i for i, m in enumerate(image.masks)
            if (m if valid is None else m & valid).any()]  # nothing to click on: skipped
    for start in range(0, len(keep), objects_per_call):
        idx = keep[start:start + objects_per_call]
        gts = image.masks[idx]
        rows = np.arange(len(idx))
        clicks = [[(first_click(gt, first_point, rng, valid), 1)] for gt in gts]
        results = [ObjectClicks(image.name, i, [], 0.0, [], [] if keep_masks else None)
                   for i in idx]
        logits = None
        for k in range(num_clicks):
            coords = np.array([[xy for xy, _ in c] for c in clicks], np.float32)
            labels = np.array([[label for _, label in c] for c in clicks], np.int32)
            masks, scores, low_res = predictor.predict_batch(
                coords, labels, mask_input=None if logits is None else logits[:, None],
                multimask_output=(k == 0))
            best = np.argmax(scores, axis=1)
            preds = masks[rows, best]
            logits = low_res[rows, best]
            for j, (gt, pred, r) in enumerate(zip(gts, preds, results)):
                if k == 0:
                    r.oracle_1 = max(mask_iou(m, gt, valid) for m in masks[j])
                r.ious.append(mask_iou(pred, gt, valid))
                if keep_masks:
                    r.masks.append(pred)
                if k + 1 < num_clicks:
                    clicks[j].append(next_click(pred, gt, valid))
        for r, c in zip(results, clicks):
            r.clicks = [(tuple(map(int, xy)), int(label)) for xy, label in c]
        out.extend(results)
    return out


@dataclasses.dataclass
class PointsResult:
    """Per dataset: every object's IoU per click; plus timing."""

    clicks: tuple  # the click counts reported, e.g. (1, 2, 3, 5, 9)
    first_point: str
    objects: Dict[str, List[ObjectClicks]]
    images: Dict[str, int]
    seconds: float
    # the image encoder's wall time per image (set_image, to the embedding's completion),
    # the first image left out (it includes compiling)
    embed_seconds: List[float] = dataclasses.field(default_factory=list)

    @property
    def embed_median(self) -> float:
        return float(np.median(self.embed_seconds)) if self.embed_seconds else float("nan")

    def miou(self, dataset: str, n: int) -> float:
        rows = self.objects[dataset]
        return float(np.mean([r.ious[n - 1] for r in rows])) if rows else float("nan")

    def oracle(self, dataset: str) -> float:
        rows = self.objects[dataset]
        return float(np.mean([r.oracle_1 for r in rows])) if rows else float("nan")

    def table(self) -> Dict[str, Dict[str, float]]:
        """dataset -> {"miou@N": ..., "oracle@1": ..., "objects": ..., "images": ...}, with a
        "mean" row over datasets (each weighted equally, as the paper averages datasets)."""
        table = {}
        for name in self.objects:
            row = {f"miou@{n}": self.miou(name, n) for n in self.clicks}
            row.update({"oracle@1": self.oracle(name), "objects": len(self.objects[name]),
                        "images": self.images[name]})
            table[name] = row
        if len(table) > 1:
            keys = [f"miou@{n}" for n in self.clicks] + ["oracle@1"]
            table["mean"] = {k: float(np.mean([table[d][k] for d in self.objects]))
                             for k in keys}
        return table

    def to_json(self) -> dict:
        total = sum(self.images.values())
        return {"protocol": {"first_point": self.first_point, "clicks": list(self.clicks),
                             "first_click": "multimask, highest predicted IoU (oracle: best)",
                             "later_clicks": "single output, previous logits as mask prompt"},
                "results": self.table(), "seconds": self.seconds,
                "embed_seconds_median": self.embed_median,
                "images_per_second": total / self.seconds if self.seconds else None,
                "objects": {d: [{"image": r.image, "index": r.index, "ious": r.ious,
                                 "oracle_1": r.oracle_1, "clicks": r.clicks}
                                for r in rows] for d, rows in self.objects.items()}}

    def format_table(self) -> str:
        head = ["dataset", "images", "objects"] + [f"mIoU@{n}" for n in self.clicks] + [
            "oracle@1"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in self.table().items():
            cells = [name, str(row.get("images", "")), str(row.get("objects", ""))]
            cells += [f"{row[f'miou@{n}']:.3f}" for n in self.clicks]
            cells.append(f"{row['oracle@1']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_points(model, datasets: Dict[str, Iterable[EvalImage]],
                    clicks: Sequence[int] = DEFAULT_CLICKS, *, first_point: str = "center",
                    seed: int = 0, objects_per_call: int = 16, progress: bool = False,
                    keep_examples: int = 0) -> tuple[PointsResult, list]:
    """Evaluates `model` (a `SamModel`) on every dataset. Returns the result and up to
    `keep_examples` (image, ObjectClicks with masks) pairs per dataset for drawing."""
    import jax

    from ..predictor import SamPredictor

    clicks = tuple(sorted(set(int(n) for n in clicks)))
    if not clicks or clicks[0] < 1:
        raise ValueError(f"click counts must be >= 1, got {clicks}")
    predictor = SamPredictor(model)
    objects: Dict[str, List[ObjectClicks]] = {}
    images: Dict[str, int] = {}
    examples = []
    embed_seconds: List[float] = []
    first = True
    start = time.perf_counter()
    for name, dataset in datasets.items():
        rng = np.random.default_rng(seed)
        items = dataset
        if progress:
            from tqdm.auto import tqdm
            items = tqdm(dataset, desc=f"points: {name}", unit="image",
                         total=len(dataset) if hasattr(dataset, "__len__") else None)
        objects[name], images[name] = [], 0
        drawn = 0
        for image in items:
            want = drawn < keep_examples and len(image.masks) > 0
            t = time.perf_counter()
            predictor.set_image(image.image)
            jax.block_until_ready(predictor.features)
            if not first:
                embed_seconds.append(time.perf_counter() - t)
            first = False
            rows = evaluate_image(predictor, image, clicks[-1], first_point=first_point,
                                  rng=rng, objects_per_call=objects_per_call,
                                  keep_masks=want, image_is_set=True)
            objects[name].extend(rows)
            images[name] += 1
            if want and rows:
                examples.append((name, image, rows[0]))  # the first object, drawn later
                drawn += 1
                for r in rows[1:]:
                    r.masks = None
    result = PointsResult(clicks, first_point, objects, images, time.perf_counter() - start,
                          embed_seconds)
    return result, examples
