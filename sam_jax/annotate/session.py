"""The model side of `sam-jax annotate`: image embeddings computed once per image (the next
image's in the background while the annotator works), one decode per click, the previous
click's low-res logits fed back as the mask prompt (SAM's interactive use), and a checkpoint
switch without a restart (the data engine's model in the loop).

Embeddings are kept for the last `cache_size` images (LRU); `embed_in_background(name)` starts
computing one on a single worker thread, and `predict` waits for it if it is still running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..utils.image_io import load_image


class PromptError(ValueError):
    """A prompt the model cannot take (outside the image, bad labels, unknown mask token)."""


class Embedded:
    """One image's embedding, as a `SamPredictor` holds it after `set_image`."""

    def __init__(self, predictor_state: Dict[str, Any], width: int, height: int, seconds: float):
        self.state = predictor_state
        self.width = width
        self.height = height
        self.seconds = seconds


class ModelSession:
    """Embeds images and decodes prompts for the annotation tool (thread-safe)."""

    def __init__(self, model, image_path, cache_size: int = 3, logits_kept: int = 64):
        from ..predictor import SamPredictor

        self._image_path = image_path  # name -> path, validated by the store
        self._predictor = SamPredictor(model)
        self._model = model
        self._lock = threading.RLock()  # one decode or embed at a time on the predictor
        self._cache: "collections.OrderedDict[str, Embedded]" = collections.OrderedDict()
        self._cache_size = cache_size
        self._pending: Dict[str, concurrent.futures.Future] = {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._logits: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
        self._logits_kept = logits_kept
        self.checkpoint: Optional[str] = None

    # ---- embeddings ---------------------------------------------------------------------------
    def _embed_now(self, name: str) -> Embedded:
        image, _ = load_image(self._image_path(name))
        with self._lock:
            start = time.perf_counter()
            self._predictor.set_image(image)
            import jax
            jax.block_until_ready(self._predictor.features)
            state = {k: getattr(self._predictor, k) for k in
                     ("features", "original_size", "input_size", "is_image_set")}
            seconds = time.perf_counter() - start
        return Embedded(state, image.shape[1], image.shape[0], seconds)

    def embedding(self, name: str) -> Embedded:
        """The image's embedding: cached, awaited from the background worker, or computed."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            future = self._pending.get(name)
        embedded = future.result() if future is not None else self._embed_now(name)
        with self._lock:
            self._pending.pop(name, None)
            self._cache[name] = embedded
            self._cache.move_to_end(name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embedded

    def embed_in_background(self, name: str) -> None:
        """Starts embedding `name` on the worker thread unless it is cached or under way."""
        with self._lock:
            if name in self._cache or name in self._pending:
                return
            self._pending[name] = self._worker.submit(self._embed_now, name)

    def image_seconds(self, name: str) -> float:
        return self.embedding(name).seconds

    # ---- decoding -----------------------------------------------------------------------------
    def predict(self, name: str, points: Sequence[Sequence[float]] = (),
                labels: Sequence[int] = (), box: Optional[Sequence[float]] = None,
                mask_token: Optional[str] = None,
                multimask: bool = True) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """One decode: (masks (C, H, W) bool, predicted IoUs (C,), a token per candidate
        whose low-res logits a later call may feed back with `mask_token`)."""
        embedded = self.embedding(name)
        coords, labs = _check_prompt(points, labels, box, embedded.width, embedded.height)
        mask_input = None
        if mask_token is not None:
            with self._lock:
                if mask_token not in self._logits:
                    raise PromptError("unknown or expired mask token: click again")
                mask_input = self._logits[mask_token][None]
        with self._lock:
            for key, value in embedded.state.items():
                setattr(self._predictor, key, value)
            masks, scores, low_res = self._predictor.predict(
                point_coords=coords, point_labels=labs,
                box=None if box is None else np.asarray(box, np.float32),
                mask_input=mask_input, multimask_output=multimask)
            tokens = []
            for logits in low_res:
                token = uuid.uuid4().hex
                self._logits[token] = logits
                tokens.append(token)
            while len(self._logits) > self._logits_kept:
                self._logits.popitem(last=False)
        return masks, scores, tokens

    def switch_checkpoint(self, model, checkpoint: str) -> None:
        """Uses `model` from now on; cached embeddings (the old encoder's) are dropped."""
        from ..predictor import SamPredictor

        with self._lock:
            self._predictor = SamPredictor(model)
            self._model = model
            self._cache.clear()
            self._logits.clear()
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self.checkpoint = checkpoint

    @property
    def model(self):
        return self._model

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _check_prompt(points, labels, box, width: int, height: int):
    """Validated (coords (N, 2) float32 or None, labels (N,) int32 or None)."""
    coords = labs = None
    if len(points) != len(labels):
        raise PromptError(f"{len(points)} points but {len(labels)} labels")
    if not len(points) and box is None:
        raise PromptError("no prompt: click a point or drag a box")
    if len(points):
        try:
            coords = np.asarray(points, np.float32).reshape(-1, 2)
            labs = np.asarray(labels, np.int32).reshape(-1)
        except (TypeError, ValueError):
            raise PromptError("points must be [x, y] pairs and labels integers") from None
        if not np.isin(labs, (0, 1)).all():
            raise PromptError("a point's label must be 1 (object) or 0 (background)")
        outside = ~((coords[:, 0] >= 0) & (coords[:, 0] < width)
                    & (coords[:, 1] >= 0) & (coords[:, 1] < height))
        if outside.any():
            x, y = coords[np.argmax(outside)]
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    if box is not None:
        try:
            b = np.asarray(box, np.float32).reshape(4)
        except (TypeError, ValueError):
            raise PromptError("a box is [x0, y0, x1, y1]") from None
        if not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            raise PromptError(f"box {b.tolist()} is not inside the {width}x{height} image "
                              "with x0 < x1 and y0 < y1")
    return coords, labs
