"""The edge stage's two implementations side by side on this backend: the dense network over
every pixel of each mask (`EdgeRefiner.__call__`, what training uses) and the tiled one
inference runs (`EdgeRefiner.refine_tiles`: only the 16x16 tiles holding the outline band),
at several tile counts per loop step, on the bundled model's own masks for random clicks.
Prints seconds (median over the clicks), the ratio to dense, the largest logit difference and
how many tiles were active, so the per-backend step size (`tiles_per_step`) can be chosen on a
GPU or TPU as it was on the CPU. (The official SAM has no such stage: nothing to compare with.)

    python experiments/edge_stage_speed.py [--image assets/truck.jpg] [--clicks 10] \
        [--out experiments/results/edge_stage_speed_cpu.txt]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` calls after one that compiles."""
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.path.join(REPO, "assets", "truck.jpg"))
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="*", default=[32, 128, 512])
    parser.add_argument("--out", default=None,
                        help="default: experiments/results/edge_stage_speed_<backend>.txt")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from PIL import Image
    from tqdm import tqdm

    import sam_jax
    from sam_jax.modeling.edge_refiner import (EdgeRefiner, active_tiles,
                                              default_tiles_per_step, outline_band)

    model = sam_jax.load()
    stage = model.config.edge_refiner
    net = EdgeRefiner(stage.width, tuple(stage.dilations))
    params = {"params": model.variables["params"]["edge_refiner"]}
    image = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = image.shape[:2]
    # the masks the stage gets: the model's upscaled logits without its own stage
    predictor = sam_jax.SamPredictor(model.with_config(edge_refiner=None))
    predictor.set_image(image)
    pixels = sam_jax.inference.edge_features(model.variables, image, config=model.config)
    backend = jax.default_backend()
    steps = sorted(set(args.steps) | {default_tiles_per_step(backend)})

    dense = jax.jit(lambda px, lg: net.apply(params, px, lg[None])[0])
    tiled = {k: jax.jit(functools.partial(
        lambda px, lg, k: net.apply(params, px, lg, jnp.zeros(lg.shape[0], jnp.int32),
                                    tiles_per_step=k, method="refine_tiles"), k=k))
        for k in steps}
    count = jax.jit(lambda lg: active_tiles(outline_band(lg), 16).sum())
    rng = np.random.default_rng(0)
    seconds = {"dense": []} | {k: [] for k in steps}
    worst, active = 0.0, []
    for _ in tqdm(range(args.clicks), desc="clicks", unit="click"):
        xy = np.array([[rng.integers(0, w), rng.integers(0, h)]], np.float32)
        logits, _, _ = predictor.predict(xy, np.array([1]), return_logits=True)
        logits = jnp.asarray(logits, jnp.float32)
        reference = dense(pixels, logits)
        seconds["dense"].append(timed(lambda: dense(pixels, logits)))
        for k in steps:
            worst = max(worst, float(jnp.abs(tiled[k](pixels, logits) - reference).max()))
            seconds[k].append(timed(lambda: tiled[k](pixels, logits)))
        active.append(int(count(logits)))

    base = float(np.median(seconds["dense"]))
    lines = [f"backend: {backend} ({jax.devices()[0].device_kind}); machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             f"image: {os.path.basename(args.image)} {w}x{h}; {args.clicks} random clicks, 3 "
             f"masks each; active 16x16 tiles per click: median {int(np.median(active))} of "
             f"{3 * -(-h // 16) * -(-w // 16)}; largest |tiled - dense| logit: {worst:.2e}",
             "", "| stage | seconds (median) | x dense |", "|---|---|---|",
             f"| dense, every pixel | {base:.4f} | 1.00 |"]
    for k in steps:
        sec = float(np.median(seconds[k]))
        chosen = " (this backend's default)" if k == default_tiles_per_step(backend) else ""
        lines.append(f"| tiled, {k} tiles a step{chosen} | {sec:.4f} | {sec / base:.2f} |")
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join(REPO, "experiments", "results",
                                   f"edge_stage_speed_{backend}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
