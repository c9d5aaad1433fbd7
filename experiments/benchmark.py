"""Speed and memory of sam_jax against the official PyTorch SAM, side by side, in one run.

    python experiments/benchmark.py [--image assets/truck.jpg] [--repeats 3] [--out-png PATH]

Each measurement runs in its own child process (so peak memory is that task's alone, read
from the child's rusage) on the same seeded random vit_b weights:
  encoder      image encoder, vit_b, 1024x1024, batch 1
  decode-1     prompt encoder + mask decoder + upscaling to the image size, 1 point prompt
  decode-64    the same for 64 single-point prompts in one call
  amg          automatic mask generation (SamAutomaticMaskGenerator defaults: 32x32 grid, 64
               points a batch) on the image resized to 1024 px on its longest side; one timed
               run each (the official takes minutes), JAX after a warm-up run; the JAX side
               also reports where its time goes
The official model is run as a user gets it (`pip install segment-anything`, stock torch,
default threads); sam_jax runs at float32 (the parity setting) and with bfloat16 compute.
Times are the best of `--repeats` runs after one warm-up (compilation excluded, reported
separately). Needs torch and segment-anything (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("encoder", "decode-1", "decode-64", "amg")


def _best(fn, repeats):
    fn()  # warm-up (and compilation for JAX)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _points(n, size):
    import numpy as np
    rng = np.random.default_rng(0)
    h, w = size
    return (rng.uniform(0, 1, (n, 1, 2)) * [w, h]).astype(np.float32), np.ones((n, 1), np.int64)


def run_torch(task, image, repeats):
    import numpy as np
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    if task == "amg":
        from segment_anything import SamAutomaticMaskGenerator
        generator = SamAutomaticMaskGenerator(sam)
        with torch.no_grad():
            start = time.perf_counter()
            masks = generator.generate(_amg_image(image))
            return time.perf_counter() - start, {"masks": len(masks)}
    pred = SamPredictor(sam)
    if task == "encoder":
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 1024, 1024))
                             .astype(np.float32))
        with torch.no_grad():
            return _best(lambda: sam.image_encoder(x), repeats)
    pred.set_image(image)
    n = int(task.split("-")[1])
    coords, labels = _points(n, image.shape[:2])
    c = torch.as_tensor(pred.transform.apply_coords(coords, image.shape[:2]), dtype=torch.float)
    lab = torch.as_tensor(labels, dtype=torch.int)
    return _best(lambda: pred.predict_torch(c, lab, multimask_output=True), repeats)


def _amg_image(image):
    from PIL import Image
    import numpy as np
    h, w = image.shape[:2]
    scale = 1024 / max(h, w)
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def run_jax(task, image, repeats, dtype):
    import jax
    import numpy as np
    import sam_jax
    from sam_jax import inference

    sam_jax.keep_freed_host_memory()  # as the sam-jax command does; see utils/host_memory.py
    cfg = sam_jax.vit_b().replace(compute_dtype=dtype)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    if task == "amg":
        generator = sam_jax.SamAutomaticMaskGenerator(sam_jax.SamModel(cfg, variables))
        small = _amg_image(image)
        start = time.perf_counter()
        generator.generate(small)  # warm-up: compiles
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        masks = generator.generate(small)
        seconds = time.perf_counter() - start
        return seconds, compile_s, {"masks": len(masks), "stages": generator.last_timings}
    if task == "encoder":
        x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(1, 1024, 1024, 3))
                              .astype(np.float32))
        t0 = time.perf_counter()
        inference.embed_images(variables, x, config=cfg).block_until_ready()
        compile_s = time.perf_counter() - t0
        return _best(lambda: inference.embed_images(variables, x, config=cfg)
                     .block_until_ready(), repeats), compile_s
    pred = sam_jax.SamPredictor(sam_jax.SamModel(cfg, variables))
    pred.set_image(image)
    n = int(task.split("-")[1])
    coords, labels = _points(n, image.shape[:2])
    prompts = pred._prompts(coords, labels, None, None)

    def decode():
        low_res, iou = inference.decode_prompts(variables, pred.features, prompts, config=cfg,
                                                multimask_output=True, with_masks=False)
        masks = inference.postprocess_masks(low_res, input_size=pred.input_size,
                                            original_size=pred.original_size,
                                            image_size=cfg.image_size,
                                            threshold=cfg.mask_threshold)
        jax.block_until_ready((masks, iou, low_res))

    t0 = time.perf_counter()
    decode()
    compile_s = time.perf_counter() - t0
    return _best(decode, repeats), compile_s


def worker(args):
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(args.image).convert("RGB"))
    if args.impl == "torch":
        out = run_torch(args.task, image, args.repeats)
        (seconds, extra), compile_s = (out if isinstance(out, tuple) else (out, {})), None
    else:
        out = run_jax(args.task, image, args.repeats, args.impl.split("-")[1])
        seconds, compile_s, extra = out if len(out) == 3 else out + ({},)
    print(json.dumps({"seconds": seconds, "compile_s": compile_s, **extra}))


def measure(impl, task, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--task", task,
           "--image", args.image, "--repeats", str(args.repeats)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env=dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{impl} {task} failed (status {status})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_gb"] = usage.ru_maxrss / 2**20  # KiB -> GiB
    return result


def draw(results, impls, tasks, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        vals = [results[(i, task)]["seconds"] for i in impls]
        ax.bar(impls, vals, color=["tab:gray", "tab:blue", "tab:green"][:len(impls)])
        ax.set_title(task)
        ax.set_ylabel("seconds (lower is better)")
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=os.path.join(REPO, "assets", "truck.jpg"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-png", default=None, help="also draw the table as a bar chart")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    impls = ["torch", "jax-float32"] + ([] if args.skip_bf16 else ["jax-bfloat16"])
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    results = {}
    for task in tasks:
        for impl in impls:
            results[(impl, task)] = measure(impl, task, args)
            r = results[(impl, task)]
            print(f"  measured {impl:13s} {task:9s} {r['seconds']:.4f} s  peak {r['peak_gb']:.2f}"
                  f" GiB", file=sys.stderr)
    import platform
    print(f"\nvit_b, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}),"
          f" image {os.path.basename(args.image)}; best of {args.repeats}\n")
    head = "| task | official (torch) | " + " | ".join(
        f"sam_jax {i.split('-')[1]} | speed-up" for i in impls[1:]) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * (len(impls) - 1)))
    for task in tasks:
        t = results[("torch", task)]["seconds"]
        row = f"| {task} | {t:.3f} s |"
        for impl in impls[1:]:
            s = results[(impl, task)]["seconds"]
            row += f" {s:.3f} s | {t / s:.1f}x |"
        print(row)
    for task in tasks:
        row = f"| peak RSS {task} | {results[('torch', task)]['peak_gb']:.2f} GiB |"
        for impl in impls[1:]:
            m = results[(impl, task)]["peak_gb"]
            row += f" {m:.2f} GiB | {results[('torch', task)]['peak_gb'] / m:.2f}x less |"
        print(row)
    print("\nJAX compile time (first call, excluded above): " + ", ".join(
        f"{impl} {task} {results[(impl, task)]['compile_s']:.1f} s"
        for impl in impls[1:] for task in tasks))
    if "amg" in tasks:
        print("\nAutomatic mask generation: masks found " + ", ".join(
            f"{impl} {results[(impl, 'amg')]['masks']}" for impl in impls) +
            " (random weights: counts differ between float32 and bfloat16 runs)")
        for impl in impls[1:]:
            stages = results[(impl, "amg")]["stages"]
            total = results[(impl, "amg")]["seconds"]
            print(f"  {impl} time by stage: " + ", ".join(
                f"{name} {sec:.2f} s ({100 * sec / total:.0f}%)" for name, sec in stages.items()))
    if args.out_png:
        draw(results, impls, tasks, args.out_png)
        print(f"chart written to {args.out_png}")


if __name__ == "__main__":
    main()
