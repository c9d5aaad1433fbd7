"""`sam-jax eval TASK ...`: the SAM paper's experiments (sam_jax.evaluation), each writing a JSON
of all numbers and a PNG of the paper's plot into -o OUT_DIR and printing a table.

  sam-jax eval points (--data SPEC ... | --images DIR --masks DIR | --coco JSON --images DIR |
                       --sa1b DIR) [--clicks 1,2,3,5,9] [--first-point center|random]
                      [--ignore-value V] [--checkpoint PATH] -o OUT_DIR
  sam-jax eval sizes --model [NAME=]CHECKPOINT --model ... (dataset options as points) -o OUT_DIR
  sam-jax eval stats SA1B_DIR... -o OUT_DIR

A dataset SPEC is `[NAME=]masks:IMAGES_DIR,MASKS_DIR`, `[NAME=]coco:ANNOTATIONS_JSON,IMAGES_DIR`
or `[NAME=]sa1b:DIR[,IMAGES_DIR]`; several --data flags are evaluated in one run (one model
load) and averaged as the paper averages its datasets.
"""

from __future__ import annotations

import json
import os

from .common import CliError, add_compute_dtype, ensure_writable_dir, info, load_model


def _clicks(text: str) -> tuple:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        values = ()
    if not values or values[0] < 1:
        raise CliError(f"--clicks: expected positive integers such as 1,2,3,5,9, got {text!r}",
                       status=2)
    return values


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="the SAM paper's experiments: point-to-mask mIoU, "
                        "dataset statistics",
                        description=__doc__.split("\n\n")[0])
    # the same parser class as the top level's, so usage errors are one-line CliErrors
    tasks = ev.add_subparsers(dest="task", metavar="TASK", parser_class=sub._parser_class)
    tasks.required = True

    pts = tasks.add_parser("points", help="point-to-mask mIoU after 1..N points (SAM §7.1)")
    _dataset_options(pts)
    _model_options(pts)
    pts.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    pts.add_argument("-q", "--quiet", action="store_true")
    pts.set_defaults(run=run_points)

    sz = tasks.add_parser("sizes", help="the same point evaluation over several checkpoints "
                          "with encoder size and time (SAM Fig. 13)")
    sz.add_argument("--model", action="append", default=[], metavar="[NAME=]CHECKPOINT",
                    required=True, help="a checkpoint to compare (repeat); 'default' is the "
                    "bundled model")
    _dataset_options(sz)
    add_compute_dtype(sz)
    sz.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    sz.add_argument("-q", "--quiet", action="store_true")
    sz.set_defaults(run=run_sizes, examples=0)

    st = tasks.add_parser("stats", help="SA-1B mask statistics (SAM Fig. 5-6)")
    st.add_argument("folders", nargs="+", metavar="SA1B_DIR")
    st.add_argument("--max-images", type=int, default=None)
    st.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    st.add_argument("-q", "--quiet", action="store_true")
    st.set_defaults(run=run_stats)



def _dataset_options(parser) -> None:
    parser.add_argument("--data", action="append", default=[], metavar="SPEC",
                     help="a dataset: [NAME=]masks:IMAGES,MASKS | [NAME=]coco:JSON,IMAGES | "
                     "[NAME=]sa1b:DIR[,IMAGES] (repeat for several)")
    parser.add_argument("--images", help="image folder (with --masks or --coco)")
    parser.add_argument("--masks", help="mask folder: binary or instance PNGs named as the images")
    parser.add_argument("--coco", metavar="JSON", help="COCO/LVIS instance annotations")
    parser.add_argument("--sa1b", metavar="DIR", help="SA-1B JSON folder (images beside them)")
    parser.add_argument("--ignore-value", type=int, default=None, metavar="V",
                     help="mask value of pixels that count neither way (e.g. 255)")
    parser.add_argument("--clicks", type=_clicks, default=(1, 2, 3, 5, 9),
                     help="point counts to report (default 1,2,3,5,9)")
    parser.add_argument("--first-point", choices=("center", "random"), default="center",
                     help="the first point at the mask's center (distance-transform maximum, "
                     "default) or a uniformly random mask pixel")
    parser.add_argument("--seed", type=int, default=0, help="for --first-point random")
    parser.add_argument("--max-images", type=int, default=None, help="first N images per dataset")
    parser.add_argument("--objects-per-call", type=int, default=16,
                     help="objects of an image decoded in one batched call")
    parser.add_argument("--examples", type=int, default=3, help="objects drawn per dataset")


def _model_options(parser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="converted directory, .pth/.safetensors or official name "
                        "(default: the bundled model)")
    parser.add_argument("--model-type", default="auto",
                        choices=("auto", "vit_b", "vit_l", "vit_h", "tiny"))
    add_compute_dtype(parser)


def _datasets(args) -> dict:
    from ..evaluation.datasets import CocoInstances, MaskFolder, Sa1bFolder, parse_dataset

    datasets = {}
    try:
        for spec in args.data:
            name, dataset = parse_dataset(spec, args.ignore_value, args.max_images)
            if name in datasets:
                raise CliError(f"two datasets are named {name!r}: name them (NAME=...)",
                               status=2)
            datasets[name] = dataset
        if args.masks or args.coco:
            if not args.images:
                raise CliError("--masks and --coco need --images", status=2)
            if args.masks and args.coco:
                raise CliError("give --masks or --coco, not both (use --data for several "
                               "datasets)", status=2)
            name = os.path.basename(os.path.normpath(args.masks or args.images))
            datasets[name] = (MaskFolder(args.images, args.masks, args.ignore_value,
                                         args.max_images) if args.masks else
                              CocoInstances(args.coco, args.images, args.max_images))
        elif args.images:
            raise CliError("--images needs --masks or --coco", status=2)
        if args.sa1b:
            datasets[os.path.basename(os.path.normpath(args.sa1b))] = Sa1bFolder(
                args.sa1b, None, args.max_images)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not datasets:
        raise CliError("no dataset: give --data SPEC, --images with --masks or --coco, or "
                       "--sa1b", status=2)
    return datasets


def _write_json(path: str, obj) -> None:
    from ..sa1b import write_json_atomic
    write_json_atomic(path, obj)


def run_points(args) -> int:
    from ..evaluation.points import evaluate_points
    from ..evaluation.points_plots import plot_points_curve, plot_points_examples

    datasets = _datasets(args)
    ensure_writable_dir(args.out)
    model = load_model(args)
    try:
        result, examples = evaluate_points(
            model, datasets, args.clicks, first_point=args.first_point, seed=args.seed,
            objects_per_call=args.objects_per_call, progress=not args.quiet,
            keep_examples=args.examples)
    except ValueError as e:
        raise CliError(str(e)) from None
    report = result.to_json()
    report["checkpoint"] = args.checkpoint
    report["compute_dtype"] = args.compute_dtype
    _write_json(os.path.join(args.out, "points.json"), report)
    plot_points_curve(result, os.path.join(args.out, "points_curve.png"))
    plot_points_examples(examples, os.path.join(args.out, "points_examples.png"), result.clicks)
    print(result.format_table())
    total = sum(result.images.values())
    print(f"{total} images in {result.seconds:.1f} s ({total / result.seconds:.2f} images/s, "
          f"image encoder {result.embed_median:.3f} s/image median); wrote "
          f"{args.out}/points.json, points_curve.png, points_examples.png")
    return 0


def run_stats(args) -> int:
    from ..evaluation.mask_stats import collect_mask_stats, plot_mask_stats

    ensure_writable_dir(args.out)
    try:
        stats = collect_mask_stats(args.folders if len(args.folders) > 1 else args.folders[0],
                                   progress=not args.quiet, max_images=args.max_images)
    except ValueError as e:
        raise CliError(str(e)) from None
    summary = stats.summary()
    _write_json(os.path.join(args.out, "stats.json"), summary)
    plot_mask_stats(stats, os.path.join(args.out, "stats.png"))
    print(json.dumps(summary, indent=1))
    info(args, f"wrote {args.out}/stats.json and stats.png")
    return 0


def run_sizes(args) -> int:
    import argparse

    from ..evaluation.model_sizes import (compare_models, format_rows, plot_model_sizes,
                                          rows_to_json)

    datasets = _datasets(args)
    ensure_writable_dir(args.out)
    models = {}
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if name in models:
            raise CliError(f"two --model flags are named {name!r}: name them NAME=PATH",
                           status=2)
        one = argparse.Namespace(checkpoint=None if path == "default" else path,
                                 model_type="auto", compute_dtype=args.compute_dtype,
                                 quiet=args.quiet)
        models[name] = load_model(one)
    try:
        rows = compare_models(models, datasets, args.clicks, first_point=args.first_point,
                              seed=args.seed, objects_per_call=args.objects_per_call,
                              progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from None
    _write_json(os.path.join(args.out, "sizes.json"), rows_to_json(rows))
    plot_model_sizes(rows, os.path.join(args.out, "sizes.png"))
    print(format_rows(rows))
    info(args, f"wrote {args.out}/sizes.json and sizes.png")
    return 0
