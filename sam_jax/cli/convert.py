"""`sam-jax convert CHECKPOINT OUT_DIR`: an official .pth or Hugging Face .safetensors checkpoint
into a directory (config.json + Orbax variables) that loads quickly (sam_jax.checkpoints)."""

from __future__ import annotations

import os
import time

from .common import MODEL_TYPE_CHOICES, CliError, info


def add_parser(sub) -> None:
    conv = sub.add_parser(
        "convert", help="convert an official .pth or Hugging Face .safetensors checkpoint into a "
        "directory (config.json + Orbax variables)",
        description="Convert an official SAM .pth (or Hugging Face SamModel .safetensors / .bin) "
        "into a directory that `sam-jax segment --checkpoint` and sam_jax.load read quickly.")
    conv.add_argument("checkpoint", help=".pth/.pt/.bin or .safetensors file")
    conv.add_argument("out_dir", help="directory to write (must be absent or empty unless "
                      "--overwrite)")
    conv.add_argument("--model-type", default="auto", choices=MODEL_TYPE_CHOICES,
                      help="model the weights are for (default: detect from the weights)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace a previous conversion in OUT_DIR")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    conv.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from ..checkpoints import CheckpointError, convert_checkpoint, read_config

    if not os.path.isfile(args.checkpoint):
        what = "is a directory, not a checkpoint file" if os.path.isdir(args.checkpoint) \
            else "no such file"
        raise CliError(f"checkpoint {args.checkpoint}: {what}")
    info(args, f"reading {args.checkpoint}")
    start = time.perf_counter()
    try:
        config = convert_checkpoint(args.checkpoint, args.out_dir, model_type=args.model_type,
                                    overwrite=args.overwrite)
        _, extra = read_config(args.out_dir)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {args.out_dir}: {e}") from None
    fmt, _, layout = extra.get("source", "?:?").partition(":")
    layout = layout.split(":", 1)[0]
    enc = config.image_encoder
    print(f"detected: {layout} layout in a {fmt} file; model {extra.get('model_type', '?')} "
          f"(image encoder width {enc.embed_dim}, depth {enc.depth}, input {enc.img_size} px)")
    print(f"wrote {os.path.abspath(args.out_dir)} (config.json + variables/) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0
