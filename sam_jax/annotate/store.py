"""Where `sam-jax annotate` keeps what annotators accept: one SA-1B JSON per image in the
annotations folder, written so that nothing accepted is ever lost.

- Every change (an object accepted or removed, an image marked done) is applied under an
  exclusive lock on the image's lock file (`fcntl.flock` on `<out>/.locks/<stem>.lock`) to
  the file as it is on disk at that moment, then written atomically (`sa1b.write_json_atomic`:
  a temporary file, fsync, rename). Two tabs or two processes on the same image therefore
  merge their objects instead of the last write dropping the other's, and a server killed at
  any moment leaves the previous complete file or the new one, never half of one.
- The file is an SA-1B record (`image`, `annotations` with COCO compressed RLE, bbox XYWH,
  area, predicted_iou, stability_score, point_coords, crop_box, id), readable by every SA-1B
  reader here (`sam-jax train`'s included), plus per annotation the object's `object_id`, its
  `label`, the `prompts` used, `source` (manual / automatic), `annotator`, `created` (UTC) and
  `seconds` spent, and a top-level `sam_jax_annotate` record: done flag, total seconds,
  annotators, the next annotation index (ids stay unique after removals).
- Image names come from the client: `image_path` accepts only a name from the folder's own
  listing (a plain file name, no folder part), so no request reaches a file elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import uuid
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from .. import sa1b
from ..utils import amg

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
META = "sam_jax_annotate"
SOURCES = ("manual", "automatic")
TMP_PREFIX = ".tmp-"  # + "<image stem>-": the writer's temporary file, until its rename


class StoreError(ValueError):
    """A request the store refuses (unknown or unsafe image name, unknown object, bad mask)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class AnnotationStore:
    """The images to annotate and their annotation files (see the module docstring)."""

    def __init__(self, images_dir: str, out_dir: str):
        self.images_dir = os.path.realpath(images_dir)
        self.out_dir = os.path.realpath(out_dir)
        if not os.path.isdir(self.images_dir):
            raise StoreError(f"images folder {images_dir!r} does not exist")
        os.makedirs(os.path.join(self.out_dir, ".locks"), exist_ok=True)
        self._remove_stale_temporaries()
        if not self.image_names():
            raise StoreError(f"images folder {images_dir!r} has no image files "
                             f"({', '.join(IMAGE_SUFFIXES)})")

    def _lock_path(self, stem: str) -> str:
        return os.path.join(self.out_dir, ".locks", stem + ".lock")

    def _remove_stale_temporaries(self) -> None:
        """Deletes what killed writers left (`.tmp-<stem>-*.json`): only where the image's lock
        is free, since another process (a second server on the same folder) may be writing
        that very file now."""
        for n in os.listdir(self.out_dir):
            if not (n.startswith(TMP_PREFIX) and n.endswith(".json") and "-" in n[len(TMP_PREFIX):]):
                continue
            stem = n[len(TMP_PREFIX):].rsplit("-", 1)[0]
            with open(self._lock_path(stem), "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a write in progress: its file is not stale
                try:
                    if os.path.exists(os.path.join(self.out_dir, n)):
                        os.unlink(os.path.join(self.out_dir, n))
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- images -----------------------------------------------------------------------------
    def image_names(self) -> List[str]:
        """The images to annotate: the image files directly in the folder (links the folder's
        owner put there count: it is the names from requests that must not escape)."""
        return sorted(n for n in os.listdir(self.images_dir)
                      if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
                      and os.path.isfile(os.path.join(self.images_dir, n)))

    def image_path(self, name: str) -> str:
        """The path of image `name`, which must be a file name (no folder part) of an image
        directly inside the images folder; anything else is refused."""
        if (not isinstance(name, str) or not name or name != os.path.basename(name)
                or name in (".", "..") or "\\" in name or "\0" in name):
            raise StoreError(f"not an image name: {name!r}")
        if name not in self.image_names():
            raise StoreError(f"no image {name!r} in the images folder")
        return os.path.join(self.images_dir, name)

    def annotation_path(self, name: str) -> str:
        self.image_path(name)
        return os.path.join(self.out_dir, os.path.splitext(name)[0] + ".json")

    # ---- reading ----------------------------------------------------------------------------
    def read(self, name: str) -> Optional[Dict[str, Any]]:
        """The image's annotation record as on disk, or None before its first object."""
        path = self.annotation_path(name)
        return sa1b.read_sa1b(path) if os.path.exists(path) else None

    def progress(self) -> List[Dict[str, Any]]:
        """Per image: name, objects, done, seconds (the image list the tool shows)."""
        rows = []
        for name in self.image_names():
            record = self.read(name)
            meta = (record or {}).get(META, {})
            rows.append({"name": name, "objects": len((record or {}).get("annotations", [])),
                         "done": bool(meta.get("done", False)),
                         "seconds": float(meta.get("seconds", 0.0))})
        return rows

    # ---- changes, each under the image's lock -----------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str, width: int, height: int) -> Iterator[Dict[str, Any]]:
        """The record as on disk (or a new one), locked; written atomically on exit."""
        path = self.annotation_path(name)
        stem = os.path.splitext(name)[0]
        with open(self._lock_path(stem), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                record = sa1b.read_sa1b(path) if os.path.exists(path) else \
                    sa1b.to_sa1b([], name, width, height)
                record.setdefault(META, {"done": False, "seconds": 0.0, "annotators": [],
                                         "next_index": len(record["annotations"])})
                image = record["image"]
                if (image["width"], image["height"]) != (width, height):
                    raise StoreError(f"{name}: the annotations are for a {image['width']}x"
                                     f"{image['height']} image, this one is {width}x{height}")
                yield record
                sa1b.write_json_atomic(path, record, tmp_prefix=f"{TMP_PREFIX}{stem}-")
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def add_object(self, name: str, mask: np.ndarray, *, prompts: Dict[str, Any],
                   predicted_iou: float, stability_score: float = 0.0,
                   label: Optional[str] = None, annotator: str = "", seconds: float = 0.0,
                   source: str = "manual") -> Dict[str, Any]:
        """Accepts one object (a (H, W) bool mask of the whole image); returns its
        annotation as written."""
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != bool:
            raise StoreError(f"a mask must be a (H, W) bool array, got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise StoreError("the mask is empty: nothing to accept")
        if source not in SOURCES:
            raise StoreError(f"source must be one of {SOURCES}, got {source!r}")
        height, width = mask.shape
        with self._locked(name, width, height) as record:
            ann = self._annotation(record, mask, prompts=prompts, predicted_iou=predicted_iou,
                                   stability_score=stability_score, label=label,
                                   annotator=annotator, seconds=seconds, source=source)
            record["annotations"].append(ann)
            meta = record[META]
            meta["seconds"] = float(meta["seconds"]) + float(seconds)
            if annotator and annotator not in meta["annotators"]:
                meta["annotators"].append(annotator)
        return ann

    @staticmethod
    def _annotation(record, mask, *, prompts, predicted_iou, stability_score, label, annotator,
                    seconds, source) -> Dict[str, Any]:
        """One SA-1B annotation (plus annotate's fields); takes the record's next index."""
        height, width = mask.shape
        rle = amg.coco_encode_rle(amg.mask_to_rle(mask[None])[0])
        ys, xs = np.nonzero(mask)
        points = [[float(x), float(y)] for x, y in prompts.get("points", [])]
        meta = record[META]
        index = int(meta["next_index"])
        meta["next_index"] = index + 1
        return {
            # SA-1B's fields: bbox as the official generator's (inclusive max pixel)
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()),
                     float(ys.max() - ys.min())],
            "area": int(mask.sum()),
            "segmentation": {"size": [height, width], "counts": rle["counts"]},
            "predicted_iou": float(predicted_iou),
            "point_coords": points[:1] or [[float(xs[0]), float(ys[0])]],
            "crop_box": [0.0, 0.0, float(width), float(height)],
            "id": record["image"]["image_id"] * sa1b.MAX_MASKS_PER_IMAGE + index,
            "stability_score": float(stability_score),
            # what annotate adds
            "object_id": uuid.uuid4().hex, "label": label or None,
            "prompts": json.loads(json.dumps(prompts)), "source": source,
            "annotator": annotator, "created": _now(), "seconds": float(seconds),
        }

    def prefill(self, name: str, objects: List[Dict[str, Any]], width: int, height: int,
                annotator: str = "automatic") -> bool:
        """Semi-automatic mode: accepts the generator's objects (dicts with `mask`,
        `predicted_iou`, `stability_score`, `point`) once per image; False if the image was
        already prefilled (by another tab, or before a restart)."""
        with self._locked(name, width, height) as record:
            meta = record[META]
            if meta.get("prefilled"):
                return False
            for obj in objects:
                mask = np.asarray(obj["mask"], bool)
                if mask.shape != (height, width):
                    raise StoreError(f"{name}: a prefilled mask is {mask.shape}, the image "
                                     f"{(height, width)}")
                record["annotations"].append(self._annotation(
                    record, mask, prompts={"points": [obj["point"]], "labels": [1]},
                    predicted_iou=obj["predicted_iou"],
                    stability_score=obj["stability_score"], label=None,
                    annotator=annotator, seconds=0.0, source="automatic"))
            meta["prefilled"] = True
        return True

    def remove_object(self, name: str, object_id: str) -> None:
        record = self.read(name)
        if record is None:
            raise StoreError(f"{name}: no object {object_id!r}")
        image = record["image"]
        with self._locked(name, image["width"], image["height"]) as record:
            kept = [a for a in record["annotations"] if a.get("object_id") != object_id]
            if len(kept) == len(record["annotations"]):
                raise StoreError(f"{name}: no object {object_id!r}")
            record["annotations"] = kept

    def set_done(self, name: str, done: bool, width: int, height: int,
                 seconds: float = 0.0) -> None:
        """Marks the image done (or not) and adds `seconds` to its time."""
        with self._locked(name, width, height) as record:
            record[META]["done"] = bool(done)
            record[META]["seconds"] = float(record[META]["seconds"]) + float(seconds)
