"""What JAX's persistent compilation cache saves a CLI user: the same `sam-jax segment` command
in fresh processes with the cache off, on but empty (first run), and on and filled (later
runs), each in its own cache folder so nothing from earlier runs leaks in.

    python experiments/cli_startup.py [--checkpoint PATH] [--runs 3] \
        [--out experiments/results/cli_startup_cpu.txt]
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


def run_cli(env: dict, out_prefix: str, checkpoint: str | None) -> float:
    cmd = [sys.executable, "-m", "sam_jax", "segment", TRUCK, "--point", "500,375",
           "--multimask", "-q", "-o", out_prefix]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--runs", type=int, default=3, help="warm runs to take the median of")
    parser.add_argument("--out", default="experiments/results/cli_startup_cpu.txt")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(os.environ)
        base.pop("JAX_COMPILATION_CACHE_DIR", None)
        off = dict(base, SAM_JAX_NO_COMPILATION_CACHE="1")
        on = dict(base, SAM_JAX_CACHE_DIR=os.path.join(tmp, "cache"))
        on.pop("SAM_JAX_NO_COMPILATION_CACHE", None)
        prefix = os.path.join(tmp, "truck")
        cold_off = [run_cli(off, prefix, args.checkpoint) for _ in range(args.runs)]
        first_on = run_cli(on, prefix, args.checkpoint)
        warm_on = [run_cli(on, prefix, args.checkpoint) for _ in range(args.runs)]
    rows.append((f"cache off (median of {args.runs})", float(np.median(cold_off))))
    rows.append(("cache on, empty (first run)", first_on))
    rows.append((f"cache on, filled (median of {args.runs})", float(np.median(warm_on))))
    ratio = rows[0][1] / rows[2][1]
    lines = [f"`sam-jax segment assets/truck.jpg --point 500,375 --multimask`, a fresh process "
             f"each time; checkpoint: {args.checkpoint or 'bundled'}",
             f"machine: {platform.machine()}, {os.cpu_count()} cores", "",
             "| run | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.2f} |" for name, sec in rows]
    lines += ["", f"filled cache vs off: {ratio:.2f}x faster"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
