"""tensorflow-datasets builders for SAM training data, prepared as `array_record` and read back
with `builder.as_data_source(split)`, without TensorFlow (no counterpart in the official release).

Two builders share one record layout, so `decode_record` and the loader in `training.data`
work for both:

  "image":      bytes   the image file as it was on disk (JPEG/PNG), decoded on read
  "height":     int32   the image height (all masks have this size)
  "width":      int32
  "masks":      Sequence(bytes)  one COCO compressed RLE `counts` string per object mask
  "mask_ids":   Sequence(int64)  DAVIS-style: the mask's pixel value (palette index, gray level
                                 or packed RGB); SA-1B: the annotation id
  "group":      bytes   DAVIS-style: the sequence (sub-folder) name; SA-1B: the tar / folder name
  "name":       bytes   the frame or file name (no extension for DAVIS-style, the file name for
                        SA-1B)
  "image_id":   int64   a stable id (`sa1b.image_id_for` of the file name, or the SA-1B id)

Bytes are `tfds.features.Tensor(shape=(), dtype=np.object_)`: unlike `tfds.features.Image`
they are encoded and decoded by tfds' numpy example parser, so preparing and reading need no
TensorFlow. Images with no mask are skipped when preparing (they carry no training signal).
Keys are hashed by tfds, so the record order within a split is a fixed pseudo-random order.

Entry points: `prepare_image_mask_folder`, `prepare_sa1b_folder`, `load_source`,
`decode_record`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from .. import sa1b
from ..utils import amg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# what PIL raises for unreadable files (a broken PNG chunk is a SyntaxError)
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
def _bytes():
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": _bytes(),
        "height": tfds.features.Scalar(dtype=np.int32),
        "width": tfds.features.Scalar(dtype=np.int32),
        "masks": tfds.features.Sequence(_bytes()),
        "mask_ids": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        "group": _bytes(),
        "name": _bytes(),
        "image_id": tfds.features.Scalar(dtype=np.int64),
    })


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except _IMAGE_ERRORS as e:
        raise ValueError(f"cannot read image {where}: {e}") from None
    return h, w


def _encode_masks(masks: np.ndarray) -> list[str]:
    return [amg.coco_encode_rle(r)["counts"] for r in amg.mask_to_rle(masks)]


def split_masks(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label image -> (object values (N,), masks (N, H, W) bool): 0 is background, each
    distinct nonzero value (palette index, gray level, or RGB packed as r<<16|g<<8|b) is one
    object, so a 0/255 mask is one object."""
    label = np.asarray(label)
    if label.ndim == 3:  # RGB(A) label colours: pack the colour channels into one integer
        c = label[..., :3].astype(np.int64)
        label = (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]
    values = np.unique(label)
    values = values[values != 0]
    return values.astype(np.int64), label[None] == values[:, None, None]


# ---- image + mask folders (DAVIS-style) ------------------------------------------------------

def _folder_layout(root: str, resolution: str | None) -> tuple[str, str]:
    """(images dir, masks dir) of a DAVIS (`JPEGImages/<res>`, `Annotations/<res>`) or plain
    (`images`, `masks`) layout."""
    if os.path.isdir(os.path.join(root, "JPEGImages")):
        if resolution is None:
            res = sorted(os.listdir(os.path.join(root, "JPEGImages")))
            if len(res) != 1:
                raise ValueError(f"{root}/JPEGImages has resolutions {res}: pass resolution=")
            resolution = res[0]
        images, masks = (os.path.join(root, d, resolution) for d in ("JPEGImages", "Annotations"))
    elif os.path.isdir(os.path.join(root, "images")):
        images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
    else:
        raise ValueError(f"{root}: expected JPEGImages/<res>/ + Annotations/<res>/ (DAVIS) or "
                         f"images/ + masks/ folders")
    for d in (images, masks):
        if not os.path.isdir(d):
            raise ValueError(f"{d}: no such folder")
    return images, masks


def _list_pairs(images: str, masks: str) -> dict[str, list[tuple[str, str, str]]]:
    """group -> [(frame name, image path, mask path)] for every image that has a mask PNG;
    images directly under `images` form the group ""."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for dirpath, _, files in sorted(os.walk(images)):
        group = os.path.relpath(dirpath, images)
        group = "" if group == "." else group
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            mask = os.path.join(masks, group, stem + ".png")
            if os.path.exists(mask):
                groups.setdefault(group, []).append((stem, os.path.join(dirpath, f), mask))
    if not groups:
        raise ValueError(f"no image in {images} has a mask <name>.png under {masks}")
    return groups


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds' default `code_path` asks importlib.resources about our package, which needs the
    `importlib_resources` backport for an editable install; this file is the answer anyway."""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


class ImageMaskFolder(_Builder, skip_registration=True):
    """Image + label-PNG folders; "validation" = the whole `holdout_groups` (only written when
    there are any), "train" = every other group."""

    name = "sam_image_mask_folder"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, root: str, holdout_groups: Sequence[str] = (),
                 resolution: str | None = None, **kwargs):
        self._root = os.path.abspath(root)
        self._resolution = resolution
        self._holdout = sorted(set(holdout_groups))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=_features(),
            description="Image + mask folders (DAVIS-style) for SAM training.",
            metadata=tfds.core.MetadataDict(root=self._root, resolution=self._resolution,
                                            holdout_groups=self._holdout))

    def _split_generators(self, dl_manager):
        groups = _list_pairs(*_folder_layout(self._root, self._resolution))
        missing = [g for g in self._holdout if g not in groups]
        if missing:
            raise ValueError(f"holdout groups {missing} are not in {self._root} (groups: "
                             f"{sorted(groups)})")
        train = {g: v for g, v in groups.items() if g not in self._holdout}
        if not train:
            raise ValueError("every group is held out: the train split would be empty")
        splits = {"train": self._generate_examples(train)}
        if self._holdout:
            splits["validation"] = self._generate_examples({g: groups[g] for g in self._holdout})
        return splits

    def _generate_examples(self, groups):
        for group, frames in groups.items():
            for name, image_path, mask_path in frames:
                with open(image_path, "rb") as f:
                    data = f.read()
                h, w = _image_size(data, image_path)
                try:
                    with Image.open(mask_path) as m:
                        label = np.asarray(m)
                except _IMAGE_ERRORS as e:
                    raise ValueError(f"cannot read mask {mask_path}: {e}") from None
                if label.shape[:2] != (h, w):
                    raise ValueError(f"{mask_path} is {label.shape[1]}x{label.shape[0]}, its "
                                     f"image {image_path} is {w}x{h} (width x height)")
                values, masks = split_masks(label)
                if not len(values):
                    continue
                key = f"{group}/{name}"
                yield key, {"image": data, "height": h, "width": w, "masks": _encode_masks(masks),
                            "mask_ids": values, "group": group, "name": name,
                            "image_id": sa1b.image_id_for(key)}


# ---- SA-1B format ----------------------------------------------------------------------------

def _in_validation(name: str, fraction: float) -> bool:
    """Deterministic held-out subset: by a hash of the image id, so the same image is always
    on the same side, whatever folder or tar it comes from."""
    h = zlib.crc32(str(sa1b.image_id_for(name)).encode()) % 1_000_000
    return h < fraction * 1_000_000


def _sa1b_record(data: dict[str, Any], image: bytes, group: str, where: str) -> dict[str, Any]:
    info = data["image"]
    h, w = _image_size(image, where)
    if (h, w) != (info["height"], info["width"]):
        raise ValueError(f"{where} is {w}x{h}, its annotation says {info['width']}x"
                         f"{info['height']} (width x height)")
    masks, ids = [], []
    for i, ann in enumerate(data["annotations"]):
        counts = ann["segmentation"]["counts"]
        if not isinstance(counts, str):  # uncompressed RLE
            counts = amg.coco_encode_counts(counts)
        masks.append(counts)
        ids.append(int(ann.get("id", i)))
    return {"image": image, "height": h, "width": w, "masks": masks,
            "mask_ids": np.asarray(ids, np.int64), "group": group, "name": info["file_name"],
            "image_id": int(info["image_id"])}


def _iter_folder(annotations: str, images: str) -> Iterator[tuple[str, dict[str, Any]]]:
    group = os.path.basename(os.path.normpath(annotations))
    for path in sorted(glob.glob(os.path.join(annotations, "*.json"))):
        data = sa1b.read_sa1b(path)
        image_path = os.path.join(images, os.path.basename(data["image"]["file_name"]))
        try:
            with open(image_path, "rb") as f:
                image = f.read()
        except OSError as e:
            raise ValueError(f"{path}: cannot read its image {image_path}: {e}") from None
        yield data["image"]["file_name"], _sa1b_record(data, image, group, image_path)


def _iter_tar(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Pairs `<name>.jpg` + `<name>.json` of a released SA-1B tar, in one pass."""
    group = os.path.basename(path).split(".")[0]
    pending: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            stem, ext = os.path.splitext(os.path.basename(member.name))
            if not member.isfile() or ext.lower() not in (".json",) + IMAGE_EXTENSIONS:
                continue
            part = pending.setdefault(stem, {})
            data = tar.extractfile(member).read()
            if ext.lower() == ".json":
                try:
                    part["json"] = json.loads(data)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{member.name}: not valid JSON ({e})") from None
            else:
                part["image"] = data
            if len(part) == 2:
                del pending[stem]
                where = f"{path}:{stem}"
                yield stem, _sa1b_record(part["json"], part["image"], group, where)


class SA1BFolder(_Builder, skip_registration=True):
    """SA-1B annotation files (released, or written by `sam-jax generate`) with their images:
    folders of `<name>.json` (images beside them or in `images_dir`) and/or released `.tar`
    files. "validation" = the images whose hashed id falls in `validation_fraction` (only
    written when there are any)."""

    name = "sam_sa1b"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, sources: Sequence[str], images_dir: str | None = None,
                 validation_fraction: float = 0.0, **kwargs):
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        self._sources = [os.path.abspath(s) for s in sources]
        self._images_dir = os.path.abspath(images_dir) if images_dir else None
        self._fraction = float(validation_fraction)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=_features(),
            description="SA-1B format annotations (COCO RLE strings) for SAM training.",
            metadata=tfds.core.MetadataDict(sources=self._sources, images_dir=self._images_dir,
                                            validation_fraction=self._fraction))

    def _iter_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for source in self._sources:
            if os.path.isdir(source):
                tars = sorted(glob.glob(os.path.join(source, "*.tar")))
                if glob.glob(os.path.join(source, "*.json")):
                    yield from _iter_folder(source, self._images_dir or source)
                for t in tars:
                    yield from _iter_tar(t)
            elif source.endswith(".tar") and os.path.isfile(source):
                yield from _iter_tar(source)
            else:
                raise ValueError(f"{source}: not a folder of SA-1B .json files or a .tar")

    def _split_generators(self, dl_manager):
        names = self._names()
        n_val = sum(_in_validation(n, self._fraction) for n in names)
        if not names:
            raise ValueError(f"no SA-1B annotation (.json or .tar) in {self._sources}")
        if n_val == len(names):
            raise ValueError("every image falls in the validation fraction: train is empty")
        splits = {"train": self._generate_examples(False)}
        if n_val:
            splits["validation"] = self._generate_examples(True)
        return splits

    def _names(self) -> list[str]:
        """Image names from the file lists alone (tar headers), to size the splits."""
        names = []
        for source in self._sources:
            tars = [source] if source.endswith(".tar") else \
                sorted(glob.glob(os.path.join(source, "*.tar")))
            for t in tars:
                with tarfile.open(t) as tar:
                    names += [os.path.basename(m.name)[:-5] for m in tar
                              if m.isfile() and m.name.endswith(".json")]
            if os.path.isdir(source):
                names += [os.path.basename(p)[:-5]
                          for p in glob.glob(os.path.join(source, "*.json"))]
        return names

    def _generate_examples(self, validation: bool):
        for name, record in self._iter_all():
            if _in_validation(name, self._fraction) != validation:
                continue
            if not record["masks"]:
                continue
            yield f"{record['group']}/{name}", record


# ---- entry points ----------------------------------------------------------------------------

def _prepare(builder: tfds.core.DatasetBuilder, wanted: dict[str, Any],
             overwrite: bool) -> tfds.core.DatasetBuilder:
    """Prepares `builder`; an already prepared copy is reused only if it was made from the
    same inputs (its metadata), else an error (or a rebuild with `overwrite`)."""
    config = None
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        have = dict(tfds.builder_from_directory(builder.data_dir).info.metadata or {})
        same = json.loads(json.dumps(have)) == json.loads(json.dumps(wanted))
        if not same and not overwrite:
            raise ValueError(f"{builder.data_dir} was prepared from {have}, not {wanted}: "
                             f"use another data_dir or overwrite=True")
        if not same or overwrite:
            config = tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    builder.download_and_prepare(download_config=config)
    return builder


def prepare_image_mask_folder(root: str, data_dir: str, holdout_groups: Sequence[str] = (),
                              resolution: str | None = None,
                              overwrite: bool = False) -> ImageMaskFolder:
    """Prepares a DAVIS-style (`JPEGImages/<res>/<group>/*.jpg` + `Annotations/<res>/<group>/
    *.png`) or plain (`images/<group>/*` + `masks/<group>/*.png`) folder under `data_dir`;
    `holdout_groups` form the "validation" split. Returns the builder."""
    b = ImageMaskFolder(root=root, holdout_groups=holdout_groups, resolution=resolution,
                        data_dir=data_dir, file_format="array_record")
    return _prepare(b, {"root": os.path.abspath(root), "resolution": resolution,
                        "holdout_groups": sorted(set(holdout_groups))}, overwrite)


def prepare_sa1b_folder(sources: str | Sequence[str], data_dir: str,
                        images_dir: str | None = None, validation_fraction: float = 0.0,
                        overwrite: bool = False) -> SA1BFolder:
    """Prepares SA-1B format data under `data_dir`: `sources` are folders of `<name>.json`
    (images beside them, or in `images_dir` for `sam-jax generate` output) and/or released
    SA-1B `.tar` files (read directly). Returns the builder."""
    b = SA1BFolder(sources=sources, images_dir=images_dir,
                   validation_fraction=validation_fraction, data_dir=data_dir,
                   file_format="array_record")
    wanted = {"sources": b._sources, "images_dir": b._images_dir,
              "validation_fraction": float(validation_fraction)}
    return _prepare(b, wanted, overwrite)


def load_source(data: str | tfds.core.DatasetBuilder, split: str = "train"):
    """A random-access data source (len, [i] -> record dict) of a prepared split: from a
    builder, a prepared version folder (the one holding dataset_info.json), or a data_dir
    holding exactly one prepared dataset."""
    if isinstance(data, tfds.core.DatasetBuilder):
        builder = data
    else:
        path = os.path.abspath(data)
        if os.path.exists(os.path.join(path, "dataset_info.json")):
            found = [path]
        else:
            found = sorted(os.path.dirname(p) for p in
                           glob.glob(os.path.join(path, "*", "*", "dataset_info.json")) +
                           glob.glob(os.path.join(path, "*", "dataset_info.json")))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one prepared dataset (a folder with "
                             f"dataset_info.json), found {found or 'none'}")
        builder = tfds.builder_from_directory(found[0])
    if split not in builder.info.splits:
        raise ValueError(f"{builder.data_dir} has no split {split!r} (has "
                         f"{sorted(builder.info.splits)})")
    return builder.as_data_source(split)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def decode_image(record: dict[str, Any]) -> np.ndarray:
    """The record's image as (H, W, 3) uint8 RGB (grayscale, palette and RGBA converted)."""
    where = f"{_text(record['group'])}/{_text(record['name'])}"
    try:
        with Image.open(io.BytesIO(record["image"])) as im:
            image = np.asarray(im.convert("RGB"))
    except _IMAGE_ERRORS as e:
        raise ValueError(f"cannot decode the image of record {where}: {e}") from None
    if image.shape[:2] != (int(record["height"]), int(record["width"])):
        raise ValueError(f"record {where}: image is {image.shape[1]}x{image.shape[0]}, the "
                         f"record says {record['width']}x{record['height']}")
    return image


def record_rles(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's masks as COCO compressed RLE dicts (decode one with `amg.rle_to_mask`)."""
    size = [int(record["height"]), int(record["width"])]
    return [{"size": size, "counts": c} for c in record["masks"]]


def record_info(record: dict[str, Any]) -> dict[str, Any]:
    return {"group": _text(record["group"]), "name": _text(record["name"]),
            "image_id": int(record["image_id"]),
            "mask_ids": np.asarray(record["mask_ids"], np.int64),
            "height": int(record["height"]), "width": int(record["width"])}


def decode_record(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A record of either builder -> (image (H, W, 3) uint8 RGB, masks (N, H, W) bool, info
    {group, name, image_id, mask_ids, height, width})."""
    image = decode_image(record)
    h, w = image.shape[:2]
    rles = record_rles(record)
    masks = np.zeros((len(rles), h, w), bool)
    for i, rle in enumerate(rles):
        masks[i] = amg.rle_to_mask(rle)
    return image, masks, record_info(record)
