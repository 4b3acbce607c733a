"""The images every runtime sees: seeded random tensors, or image files put through the checkpoint's own
preprocessing (resize, centre crop, scale to [0, 1], normalise with the checkpoint's mean and std).

Pillow decodes and resizes when it is installed (it is what timm's and transformers' pipelines use, so the
numbers match theirs). Without Pillow, ``.npy`` files (H, W, 3 uint8 or float in [0, 1]) still work through a
numpy resampler that implements the same separable, antialiased filters as Pillow (it differs from Pillow
only by Pillow's 8-bit rounding between the two passes).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convnextv2.converters.checkpoint import Preprocessing
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import check_image_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")
ARRAY_SUFFIXES = (".npy",)


def have_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


# ------------------------------------------------------------------ numpy resampling (Pillow's filters)

def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Pillow's (and Keys') bicubic constant
    x = np.abs(x)
    return np.where(
        x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def _resample_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """(out, in) weights of a 1-D antialiased resampling: the kernel is stretched by the scale when
    shrinking so every input pixel contributes, as Pillow does."""
    kernel, support = _FILTERS[interpolation]
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale
    left = np.floor(centres - support * stretch).astype(int)
    width = int(math.ceil(support * stretch)) * 2 + 2
    taps = left[:, None] + np.arange(width)[None, :]
    weights = kernel((taps + 0.5 - centres[:, None]) / stretch)
    weights[(taps < 0) | (taps >= in_size)] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = np.zeros((out_size, in_size))
    rows = np.repeat(np.arange(out_size), width)
    np.add.at(matrix, (rows, np.clip(taps, 0, in_size - 1).ravel()), weights.ravel())
    return matrix


def resize_numpy(image: np.ndarray, height: int, width: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize an (H, W, C) float image; separable, horizontal pass first like Pillow."""
    if interpolation not in _FILTERS:
        raise BadInputError(f"interpolation {interpolation!r} is not supported without Pillow; use bicubic or bilinear")
    horizontal = _resample_matrix(image.shape[1], width, interpolation)
    vertical = _resample_matrix(image.shape[0], height, interpolation)
    out = np.einsum("wx,hxc->hwc", horizontal, image.astype(np.float64))
    return np.einsum("yh,hwc->ywc", vertical, out)


# ------------------------------------------------------------------ the pipeline

def resize_plan(height: int, width: int, pre: Preprocessing, size: int) -> tuple[int, int]:
    """(height, width) to resize to before the centre crop, timm's rule: the shorter side becomes
    floor(size / crop_pct); "squash" resizes both sides to it."""
    scaled = int(math.floor(size / pre.crop_pct))
    if pre.crop_mode == "squash":
        return scaled, scaled
    if height <= width:
        return scaled, max(scaled, int(scaled * width / height))
    return max(scaled, int(scaled * height / width)), scaled


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    top = int(round((image.shape[0] - size) / 2.0))
    left = int(round((image.shape[1] - size) / 2.0))
    return image[top:top + size, left:left + size]


def _load_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadInputError(f"{path}: expected an (H, W, 3) RGB array, found shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    raise BadInputError(f"{path}: expected uint8 or float pixels, found {array.dtype}")


def preprocess_file(path: Path, pre: Preprocessing, size: int, use_pillow: bool | None = None) -> np.ndarray:
    """One image file -> (3, size, size) float32, normalised."""
    if use_pillow is None:
        use_pillow = have_pillow()
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        pixels = _load_array(path)
        new_h, new_w = resize_plan(pixels.shape[0], pixels.shape[1], pre, size)
        if use_pillow:
            from PIL import Image

            # Pillow's float mode resizes each channel without 8-bit rounding.
            channels = [np.asarray(Image.fromarray(pixels[..., c].astype(np.float32), mode="F").resize(
                (new_w, new_h), _pillow_filter(pre.interpolation))) for c in range(3)]
            resized = np.stack(channels, axis=-1).astype(np.float64)
        else:
            resized = resize_numpy(pixels, new_h, new_w, pre.interpolation)
    else:
        if not use_pillow:
            raise BadInputError(f"{path}: decoding {suffix or 'this'} images needs Pillow "
                                "(pip install 'convnextv2-toolkit[images]'), or pass .npy arrays")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise BadInputError(f"{path}: not a readable image ({exc})") from None
        new_h, new_w = resize_plan(image.height, image.width, pre, size)
        resized = np.asarray(image.resize((new_w, new_h), _pillow_filter(pre.interpolation)), dtype=np.float64) / 255.0
    cropped = _center_crop(resized, size)
    normalised = (cropped - np.asarray(pre.mean)) / np.asarray(pre.std)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def _pillow_filter(interpolation: str) -> int:
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
    if interpolation not in filters:
        raise BadInputError(f"unknown interpolation {interpolation!r} in the checkpoint's preprocessing")
    return int(filters[interpolation])


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise BadInputError(f"--images {directory}: not a directory")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
    if not files:
        raise BadInputError(f"--images {directory}: no image files ({', '.join(IMAGE_SUFFIXES + ARRAY_SUFFIXES)})")
    return files


def load_images(files: Sequence[Path], pre: Preprocessing, size: int) -> np.ndarray:
    check_image_size(size)
    return np.stack([preprocess_file(path, pre, size) for path in files])
