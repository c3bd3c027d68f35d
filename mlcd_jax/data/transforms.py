"""Decoding and augmentation on the host (uint8 out; normalised on the device, see `normalize`)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class CorruptImage(Exception):
    pass


def decode(record: dict) -> Image.Image:
    """An RGB image of a record: its array, or its encoded bytes decoded as a viewer shows them
    (EXIF orientation applied; 16-bit and 32-bit grayscale scaled to 8 bits, not clipped)."""
    if "image" in record:
        array = np.asarray(record["image"], np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:  # grayscale H × W × 1 (e.g. tfds mnist)
            array = array[..., 0]
        return Image.fromarray(array).convert("RGB")
    if record.get("error"):
        raise CorruptImage(f"{record.get('path', 'record')}: {record['error']}")
    where = record.get("path", "record")
    if not record["image_bytes"]:
        raise CorruptImage(f"{where}: an empty file")
    try:
        image = Image.open(io.BytesIO(record["image_bytes"]))
        image.load()  # decode now: a truncated file fails here, not later
        image = ImageOps.exif_transpose(image)
        return _to_8bit(image).convert("RGB")
    except UnidentifiedImageError:
        raise CorruptImage(f"{where}: not in an image format PIL can read") from None
    except Exception as e:  # PIL raises many types for bad files
        raise CorruptImage(f"{where}: {type(e).__name__}: {e}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """PIL converts 16/32-bit integer ("I;16", "I") and float ("F") grayscale to RGB by clipping
    at 255, which turns a 16-bit PNG white; scale by the bit depth instead."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
    if image.mode == "I":  # 32-bit ints, in practice a 16-bit image
        array = np.asarray(image, np.int64)
        shift = 8 if array.max(initial=0) > 255 else 0
        return Image.fromarray((np.clip(array, 0, 65535) >> shift).astype(np.uint8))
    if image.mode == "F":  # floats: [0, 1] or [0, 255]
        array = np.asarray(image, np.float32)
        array = array * 255 if array.max(initial=0) <= 1 else array
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    return image


# A crop window: (x, y, width, height) of the source image that becomes the size² output.
Window = tuple[float, float, float, float]


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[Image.Image, Window]:
    """Inception-style crop (area fraction in `scale`, aspect ratio in `ratio`), resized to
    size², and its window."""
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return (image.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch)),
                    (float(x), float(y), float(cw), float(ch)))
    return center_crop(image, size)  # fallback, as torchvision


def center_crop(image: Image.Image, size: int) -> tuple[Image.Image, Window]:
    """Resize the shorter side to `size`, then take the central size² square; and its window
    in the source image."""
    w, h = image.size
    s = size / min(w, h)
    resized = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    rw, rh = resized.size
    x, y = (rw - size) // 2, (rh - size) // 2
    sx, sy = rw / w, rh / h
    return resized.crop((x, y, x + size, y + size)), (x / sx, y / sy, size / sx, size / sy)


def crop_boxes(boxes: np.ndarray, window: Window, size: int, flipped: bool = False,
               keep: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [x0, y0, x1, y1] of the source image in pixels of the size² crop of `window`
    (mirrored if `flipped`), clipped to it; and which of them keep at least `keep` of their area
    inside the crop (the others are cropped away: their boxes are zeroed)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x, y, cw, ch = window
    scaled = (boxes - np.array([x, y, x, y], np.float32)) * np.array(
        [size / cw, size / ch, size / cw, size / ch], np.float32)
    clipped = np.clip(scaled, 0, size)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    whole = area(scaled)
    kept = (whole > 0) & (area(clipped) >= keep * whole)
    if flipped:
        clipped = np.stack([size - clipped[:, 2], clipped[:, 1], size - clipped[:, 0],
                            clipped[:, 3]], axis=1)
    return np.where(kept[:, None], clipped, 0).astype(np.float32), kept


def train_transform(record: dict, rng: np.random.Generator, size: int, scale,
                    flip: bool = True, boxes: np.ndarray | None = None):
    """The random-resized crop (+ flip) of a record as uint8; with `boxes` (source pixels),
    (image, boxes in the crop, which boxes survived it) — `crop_boxes`."""
    image, window = random_resized_crop(decode(record), size, rng, scale)
    flipped = flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = np.asarray(image, np.uint8)
    return image if boxes is None else (image, *crop_boxes(boxes, window, size, flipped))


def eval_transform(record: dict, size: int, boxes: np.ndarray | None = None):
    """The center crop of a record as uint8; with `boxes`, as `train_transform`."""
    image, window = center_crop(decode(record), size)
    image = np.asarray(image, np.uint8)
    return image if boxes is None else (image, *crop_boxes(boxes, window, size))


def normalize(images):
    """uint8 images → float32 with CLIP's mean and std (jax or numpy arrays)."""
    return (images / 255.0 - CLIP_MEAN) / CLIP_STD
