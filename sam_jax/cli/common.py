"""What every `sam-jax` subcommand shares: the program name, the error type reported as one
line, progress messages, and loading the model a command runs on. The subcommand modules
(`convert`, `segment`, `generate`, `train`) import this; none imports another."""

from __future__ import annotations

import os
import sys

PROG = "sam-jax"
MODEL_TYPE_CHOICES = ("auto", "vit_b", "vit_l", "vit_h", "tiny")


class CliError(Exception):
    """A failure to report as one `sam-jax: error:` line; `status` is the exit code."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def info(args, message: str) -> None:
    """A progress line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


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
    """The model of --checkpoint / --model-type, with load failures as CliErrors."""
    from .. import load
    from ..checkpoints import CheckpointError

    from ..hub import HubError

    path = check_checkpoint(args)
    named = not os.path.exists(path)
    info(args, f"loading checkpoint {path}" + (" (official weights by name: downloaded and "
                                               "converted once, then cached)"
                                               if named and not os.path.exists(path) else ""))
    try:
        return load(path, model_type=args.model_type)
    except HubError as e:  # a failed download: its message says what to fetch and where
        raise CliError(str(e)) from None
    except CheckpointError as e:
        raise CliError(str(e)) from None
    except (OSError, ValueError) as e:  # e.g. an Orbax directory with damaged files
        raise CliError(f"checkpoint {path}: cannot load ({type(e).__name__}: {e})") from None
