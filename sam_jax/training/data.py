"""Training examples and a deterministic, resumable, host-sharded batch loader (no counterpart
in the official release; the preprocessing matches `SamPredictor.set_image`).

An example (`make_example`), with S the model's input size:
  "image":      (S, S, 3) uint8   `ResizeLongestSide(S).apply_image`, zero-padded bottom/right
                                  (`resize_and_pad`; the train step normalizes it with
                                  `normalize_padded`, as inference does)
  "input_size": (2,) int32        (h, w) after resizing, before padding
  "masks":      (M, L, L) bool    ground truth in the mask decoder's low-res frame, which
                                  covers the padded S x S input at stride S/L (L =
                                  `SamConfig.low_res_size`: S/4 for SAM's ViT, 4 cells per
                                  patch; 128 at S = 448 for a patch-14 backbone, stride 3.5)
  "boxes":      (M, 4) float32    the original mask's tight XYXY box (inclusive pixel indexes,
                                  as `masks_to_boxes`) mapped with `apply_boxes`
  "mask_valid": (M,) bool

Low-res masks (stride t = S/L): low-res pixel (r, c) covers input pixels [tr, tr+t) x
[tc, tc+t), which map back
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

The batches are made by Grain (`TrainLoader.grain_dataset`) in worker processes: decoding a
1024 px SA-1B image, resizing it and decoding up to 64 RLEs is Python- and GIL-bound, so
threads alone cannot keep up with an accelerator step. The pipeline is a `MapDataset` over
this process's flat row indexes, mapped by `LocalExample` (a picklable per-record transform)
and batched before `mp_prefetch`, so that the order stays a function of the step alone and
worker k of W makes whole batches k, k+W, ... (Grain interleaves them back in step order);
`local_batch` makes the same batches synchronously, with the same transform. tfds data
sources go to the workers as (folder, split) and are reopened there (`ReopenedTfdsSource`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..utils import amg
from ..utils.transforms import ResizeLongestSide, resize_and_pad
from . import datasets

MAX_AREA_FRACTION = 0.9
LOW_RES_STRIDE = 4


def low_res_side(image_size: int, low_res_size: int | None) -> int:
    """The low-res side L: `low_res_size`, or S/4 (SAM's ViT) when None."""
    return image_size // LOW_RES_STRIDE if low_res_size is None else int(low_res_size)


def low_res_mask(mask: np.ndarray, image_size: int,
                 low_res_size: int | None = None) -> np.ndarray:
    """(H, W) bool mask in the original frame -> (L, L) bool in the low-res frame (see the
    module docstring; L = `low_res_size`, S/4 when None)."""
    side = low_res_side(image_size, low_res_size)
    stride = image_size / side
    big_h, big_w = mask.shape
    h, w = ResizeLongestSide.get_preprocess_shape(big_h, big_w, image_size)
    # cells touching the image (a tiny epsilon keeps 448 / 3.5 from rounding up to 129)
    lh, lw = (min(side, int(np.ceil(n / stride - 1e-9))) for n in (h, w))
    # the cells' extent in original pixels; it may pass the image edge (cells over padding)
    y1, x1 = lh * stride * big_h / h, lw * stride * big_w / w
    # worked on transposed (RLE masks are column-major, so `mask.T` is the cheap copy), always,
    # so that every caller gets the same bits from PIL's two rounding passes
    padded = np.zeros((int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1), np.uint8)
    padded[:big_w, :big_h] = mask.T
    padded *= 255
    small = Image.fromarray(padded).resize((lh, lw), Image.BOX, box=(0, 0, y1, x1))
    out = np.zeros((side, side), bool)
    out[:lh, :lw] = np.asarray(small).T >= 128
    return out


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a non-empty (H, W) mask, inclusive pixel indexes."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def _build_example(image: np.ndarray, n_masks: int, get_mask: Callable[[int], np.ndarray],
                   image_size: int, max_masks: int, rng: np.random.Generator,
                   low_res_size: int | None = None) -> dict[str, Any]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    big_h, big_w = image.shape[:2]
    transform = ResizeLongestSide(image_size)
    padded, input_size = resize_and_pad(image, image_size)
    low = low_res_side(image_size, low_res_size)
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
        lr = low_res_mask(mask, image_size, low)
        if not lr.any():
            continue
        masks[n] = lr
        boxes[n] = transform.apply_boxes(mask_box(mask)[None], (big_h, big_w))[0]
        valid[n] = True
        n += 1
    return {"image": padded, "input_size": np.array(input_size, np.int32),
            "masks": masks, "boxes": boxes, "mask_valid": valid}


def make_example(image: np.ndarray, masks: np.ndarray, image_size: int, max_masks: int,
                 rng: np.random.Generator,
                 low_res_size: int | None = None) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (N, H, W) bool masks -> one training example (layout in
    the module docstring)."""
    masks = np.asarray(masks, bool)
    return _build_example(image, len(masks), lambda i: masks[i], image_size, max_masks, rng,
                          low_res_size)


def example_from_record(record: dict[str, Any], image_size: int, max_masks: int,
                        rng: np.random.Generator,
                        low_res_size: int | None = None) -> dict[str, np.ndarray]:
    """Same as `make_example(*decode_record(record)[:2], ...)` with the same rng, but decodes
    only the RLEs it visits."""
    image = datasets.decode_image(record)
    rles = datasets.record_rles(record)
    return _build_example(image, len(rles), lambda i: amg.rle_to_mask(rles[i]), image_size,
                          max_masks, rng, low_res_size)


def default_worker_count() -> int:
    """`TrainLoader`'s worker processes when not given: one per core this process may run on,
    less one left to the training loop (which dispatches the step and copies the batches to
    the devices), at most 32 (each worker imports numpy, PIL, JAX and tfds on its own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 32))


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples -> one batch: Grain's `batch_fn` and `local_batch` both, so the two paths stack
    the same way."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class EpochOrder:
    """(step, global row) -> dataset index: position step * G + row of the endless stream of
    per-epoch permutations from (seed, epoch). Picklable (Grain ships it to its workers): the
    cache of the last two epochs' permutations and its lock stay behind."""

    def __init__(self, size: int, global_batch_size: int, seed: int):
        self.size, self.global_batch_size, self.seed = size, global_batch_size, seed
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # Grain's reader threads share one instance

    def __getstate__(self) -> dict[str, int]:
        return {"size": self.size, "global_batch_size": self.global_batch_size,
                "seed": self.seed}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
                # half the memory in each worker (SA-1B: 11 M records, 44 MB an epoch)
                self._perms[epoch] = perm.astype(np.int32) if self.size < 2 ** 31 else perm
            return self._perms[epoch]

    def __call__(self, step: int, row: int) -> int:
        epoch, offset = divmod(step * self.global_batch_size + row, self.size)
        return int(self.permutation(epoch)[offset])


class ReopenedTfdsSource:
    """A tfds data source that pickles as (prepared folder, split) and opens itself again where
    it is unpickled: tfds' own pickle rebuilds the dataset builder, which fails for a builder
    made with constructor arguments (ours), and open array_record readers should not cross
    processes anyway. Opens lazily, so a worker opens it once, on its first record."""

    def __init__(self, data_dir: str, split: str, source=None):
        self.data_dir, self.split = data_dir, split
        self._source = source

    @classmethod
    def wrap(cls, source):
        """`source` itself unless it is a tfds data source read without decoders."""
        info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
        if info is None or not isinstance(split, str) or getattr(source, "decoders", None):
            return source
        return cls(str(info.data_dir), split, source)

    def __getstate__(self) -> dict[str, str]:
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds
            self._source = tfds.builder_from_directory(self.data_dir).as_data_source(self.split)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int):
        return self._open()[index]


class LocalExample:
    """Grain's per-record transform: flat index i of this process's rows -> the example of
    global row `first_row + i % L` of global batch `i // L` (L = local batch size), seeded from
    (seed, step, global row). A top-level picklable class, so that it runs in worker
    processes; `TrainLoader.local_batch` calls the same object, so both paths decode alike."""

    def __init__(self, source, order: EpochOrder, local_batch_size: int, first_row: int,
                 image_size: int, max_masks: int, low_res_size: int | None = None):
        self.source, self.order = ReopenedTfdsSource.wrap(source), order
        self.local_batch_size, self.first_row = local_batch_size, first_row
        self.image_size, self.max_masks = image_size, max_masks
        self.low_res_size = low_res_size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        step, local_row = divmod(int(index), self.local_batch_size)
        row = self.first_row + local_row
        record = self.source[self.order(step, row)]
        rng = np.random.default_rng([self.order.seed, step, row])
        return example_from_record(record, self.image_size, self.max_masks, rng,
                                   self.low_res_size)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: ends the worker once its parent is gone. Grain stops its workers
    when the iterator is closed, but a training process killed with SIGKILL (preemption, the
    resume test) closes nothing, and the orphans would keep their cores and shared memory."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="sam_jax.exit_with_parent").start()


# `batches` without num_steps: endless in practice (Grain datasets have a length)
_ENDLESS_STEPS = 2 ** 40


class TrainLoader:
    """Deterministic host-local batches of a data source (len, [i] -> record) for one process
    of a multi-process run; see the module docstring for the order.

    `worker_count` Grain worker processes make the batches (`default_worker_count()` when
    None; 0 makes them in this process, for debugging), each with `num_workers` reader threads
    (threads only help where PIL releases the GIL) and `prefetch` finished batches buffered."""

    def __init__(self, source, global_batch_size: int, image_size: int = 1024,
                 max_masks: int = 64, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 1, prefetch: int = 2,
                 worker_count: int | None = None, low_res_size: int | None = None):
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
        if low_res_size is None and image_size % LOW_RES_STRIDE:
            raise ValueError(f"image_size {image_size} must be a multiple of {LOW_RES_STRIDE}")
        if worker_count is not None and worker_count < 0:
            raise ValueError(f"worker_count must be >= 0 (0: no worker process), got "
                             f"{worker_count}")
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.image_size, self.max_masks, self.seed = image_size, max_masks, seed
        self.process_index, self.process_count = process_index, process_count
        self.worker_count = default_worker_count() if worker_count is None else worker_count
        self.num_workers, self.prefetch = max(0, num_workers), max(1, prefetch)
        self._order = EpochOrder(len(source), global_batch_size, seed)
        self._example = LocalExample(source, self._order, self.local_batch_size,
                                     process_index * self.local_batch_size, image_size,
                                     max_masks, low_res_size)
        self._iterators: weakref.WeakSet = weakref.WeakSet()

    def __len__(self) -> int:
        return len(self.source)

    def steps_per_epoch(self) -> float:
        return len(self.source) / self.global_batch_size

    def record_index(self, step: int, row: int) -> int:
        """Dataset index of global row `row` of global batch `step`."""
        return self._order(step, row)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`, stacked: leading axis
        global_batch_size // process_count. Made here, synchronously: the reference that
        `batches` reproduces."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.local_batch_size
        return stack_examples([self._example(i)
                               for i in range(first, first + self.local_batch_size)])

    def grain_dataset(self, start_step: int = 0, num_steps: int | None = None):
        """The Grain pipeline behind `batches`: this process's local batches `start_step`,
        `start_step + 1`, ... Batched before `mp_prefetch`, so each worker makes whole batches
        (worker k of W makes every W-th) and Grain interleaves them back in step order."""
        import grain
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # Grain (<= 0.2.18) reads an absl flag unguarded once JAX is imported, which raises
            # outside absl.app (google/grain#1355): take every absl flag's default, as unparsed
            flags.FLAGS.mark_as_parsed()
        if start_step < 0:
            raise ValueError(f"step must be >= 0, got {start_step}")
        stop = start_step + (_ENDLESS_STEPS if num_steps is None else max(0, num_steps))
        n = self.local_batch_size
        ds = grain.MapDataset.range(start_step * n, stop * n).map(self._example)
        ds = ds.batch(n, batch_fn=stack_examples).to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_workers,
            prefetch_buffer_size=max(self.num_workers, self.prefetch)))
        return ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self.worker_count, per_worker_buffer_size=self.prefetch),
            worker_init_fn=_exit_with_parent)

    def batches(self, start_step: int = 0,
                num_steps: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, local batch) from `start_step` on (endless unless `num_steps`), equal to
        `local_batch(step)`, made ahead by the Grain workers (started on the first `next`);
        closing the iterator (or `close()`) stops them."""
        it = iter(self.grain_dataset(start_step, num_steps))
        self._iterators.add(it)
        try:
            for step, shared in enumerate(it, start_step):
                # out of Grain's shared memory into arrays of our own, so that the segments go
                # back at once rather than whenever (if ever) the caller drops the batch
                batch = {k: np.array(v) for k, v in shared.items()}
                del shared
                yield step, batch
        finally:
            self._iterators.discard(it)
            it.close()

    def close(self) -> None:
        """Stops the worker processes of every `batches` iterator still open."""
        for it in list(self._iterators):
            it.close()
        self._iterators.clear()


def eval_examples(source, max_examples: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """(image, masks, info) of the first `max_examples` records (all by default), in the
    source's order; info also has the record "index"."""
    n = len(source) if max_examples is None else min(max_examples, len(source))
    for i in range(n):
        image, masks, info = datasets.decode_record(source[i])
        info["index"] = i
        yield image, masks, info
