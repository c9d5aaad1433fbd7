"""The `sam-jax` command line (no counterpart in the official repository, whose
`scripts/amg.py` only runs the automatic mask generator).

  sam-jax convert CHECKPOINT OUT_DIR [--model-type auto|vit_b|vit_l|vit_h|tiny] [--overwrite]
  sam-jax download vit_b|vit_l|vit_h|facebook/sam-vit-base|...
  sam-jax segment IMAGE [--checkpoint PATH] [--point X,Y[,LABEL]]... [--box X0,Y0,X1,Y1]
                  [--multimask] -o OUT_PREFIX
  sam-jax generate INPUT... [--checkpoint PATH] -o OUT_DIR [generator options] [--visualize]
  sam-jax train --config CONFIG [KEY=VALUE ...]

Without --checkpoint, segment and generate use the model bundled in the package
(sam_jax/weights/sam_dinov2_s: a pretrained DINOv2 ViT-S/14 backbone with SAM's prompt encoder
and mask decoder trained here on real photos; see README, "The bundled model").

`segment` writes OUT_PREFIX.png (the chosen mask, 0/255 grayscale), OUT_PREFIX_overlay.png
(the mask over the image) and OUT_PREFIX.json (scores, chosen index, image size, prompt,
checkpoint). The chosen mask is the one with the highest predicted IoU.

Output streams: progress and notes go to stderr, the final summary to stdout. Every failure is
reported as `sam-jax: error: <reason>` on stderr, never as a traceback (set SAM_JAX_DEBUG=1 to
see one for an unexpected internal error). Exit status: 0 success, 2 a bad command line (syntax,
a label other than 0/1, no prompt, a prompt outside the image), 1 anything else (missing or
unreadable image or checkpoint, a checkpoint of the wrong kind, a failed write).

Layout: one module per command (`convert.py`, `segment.py`, `generate.py`, `train.py`), each
importing only `common.py` (the shared pieces) and library modules, never another command;
this module composes them into one parser and reports their errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import convert, download, generate, segment, train
from .common import PROG, CliError

_MAX_DETAIL_LINES = 12


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error becomes a CliError (one line, exit 2) instead of the
    usage block + `prog: error:` that argparse prints itself."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog[len(PROG):].strip()
        hint = f" (see '{self.prog} --help')"
        raise CliError(f"{where + ': ' if where else ''}{message}{hint}", status=2)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Segment Anything in JAX: convert checkpoints, "
                     "segment images from prompts, generate SA-1B annotations.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # one module per command, each knowing only .common; their order is the order in --help
    for command in (convert, download, segment, generate, train):
        command.add_parser(sub)
    return parser


# ---- entry point -----------------------------------------------------------------------

def _report(message: str) -> None:
    """The first line as the error; further lines (e.g. a list of checkpoint keys), capped."""
    lines = message.strip().splitlines() or ["unknown error"]
    print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
    rest = lines[1:]
    for line in rest[:_MAX_DETAIL_LINES]:
        print(f"  {line}", file=sys.stderr)
    if len(rest) > _MAX_DETAIL_LINES:
        print(f"  ... ({len(rest) - _MAX_DETAIL_LINES} more lines)", file=sys.stderr)
    sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status (never raises for bad input)."""
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
        from ..utils.host_memory import keep_freed_host_memory
        keep_freed_host_memory()  # this process is ours: reuse freed memory (XLA:CPU speed)
        return args.run(args)
    except CliError as e:
        _report(str(e))
        return e.status
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: still one line unless debugging
        if os.environ.get("SAM_JAX_DEBUG"):
            raise
        _report(f"internal error: {type(e).__name__}: {e} (rerun with SAM_JAX_DEBUG=1 for "
                "the traceback)")
        return 1
