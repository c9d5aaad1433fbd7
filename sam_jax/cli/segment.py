"""`sam-jax segment IMAGE`: a mask from point and/or box prompts, written as OUT_PREFIX.png,
OUT_PREFIX_overlay.png and OUT_PREFIX.json (see sam_jax/cli/__init__.py for their contents)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Tuple

from .common import MODEL_TYPE_CHOICES, PROG, CliError, check_checkpoint, info, load_model


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {spec!r}: {text.strip()!r} is not a "
                                         "number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid {what} {spec!r}: {text.strip()!r} is not "
                                         "finite")
    return value


def parse_point(spec: str) -> Tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' -> (x, y, label); label 1 (foreground, default) or 0."""
    parts = spec.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"invalid point {spec!r}: expected X,Y or X,Y,LABEL "
                                         f"(got {len(parts)} comma-separated values)")
    x, y = (_number(p, "point", spec) for p in parts[:2])
    label = 1
    if len(parts) == 3:
        text = parts[2].strip()
        if text not in ("0", "1"):
            raise argparse.ArgumentTypeError(
                f"invalid point {spec!r}: label must be 1 (foreground) or 0 (background), "
                f"got {text!r}")
        label = int(text)
    return x, y, label


def parse_box(spec: str) -> Tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' (top-left, bottom-right) -> a tuple of 4 floats."""
    parts = spec.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"invalid box {spec!r}: expected X0,Y0,X1,Y1 "
                                         f"(got {len(parts)} comma-separated values)")
    x0, y0, x1, y1 = (_number(p, "box", spec) for p in parts)
    if not (x0 < x1 and y0 < y1):
        raise argparse.ArgumentTypeError(f"invalid box {spec!r}: need X0 < X1 and Y0 < Y1 "
                                         "(top-left corner, then bottom-right)")
    return x0, y0, x1, y1


def add_parser(sub) -> None:
    seg = sub.add_parser(
        "segment", help="segment an image from point and/or box prompts",
        description="Predict a mask for IMAGE from point and/or box prompts (pixel "
        "coordinates of the image as displayed, after EXIF orientation) and write "
        "OUT_PREFIX.png, OUT_PREFIX_overlay.png and OUT_PREFIX.json.")
    seg.add_argument("image", help="image file (anything PIL reads)")
    seg.add_argument("--checkpoint", metavar="PATH",
                     help="official .pth, HF .safetensors (or its folder), or a directory "
                     "written by `sam-jax convert` (default: the model bundled with "
                     "sam-jax; see README)")
    seg.add_argument("--model-type", default="auto", choices=MODEL_TYPE_CHOICES,
                     help="model of a .pth/.safetensors checkpoint (default: detect; a "
                     "converted directory carries its own)")
    seg.add_argument("--point", action="append", type=parse_point, default=[],
                     metavar="X,Y[,LABEL]", help="a prompt point in pixels; LABEL 1 = "
                     "foreground (default), 0 = background. Repeat for several points.")
    seg.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1",
                     help="a prompt box in pixels (top-left, bottom-right)")
    seg.add_argument("--multimask", action="store_true",
                     help="predict 3 candidate masks and keep the best-scoring one (advised "
                     "for a single point)")
    seg.add_argument("-o", "--output", required=True, metavar="OUT_PREFIX",
                     help="output path prefix, e.g. out/truck -> out/truck.png, "
                     "out/truck_overlay.png, out/truck.json")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    seg.set_defaults(run=run_segment)


def _output_paths(prefix: str) -> Tuple[str, str, str]:
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise CliError(f"-o {prefix!r}: must be a file prefix such as out/truck, not a "
                       "directory", status=2)
    return prefix + ".png", prefix + "_overlay.png", prefix + ".json"


def _check_prompt_inside(points, box, width: int, height: int) -> None:
    """Same bounds as SamPredictor: x in [0, width], y in [0, height]."""
    def inside(x, y):
        return 0 <= x <= width and 0 <= y <= height

    for x, y, _ in points:
        if not inside(x, y):
            raise CliError(f"point {x:g},{y:g} lies outside the {width}x{height} image "
                           f"(x in [0, {width}], y in [0, {height}])", status=2)
    if box is not None and not (inside(box[0], box[1]) and inside(box[2], box[3])):
        raise CliError(f"box {','.join(f'{v:g}' for v in box)} is not inside the "
                       f"{width}x{height} image (x in [0, {width}], y in [0, {height}])",
                       status=2)


def _model_name(config) -> str:
    """The preset a config equals ("vit_b", ..., "tiny", "mini", "dinov2_s"), else "custom"."""
    from ..configs import get_config

    for name in MODEL_TYPE_CHOICES[1:] + ("mini", "dinov2_s"):
        if get_config(name) == config:
            return name
    return "custom"


def run_segment(args) -> int:
    import numpy as np

    from ..predictor import SamPredictor
    from ..utils.image_io import ImageError, draw_overlay, load_image, save_mask_png

    if not args.point and args.box is None:
        raise CliError("segment: give at least one --point X,Y[,LABEL] or a --box "
                       "X0,Y0,X1,Y1 (see 'sam-jax segment --help')", status=2)
    mask_path, overlay_path, json_path = _output_paths(args.output)
    check_checkpoint(args)  # fail before the image is decoded

    try:
        image, notes = load_image(args.image)
    except ImageError as e:
        raise CliError(str(e)) from None
    height, width = image.shape[:2]
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    _check_prompt_inside(args.point, args.box, width, height)

    model = load_model(args)
    predictor = SamPredictor(model)
    info(args, f"embedding the {width}x{height} image")
    start = time.perf_counter()
    predictor.set_image(image)
    points = np.asarray([[x, y] for x, y, _ in args.point], np.float64) if args.point else None
    labels = np.asarray([label for _, _, label in args.point], np.int32) if args.point else None
    box = np.asarray(args.box, np.float64) if args.box is not None else None
    try:
        masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                             multimask_output=args.multimask)
    except ValueError as e:  # the predictor's own prompt checks (not expected after ours)
        raise CliError(f"bad prompt: {e}", status=2) from None
    info(args, f"predicted {len(scores)} mask(s) in {time.perf_counter() - start:.1f} s")
    chosen = int(np.argmax(scores))
    mask = masks[chosen]

    parent = os.path.dirname(os.path.abspath(args.output))
    try:
        os.makedirs(parent, exist_ok=True)
        save_mask_png(mask, mask_path)
        draw_overlay(image, mask, overlay_path, points=args.point, box=args.box)
        record = {
            "image": args.image,
            "image_size": {"width": width, "height": height},
            "checkpoint": args.checkpoint,
            "model_type": _model_name(model.config),
            "multimask": bool(args.multimask),
            "prompt": {"points": [{"x": x, "y": y, "label": label}
                                  for x, y, label in args.point],
                       "box": list(args.box) if args.box is not None else None},
            "scores": [float(s) for s in scores],
            "chosen_index": chosen,
            "mask_area": int(mask.sum()),
            "outputs": {"mask": mask_path, "overlay": overlay_path, "json": json_path},
            "notes": notes,
        }
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise CliError(f"cannot write the outputs under {parent}: {e}") from None

    print(f"scores: {', '.join(f'{s:.4f}' for s in scores)} (chosen: {chosen})")
    print(f"mask: {mask_path}")
    print(f"overlay: {overlay_path}")
    print(f"json: {json_path}")
    return 0
