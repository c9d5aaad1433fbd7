"""`sam-jax generate`: the fully automatic data engine over images and folders.

  sam-jax generate INPUT... [--checkpoint PATH] -o OUT_DIR [generator options] [--visualize]

Writes OUT_DIR/<image stem>.json in SA-1B format (sam_jax/sa1b.py) for every image. A JSON
that already exists and reads back is skipped, so a killed run is resumed by running the same
command again; each JSON is written atomically (temporary file, then rename), so a kill never
leaves half a file. An image that cannot be read is reported and skipped; the others go on
(exit status 1 at the end if any was skipped). One run per OUT_DIR at a time: a run deletes the
temporary files a killed one left there.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List

from .common import MODEL_TYPE_CHOICES, CliError, info, load_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def add_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="automatic masks for images or folders, as SA-1B JSON files",
        description="Run the automatic mask generator (a grid of point prompts, filtered by "
        "predicted IoU and stability, NMS) on each image and write OUT_DIR/<stem>.json in "
        "SA-1B format. Images already done are skipped, so a killed run resumes.")
    gen.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image files or folders (folders: their image files, sorted, not "
                     "recursive)")
    gen.add_argument("--checkpoint", metavar="PATH",
                     help="official .pth, HF .safetensors, or a `sam-jax convert` directory "
                     "(default: the model bundled with sam-jax)")
    gen.add_argument("--model-type", default="auto", choices=MODEL_TYPE_CHOICES)
    gen.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                     help="folder for the JSON files (created if needed)")
    gen.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                     help="dtype of the model's matmuls (params stay float32); bfloat16 is "
                     "~1.3x faster on CPU, float32 matches the official model (default)")
    gen.add_argument("--visualize", action="store_true",
                     help="also write OUT_DIR/<stem>.png with every mask drawn in a color")
    defaults = dict(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
                    stability_score_thresh=0.95, stability_score_offset=1.0,
                    box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
                    crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1,
                    min_mask_region_area=0)
    for name, value in defaults.items():
        gen.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                         help=f"as SamAutomaticMaskGenerator (default {value:g})")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    gen.set_defaults(run=run_generate, generator_options=list(defaults))


def collect_images(inputs: List[str], error) -> List[str]:
    images = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
            if not found:
                raise error(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this "
                            "folder")
            images.extend(found)
        elif os.path.exists(path):
            images.append(path)
        else:
            raise error(f"{path}: no such file or folder", status=2)
    stems = {}
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems and os.path.abspath(stems[stem]) != os.path.abspath(path):
            raise error(f"{stems[stem]} and {path} would both be written as {stem}.json; "
                        "rename one or run them separately", status=2)
        stems[stem] = path
    return list(dict.fromkeys(images))


def _done(json_path: str) -> bool:
    from ..sa1b import SA1BFormatError, read_sa1b
    if not os.path.exists(json_path):
        return False
    try:
        read_sa1b(json_path)
        return True
    except (SA1BFormatError, OSError):
        return False  # damaged (not by us: we write atomically): do it again


def run_generate(args) -> int:
    from tqdm import tqdm

    from ..automatic_mask_generator import SamAutomaticMaskGenerator
    from ..sa1b import remove_stale_temporaries, to_sa1b, write_json_atomic
    from ..utils.image_io import ImageError, load_image

    images = collect_images(args.inputs, CliError)
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {args.output}: {e}") from None
    remove_stale_temporaries(args.output)  # from a run that was killed mid-write
    todo = [p for p in images if not _done(_json_path(args.output, p))]
    if len(todo) < len(images):
        info(args, f"{len(images) - len(todo)} of {len(images)} images already done "
              f"(their JSON exists in {args.output}); skipping them")
    if not todo:
        print(f"nothing to do: all {len(images)} images have their JSON in {args.output}")
        return 0
    model = load_model(args)
    if args.compute_dtype != model.config.compute_dtype:
        from ..inference import SamModel
        model = SamModel(model.config.replace(compute_dtype=args.compute_dtype), model.variables)
    options = {name: getattr(args, name) for name in args.generator_options}
    try:
        generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **options)
    except ValueError as e:
        raise CliError(f"generate: {e}", status=2) from None

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
        try:
            write_json_atomic(out, to_sa1b(records, os.path.basename(path), w, h))
            if args.visualize:
                _draw(image, records, os.path.splitext(out)[0] + ".png")
        except OSError as e:
            raise CliError(f"cannot write {out}: {e}") from None
        written += 1
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
