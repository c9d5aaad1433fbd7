"""Speed and memory of sam_jax against the official PyTorch SAM, side by side, in one run, on
whatever device the two see.

    python experiments/benchmark.py [--model vit_b] [--tasks encoder,decode-64] [--repeats 3]
                                    [--out-png PATH] [--out-json PATH]

Each measurement runs in its own child process (its peak memory is its own; on a GPU, JAX's
preallocation and torch's cache never meet) on the same kind of seeded random weights:
  encoder      image encoder, 1024x1024, batch 1 (latency)
  encoder-8    image encoder, batch 8 (throughput, images/s)
  decode-1     prompt encoder + mask decoder + upscaling to the image size, 1 point prompt
  decode-64    the same for 64 single-point prompts in one call
  amg          automatic mask generation (generator defaults: 32x32 grid, 64 points a batch) on
               the image resized to 1024 px on its longest side

Sides, all keeping their results on the device (the official `predict_torch`, our
`device_predict`; nothing is copied to the host inside a timed call):
  torch         the official model as a user installs it (fp32, torch's default matmul
                precision), on CUDA when torch sees a GPU, else on the CPU
  torch-bf16    the official model under `torch.autocast(bfloat16)` (CUDA only)
  jax-float32   sam_jax at float32 (the parity setting)
  jax-bfloat16  sam_jax with bfloat16 compute (float32 params)
JAX runs on its default backend, with the per-backend defaults (attention, prompt grouping).

Times: on a CPU the best of `--repeats` runs after one warm-up, as in the README's CPU table
(the official generator takes minutes there: one run); on an accelerator the median of
`--repeats` (10 suggested). Compilation is excluded and reported separately. Peak memory: the
child's RSS on a CPU, the device allocator's peak on a GPU/TPU. Needs torch and
segment-anything (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("encoder", "encoder-8", "decode-1", "decode-64", "amg")
DEFAULT_TASKS = ("encoder", "decode-1", "decode-64")


def _time(fn, repeats, sync, stat):
    """Seconds per call of `fn` (one warm-up call first), `sync()` waiting for the device."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) if stat == "best" else statistics.median(times)


def _points(n, size):
    import numpy as np
    rng = np.random.default_rng(0)
    h, w = size
    return (rng.uniform(0, 1, (n, 1, 2)) * [w, h]).astype(np.float32), np.ones((n, 1), np.int64)


def _batch(task):
    return int(task.split("-")[1]) if task.startswith("encoder-") else 1


def _amg_image(image):
    from PIL import Image
    import numpy as np
    h, w = image.shape[:2]
    scale = 1024 / max(h, w)
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


# ---- the official model ---------------------------------------------------------------------

def run_torch(task, image, args, autocast_bf16):
    import contextlib

    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stat = "median" if cuda else "best"
    torch.manual_seed(0)
    sam = sam_model_registry[args.model]().eval().to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16
                else contextlib.nullcontext())
    info = {"device": "torch: " + (torch.cuda.get_device_name() if cuda else "cpu"),
            "stat": stat}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), autocast:
        if task == "amg":
            generator = SamAutomaticMaskGenerator(sam)
            small = _amg_image(image)
            repeats = args.repeats if cuda else 0  # minutes a run on a CPU: one, no warm-up
            if repeats:
                seconds = _time(lambda: generator.generate(small), repeats, sync, stat)
                masks = generator.generate(small)
            else:
                start = time.perf_counter()
                masks = generator.generate(small)
                seconds = time.perf_counter() - start
            info["masks"] = len(masks)
        elif task.startswith("encoder"):
            x = torch.from_numpy(np.random.default_rng(0).normal(
                size=(_batch(task), 3, 1024, 1024)).astype(np.float32)).to(device)
            seconds = _time(lambda: sam.image_encoder(x), args.repeats, sync, stat)
        else:
            pred = SamPredictor(sam)
            pred.set_image(image)
            coords, labels = _points(int(task.split("-")[1]), image.shape[:2])
            c = torch.as_tensor(pred.transform.apply_coords(coords, image.shape[:2]),
                                dtype=torch.float, device=device)
            lab = torch.as_tensor(labels, dtype=torch.int, device=device)
            seconds = _time(lambda: pred.predict_torch(c, lab, multimask_output=True),
                            args.repeats, sync, stat)
    if cuda:
        info["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return seconds, None, info


# ---- sam_jax --------------------------------------------------------------------------------

def run_jax(task, image, args, dtype):
    import jax
    import numpy as np
    import sam_jax
    from sam_jax import backend, device_predict, inference

    on_device = backend.on_accelerator()
    stat = "median" if on_device else "best"
    dev = jax.devices()[0]
    info = {"device": f"jax: {dev.platform} ({dev.device_kind})", "stat": stat}
    if not on_device:
        sam_jax.keep_freed_host_memory()  # as the sam-jax command does (utils/host_memory.py)
    cfg = sam_jax.get_config(args.model).replace(compute_dtype=dtype)
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    sync = lambda out=None: None  # noqa: E731  (each timed function blocks on its result)

    def compiled(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if task == "amg":
        generator = sam_jax.SamAutomaticMaskGenerator(sam_jax.SamModel(cfg, variables))
        small = _amg_image(image)
        compile_s = compiled(lambda: generator.generate(small))
        seconds = _time(lambda: generator.generate(small), args.repeats if on_device else 1,
                        sync, stat)
        info.update(masks=len(generator.generate(small)), stages=generator.last_timings)
    elif task.startswith("encoder"):
        x = jax.device_put(np.random.default_rng(0).normal(
            size=(_batch(task), 1024, 1024, 3)).astype(np.float32))

        def encode():
            inference.embed_images(variables, x, config=cfg).block_until_ready()

        compile_s = compiled(encode)
        seconds = _time(encode, args.repeats, sync, stat)
    else:
        pred = sam_jax.SamPredictor(sam_jax.SamModel(cfg, variables))
        pred.set_image(image)
        coords, labels = _points(int(task.split("-")[1]), image.shape[:2])
        coords = jax.device_put(pred.transform.apply_coords(coords, image.shape[:2]))
        labels = jax.device_put(labels.astype(np.int32))

        def decode():  # the counterpart of predict_torch: prompts and masks stay on the device
            out = device_predict.predict_on_device(
                variables, pred.features, coords, labels, config=cfg, multimask_output=True,
                input_size=pred.input_size, original_size=pred.original_size)
            jax.block_until_ready(out)

        compile_s = compiled(decode)
        seconds = _time(decode, args.repeats, sync, stat)
    stats = dev.memory_stats() if on_device else None
    if stats and "peak_bytes_in_use" in stats:
        info["peak_device_gb"] = stats["peak_bytes_in_use"] / 2**30
    return seconds, compile_s, info


# ---- driver ---------------------------------------------------------------------------------

def worker(args):
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(args.image).convert("RGB"))
    if args.impl.startswith("torch"):
        seconds, compile_s, info = run_torch(args.task, image, args, args.impl == "torch-bf16")
    else:
        seconds, compile_s, info = run_jax(args.task, image, args, args.impl.split("-")[1])
    print(json.dumps({"seconds": seconds, "compile_s": compile_s, **info}))


def measure(impl, task, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--task", task,
           "--image", args.image, "--repeats", str(args.repeats), "--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env=dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:  # out of memory, say: reported in the table, the other runs go on
        print(f"  {impl} {task} failed (wait status {status})", file=sys.stderr)
        return {"seconds": float("nan"), "compile_s": float("nan"), "device": "failed",
                "stat": "", "masks": 0, "stages": {}}
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB -> GiB
    return result


def torch_sides():
    """The official model's sides: with autocast bf16 where torch has a GPU."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return ["torch", "torch-bf16"] if probe.stdout.strip() == "True" else ["torch"]


def table(results, impls, tasks, model, repeats):
    """Markdown lines: per task each side's time (images/s for batched encoders) and its
    speed-up over the official fp32 (and bf16, when measured) side; then peak memory."""
    first = next((r for r in results.values() if r["device"] != "failed"), {"stat": "?"})
    stat = first["stat"]
    devices = sorted({r["device"] for r in results.values()} - {"failed"})
    lines = [f"{model}; devices: {', '.join(devices)}; {stat} of {repeats}; image "
             f"1024x1024 (encoder), truck.jpg (decode), truck at 1024 px (amg)", ""]
    ours = [i for i in impls if i.startswith("jax")]
    theirs = [i for i in impls if i.startswith("torch")]
    head = "| task | " + " | ".join(theirs + ours) + " | " + " | ".join(
        f"speed-up {o} over {t}" for o in ours for t in theirs) + " |"
    lines += [head, "|" + "---|" * (1 + len(impls) + len(ours) * len(theirs))]

    def shown(task, impl):
        s = results[(impl, task)]["seconds"]
        batch = _batch(task)
        if s != s:  # NaN: the run failed
            return "failed"
        return f"{batch / s:.1f} img/s" if batch > 1 else f"{s * 1e3:.1f} ms" if s < 1 \
            else f"{s:.2f} s"

    for task in tasks:
        row = f"| {task} | " + " | ".join(shown(task, i) for i in theirs + ours) + " |"
        row += "".join(f" {results[(t, task)]['seconds'] / results[(o, task)]['seconds']:.2f}x |"
                       for o in ours for t in theirs)
        lines.append(row)
    key = "peak_device_gb" if "peak_device_gb" in first else "peak_rss_gb"
    label = "peak device memory" if key == "peak_device_gb" else "peak RSS"
    for task in tasks:
        lines.append(f"| {label} {task} | " + " | ".join(
            f"{results[(i, task)].get(key, float('nan')):.2f} GiB" for i in theirs + ours) +
            " |" + " |" * (len(ours) * len(theirs)))
    lines.append("")
    lines.append("JAX compile time (first call, excluded above): " + ", ".join(
        f"{i} {t} {results[(i, t)]['compile_s']:.1f} s" for i in ours for t in tasks))
    if "amg" in tasks:
        lines.append("Automatic masks found: " + ", ".join(
            f"{i} {results[(i, 'amg')]['masks']}" for i in impls) + " (random weights)")
        for i in ours:
            stages, total = results[(i, "amg")]["stages"], results[(i, "amg")]["seconds"]
            lines.append(f"  {i} time by stage: " + ", ".join(
                f"{n} {s:.3f} s ({100 * s / total:.0f}%)" for n, s in stages.items()))
    return lines


def draw(results, impls, tasks, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    colors = {"torch": "tab:gray", "torch-bf16": "silver", "jax-float32": "tab:blue",
              "jax-bfloat16": "tab:green"}
    for ax, task in zip(axes[0], tasks):
        vals = [results[(i, task)]["seconds"] for i in impls]
        ax.bar(impls, vals, color=[colors[i] for i in impls])
        ax.set_title(task)
        ax.set_ylabel("seconds (lower is better)")
        ax.tick_params(axis="x", labelrotation=30)
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom")
    fig.suptitle(", ".join(sorted({r["device"] for r in results.values()} - {"failed"})))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=os.path.join(REPO, "assets", "truck.jpg"))
    ap.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-png", default=None, help="also draw the table as a bar chart")
    ap.add_argument("--out-json", default=None, help="also write every measurement as JSON")
    ap.add_argument("--skip-bf16", action="store_true", help="no bfloat16 sides")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help=f"comma-separated subset of {','.join(TASKS)} (default: "
                         f"{','.join(DEFAULT_TASKS)})")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    impls = torch_sides() + ["jax-float32", "jax-bfloat16"]
    if args.skip_bf16:
        impls = [i for i in impls if "bf" not in i]
    results = {}
    for task in tasks:
        for impl in impls:
            results[(impl, task)] = r = measure(impl, task, args)
            print(f"  measured {impl:13s} {task:9s} {r['seconds']:.4f} s on {r['device']}",
                  file=sys.stderr, flush=True)
    print("\n" + "\n".join(table(results, impls, tasks, args.model, args.repeats)))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump([dict(impl=i, task=t, **r) for (i, t), r in results.items()], f, indent=1)
    if args.out_png:
        draw(results, impls, tasks, args.out_png)
        print(f"chart written to {args.out_png}")


if __name__ == "__main__":
    main()
