"""Training examples and a deterministic, resumable, host-sharded batch loader (no counterpart
in the official release; the preprocessing matches `SamPredictor.set_image`).

An example (`make_example`), with S the model's input size:
  "image":      (S, S, 3) uint8   `ResizeLongestSide(S).apply_image`, zero-padded bottom/right
  "input_size": (2,) int32        (h, w) after resizing, before padding
  "masks":      (M, S/4, S/4) bool  ground truth in the mask decoder's low-res frame, which
                                  covers the padded S x S input at stride 4
  "boxes":      (M, 4) float32    the original mask's tight XYXY box (inclusive pixel indexes,
                                  as `masks_to_boxes`) mapped with `apply_boxes`
  "mask_valid": (M,) bool

Low-res masks: low-res pixel (r, c) covers input pixels [4r, 4r+4) x [4c, 4c+4), which map back
to an area of the original image; the pixel is True when at least half of the original pixels
(by their centres) in that area are in the mask, the part of the cell over the padding counting
as background. This is one PIL box-filter resize of the original mask (a few ms for an SA-1B
mask), a close stand-in for "bilinear resize to (h, w), pad, 4x4 average >= 0.5" (which is
exact when the image is already at scale 1).

Mask selection: masks covering more than `MAX_AREA_FRACTION` of the image and masks empty at
low res are dropped; of the others a uniformly random subset of at most M is kept, in a random
order. It is done by visiting the masks in `rng.permutation` order and keeping valid ones
until M are found, so a record's RLEs are decoded only as far as needed.

`TrainLoader`: the global example stream is, per epoch, a permutation of the dataset from
(seed, epoch); global batch `step` is positions [step*G, (step+1)*G) of that endless stream;
process p of P takes rows [p*G/P, (p+1)*G/P). Each example's rng is seeded from (seed, step,
global row), so a run resumed at step k sees byte-identical batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ..utils import amg
from ..utils.transforms import ResizeLongestSide
from . import datasets

MAX_AREA_FRACTION = 0.9
LOW_RES_STRIDE = 4


def pad_image(image: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def low_res_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W) bool mask in the original frame -> (S/4, S/4) bool in the low-res frame (see the
    module docstring)."""
    big_h, big_w = mask.shape
    h, w = ResizeLongestSide.get_preprocess_shape(big_h, big_w, image_size)
    lh, lw = -(-h // LOW_RES_STRIDE), -(-w // LOW_RES_STRIDE)  # cells touching the image
    # the cells' extent in original pixels; it may pass the image edge (cells over padding)
    y1, x1 = lh * LOW_RES_STRIDE * big_h / h, lw * LOW_RES_STRIDE * big_w / w
    # worked on transposed (RLE masks are column-major, so `mask.T` is the cheap copy), always,
    # so that every caller gets the same bits from PIL's two rounding passes
    padded = np.zeros((int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1), np.uint8)
    padded[:big_w, :big_h] = mask.T
    padded *= 255
    small = Image.fromarray(padded).resize((lh, lw), Image.BOX, box=(0, 0, y1, x1))
    out = np.zeros((image_size // LOW_RES_STRIDE,) * 2, bool)
    out[:lh, :lw] = np.asarray(small).T >= 128
    return out


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a non-empty (H, W) mask, inclusive pixel indexes."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def _build_example(image: np.ndarray, n_masks: int, get_mask: Callable[[int], np.ndarray],
                   image_size: int, max_masks: int, rng: np.random.Generator) -> dict[str, Any]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    big_h, big_w = image.shape[:2]
    transform = ResizeLongestSide(image_size)
    resized = transform.apply_image(image)
    low = image_size // LOW_RES_STRIDE
    masks = np.zeros((max_masks, low, low), bool)
    boxes = np.zeros((max_masks, 4), np.float32)
    valid = np.zeros((max_masks,), bool)
    n = 0
    for i in rng.permutation(n_masks):
        if n == max_masks:
            break
        mask = get_mask(int(i))
        if mask.shape != (big_h, big_w):
            raise ValueError(f"mask {i} is {mask.shape}, the image is {(big_h, big_w)}")
        area = int(np.count_nonzero(mask))
        if area == 0 or area > MAX_AREA_FRACTION * big_h * big_w:
            continue
        lr = low_res_mask(mask, image_size)
        if not lr.any():
            continue
        masks[n] = lr
        boxes[n] = transform.apply_boxes(mask_box(mask)[None], (big_h, big_w))[0]
        valid[n] = True
        n += 1
    return {"image": pad_image(resized, image_size),
            "input_size": np.array(resized.shape[:2], np.int32),
            "masks": masks, "boxes": boxes, "mask_valid": valid}


def make_example(image: np.ndarray, masks: np.ndarray, image_size: int, max_masks: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (N, H, W) bool masks -> one training example (layout in
    the module docstring)."""
    masks = np.asarray(masks, bool)
    return _build_example(image, len(masks), lambda i: masks[i], image_size, max_masks, rng)


def example_from_record(record: dict[str, Any], image_size: int, max_masks: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Same as `make_example(*decode_record(record)[:2], ...)` with the same rng, but decodes
    only the RLEs it visits."""
    image = datasets.decode_image(record)
    rles = datasets.record_rles(record)
    return _build_example(image, len(rles), lambda i: amg.rle_to_mask(rles[i]), image_size,
                          max_masks, rng)


class TrainLoader:
    """Deterministic host-local batches of a data source (len, [i] -> record) for one process
    of a multi-process run; see the module docstring for the order."""

    def __init__(self, source, global_batch_size: int, image_size: int = 1024,
                 max_masks: int = 64, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 4, prefetch: int = 2):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if len(source) == 0:
            raise ValueError("the dataset is empty: nothing to train on")
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} must be a positive "
                             f"multiple of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} not in [0, {process_count})")
        if image_size % LOW_RES_STRIDE:
            raise ValueError(f"image_size {image_size} must be a multiple of {LOW_RES_STRIDE}")
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.image_size, self.max_masks, self.seed = image_size, max_masks, seed
        self.process_index, self.process_count = process_index, process_count
        self.num_workers, self.prefetch = max(1, num_workers), prefetch
        self._perms: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 1 else None

    def __len__(self) -> int:
        return len(self.source)

    def steps_per_epoch(self) -> float:
        return len(self.source) / self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.source))
        return self._perms[epoch]

    def record_index(self, step: int, row: int) -> int:
        """Dataset index of global row `row` of global batch `step`."""
        position = step * self.global_batch_size + row
        epoch, offset = divmod(position, len(self.source))
        return int(self._permutation(epoch)[offset])

    def _example(self, step: int, row: int, record) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, row])
        return example_from_record(record, self.image_size, self.max_masks, rng)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`, stacked: leading axis
        global_batch_size // process_count."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = self.process_index * self.local_batch_size
        rows = range(first, first + self.local_batch_size)
        records = [self.source[self.record_index(step, r)] for r in rows]
        if self._pool is None:
            examples = [self._example(step, r, rec) for r, rec in zip(rows, records)]
        else:
            examples = list(self._pool.map(lambda a: self._example(step, *a),
                                           zip(rows, records)))
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def batches(self, start_step: int = 0,
                num_steps: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, local batch) from `start_step` on (endless unless `num_steps`), made by a
        background thread `prefetch` batches ahead; closing the iterator stops the thread."""
        out: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()
        end = None if num_steps is None else start_step + num_steps

        def produce():
            step = start_step
            try:
                while not stop.is_set() and (end is None or step < end):
                    item = (step, self.local_batch(step))
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    step += 1
                out.put(None)
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
                out.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="TrainLoader.batches")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def eval_examples(source, max_examples: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """(image, masks, info) of the first `max_examples` records (all by default), in the
    source's order; info also has the record "index"."""
    n = len(source) if max_examples is None else min(max_examples, len(source))
    for i in range(n):
        image, masks, info = datasets.decode_record(source[i])
        info["index"] = i
        yield image, masks, info
