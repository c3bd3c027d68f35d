"""Image folder or webdataset tar shards (img2dataset's output) → ArrayRecord files of encoded images.

    python -m mlcd_jax.data.convert --input /data/images --output /data/ar/train --shard_size 10000
    python -m mlcd_jax.data.convert --input "/data/laion/{00000..00099}.tar" --output /data/ar/laion

Writes OUTPUT-00000-of-00010.array_record, ... (one record = one encoded image, bytes as stored,
no re-encoding) and OUTPUT.index.jsonl (record → original path or tar member, in record order).
Then: ``--config.data.source=arrayrecord --config.data.path='OUTPUT-*.array_record'``.
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib
import re
import sys
import tarfile

from tqdm import tqdm

from mlcd_jax.data.sources import IMAGE_SUFFIXES


def _expand(pattern: str) -> list[str]:
    """Shell-style globs and img2dataset's brace ranges: shard-{00000..00009}.tar."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.groups()
        return [p for i in range(int(lo), int(hi) + 1)
                for p in _expand(pattern[:match.start()] + str(i).zfill(len(lo)) + pattern[match.end():])]
    return sorted(glob.glob(pattern))


def iter_images(inputs: str):
    """(name, encoded bytes) of every image, in a deterministic order."""
    root = pathlib.Path(inputs)
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            yield str(path.relative_to(root)), path.read_bytes()
        return
    tars = _expand(inputs)
    if not tars:
        raise FileNotFoundError(f"--input {inputs}: neither a folder nor matching tar files")
    for tar in tars:
        with tarfile.open(tar) as t:
            for member in sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name):
                if pathlib.PurePath(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield f"{pathlib.Path(tar).name}:{member.name}", t.extractfile(member).read()


def convert(inputs: str, output: str, shard_size: int) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordWriter
    names, shards, writer, count = [], [], None, 0
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_paths = []
    for name, data in tqdm(iter_images(inputs), desc="convert", unit="img"):
        if count % shard_size == 0:
            if writer:
                writer.close()
            tmp_paths.append(out.parent / f"{out.name}-{len(tmp_paths):05d}.array_record.tmp")
            writer = ArrayRecordWriter(str(tmp_paths[-1]), "group_size:1")
        writer.write(data)
        names.append(name)
        count += 1
    if writer:
        writer.close()
    if not count:
        raise FileNotFoundError(f"--input {inputs}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for i, tmp in enumerate(tmp_paths):  # final names carry the shard count
        final = out.parent / f"{out.name}-{i:05d}-of-{len(tmp_paths):05d}.array_record"
        tmp.replace(final)
        shards.append(str(final))
    with open(f"{output}.index.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"record": i, "name": name}) + "\n")
    return shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlcd_jax.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image folder, or tar files (glob / {a..b})")
    p.add_argument("--output", required=True, help="output prefix")
    p.add_argument("--shard_size", type=int, default=10_000)
    a = p.parse_args(argv)
    try:
        shards = convert(a.input, a.output, a.shard_size)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"convert: wrote {len(shards)} ArrayRecord files ({a.output}-*.array_record) and "
          f"{a.output}.index.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
