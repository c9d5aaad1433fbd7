"""Image files in and out for the command line (no counterpart in the official repository,
whose scripts read images with OpenCV and leave conversions to the caller).

`load_image` returns what `SamPredictor.set_image` takes, HxWx3 uint8 RGB, from any file PIL
reads, and says in plain words what it had to do to get there:
- EXIF orientation is applied (the image is used the way viewers show it);
- grayscale (L, 1), palette (P, PA), LA, RGBA, CMYK, YCbCr, LAB, HSV become RGB; alpha is
  dropped, not composited (the colour under transparent pixels is kept);
- 16-bit grayscale (I;16*, and 32-bit integer "I" images whose values fit in 16 bits) is
  scaled to 8 bits with a FIXED mapping, round(v * 255 / 65535), not stretched to the image's
  own range, so the same file always gives the same pixels; the note gives the value range so a
  dim 10- or 12-bit image can be spotted. Floating-point images (F) are refused;
- of a multi-frame file (GIF, TIFF), the first frame is used.
Anything that is not a readable image raises `ImageError` with a one-line reason.

`save_mask_png` and `draw_overlay` write the command line's outputs.
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "save_mask_png", "draw_overlay"]

_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180", 4: "flipped vertically",
                 5: "transposed", 6: "rotated 90 clockwise", 7: "transversed",
                 8: "rotated 90 counter-clockwise"}
# mode -> how it is described in the note. "RGB" needs no conversion.
_TO_RGB = {
    "1": "bilevel (1-bit) image converted to RGB",
    "L": "grayscale (L) image converted to RGB (gray copied to all three channels)",
    "P": "palette (P) image converted to RGB",
    "PA": "palette + alpha (PA) image converted to RGB (alpha channel dropped)",
    "LA": "grayscale + alpha (LA) image converted to RGB (alpha channel dropped)",
    "La": "grayscale + alpha (La) image converted to RGB (alpha channel dropped)",
    "RGBA": "RGBA image converted to RGB (alpha channel dropped, not composited)",
    "RGBa": "RGBa image converted to RGB (alpha channel dropped)",
    "RGBX": "RGBX image converted to RGB (padding channel dropped)",
    "CMYK": "CMYK image converted to RGB (PIL's conversion, no colour profile)",
    "YCbCr": "YCbCr image converted to RGB",
    "LAB": "LAB image converted to RGB",
    "HSV": "HSV image converted to RGB",
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """The file is missing, unreadable or not an image we can turn into 8-bit RGB."""


def _open(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency
            image = Image.open(path)
            image.load()
        return image
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data, permissions
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _orient(image: Image.Image, notes: List[str]) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not stop us; say so instead
        notes.append("EXIF data unreadable; orientation not applied")
        return image
    if orientation in _ORIENTATIONS:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as e:  # noqa: BLE001
            notes.append(f"EXIF orientation {orientation} could not be applied ({e})")
            return image
        notes.append(f"EXIF orientation applied: {_ORIENTATIONS[orientation]} "
                     f"(orientation tag {orientation})")
    return image


def _sixteen_bit_to_rgb(image: Image.Image, path: str, notes: List[str]) -> np.ndarray:
    values = np.asarray(image)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageError(f"{path}: {image.mode} image with values in [{lo}, {hi}], outside "
                         "16 bits; convert it to 8-bit RGB first")
    eight = np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    notes.append(f"16-bit grayscale ({image.mode}) image scaled to 8 bits as value * 255 / 65535 "
                 f"(its values span [{lo}, {hi}]) and converted to RGB")
    return np.repeat(eight[..., None], 3, axis=2)


def load_image(path: str | os.PathLike) -> Tuple[np.ndarray, List[str]]:
    """Reads `path` as HxWx3 uint8 RGB. Returns the array and the notes (what was converted).

    Raises `ImageError` for a missing, unreadable or unsupported file."""
    path = os.fspath(path)
    image = _open(path)
    notes: List[str] = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"{image.format or 'multi-frame'} file has {image.n_frames} frames; "
                     "using the first")
    image = _orient(image, notes)
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        array = _sixteen_bit_to_rgb(image, path, notes)
    elif mode == "F":
        raise ImageError(f"{path}: floating-point (F) image; its value range is unknown, so "
                         "convert it to 8-bit RGB first")
    else:
        if mode != "RGB":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    if mode == "P" and "transparency" in image.info:
                        image = image.convert("RGBA")  # the palette's transparency, then drop it
                        note = "palette (P) image with transparency converted to RGB " \
                               "(transparency dropped)"
                    else:
                        note = _TO_RGB.get(mode, f"{mode} image converted to RGB")
                    image = image.convert("RGB")
                except (ValueError, OSError) as e:
                    raise ImageError(f"{path}: cannot convert a {mode} image to RGB "
                                     f"({e})") from None
            notes.append(note)
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"{path}: decoded to an array of shape {array.shape}, not HxWx3")
    return np.ascontiguousarray(array), notes


def save_mask_png(mask: np.ndarray, path: str | os.PathLike) -> None:
    """A boolean HxW mask as an 8-bit grayscale PNG: 255 inside, 0 outside."""
    Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8), "L").save(
        os.fspath(path), format="PNG")


def draw_overlay(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike, *,
                 points: Optional[Sequence[Tuple[float, float, int]]] = None,
                 box: Optional[Sequence[float]] = None,
                 color: Tuple[int, int, int] = (30, 144, 255), alpha: float = 0.5) -> None:
    """Writes `image` with `mask` tinted (`alpha` of `color`) and outlined, the prompt points
    (green foreground, red background) and the box (yellow) drawn on top, as an RGB PNG."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1.0 - alpha) + np.asarray(color, np.float32) * alpha
    thickness = max(1, round(min(h, w) / 400))
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    eroded = np.asarray(mask_img.filter(ImageFilter.MinFilter(2 * thickness + 1))) > 0
    out[mask & ~eroded] = color
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(255, 215, 0), width=2 * thickness)
    radius = max(3, round(min(h, w) / 100))
    for x, y, label in points or ():
        fill = (0, 200, 0) if label == 1 else (230, 0, 0)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill,
                     outline=(255, 255, 255), width=max(1, radius // 4))
    canvas.save(os.fspath(path), format="PNG")
