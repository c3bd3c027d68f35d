"""OCR region labels: each text region's token ids, written as a label store keyed by region.

RICE (arXiv 2507.20025) labels an OCR region (its text found by PaddleOCR, kept above confidence
0.7) not by a cluster but by its text's tokens: the token ids are the region's several positive
classes and the tokenizer's vocabulary is that head's K, trained with the MLCD loss. Here a
region's text is what its annotation carried (`data/regions.py`); the tokenizer is a CLIP one the
user has (`--tokenizer DIR`) or a BPE of CLIP's form trained on a seeded sample of the records'
region texts (`data/tokenizer.py`, saved as OUT/tokenizer.json).

A region's labels are its text's token ids without CLIP's start / end tokens, each once, in the
order they first appear, cut to `num_labels` (-1 pads a shorter list). A text with no token left
(none after normalisation) gives no row (counted). The store is the label store's format
(`labels/store.py`): labels.npy (N_regions × L int32), keys.npy (the regions' keys f"{record
key}#{region id}"), manifest.json (num_classes = the vocabulary's size, "regions": {"kind": "ocr",
"tokenizer", ...}), so the trainer reads object and OCR region labels the same way
(`labels/join.py:join_regions`). One streamed pass over the records (the line of each record that
has a text region), memory bounded by a batch of texts; written under .tmp names, manifest last.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from tqdm import tqdm

from mlcd_jax.data import record_keys, tokenizer as tokenizer_lib
from mlcd_jax.labels import store
from mlcd_jax.runtime import files
from mlcd_jax.runtime.errors import UserError

BATCH = 4096  # texts tokenised at once
CHUNK = 1 << 16  # records whose region counts are read at once


def _texts_of(source, indices) -> list[tuple[str, str]]:
    """(region key, text) of the text regions of records `indices` (only their lines read)."""
    counts = source.region_counts(indices)
    out = []
    for i in np.asarray(indices)[counts[:, 1] > 0]:
        regions, key = source.regions(int(i)).of_kind("text"), source.key(int(i))
        out.extend(zip(regions.keys(key), regions.texts))
    return out


def make_tokenizer(source, out: pathlib.Path, *, directory=None, vocab_size: int = 4096,
                   sample_records: int = 100_000, seed: int = 0):
    """A CLIP tokenizer from `directory`, else a BPE trained on the texts of a seeded sample of
    records (saved as OUT/tokenizer.json)."""
    if directory:
        return tokenizer_lib.load(directory), str(directory)
    n = len(source)
    chosen = np.sort(np.random.default_rng(seed).choice(n, min(n, sample_records), replace=False))
    texts = [t for s in range(0, len(chosen), CHUNK) for _, t in _texts_of(source,
                                                                         chosen[s:s + CHUNK])]
    if not texts:
        raise UserError("labels ocr: the sampled records have no region with a text (OCR "
                        "regions come from annotations with utf8_string / text / caption)")
    tok = tokenizer_lib.train(texts, vocab_size)
    path = tok.save(out)
    return tok, f"{path} (trained on {len(texts):,} region texts of {len(chosen):,} records)"


def token_labels(tok: tokenizer_lib.TextTokenizer, texts: list[str], num_labels: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n, L) int32, -1 padded; tokens per text before the cut) of `texts`."""
    out = np.full((len(texts), num_labels), -1, np.int32)
    found = np.zeros(len(texts), np.int64)
    special = {tok.start, tok.end}
    for row, encoding in enumerate(tok.tokenizer.encode_batch(texts, add_special_tokens=False)):
        ids = list(dict.fromkeys(i for i in encoding.ids if i not in special))  # once, in order
        found[row] = len(ids)
        out[row, :min(len(ids), num_labels)] = ids[:num_labels]
    return out, found


def run(source, out_dir, *, tokenizer=None, num_labels: int = 16, vocab_size: int = 4096,
        sample_records: int = 100_000, seed: int = 0) -> dict:
    """The OCR label store of `source`'s text regions in `out_dir` (see the module's docstring)."""
    if getattr(source, "no_regions", "this source has no boxes") is not None:
        raise UserError(f"labels ocr: {getattr(source, 'no_regions', 'no regions')}")
    if source.unkeyed is not None:
        raise UserError(f"labels ocr: region labels are found by key, but the records have "
                        f"none: {source.unkeyed}")
    if num_labels < 1:
        raise UserError(f"--num_labels must be ≥ 1, got {num_labels}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # no manifest vouches for a half-made store
    tok, tokenizer_name = make_tokenizer(source, out, directory=tokenizer, vocab_size=vocab_size,
                                         sample_records=sample_records, seed=seed)
    n = len(source)
    total = sum(int(source.region_counts(np.arange(s, min(n, s + CHUNK)))[:, 1].sum())
                for s in range(0, n, CHUNK))
    if not total:
        raise UserError("labels ocr: the records have no region with a text (OCR regions come "
                        "from annotations with utf8_string / text / caption)")
    rows, empty, cut = 0, 0, 0
    with (open(out / "keys.hashes.tmp", "wb") as hashes,
          tqdm(total=n, desc="labels ocr", unit="record", unit_scale=True) as bar):
        labels = np.lib.format.open_memmap(out / "labels.all.tmp", "w+", np.int32,
                                           (total, num_labels))
        pending: list[tuple[str, str]] = []
        for s in range(0, n, CHUNK):
            pending += _texts_of(source, np.arange(s, min(n, s + CHUNK)))
            last = s + CHUNK >= n
            while len(pending) >= BATCH or (last and pending):
                batch, pending = pending[:BATCH], pending[BATCH:]
                found, counts = token_labels(tok, [t for _, t in batch], num_labels)
                keep = counts > 0
                labels[rows:rows + int(keep.sum())] = found[keep]
                kept = (k for (k, _), ok in zip(batch, keep) if ok)
                hashes.write(record_keys.hashes(kept).tobytes())
                rows += int(keep.sum())
                empty += int((~keep).sum())
                cut += int((counts > num_labels).sum())
            bar.update(min(CHUNK, n - s))
        labels.flush()
        del labels
    if not rows:
        raise UserError(f"labels ocr: none of the {total:,} region texts has a token of "
                        f"{tokenizer_name}")
    _cut_rows(out / "labels.all.tmp", out / "labels.npy.tmp", rows)
    hashed = np.memmap(out / "keys.hashes.tmp", record_keys.HASH, "r")
    record_keys.build(out / "keys.npy", (hashed[s:s + (1 << 22)] for s in range(0, rows, 1 << 22)),
                      rows, describe=lambda r: f"region row {r}", what=f"the text regions of {out}")
    del hashed
    (out / "keys.hashes.tmp").unlink()
    os.replace(out / "labels.npy.tmp", out / "labels.npy")
    store.write_region_label_manifest(
        out, num_examples=rows, num_classes=tok.vocab_size, num_labels=num_labels, kind="ocr",
        source_fingerprint=files.digest(source.fingerprint(), source.regions_fingerprint()),
        keys="keys.npy", tokenizer=tokenizer_name, vocab_size=tok.vocab_size)
    return {"regions": rows, "text_regions": total, "without_tokens": empty,
            "cut_to_num_labels": cut, "num_classes": tok.vocab_size, "num_labels": num_labels,
            "tokenizer": tokenizer_name}


def _cut_rows(src: pathlib.Path, dst: pathlib.Path, rows: int, chunk: int = 1 << 20) -> None:
    """The first `rows` rows of the .npy `src` as `dst` (a chunk at a time); `src` removed."""
    whole = np.load(src, mmap_mode="r")
    if rows == len(whole):
        del whole
        os.replace(src, dst)
        return
    part = np.lib.format.open_memmap(dst, "w+", whole.dtype, (rows,) + whole.shape[1:])
    for s in range(0, rows, chunk):
        part[s:s + chunk] = whole[s:min(rows, s + chunk)]
    part.flush()
    del part, whole
    src.unlink()

