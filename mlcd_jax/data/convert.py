"""Image folder or webdataset tar shards (img2dataset's output) → ArrayRecord files of encoded
images.

    python -m mlcd_jax.data.convert --input /data/images --output /data/ar/train --shard_size 10000
    python -m mlcd_jax.data.convert --input "/data/laion/{00000..00099}.tar" --output /data/ar/laion

Writes OUTPUT-00000-of-00010.array_record, ... (one record = one encoded image, bytes as stored,
no re-encoding) and OUTPUT.index.jsonl (record → its key, original path or tar member, in record
order, and the image's caption where it has one: the .txt that img2dataset writes beside each
image, in a tar shard or a folder), with its offsets table, key hashes, each record's class (a
folder's class sub-folders, as evaluation reads them) and manifest
(`mlcd_jax/data/index.py`: any record's key, name and caption in O(1)). The key is what labels
are joined by: in img2dataset's tars the `key` of each sample's .json (else webdataset's key of the
member), in a folder the file's relative path; two records with one key are an error naming
both. Everything streams: memory does not grow with the number of images.
`--reindex OUTPUT` adds the table and the keys to an index an older convert wrote.
Then: ``--config.data.source=arrayrecord
--config.data.path='OUTPUT-*.array_record'``; LiT reads the captions with the template "{caption}".

`--regions` carries boxes (and the text of OCR regions) into the index, each record's in its line
(`mlcd_jax/data/regions.py`: COCO-style JSON, SA-1B per-image JSON, JSON lines keyed by record key,
or `beside`: each image's own SA-1B JSON), matched to records by key and checked against the
decoded image: boxes outside it, empty or under the minimum side are dropped and counted.

Every image is decoded once here: a file that does not decode (empty, truncated, not an image) is
left out, listed with its reason in OUTPUT.skipped.jsonl and counted on the console, so that each
record of the output is an image (its labels are found by its key). Images smaller
than --warn_below pixels on a side are kept and listed as a warning (they will be upscaled).
Existing shards under OUTPUT are never mixed with new ones: convert refuses, or with --overwrite
replaces them once the new ones are written.
"""

from __future__ import annotations

import glob
import json
import pathlib
import re
import sys
import tarfile

from absl import flags
from tqdm import tqdm

from mlcd_jax.data import index as index_lib, regions as regions_lib, transforms
from mlcd_jax.data.sources import IMAGE_SUFFIXES, SHARD_NAME, caption_text
from mlcd_jax.runtime import cli
from mlcd_jax.runtime.errors import MissingFile, UserError


def _expand(pattern: str) -> list[str]:
    """Shell-style globs and img2dataset's brace ranges: shard-{00000..00009}.tar."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.groups()
        return [p for i in range(int(lo), int(hi) + 1)
                for p in _expand(pattern[:match.start()] + str(i).zfill(len(lo))
                                 + pattern[match.end():])]
    return sorted(glob.glob(pattern))


def webdataset_key(member: str) -> str:
    """webdataset's `__key__` of a tar member: its path up to the first dot of its file name
    (`00000/000000123.jpg` → `00000/000000123`)."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]


def key_of_name(name: str) -> str:
    """The key an older index's record name implies (`--reindex`): a tar member's webdataset key
    (`shard.tar:KEY.jpg`), a folder file's relative path. For img2dataset's shards that is the
    `key` of each sample's .json as well."""
    tar, sep, member = name.partition(".tar:")
    return webdataset_key(member) if sep else name


def _sidecar(data: bytes, where: str) -> dict:
    """An image's .json sidecar (img2dataset's metadata, with its "key"; or SA-1B's annotations)."""
    try:
        sidecar = json.loads(data)
    except ValueError as e:
        raise UserError(f"{where}: not a JSON object ({e}); fix or remove that sidecar") from None
    if not isinstance(sidecar, dict):
        raise UserError(f"{where}: not a JSON object; fix or remove that sidecar")
    return sidecar


def iter_images(inputs: str, sidecars: bool = False):
    """(key, name, encoded bytes, caption or None, sidecar or None) of every image, in a
    deterministic order. The key is what labels are joined by: in a tar, the `key` of the
    sample's .json sidecar (img2dataset writes one) or else webdataset's key of the member; in a
    folder, the file's relative path. The caption is the text file of the same name (KEY.jpg +
    KEY.txt), as img2dataset writes them. The sidecar (the parsed KEY.json: a tar sample's
    always, a folder's with `sidecars`) carries SA-1B's per-image annotations."""
    root = pathlib.Path(inputs)
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            text, meta = path.with_suffix(".txt"), path.with_suffix(".json")
            name = path.relative_to(root).as_posix()
            yield (name, name, path.read_bytes(),
                   caption_text(text.read_bytes()) if text.is_file() else None,
                   _sidecar(meta.read_bytes(), str(meta)) if sidecars and meta.is_file()
                   else None)
        return
    tars = _expand(inputs)
    if not tars:
        raise MissingFile(f"--input {inputs}: neither a folder nor matching tar files")
    for tar in tars:
        with tarfile.open(tar) as t:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}  # webdataset key → {suffix: member}
            for m in sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name):
                suffix = m.name[len(webdataset_key(m.name)):].lower()
                samples.setdefault(webdataset_key(m.name), {}).setdefault(suffix, m)
            for key, files in samples.items():
                meta, sidecar = files.get(".json"), None
                if meta is not None:
                    sidecar = _sidecar(t.extractfile(meta).read(), f"{tar}:{meta.name}")
                    found = sidecar.get("key")
                    key = (str(found) if found is not None else "") or key
                text = files.get(".txt")
                for suffix, member in files.items():
                    if "." + suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:  # .jpg, or .x.jpg
                        yield (key, f"{pathlib.Path(tar).name}:{member.name}",
                               t.extractfile(member).read(),
                               caption_text(t.extractfile(text).read()) if text else None,
                               sidecar)
                        break  # one image per sample


def folder_class(inputs: str, name: str) -> str | None:
    """The class of a folder's image: the first sub-folder it sits in (as `FolderSource` reads
    classes); None for an image at the top, and for tar shards."""
    folder, sep, _ = name.partition("/")
    return folder if sep and pathlib.Path(inputs).is_dir() else None


def existing_shards(output: str) -> list[pathlib.Path]:
    """Shards a convert with this output prefix wrote before (PREFIX-00000-of-00003...)."""
    out = pathlib.Path(output)
    return sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}-*.array_record")
                  if (m := SHARD_NAME.match(str(p))) and m.group(1) == str(out))


def convert(inputs: str, output: str, shard_size: int, *, overwrite: bool = False,
            warn_below: int = 16, regions: str | None = None,
            region_rules: regions_lib.Rules | None = None, report=print) -> dict:
    """Every readable image of `inputs` into ArrayRecord shards and their index, streamed: memory
    holds one image and a few counters, whatever the number of images. `regions`: where the
    records' boxes are (`data/regions.py`), kept in the index."""
    from array_record.python.array_record_module import ArrayRecordWriter
    out = pathlib.Path(output)
    old = existing_shards(output)
    if old and not overwrite:
        raise UserError(f"--output {output}: {len(old)} shards of an earlier convert exist "
                        f"({old[0].name} …); pass --overwrite to replace them, or choose "
                        "another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Annotations are read (and checked) before any image: a bad file stops convert at once.
    annotations = (regions_lib.Annotations(regions, pathlib.Path(f"{output}.regions-work"),
                                           region_rules or regions_lib.Rules())
                   if regions else None)
    index = index_lib.Writer(output, regions={} if annotations else None)
    skipped_path = pathlib.Path(f"{output}.skipped.jsonl")
    skipped_file, skipped, small, tmp_paths, writer = None, [], [], [], None
    num_skipped = num_small = 0
    beside = regions == regions_lib.BESIDE
    try:
        for key, name, data, caption, sidecar in tqdm(iter_images(inputs, sidecars=beside),
                                                      desc="convert", unit="img"):
            try:
                image = transforms.decode({"image_bytes": data, "path": name})
            except transforms.CorruptImage as e:
                if skipped_file is None:
                    skipped_file = open(f"{skipped_path}.tmp", "w")
                entry = {"name": name, "key": key, "reason": str(e).removeprefix(f"{name}: ")}
                skipped_file.write(json.dumps(entry) + "\n")
                num_skipped += 1
                if len(skipped) < 5:  # shown on the console; all are in the file
                    skipped.append(entry)
                continue
            if min(image.size) < warn_below:
                num_small += 1
                if len(small) < 5:
                    small.append(f"{name} ({image.size[0]}×{image.size[1]})")
            if index.records % shard_size == 0:
                if writer:
                    writer.close()
                tmp_paths.append(out.parent / f"{out.name}-{len(tmp_paths):05d}.array_record.tmp")
                writer = ArrayRecordWriter(str(tmp_paths[-1]), "group_size:1")
                index.new_shard()
            writer.write(data)
            index.add(key, name, caption, annotations.of(key, name, image.size, sidecar)
                      if annotations else None, image_class=folder_class(inputs, name))
        if writer:
            writer.close()
    except BaseException:  # nothing half-made left under the output's names
        index.abandon()
        if annotations:
            annotations.close()
        if writer:
            writer.close()
        for tmp in tmp_paths:
            tmp.unlink(missing_ok=True)
        if skipped_file is not None:
            skipped_file.close()
            pathlib.Path(f"{skipped_path}.tmp").unlink(missing_ok=True)
        raise
    if skipped_file is not None:
        skipped_file.close()
        pathlib.Path(f"{skipped_path}.tmp").replace(skipped_path)
        shown = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        report(f"convert: skipped {num_skipped} files that are not readable images "
               f"({shown}{' …' if num_skipped > len(skipped) else ''}); all listed in "
               f"{skipped_path}")
    if small:
        report(f"convert: warning: {num_small} images are smaller than {warn_below} px on a "
               f"side and will be upscaled: {', '.join(small)}{' …' if num_small > 5 else ''}")
    if annotations:
        annotations.report(report, "convert")
        index.regions = annotations.summary()
        annotations.close()
    if not index.records:
        index.abandon()
        for tmp in tmp_paths:
            tmp.unlink()
        raise MissingFile(f"--input {inputs}: no readable images "
                          f"({', '.join(IMAGE_SUFFIXES)}; {num_skipped} unreadable)")
    shards = []
    for i, tmp in enumerate(tmp_paths):  # final names carry the shard count
        final = out.parent / f"{out.name}-{i:05d}-of-{len(tmp_paths):05d}.array_record"
        tmp.replace(final)
        shards.append(str(final))
    for stale in set(map(str, old)) - set(shards):  # --overwrite: the old run's other shards
        pathlib.Path(stale).unlink()
    index.finish(shards)
    return {"shards": shards, "records": index.records, "skipped": num_skipped,
            "small": num_small, "captioned": index.captioned,
            "regions": index.regions}


def reindex(output: str) -> dict:
    """The offsets table of an earlier convert's index (it predates them): one pass over its
    lines, each shard opened once to count its records; no image is read again."""
    from array_record.python.array_record_module import ArrayRecordReader
    shards = [str(p) for p in existing_shards(output)]
    if not shards:
        raise MissingFile(f"--reindex {output}: no shards {output}-*-of-*.array_record")
    counts = []
    for shard in tqdm(shards, desc="reindex: counting records", unit="shard"):
        reader = ArrayRecordReader(shard)
        counts.append(reader.num_records())
        reader.close()
    return index_lib.reindex(output, shards, counts, key_of_name) | {"shards": len(shards)}


# -- the command line (its own flags: this module is a library too) -------------------------------

FLAGS = flags.FlagValues()
INPUT = flags.DEFINE_string("input", None, "Image folder, or tar files (glob / {a..b}).",
                            flag_values=FLAGS)
OUTPUT = flags.DEFINE_string("output", None, "Output prefix.", flag_values=FLAGS)
REINDEX = flags.DEFINE_string("reindex", None, "OUTPUT: add the offsets table and record keys to "
                              "an earlier convert's OUTPUT.index.jsonl, nothing re-encoded.",
                              flag_values=FLAGS)
SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Images per ArrayRecord file.",
                                  lower_bound=1, flag_values=FLAGS)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the shards of an earlier convert with "
                              "this --output.", flag_values=FLAGS)
WARN_BELOW = flags.DEFINE_integer("warn_below", 16, "List images smaller than this many pixels "
                                  "on a side.", flag_values=FLAGS)
REGIONS = flags.DEFINE_string("regions", None, "Boxes per image, kept in the index: a COCO-style "
                              ".json, a .jsonl keyed by record key ({key, boxes: [[x0, y0, x1, "
                              "y1], ...], texts}), a folder of SA-1B per-image JSON, or "
                              f"{regions_lib.BESIDE!r} (each image's own KEY.json).",
                              flag_values=FLAGS)
MIN_REGION_SIDE = flags.DEFINE_float("min_region_side", regions_lib.Rules.min_side, "Drop boxes "
                                     "with a side under this many pixels (the paper's SAM boxes: "
                                     "128 at SA-1B's resolution).", flag_values=FLAGS)
MIN_REGION_FRACTION = flags.DEFINE_float(
    "min_region_fraction", regions_lib.Rules.min_fraction, "... or under this fraction of the "
    "image's shorter side (default 1/16: one patch of a /16 ViT).", flag_values=FLAGS)


def command(args) -> None:
    del args
    if REINDEX.value:
        done = reindex(REINDEX.value)
        print(f"reindex: {done['records']:,} records of {done['shards']} shards: wrote "
              f"{REINDEX.value}.index.offsets and {REINDEX.value}.index.json")
        return
    if not (INPUT.value and OUTPUT.value):
        raise UserError("--input and --output are required (or --reindex OUTPUT)")
    if MIN_REGION_SIDE.value < 0 or not 0 <= MIN_REGION_FRACTION.value < 1:
        raise UserError("--min_region_side must be ≥ 0 and --min_region_fraction in [0, 1)")
    result = convert(INPUT.value, OUTPUT.value, SHARD_SIZE.value, overwrite=OVERWRITE.value,
                     warn_below=WARN_BELOW.value, regions=REGIONS.value,
                     region_rules=regions_lib.Rules(MIN_REGION_SIDE.value,
                                                    MIN_REGION_FRACTION.value))
    skipped = f"; skipped {result['skipped']:,} unreadable" if result["skipped"] else ""
    captioned = (f" ({result['captioned']:,} with a caption)" if result["captioned"] else "")
    regions = result["regions"]
    boxed = (f"; {regions['regions']:,} regions ({regions['with_text']:,} with a text) on "
             f"{regions['records']:,} images" if regions else "")
    print(f"convert: wrote {result['records']:,} images to {len(result['shards'])} ArrayRecord "
          f"files ({OUTPUT.value}-*.array_record) and {OUTPUT.value}.index.jsonl{captioned}"
          f"{boxed}{skipped}")


def main(argv=None) -> int:
    return cli.run(command, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
