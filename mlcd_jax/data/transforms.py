"""Decoding and augmentation on the host (uint8 out; normalised on the device, see `normalize`).

Two resolutions. Square: every image becomes one size² crop (`random_resized_crop`,
`center_crop`). Native (big_vision's NaFlex, SigLIP 2): every image keeps its aspect ratio at the
largest patch-aligned size within a token budget (`Native.size`), and leaves the host as a fixed
number of patches with their (row, col) positions and a mask (`patchify`).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlcd_jax.runtime.errors import UserError

CLIP_MEAN_VALUES = (0.48145466, 0.4578275, 0.40821073)  # as CLIP's preprocessor configs say
CLIP_STD_VALUES = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN = np.array(CLIP_MEAN_VALUES, np.float32)
CLIP_STD = np.array(CLIP_STD_VALUES, np.float32)


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


def crop_boxes(boxes: np.ndarray, window: Window, size: int | tuple[int, int],
               flipped: bool = False, keep: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [x0, y0, x1, y1] of the source image in pixels of the crop of `window` resized to
    `size` (size², or (width, height)), mirrored if `flipped`, clipped to it; and which of them
    keep at least `keep` of their area inside the crop (the others are cropped away: their boxes
    are zeroed)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out_w, out_h = (size, size) if isinstance(size, int) else size
    x, y, cw, ch = window
    scaled = (boxes - np.array([x, y, x, y], np.float32)) * np.array(
        [out_w / cw, out_h / ch, out_w / cw, out_h / ch], np.float32)
    clipped = np.clip(scaled, 0, np.array([out_w, out_h, out_w, out_h], np.float32))
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    whole = area(scaled)
    kept = (whole > 0) & (area(clipped) >= keep * whole)
    if flipped:
        clipped = np.stack([out_w - clipped[:, 2], clipped[:, 1], out_w - clipped[:, 0],
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


def normalize_patches(patches):
    """uint8 patches (..., p·p·C), each a patch's rows, columns and channels flattened → float32
    with CLIP's mean and std per channel."""
    flat = patches.reshape(patches.shape[:-1] + (-1, 3))
    return normalize(flat).reshape(patches.shape)


# ------------------------------------------------------------------------------------------------
# Native resolution
# ------------------------------------------------------------------------------------------------

def budget_size(height: int, width: int, patch: int, tokens: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """(H, W): the largest patch-aligned size at the aspect ratio of `height` × `width` whose
    grid has at most `tokens` patches (each side rounded up to whole patches, at least one).
    The same float operations as transformers' SigLIP 2 image processor
    (`siglip2.image_processing_pil_siglip2.get_image_size_for_max_num_patches`: a binary search
    for the scale), so an exported model's users can size images with that function
    (tests/models/test_native_vit.py compares them)."""
    def scaled(scale: float, size: int) -> int:
        return int(max(patch, math.ceil(size * scale / patch) * patch))

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch) * (scaled(scale, width) / patch) <= tokens:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


@dataclasses.dataclass(frozen=True)
class Native:
    """Native-resolution sizing: `max_tokens` patches of `patch` px at most per image;
    `min_tokens` 0 fills the budget (NaFlex: small images are enlarged), > 0 keeps an image's own
    size (rounded up to whole patches) where that has between min_tokens and max_tokens patches,
    shrinks larger ones to the budget and enlarges smaller ones to min_tokens. `keep_aspect`
    False ("squash"): every whole image resized to the square grid of ⌊√max_tokens⌋² patches, its
    aspect ratio lost (the baseline that keeps all of an image but not its shape)."""
    patch: int
    max_tokens: int
    min_tokens: int = 0
    keep_aspect: bool = True

    def __post_init__(self):
        if not 1 <= self.max_tokens or not 0 <= self.min_tokens <= self.max_tokens:
            raise UserError(f"native sizing needs 0 ≤ min_tokens ≤ max_tokens and max_tokens ≥ "
                            f"1, got min_tokens {self.min_tokens}, max_tokens {self.max_tokens}")

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) in pixels, multiples of the patch, for an image of height × width."""
        p = self.patch
        if not self.keep_aspect:
            side = math.isqrt(self.max_tokens) * p
            return side, side
        if self.min_tokens:
            own = max(p, math.ceil(height / p) * p), max(p, math.ceil(width / p) * p)
            tokens = (own[0] // p) * (own[1] // p)
            if self.min_tokens <= tokens <= self.max_tokens:
                return own
            if tokens < self.min_tokens:
                return budget_size(height, width, p, self.min_tokens)
        return budget_size(height, width, p, self.max_tokens)

    def __str__(self) -> str:
        if not self.keep_aspect:
            side = math.isqrt(self.max_tokens)
            return f"whole images squashed to {side} × {side} patches"
        least = f", ≥ {self.min_tokens}" if self.min_tokens else ""
        return f"native resolution ≤ {self.max_tokens} patches per image{least}"

    def describe(self) -> dict:
        """The rule as an exported preprocessor config states it."""
        return {"resolution": "native" if self.keep_aspect else "squash",
                "patch_size": self.patch, "max_num_patches": self.max_tokens,
                "min_num_patches": self.min_tokens}


def native_sizing(data, patch: int) -> Native | None:
    """The native-resolution sizing of a config's `data` section for a model of `patch` (None:
    square crops). "squash" is the same patch path with every image on the square grid of
    data.image_size."""
    if data.resolution == "squash":
        return Native(patch, (data.image_size // patch) ** 2, keep_aspect=False)
    if data.resolution != "native":
        return None
    return Native(patch, data.max_tokens or (data.image_size // patch) ** 2, data.min_tokens)


def native_crop(image: Image.Image, rng: np.random.Generator, scale,
                ratio=(3 / 4, 4 / 3)) -> Window:
    """A random window for native training: its area a fraction in `scale` of the image's, its
    aspect ratio the image's own times a factor in `ratio`; the whole image where ten draws do
    not fit."""
    w, h = image.size
    for _ in range(10):
        target = w * h * rng.uniform(*scale)
        aspect = w / h * math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return float(x), float(y), float(cw), float(ch)
    return 0.0, 0.0, float(w), float(h)


def native_resize(image: Image.Image, native: Native,
                  window: Window | None = None) -> Image.Image:
    """`window` of `image` (default: all of it) resized to its native size (bicubic)."""
    x, y, cw, ch = window or (0.0, 0.0, *image.size)
    height, width = native.size(round(ch), round(cw))
    return image.resize((width, height), Image.BICUBIC, box=(x, y, x + cw, y + ch))


def patchify(image: np.ndarray, patch: int, max_tokens: int):
    """An (H, W, C) image (H, W multiples of `patch`) as `max_tokens` rows: patches
    (max_tokens, p·p·C), each a patch's rows, columns and channels flattened (the conv kernel's
    order, so the patch embedding is the kernel reshaped), in row-major grid order and then
    zero padding; positions (max_tokens, 2) int32 (row, col); mask (max_tokens,) bool, the real
    patches first."""
    h, w, c = image.shape
    gh, gw = h // patch, w // patch
    n = gh * gw
    if h % patch or w % patch or n > max_tokens:
        raise ValueError(f"a {h}×{w} image is not {patch}-px patches within {max_tokens} tokens")
    patches = np.zeros((max_tokens, patch * patch * c), image.dtype)
    patches[:n] = image.reshape(gh, patch, gw, patch, c).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    positions = np.zeros((max_tokens, 2), np.int32)
    positions[:n] = np.stack(np.divmod(np.arange(n), gw), axis=1)
    return patches, positions, np.arange(max_tokens) < n


def native_train_transform(record: dict, rng: np.random.Generator, native: Native, scale,
                           flip: bool = True, boxes: np.ndarray | None = None):
    """Native training: `native_crop`, then the crop at its native size (+ flip), uint8; with
    `boxes` (source pixels), (image, boxes in it, which boxes survived) as `train_transform`."""
    image = decode(record)
    window = native_crop(image, rng, scale)
    image = native_resize(image, native, window)
    flipped = flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    out = np.asarray(image, np.uint8)
    return out if boxes is None else (out, *crop_boxes(boxes, window, image.size, flipped))


def native_eval_transform(record: dict, native: Native, boxes: np.ndarray | None = None):
    """The whole image at its native size, uint8; with `boxes`, as `eval_transform`."""
    image = decode(record)
    window = (0.0, 0.0, *map(float, image.size))
    image = native_resize(image, native)
    out = np.asarray(image, np.uint8)
    return out if boxes is None else (out, *crop_boxes(boxes, window, image.size))
