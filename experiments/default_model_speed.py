"""What a user of the bundled model waits for on this machine: the CLI's first mask (a fresh
process: imports, loading, compiling, embedding, decoding, writing), the image embedding, one
click's decode through `SamPredictor.predict` (also without the bundled model's edge stage, and
with the opt-in averaging over the mirror image: --mirror-average), and the automatic generator
on the truck.

    python experiments/default_model_speed.py [--checkpoint DIR] [--mirror-average] \
        [--also PHOTO ...] [--out experiments/results/default_model_speed_cpu.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUCK = os.path.join(REPO, "assets", "truck.jpg")


def interactive_rows(model, image, clicks: int, label: str = "") -> list:
    """(name, seconds) for set_image (best of 5) and one click's predict (median and 95th
    percentile of `clicks` random clicks), after a first call of each that compiles (and a
    second set_image: the process's first runs after compiling are slower, which made
    whichever model came first look 0.2-0.3 s slower)."""
    import jax

    import sam_jax

    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(image)  # compiles
    predictor.set_image(image)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        predictor.set_image(image)
        jax.block_until_ready(predictor.features)  # JAX dispatches asynchronously
        jax.block_until_ready(predictor.mirrored)
        times.append(time.perf_counter() - start)
    rows = [(f"set_image (embedding){label}, best of 5", min(times))]
    rng = np.random.default_rng(0)
    seconds = []
    points = np.array([[500, 375]], np.float32)
    predictor.predict(point_coords=points, point_labels=np.array([1]), multimask_output=True)
    for _ in range(clicks):
        xy = np.array([[rng.integers(0, image.shape[1]), rng.integers(0, image.shape[0])]],
                      np.float32)
        start = time.perf_counter()
        predictor.predict(point_coords=xy, point_labels=np.array([1]), multimask_output=True)
        seconds.append(time.perf_counter() - start)
    size = f"{image.shape[1]}x{image.shape[0]}"
    rows.append((f"one click{label} (predict, 3 masks at {size}), median of {clicks}",
                 float(np.median(seconds))))
    rows.append((f"one click{label}, 95th percentile of {clicks}",
                 float(np.percentile(seconds, 95))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--mirror-average", action="store_true",
                        help="also time set_image and a click with SamConfig.mirror_average")
    parser.add_argument("--also", nargs="*", default=[],
                        help="more photos to time set_image and a click on (with and without "
                        "the edge stage; the CLI and the generator run on the truck only)")
    parser.add_argument("--out", default="experiments/results/default_model_speed_cpu.txt")
    args = parser.parse_args(argv)

    from PIL import Image

    import sam_jax

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sam_jax", "segment", TRUCK, "--point", "500,375",
               "--multimask", "-o", os.path.join(tmp, "truck")]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        for attempt in (1, 2):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            rows.append((f"CLI segment, fresh process (run {attempt})",
                         time.perf_counter() - start))

    model = sam_jax.load(args.checkpoint)
    image = np.asarray(Image.open(TRUCK).convert("RGB"))
    rows += interactive_rows(model, image, args.clicks)
    if model.config.edge_refiner is not None:  # what the edge stage costs, same process
        rows += interactive_rows(model.with_config(edge_refiner=None), image, args.clicks,
                                 " without the edge stage")
    for path in args.also:
        other = np.asarray(Image.open(path).convert("RGB"))
        name = f" on {os.path.basename(path)}"
        rows += interactive_rows(model, other, args.clicks, name)
        if model.config.edge_refiner is not None:
            rows += interactive_rows(model.with_config(edge_refiner=None), other, args.clicks,
                                     name + " without the edge stage")
    if args.mirror_average:  # the opt-in averaging over the mirror image, same process
        rows += interactive_rows(model.with_config(mirror_average=True), image, args.clicks,
                                 " with mirror averaging")
    generator = sam_jax.SamAutomaticMaskGenerator(model)
    start = time.perf_counter()
    found = generator.generate(image)
    rows.append((f"automatic masks on the truck, first call ({len(found)} masks)",
                 time.perf_counter() - start))
    start = time.perf_counter()
    generator.generate(image)
    rows.append(("automatic masks on the truck, second call", time.perf_counter() - start))

    lines = [f"checkpoint: {args.checkpoint or 'bundled (' + sam_jax.DEFAULT_CHECKPOINT + ')'}",
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "", "| what | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.3f} |" for name, sec in rows]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
