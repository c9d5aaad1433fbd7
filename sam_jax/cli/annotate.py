"""`sam-jax annotate IMAGES_DIR -o ANNOTATIONS_DIR`: the data engine's assisted-manual and
semi-automatic stages as a local web app (sam_jax.annotate); `sam-jax annotate --stats DIR`
reports masks and seconds per image of an annotations folder."""

from __future__ import annotations

import json

from .common import CliError, add_compute_dtype, add_mirror_average, info, load_model


def add_parser(sub) -> None:
    an = sub.add_parser("annotate", help="annotate images in the browser with the model's help "
                        "(assisted-manual or semi-automatic), writing SA-1B files",
                        description=__doc__.split("\n\n")[0])
    an.add_argument("images", nargs="?", metavar="IMAGES_DIR")
    an.add_argument("-o", "--out", metavar="ANNOTATIONS_DIR",
                    help="one SA-1B JSON per image is written here (resumed when it exists)")
    an.add_argument("--mode", choices=("manual", "semi"), default="manual",
                    help="semi: the generator's confident masks are filled in on opening an "
                    "image; the annotator adds what is missing")
    an.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only)")
    an.add_argument("--port", type=int, default=8765)
    an.add_argument("--annotator", default="", help="name recorded with every object")
    an.add_argument("--stats", metavar="DIR", default=None,
                    help="print masks and seconds per image of an annotations folder and exit")
    an.add_argument("--checkpoint", default=None, help="default: the bundled model")
    an.add_argument("--model-type", default="auto",
                    choices=("auto", "vit_b", "vit_l", "vit_h", "tiny"))
    add_compute_dtype(an)
    add_mirror_average(an)
    an.add_argument("-q", "--quiet", action="store_true")
    an.set_defaults(run=run_annotate)


def run_annotate(args) -> int:
    if args.stats:
        from ..annotate.stats import annotation_stats
        try:
            print(json.dumps(annotation_stats(args.stats), indent=1))
        except ValueError as e:
            raise CliError(str(e)) from None
        return 0
    if not args.images or not args.out:
        raise CliError("give IMAGES_DIR and -o ANNOTATIONS_DIR (or --stats DIR)", status=2)
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn")):
        raise CliError("annotate needs its web server: pip install 'sam-jax[annotate]' "
                       "(starlette, uvicorn)")
    import uvicorn
    from ..annotate.server import build_app
    from ..annotate.session import ModelSession
    from ..annotate.store import AnnotationStore, StoreError

    try:
        store = AnnotationStore(args.images, args.out)
    except StoreError as e:
        raise CliError(str(e)) from None
    model = load_model(args)
    session = ModelSession(model, store.image_path)
    session.checkpoint = args.checkpoint

    def load_checkpoint(path):
        import argparse
        return load_model(argparse.Namespace(checkpoint=path, model_type="auto",
                                             compute_dtype=args.compute_dtype,
                                             mirror_average=args.mirror_average, quiet=True))

    app = build_app(store, session, mode=args.mode, annotator=args.annotator,
                    load_checkpoint=load_checkpoint)
    url = f"http://{args.host}:{args.port}/"
    print(f"annotating {args.images} -> {args.out} ({args.mode}): open {url}", flush=True)
    info(args, "Ctrl+C stops the server; every accepted object is already on disk")
    try:
        uvicorn.run(app, host=args.host, port=args.port,
                    log_level="warning" if args.quiet else "info")
    finally:
        session.close()
    return 0
