"""COCO/LVIS ground truth, result files and pycocotools' COCOeval, shared by the proposal
(`evaluation.proposals`) and instance (`evaluation.instances`) evaluations."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Iterable, List, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


def _read_json(path: PathLike, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {str(path)!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None


def load_coco_gt(coco_gt):
    """A pycocotools `COCO`, a `CocoInstances` (its `.coco`) or the path of a COCO/LVIS
    instance JSON -> a `COCO` ready for COCOeval. Annotations without `iscrowd` (LVIS) get 0,
    without `area` their mask's area; a file without `categories` gets an empty list."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    if isinstance(coco_gt, (str, os.PathLike)):
        data = _read_json(coco_gt, "annotation")
        if not isinstance(data, dict) or any(k not in data for k in ("images", "annotations")):
            raise ValueError(f"{coco_gt}: no 'images' and 'annotations' lists: not a COCO "
                             "instance file")
        coco = COCO()
        coco.dataset = data
        coco.dataset.setdefault("categories", [])
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    elif isinstance(getattr(coco_gt, "coco", None), COCO):
        coco = coco_gt.coco
    elif isinstance(coco_gt, COCO):
        coco = coco_gt
    else:
        raise ValueError("coco_gt must be a pycocotools COCO, a CocoInstances or the path of an "
                         f"annotation JSON, got {type(coco_gt).__name__}")
    coco.dataset.setdefault("categories", [])
    for ann in coco.anns.values():  # the same dicts as dataset["annotations"]
        ann.setdefault("iscrowd", 0)  # LVIS has no crowd flag
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(coco.annToRLE(ann)))
    return coco


def read_results(results, required: Sequence[str], what: str = "results") -> List[dict]:
    """A list of COCO result dicts, or the path of a JSON holding one -> the list, after
    checking that every entry is a dict with the `required` keys."""
    if isinstance(results, (str, os.PathLike)):
        source = str(results)
        results = _read_json(results, what)
    else:
        source = what
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of COCO result dicts, got "
                         f"{type(results).__name__}")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: entry {i} is a {type(r).__name__}, not a dict")
        missing = [k for k in required if k not in r]
        if missing:
            raise ValueError(f"{source}: entry {i} has no {', '.join(map(repr, missing))} "
                             f"(each needs {', '.join(required)})")
    return results


def check_image_ids(gt, ids: Iterable, what: str) -> None:
    unknown = sorted(set(ids) - set(gt.getImgIds()), key=str)
    if unknown:
        raise ValueError(f"{what} name {len(unknown)} image id(s) that the ground truth does "
                         f"not have: {', '.join(map(str, unknown[:5]))}")


def run_cocoeval(gt, results: List[dict], *, use_cats: bool, max_dets: Sequence[int],
                 image_ids: Optional[Sequence[int]] = None):
    """COCOeval(iouType="segm") of `results` (mask results) against `gt` (a `COCO` from
    `load_coco_gt`), evaluated and accumulated with pycocotools' printing silenced.
    `image_ids`: the images scored (default: every image of `gt`; pass the ids actually run
    when only some were, or the other images' objects count as missed). A result's `bbox`
    is dropped first, as Detectron2 does: with one, loadRes would take the box's area instead
    of the mask's for the small/medium/large ranges."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    check_image_ids(gt, (r["image_id"] for r in results), "results")
    if image_ids is not None:
        check_image_ids(gt, image_ids, "image_ids")
    dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            dt = gt.loadRes(dets)
        else:  # loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {"images": copy.deepcopy(gt.dataset["images"]),
                          "categories": copy.deepcopy(gt.dataset["categories"]),
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = sorted(int(m) for m in max_dets)
        ev.params.imgIds = sorted(gt.getImgIds() if image_ids is None else set(image_ids))
        ev.evaluate()
        ev.accumulate()
    return ev


def coco_image_path(images_dir: PathLike, info: dict) -> str:
    """Where an annotation file's image record points in `images_dir`: its `file_name`, or
    for LVIS (images named by their COCO URL) the URL's last component; a `file_name` with
    folders falls back to its base name when the full path is not there."""
    name = info.get("file_name") or info.get("coco_url", "").rsplit("/", 1)[-1]
    path = os.path.join(images_dir, name)
    return path if os.path.isfile(path) else os.path.join(images_dir, os.path.basename(name))
