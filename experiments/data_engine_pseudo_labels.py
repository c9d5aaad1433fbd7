"""The data engine's automatic stage on the training views: the model labels what the
annotations leave out, and its confident, stable, new masks become extra training masks.

    python experiments/data_engine_pseudo_labels.py --cache runs/default/cache \
        --out runs/default/pseudo [--checkpoint DIR] [--points-per-side 16]

SAM grew SA-1B this way (its §4: fully automatic masks from a point grid, kept when the
predicted IoU and the stability are high, deduplicated by NMS). Here it runs on the cached
DINOv2 features of every training view (`default_model_data.py`), on the decoder's 128x128
low-res grid, so no image is decoded or re-encoded:
- a `--points-per-side` grid of single positive points over the view's image area (not the
  padding), 3 multimask candidates each;
- kept where predicted IoU >= and stability >= the checkpoint's recommended generator
  thresholds (`generator_defaults`; SAM's 0.88/0.95 for weights without them), and where the
  mask covers at least `--min-cells` cells and less than `--max-fraction` of the view;
- greedy NMS by mask IoU (`--nms`, highest predicted IoU first);
- dropped when it matches an annotated mask of the view (IoU >= `--known-iou`): only masks the
  annotations lack are new data;
- at most the view's free mask slots (the cache holds 16 a view).

Writes `pseudo_NNNN.npz` beside each `train_NNNN.npz`'s name in `--out` (masks bit-packed,
boxes in the input frame, valid flags, in the shard's free slots) and `summary.json` (views,
candidates, kept per dataset). `train_default_model.py --pseudo DIR` trains on them; whether
that helps is decided by the held-out numbers only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def grid_points(input_size: np.ndarray, per_side: int) -> np.ndarray:
    """(per_side**2, 2) (x, y) cell centres of a regular grid over the (h, w) image area."""
    h, w = (float(v) for v in input_size)
    offsets = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(offsets * w, offsets * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, L, L) x (M, L, L) bool -> (N, M) IoU (0 where both are empty)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def greedy_nms(masks: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices kept by greedy NMS on mask IoU, highest score first."""
    order = np.argsort(-scores, kind="stable")
    ious = mask_ious(masks, masks)
    kept: list[int] = []
    for i in order:
        if all(ious[i, j] < threshold for j in kept):
            kept.append(int(i))
    return kept


def box_of_cells(mask: np.ndarray, cell: float) -> np.ndarray:
    """XYXY box in the input frame of a low-res mask (cell edges)."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return np.array([cols[0] * cell, rows[0] * cell, (cols[-1] + 1) * cell,
                     (rows[-1] + 1) * cell], np.float32)


def select_new_masks(logits: np.ndarray, iou_pred: np.ndarray, known: np.ndarray,
                     inside: np.ndarray, free_slots: int, *, iou_thresh: float,
                     stability_thresh: float, nms: float, known_iou: float, min_cells: int,
                     max_fraction: float, offset: float = 1.0) -> tuple[np.ndarray, dict]:
    """One view's candidates (C, L, L) logits and predicted IoUs (C,) -> the new masks
    (K, L, L) bool, K <= free_slots, and counts of what each filter removed."""
    from sam_jax.utils import amg

    masks = (logits > 0) & inside
    # the generator's stability score, over the image area only (padding can never count)
    stability = np.nan_to_num(np.asarray(amg.stability_score(
        np.where(inside, logits, -np.inf), 0.0, offset)))
    area = masks.sum((1, 2))
    counts = {"candidates": len(masks)}
    keep = (iou_pred >= iou_thresh) & (stability >= stability_thresh)
    counts["confident_stable"] = int(keep.sum())
    keep &= (area >= min_cells) & (area < max_fraction * inside.sum())
    counts["sized"] = int(keep.sum())
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return np.zeros((0,) + masks.shape[1:], bool), dict(counts, after_nms=0, new=0, kept=0)
    idx = idx[greedy_nms(masks[idx], iou_pred[idx], nms)]
    counts["after_nms"] = len(idx)
    if len(known):
        idx = idx[mask_ious(masks[idx], known).max(1) < known_iou]
    counts["new"] = len(idx)
    idx = idx[:free_slots]
    counts["kept"] = len(idx)
    return masks[idx], counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/default/cache")
    parser.add_argument("--out", default="runs/default/pseudo")
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--nms", type=float, default=0.7)
    parser.add_argument("--known-iou", type=float, default=0.5)
    parser.add_argument("--min-cells", type=int, default=16,
                        help="smallest mask kept, in 128x128 low-res cells")
    parser.add_argument("--max-fraction", type=float, default=0.9)
    parser.add_argument("--limit", type=int, default=None, help="first N shards only")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    import sam_jax
    from sam_jax.inference import decode_prompts, make_prompt_batch
    from sam_jax.modeling import Sam

    model = sam_jax.load(args.checkpoint)
    cfg, variables = model.config, model.variables
    thresholds = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
    thresholds.update(model.generator_defaults or {})
    cell = cfg.low_res_stride
    side = cfg.low_res_size
    embed = jax.jit(lambda v, f: Sam(cfg).apply(v, f, method="embed_features"))
    n_points = args.points_per_side ** 2

    shards = sorted(glob.glob(os.path.join(args.cache, "train_*.npz")))[:args.limit]
    os.makedirs(args.out, exist_ok=True)
    totals: dict[str, dict] = {}
    start = time.time()
    for path in tqdm(shards, desc="pseudo-labels", unit="shard"):
        out_path = os.path.join(args.out, os.path.basename(path).replace("train_", "pseudo_"))
        with np.load(path) as shard:
            data = {k: shard[k] for k in shard}
        n, slots = data["mask_valid"].shape
        packed = np.zeros((n, slots, side, (side + 7) // 8), np.uint8)
        boxes = np.zeros((n, slots, 4), np.float32)
        valid = np.zeros((n, slots), bool)
        embeddings = embed(variables, jnp.asarray(data["features"], jnp.float32))
        for v in range(n):
            points = grid_points(data["input_size"][v], args.points_per_side)
            prompts = make_prompt_batch(cfg, coords=points[:, None],
                                        labels=np.ones((n_points, 1), np.int32))
            low, iou = decode_prompts(variables, embeddings[v:v + 1], prompts, config=cfg,
                                      multimask_output=True, with_masks=False)
            low = np.asarray(low[:n_points], np.float32).reshape(-1, side, side)
            iou = np.asarray(iou[:n_points], np.float32).reshape(-1)
            h, w = data["input_size"][v]
            rows, cols = np.arange(side)[:, None] * cell, np.arange(side)[None, :] * cell
            inside = (rows < h) & (cols < w)
            gt_valid = data["mask_valid"][v]
            known = np.unpackbits(data["masks"][v][gt_valid], axis=-1)[..., :side] > 0
            new, counts = select_new_masks(
                low, iou, known, inside, slots - int(gt_valid.sum()),
                iou_thresh=thresholds["pred_iou_thresh"],
                stability_thresh=thresholds["stability_score_thresh"], nms=args.nms,
                known_iou=args.known_iou, min_cells=args.min_cells,
                max_fraction=args.max_fraction)
            free = np.flatnonzero(~gt_valid)[:len(new)]
            for slot, m in zip(free, new):
                packed[v, slot] = np.packbits(m, axis=-1)
                boxes[v, slot] = box_of_cells(m, cell)
                valid[v, slot] = True
            dataset = str(data["names"][v]).split("/")[0]
            tot = totals.setdefault(dataset, {"views": 0})
            tot["views"] += 1
            for k, c in counts.items():
                tot[k] = tot.get(k, 0) + c
        tmp = out_path + ".tmp.npz"
        np.savez(tmp, masks=packed, boxes=boxes, mask_valid=valid, names=data["names"])
        os.replace(tmp, out_path)
    summary = {"checkpoint": args.checkpoint or "bundled", "thresholds": thresholds,
               "points_per_side": args.points_per_side, "nms": args.nms,
               "known_iou": args.known_iou, "min_cells": args.min_cells,
               "max_fraction": args.max_fraction, "shards": len(shards),
               "seconds": round(time.time() - start, 1), "per_dataset": totals}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for name, t in sorted(totals.items()):
        print(f"{name}: {t['views']} views, {t['candidates']} candidates, "
              f"{t['confident_stable']} confident and stable, {t['after_nms']} after NMS, "
              f"{t['new']} not annotated, {t['kept']} kept ({t['kept'] / t['views']:.2f} a view)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
