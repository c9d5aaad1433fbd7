"""Training input pipeline throughput: images/s of `sam_jax.training.data.TrainLoader` for
several Grain worker-process counts, on a synthetic SA-1B-like dataset.

    python experiments/loader_benchmark.py [--workers 0,1,2] [--images 16] [--batch 4] \
        [--steps 8] [--warmup 2] [--threads 1] [--data-dir DIR] \
        [--out experiments/results/loader_benchmark_cpu.txt]

Why: the accelerator's train step must never wait for the host, so the loader's images/s per
host core says how many cores a host needs to feed a given step rate.

The data: `--images` JPEGs of `--height` x `--width` (1500 x 2250 like the SA-1B originals;
smooth random content with a little noise, so that they decode like photographs, not like pure
noise), each with `--masks` random elliptic masks (sizes log-uniform from ~20 px to ~1/3 of the
image) written as SA-1B annotation files with COCO RLE counts and prepared by the project's own
SA-1B builder (`datasets.prepare_sa1b_folder`), so every record is what training reads. The
masks all stay valid (none over 90% of the image or empty at low res: 64 of 64 kept, checked),
so the loader decodes min(--masks, 64) RLEs per image.

What is timed: `TrainLoader(..., image_size=1024, max_masks=64).batches(0)` consumed as fast as
possible: JPEG decode, resize to 1024 px longest side, RLE decodes, the low-res (256 x 256)
ground truth and boxes, stacking, the hand-over from the workers (shared memory) and the copy
out of it. The first `--warmup` batches (worker start-up: each worker imports numpy, PIL, JAX
and tfds) are not timed, then images/s over the next `--steps` batches. "per core" divides by
the cores doing the decoding: max(1, worker_count) (0 workers: this process). The main process
also works (the hand-over copy), so on a machine with as many cores as workers the per-core
figure for the largest count is low; the machine may also be shared, so the wall-clock figures
are noisy. "images per CPU-s" (images over the CPU time of this process and its workers in the
timed window; psutil, which orbax-checkpoint already requires) is the rate per free core and
far less sensitive to other load.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np
import psutil
from PIL import Image
from tqdm.auto import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sam_jax import sa1b  # noqa: E402
from sam_jax.training import data, datasets  # noqa: E402
from sam_jax.utils import amg  # noqa: E402

DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "loader_benchmark_cpu.txt")


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random colour fields (a coarse grid upsampled bicubically) plus mild noise: JPEG
    sizes and decode times like a photograph's."""
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noise = rng.normal(0, 6, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def synthetic_masks(rng: np.random.Generator, height: int, width: int, n: int) -> np.ndarray:
    """(n, H, W) bool random ellipses, radii log-uniform from 10 px to 1/6 of the longer side."""
    masks = np.zeros((n, height, width), bool)
    for i in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = np.exp(rng.uniform(np.log(10), np.log(max(height, width) / 6), 2))
        # evaluated over the ellipse's bounding box only (the rest is False anyway)
        y0, y1 = max(0, int(cy - ry) - 1), min(height, int(cy + ry) + 2)
        x0, x1 = max(0, int(cx - rx) - 1), min(width, int(cx + rx) + 2)
        ys, xs = np.ogrid[y0:y1, x0:x1]
        masks[i, y0:y1, x0:x1] = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        if not masks[i].any():
            masks[i, int(cy), int(cx)] = True
    return masks


def write_sa1b_folder(folder: str, n_images: int, height: int, width: int, n_masks: int,
                      seed: int = 0) -> None:
    """`n_images` SA-1B image + annotation pairs in `folder`, as the released files are."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in tqdm(range(n_images), desc="synthetic SA-1B images", unit="image"):
        name = f"sa_{i + 1}.jpg"
        Image.fromarray(synthetic_image(rng, height, width)).save(
            os.path.join(folder, name), quality=90)
        masks = synthetic_masks(rng, height, width, n_masks)
        records = []
        for rle, m in zip(amg.mask_to_rle(masks), masks):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            records.append({"segmentation": rle, "area": int(m.sum()),
                            "bbox": [cols[0], rows[0], cols[-1] - cols[0] + 1,
                                     rows[-1] - rows[0] + 1],
                            "predicted_iou": 0.9, "stability_score": 0.95,
                            "point_coords": [[cols[0], rows[0]]],
                            "crop_box": [0, 0, width, height]})
        sa1b.write_json_atomic(os.path.join(folder, f"sa_{i + 1}.json"),
                               sa1b.to_sa1b(records, name, width, height))


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its live worker processes."""
    procs = [psutil.Process()] + [psutil.Process(p.pid) for p in
                                  multiprocessing.active_children()]
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def measure(source, worker_count: int, batch: int, threads: int, warmup: int,
            steps: int) -> dict[str, float]:
    """Start-up time (to the first batch), then over the next `steps` batches: images/s and
    images per CPU-second of this process and its workers (the rate one free core would give;
    robust to other load on the machine, which the wall-clock rate is not)."""
    loader = data.TrainLoader(source, batch, image_size=1024, max_masks=64, seed=0,
                              process_index=0, process_count=1, num_workers=threads,
                              worker_count=worker_count)
    t0 = time.perf_counter()
    it = loader.batches(0, warmup + steps)
    bar = tqdm(total=warmup + steps, desc=f"{worker_count} workers", unit="batch", leave=False)
    first = start = cpu0 = cpu1 = end = None
    try:
        for i, (_, b) in enumerate(it):
            assert b["masks"].shape == (batch, 64, 256, 256)
            if i == 0:
                first = time.perf_counter() - t0
            if i == warmup - 1:
                start, cpu0 = time.perf_counter(), cpu_seconds()
            if i == warmup + steps - 1:
                end, cpu1 = time.perf_counter(), cpu_seconds()
            bar.update(1)
    finally:
        it.close()
        loader.close()
        bar.close()
    images = steps * batch
    return {"startup_s": first, "images_per_s": images / (end - start),
            "per_core": images / (end - start) / max(1, worker_count),
            "per_cpu_s": images / (cpu1 - cpu0), "cores_busy": (cpu1 - cpu0) / (end - start)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="worker_count values, comma-separated")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--width", type=int, default=2250)
    p.add_argument("--masks", type=int, default=64, help="masks per image")
    p.add_argument("--batch", type=int, default=4, help="global (= local) batch size")
    p.add_argument("--steps", type=int, default=8, help="timed batches")
    p.add_argument("--warmup", type=int, default=2, help="untimed first batches (>= 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="TrainLoader num_workers: reader threads per process")
    p.add_argument("--data-dir", default="",
                   help="keep the synthetic data here (reused when present); default: a "
                        "temporary folder")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first batch includes the workers' start-up)")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        raw = os.path.join(root, "sa1b")
        if not os.path.exists(os.path.join(raw, f"sa_{args.images}.json")):
            write_sa1b_folder(raw, args.images, args.height, args.width, args.masks)
        source = datasets.load_source(datasets.prepare_sa1b_folder(raw,
                                                                   os.path.join(root, "tfds")))
        results = {}
        for wc in (int(w) for w in args.workers.split(",")):
            results[wc] = measure(source, wc, args.batch, args.threads, args.warmup,
                                  args.steps)
            print(f"worker_count {wc}: {results[wc]['images_per_s']:.2f} images/s", flush=True)

    import grain
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"training loader; {cores} CPU cores ({platform.machine()}), grain {grain.__version__}, "
        f"{datetime.date.today()}; {args.images} synthetic SA-1B images {args.width}x"
        f"{args.height} JPEG, {args.masks} COCO RLE masks each; image_size 1024, max_masks 64, "
        f"batch {args.batch}, {args.threads} reader thread(s) per process; images/s over "
        f"{args.steps} batches after {args.warmup} untimed",
        "",
        "| worker_count | start-up s | images/s | images/s per worker core | cores busy | "
        "images per CPU-s |",
        "|---|---|---|---|---|---|",
    ]
    for wc, r in results.items():
        lines.append(f"| {wc} | {r['startup_s']:.1f} | {r['images_per_s']:.2f} | "
                     f"{r['per_core']:.2f} | {r['cores_busy']:.2f} | {r['per_cpu_s']:.2f} |")
    lines += ["", "images/s per worker core: images/s / max(1, worker_count). cores busy: CPU "
              "seconds of this process and its workers per wall second. images per CPU-s: what "
              "one free core gives (this process's share included). On a shared machine the "
              "wall-clock figures are noisy; the CPU-time one much less so."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
