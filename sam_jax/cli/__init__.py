"""The `sam-jax` command line (no counterpart in the official repository, whose
`scripts/amg.py` only runs the automatic mask generator).

  sam-jax convert CHECKPOINT OUT_DIR [--model-type auto|vit_b|vit_l|vit_h|tiny] [--overwrite]
  sam-jax download vit_b|vit_l|vit_h|facebook/sam-vit-base|...
  sam-jax segment IMAGE_OR_FOLDER... [--checkpoint PATH] [--point X,Y[,LABEL]]...
                  [--box X0,Y0,X1,Y1]... [--prompt box=X0,Y0,X1,Y1/point=X,Y[,LABEL]/...]...
                  [--multimask] [--save-all] [--compute-dtype float32|bfloat16]
                  [--mirror-average] -o OUT
  sam-jax generate INPUT... [--checkpoint PATH] -o OUT_DIR [generator options] [--visualize]
                   [--compute-dtype float32|bfloat16] [--overwrite]
  sam-jax train --config CONFIG [KEY=VALUE ...]
  sam-jax eval points|sizes|edges|edges-benchmark|proposals|instances|stats ...
                  (the paper's experiments; see eval.py)
  sam-jax annotate IMAGES_DIR -o ANNOTATIONS_DIR [--mode manual|semi] [--port N]
  sam-jax annotate --stats ANNOTATIONS_DIR

Without --checkpoint, segment and generate use the model bundled in the package
(sam_jax/weights/sam_dinov2_s: a pretrained DINOv2 ViT-S/14 backbone with SAM's prompt encoder
and mask decoder trained here on real photos; see README, "The bundled model"). --model-type
picks the architecture of a .pth/.safetensors file (SAM's three, and the test preset `tiny`);
the models trained here (`mini`, `dinov2_s`) exist only as converted directories, which carry
their own config, so they are no choices (a --model-type that disagrees with a converted
directory is ignored, with a note).

`segment` prompts: the --point flags and one --box are ONE prompt; several --box flags (without
--point) are one prompt each; --point with several --box is refused as ambiguous; `--prompt
box=.../point=.../point=...` gives one prompt per flag (not mixed with --point/--box). Each
prompt gives one mask; all are decoded in one batched `SamPredictor.predict_batch` call (one
call per distinct prompt shape: number of points, box or not).

`segment` outputs, OUT being -o for one image file (a path prefix) and OUT_DIR/<stem> for
several images or a folder (-o a folder; two inputs with one stem are refused): one prompt:
OUT.png (the chosen mask, 0/255 grayscale), OUT_overlay.png (the mask over the image) and
OUT.json (image, image_size, checkpoint, model_type, compute_dtype, mirror_average, multimask,
prompt, scores, chosen_index, mask_area, outputs, notes); N prompts: OUT_prompt<i>.png per prompt,
OUT_overlay.png with all, and OUT.json with a "prompts" list (prompt, mask, scores,
chosen_index, mask_area per prompt) in place of the one prompt's fields. --save-all also writes
every candidate, OUT_candidate<j>.png (OUT_prompt<i>_candidate<j>.png for N prompts), listed
with its score and area under "candidates". The chosen mask is the one with the highest
predicted IoU. With several images the model is loaded once; an unreadable image, or one the
prompts do not fit in, is reported and skipped (exit status 1 at the end).

`generate` writes OUT_DIR/<stem>.json (SA-1B) with a top-level "sam_jax" record (version,
model_type, options: checkpoint, compute_dtype, generator options) and prints `<image>: N masks`
per image (a warning with a hint when N is 0). It skips an image whose JSON records the same
options, redoes one made with other options, and redoes all with --overwrite.

An output folder that cannot be written is reported before the model is loaded.

Output streams: progress and notes go to stderr, the final summary to stdout. Every failure is
reported as `sam-jax: error: <reason>` on stderr, never as a traceback (set SAM_JAX_DEBUG=1 to
see one for an unexpected internal error). Exit status: 0 success, 2 a bad command line (syntax,
a label other than 0/1, no prompt, a prompt outside the image), 1 anything else (missing or
unreadable image or checkpoint, a checkpoint of the wrong kind, a failed write).

Layout: one module per command (`convert.py`, `segment.py`, `generate.py`, `train.py`,
`eval.py`, `annotate.py`), each
importing only `common.py` (the shared pieces) and library modules, never another command;
this module composes them into one parser and reports their errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import annotate, convert, download, eval as eval_, generate, segment, train
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
    for command in (convert, download, segment, generate, train, eval_, annotate):
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
