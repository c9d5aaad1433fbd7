"""`sam-jax eval TASK ...`: the SAM paper's experiments (sam_jax.evaluation), each writing a JSON
of all numbers and a PNG of the paper's plot into -o OUT_DIR and printing a table.

  sam-jax eval points (--data SPEC ... | --images DIR --masks DIR | --coco JSON --images DIR |
                       --sa1b DIR) [--clicks 1,2,3,5,9] [--first-point center|random]
                      [--ignore-value V] [--checkpoint PATH] -o OUT_DIR
  sam-jax eval sizes --model [NAME=]CHECKPOINT --model ... (dataset options as points) -o OUT_DIR
  sam-jax eval proposals --coco JSON --images DIR [--points-per-side 64] -o OUT_DIR
  sam-jax eval instances --coco JSON --images DIR --detections JSON [--refine] -o OUT_DIR
  sam-jax eval edges IMAGE_OR_FOLDER... [--ground-truth BSDS_GT_DIR] -o OUT_DIR
  sam-jax eval edges-benchmark EDGE_PNG_DIR GROUND_TRUTH_DIR [-o OUT_DIR]
  sam-jax eval stats SA1B_DIR... -o OUT_DIR

A dataset SPEC is `[NAME=]masks:IMAGES_DIR,MASKS_DIR`, `[NAME=]coco:ANNOTATIONS_JSON,IMAGES_DIR`
or `[NAME=]sa1b:DIR[,IMAGES_DIR]`; several --data flags are evaluated in one run (one model
load) and averaged as the paper averages its datasets.
"""

from __future__ import annotations

import json
import os

from .common import (CliError, add_compute_dtype, add_mirror_average, ensure_writable_dir,
                     info, load_model)


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
                        "edges and the BSDS500 benchmark, object proposals, box-prompted instances, "
                        "encoder sizes, dataset statistics",
                        description=__doc__.split("\n\n")[0])
    # the same parser class as the top level's, so usage errors are one-line CliErrors
    tasks = ev.add_subparsers(dest="task", metavar="TASK", parser_class=sub._parser_class)
    tasks.required = True

    pts = tasks.add_parser("points", help="point-to-mask mIoU after 1..N points (SAM §7.1)")
    _dataset_options(pts)
    _model_options(pts)
    add_mirror_average(pts)
    _output_options(pts)
    pts.set_defaults(run=run_points)

    sz = tasks.add_parser("sizes", help="the same point evaluation over several checkpoints "
                          "with encoder size and time (SAM Fig. 13)")
    sz.add_argument("--model", action="append", default=[], metavar="[NAME=]CHECKPOINT",
                    required=True, help="a checkpoint to compare (repeat); 'default' is the "
                    "bundled model")
    _dataset_options(sz)
    add_compute_dtype(sz)
    _output_options(sz)
    sz.set_defaults(run=run_sizes, examples=0)

    pr = tasks.add_parser("proposals", help="class-agnostic mask AR@100/1000 of the automatic "
                          "generator's proposals on COCO/LVIS annotations (SAM §7.3)")
    pr.add_argument("--coco", required=True, metavar="JSON", help="COCO/LVIS instance "
                    "annotations (the ground truth)")
    pr.add_argument("--images", required=True, help="the annotations' image folder")
    pr.add_argument("--points-per-side", type=int, default=64,
                    help="the point grid (the paper: 64)")
    pr.add_argument("--max-proposals", type=int, default=1000)
    pr.add_argument("--max-images", type=int, default=None, help="first N images")
    _model_options(pr)
    _output_options(pr)
    pr.set_defaults(run=run_proposals)

    ins = tasks.add_parser("instances", help="COCO mask AP of masks prompted by a detector's "
                           "boxes (SAM §7.4)")
    ins.add_argument("--coco", required=True, metavar="JSON",
                     help="COCO/LVIS instance annotations (the ground truth)")
    ins.add_argument("--images", required=True, help="the annotations' image folder")
    ins.add_argument("--detections", required=True, metavar="JSON",
                     help="COCO detection results: image_id, category_id, bbox XYWH, score")
    ins.add_argument("--score-threshold", type=float, default=0.0)
    ins.add_argument("--max-per-image", type=int, default=100)
    ins.add_argument("--refine", action="store_true", help="one more pass with the most "
                     "confident mask's logits as mask prompt (the paper's App. D.4 variant)")
    ins.add_argument("--max-images", type=int, default=None,
                     help="only the first N images (by id) that have detections")
    _model_options(ins)
    add_mirror_average(ins)
    _output_options(ins)
    ins.set_defaults(run=run_instances)

    ed = tasks.add_parser("edges", help="zero-shot edge maps (SAM §7.2: 16x16 point grid, "
                          "Sobel on mask probabilities, edge NMS), optionally benchmarked")
    ed.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    ed.add_argument("--ground-truth", default=None, metavar="DIR",
                    help="BSDS groundTruth/*.mat folder: also run the boundary benchmark")
    ed.add_argument("--points-per-side", type=int, default=16)
    _model_options(ed)
    ed.add_argument("-o", "--out", required=True, metavar="OUT_DIR",
                    help="edge maps are written to OUT_DIR/edges/<stem>.png")
    ed.add_argument("-q", "--quiet", action="store_true")
    ed.set_defaults(run=run_edges)

    eb = tasks.add_parser("edges-benchmark", help="BSDS500 boundary benchmark (ODS, OIS, AP, "
                          "R50) of edge-map PNGs against groundTruth/*.mat")
    eb.add_argument("edges", metavar="EDGE_PNG_DIR")
    eb.add_argument("ground_truth", metavar="GROUND_TRUTH_DIR")
    eb.add_argument("--thresholds", type=int, default=99)
    eb.add_argument("-o", "--out", default=None, metavar="OUT_DIR",
                    help="also write edges_benchmark.json and the P/R curve PNG here")
    eb.add_argument("-q", "--quiet", action="store_true")
    eb.set_defaults(run=run_edges_benchmark)


    st = tasks.add_parser("stats", help="SA-1B mask statistics (SAM Fig. 5-6)")
    st.add_argument("folders", nargs="+", metavar="SA1B_DIR")
    st.add_argument("--max-images", type=int, default=None)
    _output_options(st)
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


def _output_options(parser) -> None:
    parser.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    parser.add_argument("-q", "--quiet", action="store_true")


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
    report["mirror_average"] = bool(model.config.mirror_average)
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


def run_edges_benchmark(args) -> int:
    from ..evaluation.boundary_benchmark import benchmark_folders, plot_pr_curve

    if args.out:
        ensure_writable_dir(args.out)
    try:
        result = benchmark_folders(args.edges, args.ground_truth, thresholds=args.thresholds,
                                   progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(f"ODS {result.ods.f:.3f}  OIS {result.ois.f:.3f}  AP {result.ap:.3f}  "
          f"R50 {result.r50:.3f}")
    if args.out:
        _write_json(os.path.join(args.out, "edges_benchmark.json"), result.to_json())
        plot_pr_curve(result, os.path.join(args.out, "edges_benchmark.png"))
    return 0


def run_proposals(args) -> int:
    from ..evaluation.coco_plots import plot_proposal_recall
    from ..evaluation.datasets import CocoInstances
    from ..evaluation.proposals import (evaluate_proposals, generate_proposals,
                                        proposal_settings)

    try:
        dataset = CocoInstances(args.coco, args.images, args.max_images)
    except ValueError as e:
        raise CliError(str(e)) from None
    ensure_writable_dir(args.out)
    model = load_model(args)
    try:
        results = generate_proposals(model, dataset, args.max_proposals,
                                     settings=proposal_settings(args.points_per_side),
                                     progress=not args.quiet)
        result = evaluate_proposals(dataset.coco, results,
                                    max_dets=sorted({100, args.max_proposals}),
                                    image_ids=dataset.ids)
    except ValueError as e:
        raise CliError(str(e)) from None
    _write_json(os.path.join(args.out, "proposals_results.json"), results)
    report = dict(result.to_json(), checkpoint=args.checkpoint,
                  points_per_side=args.points_per_side)
    _write_json(os.path.join(args.out, "proposals.json"), report)
    plot_proposal_recall(result, os.path.join(args.out, "proposals.png"))
    print(result.format_table())
    info(args, f"wrote {args.out}/proposals.json, proposals_results.json, proposals.png")
    return 0


def run_instances(args) -> int:
    import warnings

    from ..evaluation.coco import load_coco_gt, read_results
    from ..evaluation.coco_plots import plot_instance_ap
    from ..evaluation.instances import DETECTION_KEYS, evaluate_instances, masks_from_detections

    try:
        gt = load_coco_gt(args.coco)
        detections = read_results(args.detections, DETECTION_KEYS, "detections")
    except ValueError as e:
        raise CliError(str(e)) from None
    image_ids = sorted({d["image_id"] for d in detections})[:args.max_images]
    chosen = set(image_ids)
    detections = [d for d in detections if d["image_id"] in chosen]
    ensure_writable_dir(args.out)
    model = load_model(args)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = masks_from_detections(model, detections, args.images, gt,
                                            args.score_threshold, args.max_per_image,
                                            args.refine, progress=not args.quiet)
        for w in caught:
            from .common import warn
            warn(str(w.message))
        result = evaluate_instances(gt, results, image_ids=image_ids)
    except ValueError as e:
        raise CliError(str(e)) from None
    _write_json(os.path.join(args.out, "instances_results.json"), results)
    _write_json(os.path.join(args.out, "instances.json"),
                dict(result.to_json(), checkpoint=args.checkpoint, refine=args.refine))
    plot_instance_ap(result, os.path.join(args.out, "instances.png"))
    print(result.format_table())
    info(args, f"wrote {args.out}/instances.json, instances_results.json, instances.png")
    return 0


def run_edges(args) -> int:
    import argparse

    from ..evaluation.edges import EdgeOptions, write_edge_maps
    from .common import collect_images

    images = collect_images(args.inputs)
    edge_dir = os.path.join(args.out, "edges")
    ensure_writable_dir(edge_dir)
    model = load_model(args)
    try:
        write_edge_maps(model, images, edge_dir, progress=not args.quiet,
                        options=EdgeOptions(points_per_side=args.points_per_side))
    except ValueError as e:
        raise CliError(str(e)) from None
    info(args, f"wrote {len(images)} edge maps to {edge_dir}")
    if args.ground_truth:
        return run_edges_benchmark(argparse.Namespace(
            edges=edge_dir, ground_truth=args.ground_truth, thresholds=99, out=args.out,
            quiet=args.quiet))
    return 0
