"""What every `sam-jax` subcommand shares: the program name, the error type reported as one
line, progress messages, the images a command runs on and the files it writes, and loading
the model. The subcommand modules (`convert`, `segment`, `generate`, `train`) import this; none
imports another."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Dict, List, Sequence

PROG = "sam-jax"
# --model-type names the architecture a .pth/.safetensors file's tensors are read into. Only
# SAM's three (and the test preset) exist as such files; "mini" and "dinov2_s" are models
# trained here, which exist only as converted directories, and those carry their own config.
MODEL_TYPE_CHOICES = ("auto", "vit_b", "vit_l", "vit_h", "tiny")
# Every preset `model_name` can report (the JSON's "model_type").
PRESETS = ("vit_b", "vit_l", "vit_h", "tiny", "mini", "dinov2_s")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
COMPUTE_DTYPES = ("float32", "bfloat16")


class CliError(Exception):
    """A failure to report as one `sam-jax: error:` line; `status` is the exit code."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def info(args, message: str) -> None:
    """A progress line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning on stderr, also with --quiet (something the user should act on)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


# ---- inputs and outputs --------------------------------------------------------------------

def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files and folders (their image files by suffix, sorted, not recursive) -> the
    image paths, each once. A missing path is a usage error (exit 2); a folder without
    images an error (exit 1)."""
    images = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
            if not found:
                raise CliError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this "
                               "folder")
            images.extend(found)
        elif os.path.exists(path):
            images.append(path)
        else:
            raise CliError(f"{path}: no such file or folder", status=2)
    unique: Dict[str, str] = {}
    for path in images:  # the same file named twice (a.jpg, ./a.jpg) is done once
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def check_distinct_outputs(outputs: Dict[str, Sequence[str]]) -> None:
    """`outputs` maps each input image to the files it will write; two images that would
    write the same file are a usage error (exit 2), found before any work."""
    owner: Dict[str, str] = {}
    for image, paths in outputs.items():
        for path in paths:
            key = os.path.abspath(path)
            if key in owner and owner[key] != image:
                raise CliError(f"{owner[key]} and {image} would both be written as "
                               f"{os.path.basename(path)}; rename one or run them separately",
                               status=2)
            owner[key] = image


def ensure_writable_dir(path: str) -> None:
    """Creates folder `path` if needed and checks that a file can be written in it (a probe
    file, deleted again); else a CliError, raised before the model is loaded."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise CliError(f"cannot write to the output folder {path}: {reason}") from None


# ---- the model -----------------------------------------------------------------------------

def add_compute_dtype(parser) -> None:
    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="dtype of the model's matmuls (params stay float32); bfloat16 is "
                        "~1.3x faster on CPU, float32 matches the official model (default)")


def add_mirror_average(parser) -> None:
    parser.add_argument("--mirror-average", action="store_true",
                        help="average the masks over the image and its mirror image "
                        "(SamConfig.mirror_average): steadier outlines for twice the time per "
                        "image and click (README, \"Averaging over the mirror image\")")


def model_name(config) -> str:
    """The preset a config is ("vit_b", ..., "tiny", "mini", "dinov2_s"), else "custom";
    runtime choices (compute dtype, attention implementation, chunk sizes) do not count, nor
    does a mask refiner or an edge stage on top (the bundled dinov2_s has a refiner), keeping
    only clicked components (so does the bundled model), averaging over the mirror image, or
    a DINOv2 encoder's input size (the bundled one runs at 518 px), as in `preset_name`."""
    from ..configs import get_config, weights_neutral

    for name in PRESETS:
        preset = get_config(name)
        runtime = dict(compute_dtype=preset.compute_dtype, attention_impl=preset.attention_impl,
                       attention_chunk_size=preset.attention_chunk_size,
                       decode_group_size=preset.decode_group_size,
                       mask_refiner=preset.mask_refiner,
                       edge_refiner=preset.edge_refiner,
                       keep_clicked_components=preset.keep_clicked_components,
                       mirror_average=preset.mirror_average,
                       image_encoder=weights_neutral(config.image_encoder))
        if config.replace(**runtime) == preset:
            return name
    return "custom"


def resolve_checkpoint(args) -> str:
    """--checkpoint, or the bundled default model when none is given."""
    from .. import DEFAULT_CHECKPOINT  # looked up per call: tests replace it

    if args.checkpoint:
        return args.checkpoint
    if not os.path.isdir(DEFAULT_CHECKPOINT):
        raise CliError("no --checkpoint given and the bundled default model is missing from "
                       f"this install ({DEFAULT_CHECKPOINT}); pass --checkpoint PATH")
    info(args, "no --checkpoint: using the bundled default model (a pretrained DINOv2-S "
         "backbone with SAM's head trained here on 1,462 photos; convert an official "
         "checkpoint for SAM's quality)")
    args.checkpoint = DEFAULT_CHECKPOINT
    return DEFAULT_CHECKPOINT


def check_checkpoint(args) -> str:
    """--checkpoint (or the bundled model) if it exists or names official weights (fetched at
    load); else a CliError, raised before any other work."""
    from ..hub import HF_REPOS, OFFICIAL_CHECKPOINTS

    path = resolve_checkpoint(args)
    if not os.path.exists(path) and path not in OFFICIAL_CHECKPOINTS and path not in HF_REPOS:
        raise CliError(f"checkpoint {path}: no such file or directory (official weights by "
                       f"name: {', '.join(OFFICIAL_CHECKPOINTS)}; see `{PROG} download`)")
    return path


def load_model(args):
    """The model of --checkpoint / --model-type (computing in --compute-dtype where the
    command has that option), with load failures as CliErrors."""
    from .. import load
    from ..checkpoints import CheckpointError

    from ..hub import HubError

    path = check_checkpoint(args)
    named = not os.path.exists(path)
    info(args, f"loading checkpoint {path}" + (" (official weights by name: downloaded and "
                                               "converted once, then cached)"
                                               if named and not os.path.exists(path) else ""))
    try:
        model = load(path, model_type=args.model_type)
    except HubError as e:  # a failed download: its message says what to fetch and where
        raise CliError(str(e)) from None
    except CheckpointError as e:
        raise CliError(str(e)) from None
    except (OSError, ValueError) as e:  # e.g. an Orbax directory with damaged files
        raise CliError(f"checkpoint {path}: cannot load ({type(e).__name__}: {e})") from None
    name = model_name(model.config)
    if args.model_type != "auto" and name != args.model_type and os.path.isdir(path):
        info(args, f"note: --model-type {args.model_type} ignored: {path} is a converted "
             f"directory, which carries its own config ({name})")
    dtype = getattr(args, "compute_dtype", None)
    if dtype and dtype != model.config.compute_dtype:
        import dataclasses
        model = dataclasses.replace(model, config=model.config.replace(compute_dtype=dtype))
    if getattr(args, "mirror_average", False):
        model = model.with_config(mirror_average=True)
    return model
