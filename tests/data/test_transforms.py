"""Decoding and transforms (mlcd_jax/data/transforms.py): the train and eval transforms, CLIP
normalisation, a corrupt image named, 16-bit PNGs and EXIF orientation decoded as a viewer shows
them."""

import io

import numpy as np
import pytest
from PIL import Image

from mlcd_jax.data import transforms

from helpers.images import Encoded


def test_train_and_eval_transforms():
    record = {"image": np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)}
    rng = np.random.default_rng(0)
    crops = [transforms.train_transform(record, rng, 16, (0.08, 1.0)) for _ in range(5)]
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 5  # random crops differ
    a, b = transforms.eval_transform(record, 16), transforms.eval_transform(record, 16)
    np.testing.assert_array_equal(a, b)
    ones = transforms.normalize(np.full((1, 3), 255, np.uint8))[0]
    np.testing.assert_allclose(ones, (1 - transforms.CLIP_MEAN) / transforms.CLIP_STD, rtol=1e-6)
    with pytest.raises(transforms.CorruptImage, match="img3.jpg"):
        transforms.decode(Encoded(5, corrupt={3})[3])


def test_sixteen_bit_png_and_exif_rotation_decode_as_a_viewer_shows_them():
    gradient = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, "PNG")  # a 16-bit grayscale PNG
    decoded = np.asarray(transforms.decode({"image_bytes": buf.getvalue()}), np.float64)
    np.testing.assert_allclose(decoded[..., 0], gradient / 257, atol=1)  # not clipped to white
    # A landscape photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view).
    stored = np.zeros((10, 30, 3), np.uint8)
    stored[:, :5] = 255  # a white band at the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    shown = np.asarray(transforms.decode({"image_bytes": buf.getvalue()}))
    assert shown.shape == (30, 10, 3)  # upright: portrait
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the band is now at the top
