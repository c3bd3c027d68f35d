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


def digit_folders(root, images: int = 400, start: int = 0):
    """scikit-learn's real digits as a user's folder: ROOT/CLASS/NNNN.png, 28 × 28 RGB PNGs (the
    first `images` digits from `start`)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in range(start, start + images):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28)).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def clip_teacher(path, seed: int = 0):
    """A randomly initialised transformers CLIP vision model with its projection (32 px, patch
    8, 16-d embeddings) saved at `path`: a user's CLIP checkpoint dir, small."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(path)
    return path


def digit_boxes(root, images: int = 60):
    """Images with boxes as COCO writes them: ROOT/images/NNNN.png (40 × 40 RGB, two real digits
    side by side) and ROOT/instances.json ("images", "annotations" with [x, y, w, h] boxes and
    category ids, "categories": the digits' names). Returns the JSON's path."""
    import json

    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i in range(images):
        canvas = np.zeros((40, 40), np.uint8)
        for j in range(2):
            k = int(rng.integers(len(digits.images)))
            glyph = Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8)).resize((14, 14))
            x, y = 2 + 20 * j + int(rng.integers(0, 4)), int(rng.integers(2, 26))
            canvas[y:y + 14, x:x + 14] = np.asarray(glyph)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "bbox": [x, y, 14, 14], "category_id": int(digits.target[k]) + 1,
                                "area": 196, "iscrowd": 0})
        Image.fromarray(canvas).convert("RGB").save(root / "images" / f"{i:04d}.png")
        entries.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": 40, "height": 40})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": c + 1, "name": str(c)} for c in range(10)]}))
    return path
