"""`sam-jax annotate --stats DIR`: the paper's measures of an annotation stage, masks per image
and seconds per image (and per mask), from the folder the tool writes."""

from __future__ import annotations

import glob
import os
from typing import Any, Dict

import numpy as np

from .. import sa1b
from .store import META


def annotation_stats(folder: str) -> Dict[str, Any]:
    if not os.path.isdir(folder):
        raise ValueError(f"annotations folder {folder!r} does not exist")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*.json"))
                   if not os.path.basename(p).startswith("."))
    if not paths:
        raise ValueError(f"annotations folder {folder!r} has no .json files")
    manual, automatic, seconds, done = [], [], [], 0
    for path in paths:
        record = sa1b.read_sa1b(path)
        sources = [a.get("source", "manual") for a in record["annotations"]]
        manual.append(sources.count("manual"))
        automatic.append(sources.count("automatic"))
        meta = record.get(META, {})
        seconds.append(float(meta.get("seconds", 0.0)))
        done += bool(meta.get("done", False))
    manual, automatic, seconds = map(np.asarray, (manual, automatic, seconds))

    def summary(values):
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "total": float(values.sum())}

    return {"images": len(paths), "done": done,
            "manual_masks_per_image": summary(manual),
            "automatic_masks_per_image": summary(automatic),
            "seconds_per_image": summary(seconds),
            "seconds_per_manual_mask": (float(seconds.sum() / manual.sum())
                                        if manual.sum() else None)}
