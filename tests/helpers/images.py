"""Small encoded images shared by the data tests: a JPEG / PNG of one grey value, a source of
them with some records truncated, and a folder with unreadable files among good ones."""

import io

import numpy as np
from PIL import Image


def jpeg(value, size=(12, 10), fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1] + (3,), value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


class Encoded:
    """Encoded images; records in `corrupt` are truncated (a JPEG cut at a third)."""

    def __init__(self, n=24, corrupt=()):
        self.n, self.corrupt = n, set(corrupt)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        data = jpeg(i * 10)
        return {"image_bytes": data[:len(data) // 3] if i in self.corrupt else data,
                "label": i % 5, "path": f"img{i}.jpg"}


def unreadable_files(folder):
    """A folder of 6 good images and 3 that are not: empty, truncated, a text file."""
    (folder / "cls").mkdir(parents=True)
    for i in range(6):
        (folder / "cls" / f"good{i}.png").write_bytes(jpeg(i * 40, size=(40, 40), fmt="PNG"))
    (folder / "cls" / "empty.jpg").write_bytes(b"")
    (folder / "cls" / "cut.jpg").write_bytes(jpeg(9, size=(40, 40))[:100])
    (folder / "cls" / "notes.png").write_text("not an image")
    (folder / "cls" / "tiny.png").write_bytes(jpeg(5, size=(5, 5), fmt="PNG"))
