"""Train input pipeline throughput: images/s by number of grain worker processes.

    .venv/bin/python bench/pipeline.py               # 500 × 375 JPEGs → 224² crops, workers 0, 1, 2
    .venv/bin/python bench/pipeline.py --smoke --workers 0 --json /tmp/p.json   # toy (the tests)

Writes synthetic photos-like JPEGs (smooth gradients + noise, ~quality 90) into an ArrayRecord
file, then times the full train pipeline (read, decode, random-resized crop, flip, batch) with
0 (in-process), 1 and 2 worker processes. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from mlcd_jax.data import pipeline, sources  # noqa: E402


def photo(rng, w=500, h=375):
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80))
                     for c in range(3)], -1)
    img = np.clip(128 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--json", default="bench/results/pipeline.json")
    p.add_argument("--smoke", action="store_true", help="16 images of 64 × 48 → 32² crops, "
                   "batches of 4, 2 timed: seconds, for the tests")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.image_size, a.batch, a.batches = 16, 32, 4, 2
    size = (64, 48) if a.smoke else (500, 375)
    flags.FLAGS.mark_as_parsed()

    from array_record.python.array_record_module import ArrayRecordWriter
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/photos.array_record"
        writer = ArrayRecordWriter(path, "group_size:1")
        for _ in range(a.images):
            writer.write(photo(rng, *size))
        writer.close()
        source = sources.ArrayRecordSource(path)
        for workers in [int(w) for w in a.workers.split(",")]:
            it = iter(pipeline.dataset(source, batch_size=a.batch, image_size=a.image_size,
                                       num_labels=1, seed=0, workers=workers,
                                       process_index=0, process_count=1))
            for _ in range(max(2, workers * 2)):  # warm-up: start workers, fill buffers
                next(it)
            t = time.perf_counter()
            for _ in range(a.batches):
                next(it)
            rate = a.batches * a.batch / (time.perf_counter() - t)
            rows.append({"workers": workers, "images_per_s": rate,
                         "images_per_s_per_worker": rate / max(workers, 1)})
            print(f"workers={workers}: {rate:.0f} images/s", flush=True)
    print(f"\n{a.images} JPEGs {size[0]}×{size[1]} → {a.image_size}² random-resized crops + flip, "
          f"batch {a.batch}")
    print(f"{'workers':>8} {'images/s':>10} {'per worker':>11}")
    for r in rows:
        print(f"{r['workers']:>8} {r['images_per_s']:>10.0f} {r['images_per_s_per_worker']:>11.0f}")
    out = pathlib.Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
