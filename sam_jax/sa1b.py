"""SA-1B annotation files: writing them from generator records, reading them back as masks.

One JSON per image, exactly as the released SA-1B files:
  {"image": {"image_id", "width", "height", "file_name"},
   "annotations": [{"bbox", "area", "segmentation": {"size", "counts"}, "predicted_iou",
                    "point_coords", "crop_box", "id", "stability_score"}, ...]}
with COCO compressed RLE strings, and bbox / crop_box as float XYWH. SA-1B's bbox is the
official generator's box (inclusive max pixel), so its width and height are one less than
pycocotools' `toBbox` of the same mask.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from .utils import amg

_SA_NAME = re.compile(r"^sa_(\d+)$")
MAX_MASKS_PER_IMAGE = 100_000  # annotation ids are image_id * this + index


class SA1BFormatError(ValueError):
    """A file that is not an SA-1B annotation file; the message names the file and field."""


def image_id_for(file_name: str) -> int:
    """SA-1B's own id for `sa_<id>.jpg`; otherwise a stable id from the file name (CRC-32),
    so re-running on the same folder gives the same ids."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    match = _SA_NAME.match(stem)
    return int(match.group(1)) if match else zlib.crc32(stem.encode("utf-8"))


def to_sa1b(records: List[Dict[str, Any]], file_name: str, width: int,
            height: int) -> Dict[str, Any]:
    """Generator records (any output_mode) -> one SA-1B image record."""
    image_id = image_id_for(file_name)
    annotations = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        if isinstance(seg, np.ndarray):
            seg = amg.mask_to_rle(seg[None])[0]
        if not isinstance(seg["counts"], str):
            seg = amg.coco_encode_rle(seg)
        annotations.append({
            "bbox": [float(v) for v in r["bbox"]],
            "area": int(r["area"]),
            "segmentation": {"size": [int(height), int(width)], "counts": seg["counts"]},
            "predicted_iou": float(r["predicted_iou"]),
            "point_coords": [[float(x), float(y)] for x, y in r["point_coords"]],
            "crop_box": [float(v) for v in r["crop_box"]],
            "id": image_id * MAX_MASKS_PER_IMAGE + i,
            "stability_score": float(r["stability_score"]),
        })
    return {"image": {"image_id": image_id, "width": int(width), "height": int(height),
                      "file_name": os.path.basename(file_name)},
            "annotations": annotations}


def write_json_atomic(path: str, obj: Any, tmp_prefix: str = ".tmp-") -> None:
    """Writes JSON to a temporary file beside `path` (named `tmp_prefix` + random + .json),
    flushes it to disk, then renames it over `path`: a reader (or a resumed run) sees the old
    file or the whole new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; annotations are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(directory: str) -> int:
    """Deletes temporary files a killed `write_json_atomic` left in `directory` (one run
    per output folder is assumed); returns how many."""
    stale = [n for n in os.listdir(directory) if n.startswith(".tmp-") and n.endswith(".json")]
    for name in stale:
        os.unlink(os.path.join(directory, name))
    return len(stale)


def read_sa1b(path: str) -> Dict[str, Any]:
    """Reads and checks an SA-1B annotation file (ours or a released one)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SA1BFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), dict) or \
            not isinstance(data.get("annotations"), list):
        raise SA1BFormatError(f"{path}: expected an object with 'image' and 'annotations'")
    for key in ("image_id", "width", "height", "file_name"):
        if key not in data["image"]:
            raise SA1BFormatError(f"{path}: image record has no {key!r}")
    size = [data["image"]["height"], data["image"]["width"]]
    for i, ann in enumerate(data["annotations"]):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise SA1BFormatError(f"{path}: annotation {i} has no segmentation RLE")
        if list(seg["size"]) != size:
            raise SA1BFormatError(f"{path}: annotation {i} has size {seg['size']}, the image "
                                  f"is {size[0]}x{size[1]} (height x width)")
    return data


def iter_masks(data: Dict[str, Any]) -> Iterator[Tuple[Dict[str, Any], np.ndarray]]:
    """(annotation, (H, W) bool mask) for each annotation of a record from `read_sa1b`;
    masks are decoded one at a time (an SA-1B image has ~100 masks of 2-3 MP)."""
    for ann in data["annotations"]:
        yield ann, amg.rle_to_mask(ann["segmentation"])


def load_masks(path: str) -> Tuple[Dict[str, Any], np.ndarray]:
    """The image record and all masks (N, H, W) bool of an SA-1B file."""
    data = read_sa1b(path)
    h, w = data["image"]["height"], data["image"]["width"]
    masks = np.zeros((len(data["annotations"]), h, w), bool)
    for i, (_, mask) in enumerate(iter_masks(data)):
        masks[i] = mask
    return data["image"], masks
