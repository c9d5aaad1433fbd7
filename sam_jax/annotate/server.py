"""The web app of `sam-jax annotate` (Starlette): a JSON API over the annotation store and the
model session, and the static canvas front end.

API (all JSON; image names as listed by GET /api/images):
  GET  /api/images                       -> {"images": [{name, objects, done, seconds}], mode}
  GET  /api/image/{name}                 -> the image file
  POST /api/open      {name}             -> {width, height, objects, prefilled}; embeds the
                                            image (and the next one in the background); in
                                            semi-automatic mode first fills in the generator's
                                            confident masks
  POST /api/predict   {name, points, labels, box, mask_token, multimask}
                                         -> {masks: [PNG data URL], scores, tokens}
  POST /api/accept    {name, mask (PNG data URL), prompts, predicted_iou, label, seconds}
                                         -> the annotation written (object_id, id, bbox, ...)
  POST /api/remove    {name, object_id}
  POST /api/done      {name, done, seconds}
  POST /api/checkpoint {checkpoint}      -> switches the model without a restart
  GET  /api/objects/{name}               -> the image's objects (masks as PNG data URLs)
Errors are {"error": message} with status 400 (bad request), 404 (unknown image or object),
413 (body over the limit).
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any, Callable, Dict, Optional

import numpy as np
from PIL import Image

from .session import ModelSession, PromptError
from .store import AnnotationStore, StoreError

MAX_BODY_BYTES = 16 * 1024 * 1024  # a whole-image mask PNG of a large photo fits many times
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MODES = ("manual", "semi")


def mask_to_data_url(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8) * 255).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def data_url_to_mask(url: str, width: int, height: int) -> np.ndarray:
    """A PNG data URL (any mode; a pixel is in the mask where it is light, gray level >= 128,
    and, with transparency, opaque, alpha >= 128: a browser canvas exports white-on-black as
    opaque RGBA) -> (height, width) bool; a clear error for anything else."""
    prefix = "data:image/png;base64,"
    if not isinstance(url, str) or not url.startswith(prefix):
        raise PromptError("mask must be a PNG data URL (data:image/png;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):], validate=True)))
        image.load()
    except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, ...
        raise PromptError(f"mask is not a readable PNG ({type(e).__name__})") from None
    if image.size != (width, height):
        raise PromptError(f"mask is {image.size[0]}x{image.size[1]}, the image {width}x{height}")
    light = np.asarray(image.convert("L")) >= 128
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        light &= np.asarray(image.convert("RGBA").getchannel("A")) >= 128
    return light


def _generator_objects(model, image: np.ndarray):
    """The automatic generator's masks at the checkpoint's recommended thresholds."""
    from ..automatic_mask_generator import SamAutomaticMaskGenerator

    records = SamAutomaticMaskGenerator(model).generate(image)
    return [{"mask": r["segmentation"], "predicted_iou": r["predicted_iou"],
             "stability_score": r["stability_score"], "point": r["point_coords"][0]}
            for r in records]


def build_app(store: AnnotationStore, session: ModelSession, *, mode: str = "manual",
              annotator: str = "", load_checkpoint: Optional[Callable[[str], Any]] = None,
              max_body_bytes: int = MAX_BODY_BYTES):
    """The Starlette application for `store` and `session`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body(request: Request) -> Dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _TooLarge()
        data = b""
        async for chunk in request.stream():  # a body without a length is counted too
            data += chunk
            if len(data) > max_body_bytes:
                raise _TooLarge()
        try:
            parsed = json.loads(data or b"{}")
        except ValueError:
            raise PromptError("the request body is not JSON") from None
        if not isinstance(parsed, dict):
            raise PromptError("the request body must be a JSON object")
        return parsed

    def name_of(data: Dict[str, Any]) -> str:
        name = data.get("name")
        store.image_path(name)  # StoreError (404) for anything not in the folder
        return name

    def handler(fn):
        async def wrapped(request: Request):
            try:
                return await fn(request)
            except _TooLarge:
                return error(f"request body over {max_body_bytes} bytes", 413)
            except StoreError as e:
                status = 404 if ("no image" in str(e) or "not an image" in str(e)
                                 or "no object" in str(e)) else 400
                return error(str(e), status)
            except (PromptError, KeyError, TypeError) as e:
                return error(str(e) if isinstance(e, PromptError) else
                             f"bad request: {type(e).__name__}: {e}")
        return wrapped

    @handler
    async def images(request: Request):
        return JSONResponse({"images": store.progress(), "mode": mode,
                             "checkpoint": session.checkpoint})

    @handler
    async def image_file(request: Request):
        return FileResponse(store.image_path(request.path_params["name"]))

    def objects_of(name: str):
        record = store.read(name) or {"annotations": []}
        from ..utils import amg
        return [{"object_id": a.get("object_id"), "id": a["id"], "label": a.get("label"),
                 "source": a.get("source", "manual"), "bbox": a["bbox"],
                 "predicted_iou": a.get("predicted_iou"),
                 "mask": mask_to_data_url(amg.rle_to_mask(a["segmentation"]))}
                for a in record["annotations"]]

    @handler
    async def open_image(request: Request):
        import anyio

        data = await body(request)
        name = name_of(data)
        embedded = await anyio.to_thread.run_sync(session.embedding, name)
        names = store.image_names()
        following = names[(names.index(name) + 1) % len(names)]
        session.embed_in_background(following)  # hidden behind this image's work
        prefilled = False
        if mode == "semi":
            record = store.read(name)
            if not (record or {}).get("sam_jax_annotate", {}).get("prefilled"):
                from ..utils.image_io import load_image
                image, _ = load_image(store.image_path(name))
                objs = await anyio.to_thread.run_sync(_generator_objects, session.model, image)
                prefilled = store.prefill(name, objs, embedded.width, embedded.height)
        return JSONResponse({"name": name, "width": embedded.width, "height": embedded.height,
                             "embed_seconds": embedded.seconds, "prefilled": prefilled,
                             "objects": objects_of(name)})

    @handler
    async def predict(request: Request):
        import anyio

        data = await body(request)
        name = name_of(data)

        def run():
            return session.predict(name, data.get("points") or [], data.get("labels") or [],
                                   data.get("box"), data.get("mask_token"),
                                   bool(data.get("multimask", True)))
        masks, scores, tokens = await anyio.to_thread.run_sync(run)
        return JSONResponse({"masks": [mask_to_data_url(m) for m in masks],
                             "scores": [float(s) for s in scores], "tokens": tokens})

    @handler
    async def accept(request: Request):
        data = await body(request)
        name = name_of(data)
        embedded = session.embedding(name)
        mask = data_url_to_mask(data.get("mask"), embedded.width, embedded.height)
        label = data.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise PromptError("label must be text of at most 200 characters")
        prompts = data.get("prompts") or {}
        if not isinstance(prompts, dict):
            raise PromptError("prompts must be an object")
        ann = store.add_object(name, mask, prompts=prompts,
                               predicted_iou=float(data.get("predicted_iou") or 0.0),
                               label=label, annotator=annotator,
                               seconds=float(data.get("seconds") or 0.0))
        return JSONResponse({k: ann[k] for k in ("object_id", "id", "bbox", "area", "label")})

    @handler
    async def remove(request: Request):
        data = await body(request)
        store.remove_object(name_of(data), str(data.get("object_id")))
        return JSONResponse({"removed": data.get("object_id")})

    @handler
    async def done(request: Request):
        data = await body(request)
        name = name_of(data)
        embedded = session.embedding(name)
        store.set_done(name, bool(data.get("done", True)), embedded.width, embedded.height,
                       float(data.get("seconds") or 0.0))
        return JSONResponse({"name": name, "done": bool(data.get("done", True))})

    @handler
    async def objects(request: Request):
        name = request.path_params["name"]
        store.image_path(name)
        return JSONResponse({"objects": objects_of(name)})

    @handler
    async def checkpoint(request: Request):
        import anyio

        data = await body(request)
        path = data.get("checkpoint")
        if load_checkpoint is None:
            raise PromptError("this server cannot load checkpoints")
        if not isinstance(path, str) or not path:
            raise PromptError("checkpoint must be a path")
        try:
            model = await anyio.to_thread.run_sync(load_checkpoint, path)
        except Exception as e:  # the loader's own errors name the problem
            raise PromptError(f"cannot load {path}: {e}") from None
        session.switch_checkpoint(model, path)
        return JSONResponse({"checkpoint": path})

    async def index(request: Request):
        return FileResponse(os.path.join(STATIC, "index.html"))

    routes = [
        Route("/", index),
        Route("/api/images", images),
        Route("/api/image/{name:str}", image_file),
        Route("/api/objects/{name:str}", objects),
        Route("/api/open", open_image, methods=["POST"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/accept", accept, methods=["POST"]),
        Route("/api/remove", remove, methods=["POST"]),
        Route("/api/done", done, methods=["POST"]),
        Route("/api/checkpoint", checkpoint, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


class _TooLarge(Exception):
    pass
