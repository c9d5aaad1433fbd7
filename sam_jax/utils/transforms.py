"""Ports `segment_anything/utils/transforms.py` (numpy side): resize the longest side; and
the rest of SAM's image preprocessing (the official `Sam.preprocess`: normalize, zero-pad), the
one copy that inference (numpy, on the host) and training (jax, inside the jitted step) call.

The official `apply_image` resizes with torchvision on a PIL image, which is PIL's bilinear
(antialiased) resize; we call PIL directly so the pixels are identical without torchvision.

    padded, input_size = resize_and_pad(image, S)      # (S, S, 3) uint8, (h, w) before padding
    pixels = normalize_padded(padded, input_size, pixel_mean, pixel_std)   # float32
Training stores the uint8 `padded` (4x smaller than float32) and normalizes a whole batch on
the device; inference normalizes one image on the host. Both run the same float32 operations,
except that XLA turns the division by the per-channel std into a multiplication by its
reciprocal, so the two may differ in the last bit (numpy divides, as the official torch code).
"""

from copy import deepcopy
from typing import Sequence, Tuple

import numpy as np
from PIL import Image


class ResizeLongestSide:
    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> resized uint8 with the longest side equal to `target_length`
        (a writable array, as the official one: official code hands it to torch.as_tensor)."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) pixel coordinates in the original image -> model input frame."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = deepcopy(np.asarray(coords)).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """(B, 4) XYXY boxes in the original image -> model input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    # The official `_torch` variants, for code written against `predict_torch`: same
    # arithmetic in float32, as torch does it. They accept numpy, jax or torch arrays (torch
    # converted through numpy) and return jax arrays for jax input, numpy otherwise.
    def apply_coords_torch(self, coords, original_size: Tuple[int, int]):
        """(..., 2) (x, y) pixel coordinates in the original image -> model input frame,
        float32."""
        coords = from_torch(coords)
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        # numpy and jax both keep float32 when scaled by a Python float, as torch does
        return coords.astype(np.float32) * np.array([new_w / old_w, new_h / old_h], np.float32)

    def apply_boxes_torch(self, boxes, original_size: Tuple[int, int]):
        """(B, 4) XYXY boxes in the original image -> model input frame, float32."""
        boxes = from_torch(boxes)
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """The official rounding, except that no side becomes 0 px (the official code gives
        0 for a side under half a pixel after scaling, e.g. a 2x40000 image at 1024, and
        then fails): such a side is 1 px. Every other shape is the official one."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return (max(1, int(newh + 0.5)), max(1, int(neww + 0.5)))


def from_torch(x):
    """A torch tensor as a numpy array (detached, copied to the host); anything else as given
    (numpy, jax, None), or as a numpy array when it is a list or tuple. Recognises torch by
    its type's module, so torch is never imported here."""
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    return x


def resize_and_pad(image: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """HxWx3 uint8 -> (the image with its longest side resized to `size` (`apply_image`) and
    zero-padded bottom-right to (size, size, 3) uint8, its (h, w) before padding)."""
    resized = ResizeLongestSide(size).apply_image(image)
    padded = np.zeros((size, size, 3), np.uint8)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    return padded, (int(resized.shape[0]), int(resized.shape[1]))


def normalize_padded(images, input_size, pixel_mean: Sequence[float],
                     pixel_std: Sequence[float]):
    """(..., S, S, 3) uint8 images from `resize_and_pad`, `input_size` (..., 2) their (h, w) ->
    float32 `(x - mean) / std` with the padding at exactly zero: the official `Sam.preprocess`
    (normalize, then pad). numpy arrays in, numpy out; jax arrays (or tracers) in, jax out."""
    if isinstance(images, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp  # only the training step passes jax arrays
    mean = xp.asarray(pixel_mean, xp.float32)
    std = xp.asarray(pixel_std, xp.float32)
    x = (images.astype(xp.float32) - mean) / std
    input_size = xp.asarray(input_size)
    inside = ((xp.arange(images.shape[-3])[:, None] < input_size[..., 0, None, None])
              & (xp.arange(images.shape[-2])[None, :] < input_size[..., 1, None, None]))
    return xp.where(inside[..., None], x, 0.0)
