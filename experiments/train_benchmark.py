"""Speed and memory of one SAM training step, for several model presets.

    python experiments/train_benchmark.py --models tiny,mini,vit_b --batch 8 --masks 1 \
        [--masks-per-model vit_b=16] [--compute-dtype float32|bfloat16] [--remat-blocks] \
        [--steps 3] [--out experiments/results/train_benchmark_cpu]

What is timed is the whole jitted train step of `sam_jax.training.train_step` (the function
`sam-jax train` runs): the image encoder once per image, the 11 interactive decoder rounds for
each of the N masks of every image, the losses, the backward pass and the AdamW update, on a
data-parallel mesh over all local devices. Each model runs in its own child process, so its peak
host RSS is its own and a model that fails (out of memory, say) is reported as failed while the
others still run.

Per model:
  compile s     `lower` + `compile` of the step (the cost of the first call, excluded below)
  step s        median of `--steps` timed steps, after `--warmup` untimed ones
  images/s, masks/s, mask-rounds/s   from the median (a mask-round: one mask's decoder round)
  peak RSS      the child's peak resident host memory (`resource.getrusage`), after timing
  peak dev mem  the device allocator's peak (GPU/TPU only)
  GFLOP/step    XLA's cost analysis of the step with its loops unrolled (see `count_flops`)
  TFLOP/s       GFLOP/step / step s
  MFU           TFLOP/s / (vendor peak per device x devices), GPU/TPU only ("n/a" on CPU)

Inputs are synthetic: random pixels in a random-aspect region of the zero-padded S x S image,
rectangle masks with their boxes. The state comes from `init_variables`; the optimizer is the
"tiny" preset for `tiny` and the paper's preset for the others (the vit_b one for `mini`), its
drop path applied to the encoder as `sam-jax train` does. The optimizer choice barely affects the
step time (layer-wise lr decay and clipping are a few elementwise passes over the parameters).

FLOPs: XLA's `cost_analysis()` counts the body of a loop once, whatever its trip count (checked:
an 11-step `lax.scan` of a matmul reports the flops of one matmul). The step has loops (the 11
decoder rounds are a `lax.scan`; on CPU the encoder's global attention maps over heads and
query chunks with `lax.map`), so the compiled step's count is far too low. `count_flops`
therefore traces the step again with `lax.scan`/`lax.map` fully unrolled and takes the cost analysis of that lowering
(unoptimized HLO, not compiled: compiling it would take far longer; for tiny, the optimized
program's count is ~13% above the unoptimized one's, XLA expanding some ops). The count is taken
with the encoder's "xla" attention (cost analysis cannot see inside the cuDNN/Pallas kernels the
step may use on a GPU/TPU; the math is the same). It counts what is executed, remat
recomputation included, so the "MFU" here is closer to hardware FLOPs
utilisation than to the model FLOPs of the PaLM paper.
The compiled step's own (loop-once) count goes to `--json` as `xla_flops_loops_once`.

MFU peaks are vendor datasheet numbers, dense (no 2:4 sparsity), per device as JAX sees it
(one GPU, one TPU chip), in TFLOP/s:
  H100 SXM / H200   bf16 989, tf32 495 (f32 on CUDA cores: 67)
  H100 PCIe         bf16 756, tf32 378 (f32: 51)
  A100              bf16 312, tf32 156 (f32: 19.5)
  TPU v4 275, v5e 197, v5p 459, v6e 918 (bf16)
With `--compute-dtype float32` the GPU peak is TF32's: JAX's default matmul precision lets XLA
use TF32 tensor cores for float32 dots on Ampere and later (with
`jax_default_matmul_precision=highest` the plain f32 peak is used). TPUs run default-precision
float32 dots as one bf16 pass, so their bf16 peak applies to both. Vendor peaks are not
reachable in practice (clocks, power limits, memory-bound ops), so MFU is a relative measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "train_benchmark_cpu")

# Vendor dense peaks per device, TFLOP/s: (substring of device_kind, bf16, tf32, fp32). The first
# match wins, so the more specific names come first.
PEAKS = (
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100", 989.4, 494.7, 66.9),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4, 494.7, 66.9),
    ("A100", 312.0, 156.0, 19.5),
    ("TPU v4", 275.0, 275.0, 275.0),
    ("TPU v5 lite", 197.0, 197.0, 197.0),  # v5e
    ("TPU v5e", 197.0, 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0, 459.0),
    ("TPU v5", 459.0, 459.0, 459.0),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0, 918.0, 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0, 918.0, 918.0),
)


def peak_tflops(device_kind: str, platform_name: str, compute_dtype: str,
                matmul_precision: str | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, what it is) or (None, why not)."""
    if platform_name == "cpu":
        return None, "cpu"
    for name, bf16, tf32, fp32 in PEAKS:
        if name.lower() in device_kind.lower():
            if compute_dtype == "bfloat16" or platform_name == "tpu":
                return bf16, f"{name} bf16"
            if (matmul_precision or "").lower() in ("highest", "float32"):
                return fp32, f"{name} fp32"
            return tf32, f"{name} tf32"
    return None, f"unknown device {device_kind!r}"


# ----------------------------------------------------------------------------- child process


def synthetic_batch(batch: int, masks: int, size: int, seed: int = 0) -> dict:
    """Random pixels in a random-aspect region (longest side = size, as after ResizeLongestSide),
    zero padding elsewhere; rectangle masks inside that region at size/4, with their XYXY boxes
    (inclusive pixel indexes in the size x size input frame)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    side = size // 4
    image = np.zeros((batch, size, size, 3), np.uint8)
    input_size = np.zeros((batch, 2), np.int32)
    gt = np.zeros((batch, masks, side, side), bool)
    boxes = np.zeros((batch, masks, 4), np.float32)
    for b in range(batch):
        short = int(rng.integers(size // 2, size + 1))
        h, w = (size, short) if rng.random() < 0.5 else (short, size)
        input_size[b] = h, w
        image[b, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lh, lw = max(h // 4, 2), max(w // 4, 2)
        for m in range(masks):
            y0, y1 = np.sort(rng.choice(lh + 1, 2, replace=False))
            x0, x1 = np.sort(rng.choice(lw + 1, 2, replace=False))
            gt[b, m, y0:y1, x0:x1] = True
            boxes[b, m] = 4 * x0, 4 * y0, 4 * x1 - 1, 4 * y1 - 1
    return {"image": image, "input_size": input_size, "masks": gt, "boxes": boxes,
            "mask_valid": np.ones((batch, masks), bool)}


def _cost_flops(cost) -> float | None:
    """The 'flops' of a cost analysis, which JAX returns as a dict, a list of dicts (one per
    computation, older versions) or None."""
    if cost is None:
        return None
    if isinstance(cost, dict):
        cost = [cost]
    total = [c.get("flops") for c in cost if isinstance(c, dict) and c.get("flops") is not None]
    return float(sum(total)) if total else None


def count_flops(step_fn, args) -> float | None:
    """XLA's flop count of `step_fn(*args)` traced with every `lax.scan`/`lax.map` unrolled
    (XLA counts a loop body once, not once per iteration). Lowered, not compiled."""
    import jax

    scan, lmap = jax.lax.scan, jax.lax.map

    def unrolled_scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True, **kw)

    def unrolled_map(f, xs, *, batch_size=None):
        return scan(lambda _, x: ((), f(x)), (), xs, unroll=True)[1]

    jax.clear_caches()  # a trace cached from the real (rolled) step would be reused
    jax.lax.scan, jax.lax.map = unrolled_scan, unrolled_map
    try:
        lowered = jax.jit(step_fn).lower(*args)
    finally:
        jax.lax.scan, jax.lax.map = scan, lmap
    return _cost_flops(lowered.cost_analysis())


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * (1 if sys.platform.startswith("linux") else 1 / 1024) / 2**20


def run_model(args) -> dict:
    import jax
    import numpy as np
    import sam_jax
    from sam_jax.configs import get_config
    from sam_jax.sharding import data_mesh
    from sam_jax.training.optim import PRESETS, make_optimizer
    from sam_jax.training.train_step import (StepConfig, compile_train_step, global_batch,
                                             make_train_step, place_state)
    from tqdm.auto import tqdm

    sam_jax.keep_freed_host_memory()  # as `sam-jax train` does; see utils/host_memory.py
    name = args.model
    cfg = get_config(name).replace(compute_dtype=args.compute_dtype)
    optim = PRESETS["tiny" if name == "tiny" else name if name in PRESETS else "vit_b"]
    encoder = dataclasses.replace(cfg.image_encoder, remat_blocks=args.remat_blocks,
                                  drop_path_rate=optim.drop_path)
    cfg = cfg.replace(image_encoder=encoder)
    step_config = StepConfig(remat_rounds=not args.no_remat_rounds)
    mesh = data_mesh()
    if args.batch % mesh.size:
        raise ValueError(f"batch {args.batch} does not divide by {mesh.size} devices")

    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    params, buffers = variables["params"], variables["buffers"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    optimizer = make_optimizer(optim, params)

    def shape(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    compiled = compile_train_step(cfg, optim, step_config, shape(params), shape(buffers), mesh,
                                  optimizer=optimizer)
    buffers = jax.device_put(buffers, compiled.buffers_sharding)
    state = place_state(params, optimizer, compiled.state_sharding)
    del variables, params
    batch = global_batch(synthetic_batch(args.batch, args.masks, cfg.image_size), mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            (state, batch, buffers))

    t0 = time.perf_counter()
    executable = compiled.step.lower(*abstract).compile()
    compile_s = time.perf_counter() - t0
    loops_once = _cost_flops(executable.cost_analysis())

    for _ in range(args.warmup):
        state, metrics = executable(state, batch, buffers)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in tqdm(range(args.steps), desc=f"{name} steps", unit="step", leave=False):
        t0 = time.perf_counter()
        state, metrics = executable(state, batch, buffers)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(jax.device_get(metrics["loss"]))
    peak_rss = _peak_rss_gib()  # before the flop count below, which traces a larger graph
    dev_stats = jax.local_devices()[0].memory_stats() or {}
    peak_dev = dev_stats.get("peak_bytes_in_use")

    flops = None
    if not args.no_flops:
        # Counted on the "xla" attention path, the same function as the step's: fused
        # attention kernels (cuDNN, Pallas) are custom calls that XLA's cost analysis cannot
        # see into, and the folded path's wider q.k product is not model work.
        counted = cfg.replace(attention_impl="xla")
        fn = make_train_step(counted, optim, step_config, optimizer)
        flops = count_flops(fn, abstract)
    step_s = statistics.median(times)
    return {
        "model": name, "params_m": n_params / 1e6, "image_size": cfg.image_size,
        "batch": args.batch, "masks": args.masks, "compile_s": compile_s, "step_s": step_s,
        "step_times": times, "loss": loss, "peak_rss_gib": peak_rss,
        "peak_device_gib": None if peak_dev is None else peak_dev / 2**30,
        "flops": flops, "xla_flops_loops_once": loops_once,
        "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
    }


def worker(args) -> None:
    """Child process: measure one model, write its result (or its error) as JSON."""
    try:
        result = run_model(args)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other models still run
        lines = str(e).strip().splitlines()
        result = {"model": args.model, "error": f"{type(e).__name__}: "
                                                f"{lines[0] if lines else ''}"[:200]}
        import traceback
        traceback.print_exc()
    with open(args.result_file, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- parent process


def measure(model: str, masks: int, args) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model,
           "--result-file", path, "--batch", str(args.batch), "--masks", str(masks),
           "--compute-dtype", args.compute_dtype, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    cmd += ["--remat-blocks"] * args.remat_blocks + ["--no-remat-rounds"] * args.no_remat_rounds
    cmd += ["--no-flops"] * args.no_flops
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        status = subprocess.call(cmd, cwd=REPO, env=env)
        with open(path) as f:
            text = f.read()
        if text:
            return json.loads(text)
        why = (f"killed by signal {-status}" + (" (out of host memory?)" if status == -9 else "")
               if status < 0 else f"exit status {status}")
        return {"model": model, "error": f"process died: {why}"}
    finally:
        os.unlink(path)


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def table(results: list[dict], args) -> list[str]:
    head = ("| model | params | image | batch x masks | compile s | step s | images/s | masks/s "
            "| mask-rounds/s | peak RSS GiB | peak dev GiB | GFLOP/step | TFLOP/s | MFU |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'].replace('|', '/')} |"
                         + " |" * (head.count(" | ") - 1))
            continue
        step = r["step_s"]
        images = r["batch"] / step
        masks = images * r["masks"]
        tflops = None if r["flops"] is None else r["flops"] / step / 1e12
        peak, _ = peak_tflops(r["device_kind"], r["platform"], args.compute_dtype,
                              _matmul_precision())
        mfu = None if peak is None or tflops is None else tflops / (peak * r["devices"])
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} M | {r['image_size']} | {r['batch']} x "
            f"{r['masks']} | {r['compile_s']:.1f} | {step:.3f} | {images:.2f} | {masks:.2f} | "
            f"{masks * 11:.1f} | {r['peak_rss_gib']:.2f} | {_fmt(r['peak_device_gib'], '.2f')} | "
            f"{_fmt(r['flops'] and r['flops'] / 1e9, '.1f')} | {_fmt(tflops, '.3f')} | "
            f"{_fmt(mfu and 100 * mfu, '.1f')}{'' if mfu is None else ' %'} |")
    return lines


def _matmul_precision() -> str | None:
    import jax
    return jax.config.jax_default_matmul_precision


def draw(results: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    names = [r["model"] for r in ok]
    import textwrap

    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 3 + 1.5 * len(ok)), 4.0))
    for ax, key, label in ((axes[0], "step_s", "step time, s (lower is better)"),
                           (axes[1], "images_s", "images/s (higher is better)")):
        vals = [r["step_s"] if key == "step_s" else r["batch"] / r["step_s"] for r in ok]
        ax.bar(names, vals, color="tab:blue" if key == "step_s" else "tab:green")
        ax.set_ylabel(label)
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom")
    fig.suptitle(textwrap.fill(title, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _masks_per_model(text: str, ap) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            ap.error(f"--masks-per-model: expected MODEL=N[,MODEL=N], got {item!r}")
        out[name.strip()] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--models", default="tiny,mini,vit_b",
                    help="comma-separated presets (tiny, mini, vit_b, vit_l, vit_h)")
    ap.add_argument("--batch", type=int, default=8, help="images per step (global)")
    ap.add_argument("--masks", type=int, default=1, help="masks per image")
    ap.add_argument("--masks-per-model", default="", metavar="MODEL=N,...",
                    help="override --masks for some models, e.g. vit_b=16")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat-blocks", action="store_true",
                    help="recompute encoder block activations in the backward pass")
    ap.add_argument("--no-remat-rounds", action="store_true",
                    help="keep decoder-round activations instead of recomputing them")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    ap.add_argument("--no-flops", action="store_true", help="skip the (unrolled) flop count")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="write the table to <out>.txt and a chart to <out>.png ('' = neither)")
    ap.add_argument("--json", action="store_true",
                    help="also write every measurement (each step's time...) to <out>.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < 1 or args.batch < 1 or args.masks < 1 or args.warmup < 0:
        ap.error("--steps, --batch and --masks must be >= 1, --warmup >= 0")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    per_model = _masks_per_model(args.masks_per_model, ap)
    from sam_jax.configs import get_config
    for m in models + list(per_model):
        try:
            get_config(m)
        except ValueError as e:
            ap.error(str(e))

    import jax  # the parent never touches a device: on a GPU it would take the memory

    settings = (f"compute {args.compute_dtype}, remat blocks "
                f"{'on' if args.remat_blocks else 'off'}, remat rounds "
                f"{'off' if args.no_remat_rounds else 'on'}; median of {args.steps} steps after "
                f"{args.warmup} warm-up")
    print(f"train step benchmark; {settings}", file=sys.stderr)
    results = []
    for model in models:
        masks = per_model.get(model, args.masks)
        print(f"  {model}: batch {args.batch} x {masks} masks ...", file=sys.stderr)
        r = measure(model, masks, args)
        results.append(r)
        print(f"  {model}: " + (f"failed: {r['error']}" if "error" in r else
                                f"{r['step_s']:.3f} s/step, compile {r['compile_s']:.1f} s, "
                                f"peak RSS {r['peak_rss_gib']:.2f} GiB"), file=sys.stderr)

    ok = [r for r in results if "error" not in r]
    kind, plat, n_dev = ((ok[0]["device_kind"], ok[0]["platform"], ok[0]["devices"]) if ok
                         else ("unknown device", "unknown", 0))
    header = (f"train step; {n_dev} x {kind} ({plat}), jax {jax.__version__}, "
              f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
              f"{datetime.date.today().isoformat()}; {settings}")
    peak, what = peak_tflops(kind, plat, args.compute_dtype, _matmul_precision())
    notes = [
        "",
        "11 decoder rounds per mask (mask-rounds/s = masks/s x 11). GFLOP/step: XLA cost "
        "analysis of the step with loops unrolled (remat recomputation included).",
        "MFU: " + (f"against the vendor peak {peak:g} TFLOP/s per device ({what}), dense."
                   if peak else f"n/a ({what})."),
    ]
    lines = [header, ""] + table(results, args) + notes
    print("\n" + "\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        if args.json:
            with open(args.out + ".json", "w") as f:
                json.dump({"header": header, "args": vars(args), "results": results}, f,
                          indent=1)
        draw(results, args.out + ".png", header)
        print(f"\nwritten {args.out}.txt and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
