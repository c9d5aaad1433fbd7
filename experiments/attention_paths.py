"""The image encoder's attention implementations weighed against each other on this device:
time per batch and distance from a float32 reference, per implementation and compute dtype.

    python experiments/attention_paths.py [--model vit_h] [--batches 1,8] [--repeats 10]
        [--impls chunked,xla,cudnn,pallas] [--dtypes float32,bfloat16] [--out-json PATH]

The reference is the "xla" path at float32 with `jax_default_matmul_precision=highest` (exact
float32 matmuls; the parity tests tie every path to the official model on CPU). Each row says
how far an implementation's embedding is from it (max abs difference over the max abs value)
and how long a batch takes (median of `--repeats` after a compile and a warm-up), with
images/s. Implementations that do not apply on this backend (cuDNN off NVIDIA GPUs or below
bf16/fp16, Pallas off GPU/TPU) are skipped with the reason. Random weights: speed and numerics
do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def applicable(impl: str, dtype: str, platform: str) -> str | None:
    """Why `impl` cannot run here, or None."""
    if impl == "cudnn" and platform != "gpu":
        return "cuDNN needs an NVIDIA GPU"
    if impl == "cudnn" and dtype == "float32":
        return "cuDNN's fused attention takes bf16/fp16 only"
    if impl == "pallas" and platform not in ("gpu", "tpu"):
        return "Pallas kernels run compiled on GPU/TPU only (interpret mode is for tests)"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_h", choices=("vit_b", "vit_l", "vit_h"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--impls", default="chunked,xla,cudnn,pallas")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()

    import jax
    import numpy as np
    import sam_jax
    from sam_jax import inference
    from sam_jax.modeling import rel_pos_attention as rpa

    device = jax.devices()[0]
    platform = device.platform
    base = sam_jax.get_config(args.model)
    head_dim = base.image_encoder.embed_dim // base.image_encoder.num_heads
    variables = sam_jax.init_variables(base, jax.random.key(0))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = jax.device_put(np.random.default_rng(0).normal(
            size=(batch, 1024, 1024, 3)).astype(np.float32))
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(inference.embed_images(
                variables, x, config=base.replace(attention_impl="xla")))
        scale = float(np.abs(ref).max())
        for dtype in args.dtypes.split(","):
            for impl in args.impls.split(","):
                cfg = base.replace(compute_dtype=dtype, attention_impl=impl)
                why = applicable(impl, dtype, platform)
                if why:
                    rows.append(dict(batch=batch, dtype=dtype, impl=impl, skipped=why))
                    continue

                def run():
                    return inference.embed_images(variables, x, config=cfg).block_until_ready()

                try:
                    t0 = time.perf_counter()
                    out = np.asarray(run())
                    compile_s = time.perf_counter() - t0
                    run()
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        run()
                        times.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 (a kernel that refuses a shape is a row)
                    rows.append(dict(batch=batch, dtype=dtype, impl=impl,
                                     skipped=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                    continue
                seconds = statistics.median(times)
                rows.append(dict(batch=batch, dtype=dtype, impl=impl, seconds=seconds,
                                 images_per_s=batch / seconds, compile_s=compile_s,
                                 rel_err=float(np.abs(out - ref).max()) / scale))
                print(f"  {args.model} batch {batch} {dtype:8s} {impl:8s} "
                      f"{seconds * 1e3:8.1f} ms  rel err {rows[-1]['rel_err']:.2e}", flush=True)
    print(f"\n{args.model} image encoder on {platform}: {device.device_kind}; median of "
          f"{args.repeats}; error: max |embedding - float32 'xla' at highest precision| / "
          f"max |reference|; 'auto' here picks, at batch 1: " + ", ".join(
              f"{d} -> {rpa.resolve_impl('auto', d, head_dim, (64, 64))}"
              for d in args.dtypes.split(",")) + " (global blocks)\n")
    print("| batch | dtype | attention | ms / batch | images/s | rel. error | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['batch']} | {r['dtype']} | {r['impl']} | - | - | {r['skipped']} | |")
        else:
            print(f"| {r['batch']} | {r['dtype']} | {r['impl']} | {r['seconds'] * 1e3:.1f} | "
                  f"{r['images_per_s']:.1f} | {r['rel_err']:.1e} | {r['compile_s']:.1f} |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(dict(model=args.model, device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
