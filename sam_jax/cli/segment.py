"""`sam-jax segment IMAGE_OR_FOLDER...`: masks from point and/or box prompts.

One image file: -o is a path prefix (OUT_PREFIX.png, OUT_PREFIX_overlay.png, OUT_PREFIX.json).
Several images or a folder: -o is a folder and each image is written as OUT_DIR/<stem>.png,
<stem>_overlay.png, <stem>.json, with the same prompts for every image. The model is loaded
once for all images. Prompt rules and file contents: see sam_jax/cli/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

from .common import (MODEL_TYPE_CHOICES, PROG, CliError, add_compute_dtype,
                     add_mirror_average, check_checkpoint, check_distinct_outputs,
                     collect_images, ensure_writable_dir, info, load_model, model_name, warn)

Point = Tuple[float, float, int]
Box = Tuple[float, float, float, float]


class Prompt(NamedTuple):
    """One prompt: any number of points and at most one box; it gives one mask."""
    points: Tuple[Point, ...]
    box: Optional[Box]


class Outputs(NamedTuple):
    """The files written for one image (`candidates` only with --save-all)."""
    masks: List[str]                        # the chosen mask of each prompt
    overlay: str
    json: str
    candidates: Optional[List[List[str]]]   # per prompt, every candidate mask

    def files(self) -> List[str]:
        return self.masks + [self.overlay, self.json] + \
            [p for per_prompt in self.candidates or () for p in per_prompt]


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


def parse_point(spec: str) -> Point:
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


def parse_box(spec: str) -> Box:
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


def parse_prompt(spec: str) -> Prompt:
    """'box=X0,Y0,X1,Y1/point=X,Y[,LABEL]/...' -> one prompt (at most one box, any points,
    in any order)."""
    points: List[Point] = []
    box = None
    for part in spec.split("/"):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in ("box", "point"):
            raise argparse.ArgumentTypeError(
                f"invalid prompt {spec!r}: each '/'-separated part must be box=X0,Y0,X1,Y1 or "
                f"point=X,Y[,LABEL], got {part!r}")
        if kind == "box":
            if box is not None:
                raise argparse.ArgumentTypeError(
                    f"invalid prompt {spec!r}: one box per prompt (give each box its own "
                    "--prompt)")
            box = parse_box(value)
        else:
            points.append(parse_point(value))
    return Prompt(tuple(points), box)


PROMPT_RULES = """\
prompts: every prompt gives one mask; prompts of one shape (number of points, box or not) are
decoded together in one batched call, so several boxes are one call.
  --point and --box flags:  the --point flags (any number) and one --box make ONE prompt;
                            several --box flags (and no --point) are one prompt EACH;
                            --point together with several --box flags is refused (which box
                            would a point belong to?): use --prompt.
  --prompt GROUP:           one prompt per --prompt flag (repeat it for more), GROUP being
                            '/'-separated parts, at most one box:
                            --prompt box=X0,Y0,X1,Y1/point=X,Y/point=X,Y,0
                            --prompt cannot be mixed with --point/--box.
Coordinates are pixels of the image as displayed (after EXIF orientation); with several
images the same prompts are used for each.

outputs (OUT = OUT_PREFIX for one image file; OUT_DIR/<stem> for several images or a folder):
  one prompt:    OUT.png (the chosen mask), OUT_overlay.png, OUT.json
  N prompts:     OUT_prompt0.png ... OUT_prompt<N-1>.png, OUT_overlay.png (all), OUT.json
  --save-all:    also every candidate: OUT_candidate<j>.png (one prompt) or
                 OUT_prompt<i>_candidate<j>.png, with their scores in OUT.json
The chosen mask of a prompt is its candidate with the highest predicted IoU."""


def add_parser(sub) -> None:
    seg = sub.add_parser(
        "segment", help="segment images from point and/or box prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict masks for images from point and/or box prompts and write the "
        "masks, an overlay and a JSON record per image.", epilog=PROMPT_RULES)
    seg.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                     help="image file(s) (anything PIL reads) or folders (their image files, "
                     "sorted, not recursive)")
    seg.add_argument("--checkpoint", metavar="PATH",
                     help="official .pth, HF .safetensors (or its folder), or a directory "
                     "written by `sam-jax convert` (default: the model bundled with "
                     "sam-jax; see README)")
    seg.add_argument("--model-type", default="auto", choices=MODEL_TYPE_CHOICES,
                     help="model of a .pth/.safetensors checkpoint (default: detect; a "
                     "converted directory carries its own)")
    seg.add_argument("--point", action="append", type=parse_point, default=[],
                     metavar="X,Y[,LABEL]", help="a prompt point in pixels; LABEL 1 = "
                     "foreground (default), 0 = background. Repeat for several points (all "
                     "in one prompt).")
    seg.add_argument("--box", action="append", type=parse_box, default=[],
                     metavar="X0,Y0,X1,Y1", help="a prompt box in pixels (top-left, "
                     "bottom-right); repeat for several prompts, one mask per box")
    seg.add_argument("--prompt", action="append", type=parse_prompt, default=[],
                     metavar="GROUP", help="one prompt of a box and/or points: "
                     "box=X0,Y0,X1,Y1/point=X,Y[,LABEL]/...; repeat for several prompts")
    seg.add_argument("--multimask", action="store_true",
                     help="predict 3 candidate masks per prompt and keep the best-scoring one "
                     "(advised for a single point)")
    seg.add_argument("--save-all", action="store_true",
                     help="also write every candidate mask (3 with --multimask, else 1) with "
                     "its score in the JSON")
    add_compute_dtype(seg)
    add_mirror_average(seg)
    seg.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="one image file: a path prefix, e.g. out/truck -> out/truck.png, "
                     "out/truck_overlay.png, out/truck.json; several images or a folder: "
                     "a folder (created if needed) for <stem>.png, <stem>_overlay.png, "
                     "<stem>.json")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    seg.set_defaults(run=run_segment)


def prompts_of(args) -> List[Prompt]:
    """The prompts of the command line, by the rules in PROMPT_RULES."""
    if args.prompt:
        if args.point or args.box:
            raise CliError("segment: give prompts either as --prompt groups or as --point/--box "
                           "flags, not both", status=2)
        return list(args.prompt)
    if not args.point and not args.box:
        raise CliError("segment: give at least one --point X,Y[,LABEL], a --box X0,Y0,X1,Y1 "
                       "or a --prompt GROUP (see 'sam-jax segment --help')", status=2)
    if len(args.box) > 1:
        if args.point:
            raise CliError(f"segment: {len(args.point)} --point with {len(args.box)} --box "
                           "flags is ambiguous (several boxes are one prompt each; which one "
                           "would a point belong to?): give each prompt as --prompt "
                           "box=X0,Y0,X1,Y1/point=X,Y[,LABEL]", status=2)
        return [Prompt((), box) for box in args.box]
    return [Prompt(tuple(args.point), args.box[0] if args.box else None)]


def _outputs(prefix: str, num_prompts: int, num_candidates: int, save_all: bool) -> Outputs:
    if num_prompts == 1:
        masks = [prefix + ".png"]
        names = [prefix]
    else:
        masks = [f"{prefix}_prompt{i}.png" for i in range(num_prompts)]
        names = [f"{prefix}_prompt{i}" for i in range(num_prompts)]
    candidates = [[f"{name}_candidate{j}.png" for j in range(num_candidates)]
                  for name in names] if save_all else None
    return Outputs(masks, prefix + "_overlay.png", prefix + ".json", candidates)


def _check_prefix(prefix: str) -> None:
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise CliError(f"-o {prefix!r}: must be a file prefix such as out/truck, not a "
                       "directory", status=2)


def _check_prompts_inside(prompts: Sequence[Prompt], width: int, height: int) -> None:
    """Same bounds as SamPredictor: x in [0, width], y in [0, height]."""
    def inside(x, y):
        return 0 <= x <= width and 0 <= y <= height

    for prompt in prompts:
        for x, y, _ in prompt.points:
            if not inside(x, y):
                raise CliError(f"point {x:g},{y:g} lies outside the {width}x{height} image "
                               f"(x in [0, {width}], y in [0, {height}])", status=2)
        box = prompt.box
        if box is not None and not (inside(box[0], box[1]) and inside(box[2], box[3])):
            raise CliError(f"box {','.join(f'{v:g}' for v in box)} is not inside the "
                           f"{width}x{height} image (x in [0, {width}], y in [0, {height}])",
                           status=2)


def _predict(predictor, prompts: Sequence[Prompt], multimask: bool):
    """[(masks (C, H, W) bool, scores (C,))] per prompt. Prompts of one shape (number of
    points, box or not) are decoded together in one `predict_batch` call: with the usual
    prompts (several boxes, or one prompt) that is one call for all."""
    import numpy as np

    groups: dict = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault((len(prompt.points), prompt.box is not None), []).append(i)
    results: list = [None] * len(prompts)
    for (num_points, has_box), members in groups.items():
        coords = labels = boxes = None
        if num_points:
            coords = np.asarray([[(x, y) for x, y, _ in prompts[i].points] for i in members],
                                np.float64)
            labels = np.asarray([[label for _, _, label in prompts[i].points]
                                 for i in members], np.int32)
        if has_box:
            boxes = np.asarray([prompts[i].box for i in members], np.float64)
        try:
            masks, scores, _ = predictor.predict_batch(coords, labels, boxes,
                                                       multimask_output=multimask)
        except ValueError as e:  # the predictor's own prompt checks (not expected after ours)
            raise CliError(f"bad prompt: {e}", status=2) from None
        for k, i in enumerate(members):
            results[i] = (masks[k], scores[k])
    return results


_COLORS = ((30, 144, 255), (255, 99, 71), (50, 205, 50), (238, 130, 238), (255, 165, 0),
           (0, 206, 209), (255, 215, 0), (139, 69, 19))


def _draw_prompts(image, masks, prompts: Sequence[Prompt], path: str) -> None:
    """The overlay for several prompts: each chosen mask tinted and outlined in its own color
    (cycling through 8), then every box and point on top, as `draw_overlay` does for one."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    h, w = image.shape[:2]
    out = image.astype(np.float32)
    thickness = max(1, round(min(h, w) / 400))
    for i, mask in enumerate(masks):
        color = np.asarray(_COLORS[i % len(_COLORS)], np.float32)
        mask = np.asarray(mask, bool)
        out[mask] = out[mask] * 0.5 + color * 0.5
        eroded = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(
            ImageFilter.MinFilter(2 * thickness + 1))) > 0
        out[mask & ~eroded] = color
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(min(h, w) / 100))
    for i, prompt in enumerate(prompts):
        if prompt.box is not None:
            draw.rectangle([float(v) for v in prompt.box], outline=_COLORS[i % len(_COLORS)],
                           width=2 * thickness)
        for x, y, label in prompt.points:
            fill = (0, 200, 0) if label == 1 else (230, 0, 0)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill,
                         outline=(255, 255, 255), width=max(1, radius // 4))
    canvas.save(path, format="PNG")


def _prompt_record(prompt: Prompt) -> dict:
    return {"points": [{"x": x, "y": y, "label": label} for x, y, label in prompt.points],
            "box": list(prompt.box) if prompt.box is not None else None}


def _segment_image(args, predictor, image, image_path: str, notes, prompts, out: Outputs,
                   model_type: str, where: str) -> List[Tuple[List[float], int]]:
    """Predicts, writes `out`; returns (scores, chosen index) per prompt."""
    import numpy as np

    from ..utils.image_io import draw_overlay, save_mask_png

    height, width = image.shape[:2]
    info(args, f"{where}embedding the {width}x{height} image")
    start = time.perf_counter()
    predictor.set_image(image)
    results = _predict(predictor, prompts, args.multimask)
    info(args, f"{where}predicted {sum(len(s) for _, s in results)} mask(s) in "
         f"{time.perf_counter() - start:.1f} s")
    chosen = [int(np.argmax(scores)) for _, scores in results]

    per_prompt = []
    try:
        for i, ((masks, scores), c) in enumerate(zip(results, chosen)):
            save_mask_png(masks[c], out.masks[i])
            entry = {"scores": [float(s) for s in scores], "chosen_index": c,
                     "mask_area": int(masks[c].sum())}
            if out.candidates is not None:
                entry["candidates"] = []
                for j, path in enumerate(out.candidates[i]):
                    save_mask_png(masks[j], path)
                    entry["candidates"].append({"index": j, "score": float(scores[j]),
                                                "mask_area": int(masks[j].sum()),
                                                "mask": path})
            per_prompt.append(entry)
        if len(prompts) == 1:
            draw_overlay(image, results[0][0][chosen[0]], out.overlay,
                         points=prompts[0].points, box=prompts[0].box)
        else:
            _draw_prompts(image, [m[c] for (m, _), c in zip(results, chosen)], prompts,
                          out.overlay)
        record = {
            "image": image_path,
            "image_size": {"width": width, "height": height},
            "checkpoint": args.checkpoint,
            "model_type": model_type,
            "compute_dtype": args.compute_dtype,
            "mirror_average": bool(args.mirror_average),
            "multimask": bool(args.multimask),
        }
        if len(prompts) == 1:  # the one-prompt layout: the prompt's fields at the top
            record["prompt"] = _prompt_record(prompts[0])
            record.update(per_prompt[0])
            record["outputs"] = {"mask": out.masks[0], "overlay": out.overlay,
                                 "json": out.json}
        else:
            record["prompts"] = [dict(prompt=_prompt_record(p), mask=path, **entry)
                                 for p, path, entry in zip(prompts, out.masks, per_prompt)]
            record["outputs"] = {"masks": out.masks, "overlay": out.overlay, "json": out.json}
        record["notes"] = notes
        with open(out.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise CliError(f"cannot write the outputs of {image_path}: {e}") from None
    return [([float(s) for s in scores], c) for (_, scores), c in zip(results, chosen)]


def run_segment(args) -> int:
    from ..predictor import SamPredictor
    from ..utils.image_io import ImageError, load_image

    prompts = prompts_of(args)
    num_candidates = 3 if args.multimask else 1
    several = len(args.inputs) > 1 or any(os.path.isdir(p) for p in args.inputs)
    if several:
        images = collect_images(args.inputs)
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CliError(f"-o {args.output}: with several images (or a folder) -o is the "
                           "output folder, and this is a file", status=2)
        plan = {image: _outputs(os.path.join(args.output,
                                             os.path.splitext(os.path.basename(image))[0]),
                                len(prompts), num_candidates, args.save_all)
                for image in images}
        check_distinct_outputs({image: out.files() for image, out in plan.items()})
        out_dir = args.output
    else:
        images = list(args.inputs)
        _check_prefix(args.output)
        plan = {images[0]: _outputs(args.output, len(prompts), num_candidates, args.save_all)}
        out_dir = os.path.dirname(os.path.abspath(args.output))
    check_checkpoint(args)  # fail before any image is decoded
    ensure_writable_dir(out_dir)

    model = predictor = model_type = None
    skipped, start = [], time.perf_counter()
    for image_path in images:
        where = f"{image_path}: " if several else ""
        try:
            image, notes = load_image(image_path)
            height, width = image.shape[:2]
            _check_prompts_inside(prompts, width, height)
        except (ImageError, CliError) as e:
            if not several:  # one image: its error is the command's (exit 2 for a prompt)
                raise CliError(str(e), status=getattr(e, "status", 1)) from None
            warn(f"skipping an image: {e}" if str(e).startswith(image_path)
                 else f"skipping {image_path}: {e}")
            skipped.append(image_path)
            continue
        for note in notes:
            print(f"{PROG}: note: {where}{note}", file=sys.stderr, flush=True)
        if model is None:  # once, for all images
            model = load_model(args)
            model_type = model_name(model.config)
            predictor = SamPredictor(model)
        out = plan[image_path]
        found = _segment_image(args, predictor, image, image_path, notes, prompts, out,
                               model_type, where)
        if several:
            scores = ", ".join(f"{s[c]:.4f}" for s, c in found)
            print(f"{image_path}: {len(found)} mask(s), score(s) {scores} -> {out.json}",
                  flush=True)
        elif len(prompts) == 1:
            scores, c = found[0]
            print(f"scores: {', '.join(f'{s:.4f}' for s in scores)} (chosen: {c})")
            print(f"mask: {out.masks[0]}")
            if out.candidates is not None:
                print(f"candidates: {', '.join(out.candidates[0])}")
            print(f"overlay: {out.overlay}")
            print(f"json: {out.json}")
        else:
            for i, ((scores, c), path) in enumerate(zip(found, out.masks)):
                print(f"prompt {i}: scores: {', '.join(f'{s:.4f}' for s in scores)} "
                      f"(chosen: {c}) -> {path}")
            print(f"overlay: {out.overlay}")
            print(f"json: {out.json}")
    if several:
        done = len(images) - len(skipped)
        print(f"segmented {done} of {len(images)} image(s) into {out_dir} in "
              f"{time.perf_counter() - start:.1f} s"
              + (f"; skipped {len(skipped)} (see the warnings above)" if skipped else ""))
    return 1 if skipped else 0
