"""Does the mask honour the click just made? With and without averaging over the mirror image.

The evaluation protocol (`sam_jax.training.evaluate.click_ious`) on the validation photos'
whole objects; after every corrective click (2nd to 5th), the pixel clicked should be inside
the new mask for a positive click and outside it for a negative one. Counted per set and kind
of click, for the bundled model with `mirror_average` (the mean over the image and its mirror
image) and without it (`with_config(mirror_average=False)`). The held-out photos are not used.

    python experiments/clicks_honoured.py --cache runs/default/cache518 [--sets davis horse]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from click_local_oracle import WHOLE_SETS  # noqa: E402
from evaluate_default_model import CLICKS  # noqa: E402


class RecordingPredictor:
    """`SamPredictor.predict` that records each call's clicks and the mask the protocol keeps
    (the highest-scoring one)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.calls = []

    def predict(self, point_coords, point_labels, **kwargs):
        masks, scores, low_res = self.predictor.predict(point_coords, point_labels, **kwargs)
        self.calls.append((point_coords[-1], int(point_labels[-1]),
                           masks[int(np.argmax(scores))]))
        return masks, scores, low_res


def honoured(calls) -> list[tuple[int, bool]]:
    """(label, whether the mask after it agrees with it) for every corrective click."""
    out = []
    for (x, y), label, mask in calls[1:]:
        inside = bool(mask[int(round(y)), int(round(x))])
        out.append((label, inside == (label == 1)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--cache", default="runs/default/cache518",
                        help="a feature cache's folder (its split.json names the validation "
                             "photos)")
    parser.add_argument("--sets", nargs="+", default=list(WHOLE_SETS))
    parser.add_argument("--out", default="experiments/results/clicks_honoured_validation")
    args = parser.parse_args(argv)

    import sam_jax
    from evaluate_default_model import set_masks, split_sets, write_results
    from sam_jax.training.evaluate import click_ious

    sets = {k: v for k, v in split_sets(args.data, "validation", args.cache).items()
            if k in args.sets}
    bundled = sam_jax.load()
    models = {"mirror-averaged": bundled.with_config(mirror_average=True),
              "single view": bundled.with_config(mirror_average=False)}
    results = {}
    for name, model in models.items():
        predictor = sam_jax.SamPredictor(model)
        for set_name, items in sets.items():
            rows = []
            for _, _, gt in set_masks(predictor, items, f"{name} {set_name}"):
                recorder = RecordingPredictor(predictor)
                click_ious(recorder, gt, CLICKS)
                rows += honoured(recorder.calls)
            labels = np.array([r[0] for r in rows])
            ok = np.array([r[1] for r in rows])
            results[f"{name} / {set_name}"] = {
                "positive clicks": int((labels == 1).sum()),
                "positive honoured": float(ok[labels == 1].mean()),
                "negative clicks": int((labels == 0).sum()),
                "negative honoured": float(ok[labels == 0].mean())}
    lines = ["Corrective clicks (2nd to 5th) whose pixel the next mask puts on the clicked side, "
             "validation photos' whole objects",
             "| model / set | positive clicks | honoured | negative clicks | honoured |",
             "|---|---|---|---|---|"]
    for key, r in results.items():
        lines.append(f"| {key} | {r['positive clicks']} | {r['positive honoured']:.3f} | "
                     f"{r['negative clicks']} | {r['negative honoured']:.3f} |")
    write_results(args.out, "\n".join(lines), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
