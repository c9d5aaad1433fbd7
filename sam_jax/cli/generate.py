"""`sam-jax generate`: the fully automatic data engine over images and folders.

  sam-jax generate INPUT... [--checkpoint PATH] -o OUT_DIR [generator options] [--visualize]
                   [--overwrite]

Writes OUT_DIR/<image stem>.json in SA-1B format (sam_jax/sa1b.py) for every image, plus a
top-level "sam_jax" record of what made it (checkpoint, model type, compute dtype, generator
options; SA-1B readers look only at "image" and "annotations"). An image whose JSON exists,
reads back and records the same options (checkpoint, compute dtype, generator options) is
skipped, so a killed run is resumed by running the same command again, and a run with other
options redoes the images; --overwrite redoes all. Each JSON is written atomically (temporary
file, then rename), so a kill never leaves half a file. An image that cannot be read is
reported and skipped; the others go on (exit status 1 at the end if any was skipped). One run
per OUT_DIR at a time: a run deletes the temporary files a killed one left there.

stdout: `<image>: N masks` per image, then a summary line; stderr: progress, and a warning with
a hint for an image that got no mask.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .common import (MODEL_TYPE_CHOICES, CliError, add_compute_dtype, check_checkpoint,
                     check_distinct_outputs, collect_images, ensure_writable_dir, info,
                     load_model, model_name)

# the JSON's top-level key for how it was made (kept by SA-1B readers, which ignore it)
RECORD_KEY = "sam_jax"
# The generator's three thresholds and their official defaults. Defined here, not imported
# from automatic_mask_generator (which imports jax): `sam-jax --help` stays quick. A test checks
# the two agree.
OFFICIAL_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                       "stability_score_offset": 1.0}
# thresholds suggested when an image gets no mask
_HINT = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.85}


def add_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="automatic masks for images or folders, as SA-1B JSON files",
        description="Run the automatic mask generator (a grid of point prompts, filtered by "
        "predicted IoU and stability, NMS) on each image and write OUT_DIR/<stem>.json in "
        "SA-1B format. Images already done with the same options are skipped, so a killed "
        "run resumes; images done with other options are redone.")
    gen.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image files or folders (folders: their image files, sorted, not "
                     "recursive)")
    gen.add_argument("--checkpoint", metavar="PATH",
                     help="official .pth, HF .safetensors, or a `sam-jax convert` directory "
                     "(default: the model bundled with sam-jax)")
    gen.add_argument("--model-type", default="auto", choices=MODEL_TYPE_CHOICES)
    gen.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                     help="folder for the JSON files (created if needed)")
    add_compute_dtype(gen)
    gen.add_argument("--visualize", action="store_true",
                     help="also write OUT_DIR/<stem>.png with every mask drawn in a color")
    gen.add_argument("--overwrite", action="store_true",
                     help="redo every image, also those whose JSON records the same options")
    defaults = dict(points_per_side=32, points_per_batch=64, box_nms_thresh=0.7,
                    crop_n_layers=0, crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
                    crop_n_points_downscale_factor=1, min_mask_region_area=0)
    for name, value in defaults.items():
        gen.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                         help=f"as SamAutomaticMaskGenerator (default {value:g})")
    for name, value in OFFICIAL_THRESHOLDS.items():
        gen.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                         help="as SamAutomaticMaskGenerator (default: what the checkpoint "
                         f"recommends for its model, e.g. the bundled model's, else SAM's "
                         f"{value:g})")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    gen.set_defaults(run=run_generate,
                     generator_options=list(defaults) + list(OFFICIAL_THRESHOLDS))


def run_options(args) -> dict:
    """What decides an image's masks, as recorded in its JSON and compared on a rerun: the
    checkpoint (an absolute path, or official weights by name), the compute dtype and every
    generator option. JSON-normalised, so a value read back compares equal."""
    path = args.checkpoint
    options = {"checkpoint": os.path.abspath(path) if os.path.exists(path) else path,
               "compute_dtype": args.compute_dtype}
    options.update({name: getattr(args, name) for name in args.generator_options})
    return json.loads(json.dumps(options))


def _state(json_path: str, options: dict) -> str:
    """"missing", "same" (reads back, recorded with `options`), "other" (other or no recorded
    options) or "damaged"."""
    from ..sa1b import SA1BFormatError, read_sa1b
    if not os.path.exists(json_path):
        return "missing"
    try:
        data = read_sa1b(json_path)
    except (SA1BFormatError, OSError):
        return "damaged"  # not by us (we write atomically): do it again
    record = data.get(RECORD_KEY)
    return "same" if isinstance(record, dict) and record.get("options") == options else "other"


def _resolve_thresholds(args, checkpoint: str) -> None:
    """Thresholds not given on the command line: the checkpoint's recommendation for its model
    (a converted directory's config.json; the bundled model has one), else SAM's defaults.
    Resolved before the run's options are recorded, so a JSON says what was used."""
    from ..checkpoints import CheckpointError, generator_defaults

    try:
        recommended = generator_defaults(checkpoint) if os.path.exists(checkpoint) else {}
    except CheckpointError as e:
        raise CliError(str(e)) from None
    for name, default in OFFICIAL_THRESHOLDS.items():
        if getattr(args, name) is None:
            setattr(args, name, recommended.get(name, default))


def _no_mask_hint(args) -> str:
    lower = {name: value for name, value in _HINT.items() if getattr(args, name) > value}
    now = ", ".join(f"--{n.replace('_', '-')} {getattr(args, n):g}" for n in _HINT)
    if not lower:
        return f"no mask passed the thresholds ({now}); try a larger --points-per-side"
    return (f"no mask passed the thresholds ({now}); try "
            + " ".join(f"--{n.replace('_', '-')} {v:g}" for n, v in lower.items()))


def run_generate(args) -> int:
    from tqdm import tqdm

    from .. import __version__
    from ..automatic_mask_generator import SamAutomaticMaskGenerator
    from ..sa1b import remove_stale_temporaries, to_sa1b, write_json_atomic
    from ..utils.image_io import ImageError, load_image

    images = collect_images(args.inputs)
    check_distinct_outputs({p: [_json_path(args.output, p)] for p in images})
    _resolve_thresholds(args, check_checkpoint(args))
    ensure_writable_dir(args.output)
    remove_stale_temporaries(args.output)  # from a run that was killed mid-write
    options = run_options(args)
    states = {p: "missing" if args.overwrite else _state(_json_path(args.output, p), options)
              for p in images}
    todo = [p for p in images if states[p] != "same"]
    same, other = len(images) - len(todo), sum(s == "other" for s in states.values())
    if same:
        info(args, f"{same} of {len(images)} images already done with these options (their "
             f"JSON exists in {args.output}); skipping them")
    if other:
        info(args, f"{other} of {len(images)} images have a JSON made with other options (or "
             "none recorded); redoing them")
    if args.overwrite:
        info(args, f"--overwrite: redoing all {len(images)} images")
    if not todo:
        print(f"nothing to do: all {len(images)} images have their JSON in {args.output}, "
              "made with these options (--overwrite redoes them)")
        return 0
    model = load_model(args)
    generator_options = {name: getattr(args, name) for name in args.generator_options}
    try:
        generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle",
                                              **generator_options)
    except ValueError as e:
        raise CliError(f"generate: {e}", status=2) from None
    made_by = {"version": __version__, "model_type": model_name(model.config),
               "options": options}

    failed, written, start = [], 0, time.perf_counter()
    bar = tqdm(todo, unit="image", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(os.path.basename(path))
        try:
            image, _ = load_image(path)
        except ImageError as e:
            tqdm.write(f"sam-jax: warning: skipping an image: {e}", file=sys.stderr)
            failed.append(path)
            continue
        records = generator.generate(image)
        h, w = image.shape[:2]
        out = _json_path(args.output, path)
        data = to_sa1b(records, os.path.basename(path), w, h)
        data[RECORD_KEY] = made_by
        try:
            write_json_atomic(out, data)
            if args.visualize:
                _draw(image, records, os.path.splitext(out)[0] + ".png")
        except OSError as e:
            raise CliError(f"cannot write {out}: {e}") from None
        written += 1
        tqdm.write(f"{path}: {len(records)} mask{'' if len(records) == 1 else 's'}",
                   file=sys.stdout)
        if not records:
            tqdm.write(f"sam-jax: warning: {path}: {_no_mask_hint(args)}", file=sys.stderr)
    bar.close()
    print(f"wrote {written} SA-1B JSON file(s) to {args.output} in "
          f"{time.perf_counter() - start:.1f} s"
          + (f"; skipped {len(failed)} unreadable image(s)" if failed else ""))
    return 1 if failed else 0


def _json_path(out_dir: str, image_path: str) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(image_path))[0] + ".json")


def _draw(image, records, path: str) -> None:
    """Every mask in a random color at 50% over the image, largest first (small masks stay
    visible on top)."""
    import numpy as np
    from PIL import Image

    from ..utils import amg

    canvas = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for r in sorted(records, key=lambda r: -r["area"]):
        mask = amg.rle_to_mask(r["segmentation"])
        color = rng.integers(0, 256, 3).astype(np.float32)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * color
    Image.fromarray(canvas.round().astype(np.uint8)).save(path)
