"""Does averaging the model's masks over the image and its mirror image sharpen the outline?

(The library now has the shared-prompt variant built in, on the device:
`SamConfig.mirror_average`; this script keeps the first experiment, two click chains.)

A test-time augmentation for the bundled model's first-mask outline, which the click-local
oracle (`click_local_oracle.py`) found to be what limits it at 3 clicks. Each image is run twice,
as it is and mirrored left-right (its own embedding, the clicks mirrored), each as its own
click chain (each chain feeds its own low-res logits back); the masks shown are the mean of the
two chains' refined logits (the mirrored one mirrored back) above the model's threshold, and the
first click picks the output with the highest mean predicted IoU. It costs twice the embedding
and decode. Scored with the evaluation protocol (`sam_jax.training.evaluate.click_ious`) on the
validation photos' whole objects only; the held-out photos are never used here.

    python experiments/flip_averaging.py --cache runs/default/cache518
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from click_local_oracle import WHOLE_SETS  # noqa: E402
from evaluate_default_model import CLICKS  # noqa: E402


class FlipAveragedPredictor:
    """`SamPredictor.predict`'s interface over two predictors, one on the mirrored image.

    Two ways to feed the previous logits back: `shared_prompt=False` keeps two click chains,
    and the low-res logits it returns stack both chains' (C, 2, L, L), so a caller feeding them
    back as `mask_input` feeds each chain its own; `shared_prompt=True` returns one (C, L, L),
    the mean of the plain chain's and the mirrored chain's mirrored back (`_mirror`),
    which both chains read (the mirrored one mirrored): what a predictor with one mask prompt
    per mask, SAM's interface, could do."""

    def __init__(self, model, shared_prompt: bool = False):
        from sam_jax.predictor import SamPredictor

        self.plain = SamPredictor(model)
        self.mirrored = SamPredictor(model)
        self.threshold = model.config.mask_threshold
        self.image_size = model.config.image_size
        self.shared_prompt = shared_prompt

    def set_image(self, image: np.ndarray) -> None:
        self.width = image.shape[1]
        self.plain.set_image(image)
        self.mirrored.set_image(np.ascontiguousarray(image[:, ::-1]))

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        mirrored_coords = np.asarray(point_coords, np.float32).copy()
        # pixel centres: x + 0.5 -> W - (x + 0.5), so pixel x -> W - 1 - x
        mirrored_coords[:, 0] = self.width - 1 - mirrored_coords[:, 0]
        if mask_input is None:
            inputs = (None, None)
        elif self.shared_prompt:
            inputs = (mask_input, self._mirror(mask_input))
        else:
            inputs = (mask_input[:, 0], mask_input[:, 1])
        logits_a, iou_a, low_a = self.plain.predict(point_coords, point_labels,
                                                    mask_input=inputs[0],
                                                    multimask_output=multimask_output,
                                                    return_logits=True)
        logits_b, iou_b, low_b = self.mirrored.predict(mirrored_coords, point_labels,
                                                       mask_input=inputs[1],
                                                       multimask_output=multimask_output,
                                                       return_logits=True)
        logits = (logits_a + logits_b[..., ::-1]) / 2
        if self.shared_prompt:
            low_res = (low_a + self._mirror(low_b)) / 2
        else:
            low_res = np.stack([low_a, low_b], axis=1)
        return logits > self.threshold, (iou_a + iou_b) / 2, low_res

    def _mirror(self, low_res: np.ndarray) -> np.ndarray:
        """(C, L, L) low-res logits -> the mirrored image's (`sam_jax.utils.mirror`)."""
        from sam_jax.utils.mirror import mirror_columns

        widths = np.full((len(low_res),), self.plain.input_size[1])
        return np.asarray(mirror_columns(low_res, widths, self.image_size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--cache", default="runs/default/cache518",
                        help="a feature cache's folder (its split.json names the validation "
                             "photos)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled one)")
    parser.add_argument("--shared-prompt", action="store_true",
                        help="one mask prompt for both chains (FlipAveragedPredictor)")
    parser.add_argument("--out", default="experiments/results/flip_averaging_validation")
    args = parser.parse_args(argv)

    import sam_jax
    from evaluate_default_model import set_masks, split_sets, write_results
    from sam_jax.training.evaluate import click_ious

    sets = {k: v for k, v in split_sets(args.data, "validation", args.cache).items()
            if k in WHOLE_SETS}
    model = sam_jax.load(args.model)
    predictor = FlipAveragedPredictor(model, shared_prompt=args.shared_prompt)
    results, pooled = {}, []
    for set_name, items in sets.items():
        rows, oracle = [], []
        for _, _, gt in set_masks(predictor, items, set_name):
            r = click_ious(predictor, gt, CLICKS)
            rows.append(r["ious"])
            oracle.append(r["oracle_1"])
        results[set_name] = {"mious": np.mean(rows, axis=0).tolist(),
                             "oracle_1": float(np.mean(oracle)), "masks": len(rows)}
        pooled += rows
    results["whole objects"] = {"mious": np.mean(pooled, axis=0).tolist(), "masks": len(pooled)}
    chains = "one shared mask prompt" if args.shared_prompt else "two click chains"
    lines = [f"mirror-averaged masks ({chains}) on the validation photos' whole objects: mIoU "
             f"at 1..{CLICKS} clicks (oracle@1)",
             "| set | masks | " + " | ".join(str(k) for k in range(1, CLICKS + 1)) + " | oracle |",
             "|---|---|" + "---|" * (CLICKS + 1)]
    for name, r in results.items():
        vals = " | ".join(f"{v:.3f}" for v in r["mious"])
        oracle = f"{r['oracle_1']:.3f}" if "oracle_1" in r else ""
        lines.append(f"| {name} | {r['masks']} | {vals} | {oracle} |")
    write_results(args.out, "\n".join(lines), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
