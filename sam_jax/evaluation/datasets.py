"""Evaluation datasets: images with their object masks, from the formats users have.

- `MaskFolder(images, masks, ignore_value=None)`: an image folder and a mask folder paired by
  file stem. A mask PNG is binary (0 and one other value: one object) or an instance map
  (every distinct non-zero value one object; an RGB map: every distinct non-black colour);
  `ignore_value` marks pixels that count neither way (e.g. 255 for VOC-style void borders).
- `CocoInstances(annotations, images)`: a COCO or LVIS instance JSON read with pycocotools;
  crowd regions become ignore pixels, as in COCO's own evaluation.
- `Sa1bFolder(folder, images=None)`: SA-1B JSON files (released, or `sam-jax generate`'s),
  each image beside its JSON or in `images`.

Each yields `EvalImage`s; `max_images` keeps the first N (sorted by name, COCO by image id, so
runs compare).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
from PIL import Image

from ..utils.image_io import load_image
from .coco import coco_image_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


class EvalImage(NamedTuple):
    name: str  # the image's stem
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool, one per object
    ignore: Optional[np.ndarray]  # (H, W) bool: pixels outside every IoU, or None


def _by_stem(folder: str, extensions: tuple, what: str) -> dict:
    if not os.path.isdir(folder):
        raise ValueError(f"{what} folder {folder!r} does not exist")
    files = {}
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in extensions:
            if stem in files:
                raise ValueError(f"{what} folder {folder!r} has two files for {stem!r}: "
                                 f"{os.path.basename(files[stem])} and {os.path.basename(path)}")
            files[stem] = path
    if not files:
        raise ValueError(f"{what} folder {folder!r} has no {'/'.join(extensions)} files")
    return files


def instance_masks(label_map: np.ndarray, ignore_value: Optional[int] = None,
                   source: str = "mask") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(H, W) or (H, W, 3) label map -> ((N, H, W) bool objects, (H, W) ignore or None).
    0 (black) is background; every other value (colour) is one object, in increasing order."""
    if label_map.ndim == 3:
        rgb = label_map[..., :3].astype(np.int64)
        label_map = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    elif label_map.ndim != 2:
        raise ValueError(f"{source}: a mask must be (H, W) or (H, W, 3), got {label_map.shape}")
    ignore = None
    if ignore_value is not None:
        ignore = label_map == ignore_value
        ignore = ignore if ignore.any() else None
    values = [v for v in np.unique(label_map) if v != 0 and v != ignore_value]
    masks = np.stack([label_map == v for v in values]) if values else np.zeros(
        (0,) + label_map.shape, bool)
    return masks, ignore


class MaskFolder:
    """Images and masks paired by stem (see the module docstring)."""

    def __init__(self, images: str, masks: str, ignore_value: Optional[int] = None,
                 max_images: Optional[int] = None):
        image_files = _by_stem(images, IMAGE_EXTENSIONS, "image")
        mask_files = _by_stem(masks, MASK_EXTENSIONS, "mask")
        missing = sorted(set(image_files) - set(mask_files))
        if len(missing) == len(image_files):
            raise ValueError(f"no image in {images!r} has a mask of the same name in {masks!r} "
                             f"(e.g. {missing[0]!r})")
        # images without a mask are not evaluated; masks without an image are an error, since
        # those objects would silently drop out of the score
        orphans = sorted(set(mask_files) - set(image_files))
        if orphans:
            raise ValueError(f"{len(orphans)} mask(s) in {masks!r} have no image in {images!r}: "
                             f"{', '.join(orphans[:5])}")
        stems = sorted(mask_files)[:max_images]
        self.pairs = [(s, image_files[s], mask_files[s]) for s in stems]
        self.ignore_value = ignore_value

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[EvalImage]:
        for stem, image_path, mask_path in self.pairs:
            image, _ = load_image(image_path)
            label_map = np.asarray(Image.open(mask_path))
            if label_map.shape[:2] != image.shape[:2]:
                raise ValueError(f"{mask_path}: mask is {label_map.shape[1]}x"
                                 f"{label_map.shape[0]}, its image {image.shape[1]}x"
                                 f"{image.shape[0]}")
            masks, ignore = instance_masks(label_map, self.ignore_value, mask_path)
            yield EvalImage(stem, image, masks, ignore)


class CocoInstances:
    """A COCO/LVIS instance annotation JSON with its image folder (pycocotools)."""

    def __init__(self, annotations: str, images: str, max_images: Optional[int] = None):
        try:
            from pycocotools.coco import COCO
        except ImportError as e:  # pragma: no cover - pycocotools is a dependency
            raise ImportError("COCO/LVIS datasets need pycocotools: pip install pycocotools") from e
        if not os.path.isfile(annotations):
            raise ValueError(f"annotation file {annotations!r} does not exist")
        with open(annotations) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{annotations}: not a JSON file ({e})") from None
        for key in ("images", "annotations"):
            if key not in data:
                raise ValueError(f"{annotations}: no {key!r} list: not a COCO instance file")
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)  # LVIS has no crowd flag
        self.coco = COCO()
        self.coco.dataset = data
        self.coco.createIndex()
        self.images = images
        ids = sorted(self.coco.getImgIds())  # by id: LVIS images have no file_name
        self.ids = [i for i in ids if self.coco.getAnnIds(imgIds=i)][:max_images]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[EvalImage]:
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            path = coco_image_path(self.images, info)
            if not os.path.isfile(path):
                raise ValueError(f"image {image_id} of the annotations is not at {path}")
            image, _ = load_image(path)
            if image.shape[:2] != (info["height"], info["width"]):
                raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, the "
                                 f"annotations say {info['width']}x{info['height']}")
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
            objects = [self.coco.annToMask(a).astype(bool) for a in anns if not a["iscrowd"]]
            crowd = [self.coco.annToMask(a).astype(bool) for a in anns if a["iscrowd"]]
            masks = np.stack(objects) if objects else np.zeros((0,) + image.shape[:2], bool)
            ignore = np.logical_or.reduce(crowd) if crowd else None
            yield EvalImage(os.path.splitext(os.path.basename(path))[0], image, masks, ignore)


class Sa1bFolder:
    """SA-1B annotation files with their images."""

    def __init__(self, folder: str, images: Optional[str] = None,
                 max_images: Optional[int] = None):
        from ..sa1b import read_sa1b

        if not os.path.isdir(folder):
            raise ValueError(f"SA-1B folder {folder!r} does not exist")
        paths = sorted(glob.glob(os.path.join(folder, "*.json")))
        if not paths:
            raise ValueError(f"SA-1B folder {folder!r} has no .json files")
        self.records = [(p, read_sa1b(p)) for p in paths[:max_images]]
        self.images = images or folder

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EvalImage]:
        from ..sa1b import iter_masks

        for path, data in self.records:
            image_path = os.path.join(self.images, data["image"]["file_name"])
            if not os.path.isfile(image_path):
                raise ValueError(f"{path}: its image {data['image']['file_name']!r} is not in "
                                 f"{self.images!r}")
            image, _ = load_image(image_path)
            masks: List[np.ndarray] = [m for _, m in iter_masks(data)]
            stacked = np.stack(masks) if masks else np.zeros((0,) + image.shape[:2], bool)
            if stacked.shape[1:] != image.shape[:2]:
                raise ValueError(f"{path}: masks are {stacked.shape[2]}x{stacked.shape[1]}, "
                                 f"the image {image.shape[1]}x{image.shape[0]}")
            yield EvalImage(os.path.splitext(data["image"]["file_name"])[0], image, stacked,
                            None)


def parse_dataset(spec: str, ignore_value: Optional[int] = None,
                  max_images: Optional[int] = None):
    """A command-line dataset spec -> (name, dataset):
    `[NAME=]masks:IMAGES_DIR,MASKS_DIR`, `[NAME=]coco:ANNOTATIONS_JSON,IMAGES_DIR` or
    `[NAME=]sa1b:DIR[,IMAGES_DIR]`. The name defaults to the last folder's name."""
    head, sep, paths = spec.partition(":")
    name, _, kind = head.rpartition("=")
    parts = [p for p in paths.split(",") if p] if sep else []
    kinds = {"masks": (2, 2), "coco": (2, 2), "sa1b": (1, 2)}
    if kind not in kinds or not kinds[kind][0] <= len(parts) <= kinds[kind][1]:
        raise ValueError(f"dataset {spec!r}: expected [NAME=]masks:IMAGES_DIR,MASKS_DIR, "
                         "[NAME=]coco:ANNOTATIONS_JSON,IMAGES_DIR or [NAME=]sa1b:DIR[,IMAGES_DIR]")
    if kind == "masks":
        dataset = MaskFolder(parts[0], parts[1], ignore_value, max_images)
    elif kind == "coco":
        dataset = CocoInstances(parts[0], parts[1], max_images)
    else:
        dataset = Sa1bFolder(parts[0], parts[1] if len(parts) > 1 else None, max_images)
    default = os.path.basename(os.path.normpath(parts[-1] if kind != "coco" else parts[0]))
    return name or os.path.splitext(default)[0], dataset
