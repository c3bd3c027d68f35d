"""Each stage's cost as the data grows: wall time, rows/s and peak memory at growing N, each stage
in its own child process, on synthetic data the benchmark makes.

    .venv/bin/python bench/scale.py                        # N = 1e4, 1e5, 1e6 (every stage)
    .venv/bin/python bench/scale.py --sizes 1e5,1e6,1e7 --stages lookup,input,kmeans,assign
    .venv/bin/python bench/scale.py --smoke --out /tmp/s.json --png /tmp/s.png   # (the tests)

Stages (each on the data of the size asked for; the inputs are made first, untimed):
  convert   img2dataset-style tar shards (1,000 tiny images + captions each) → ArrayRecord shards
            of 1,000 records (many small shards) and the index
  lookup    ArrayRecordSource over those shards: open, then name and caption the last record and
            1,000 random ones (the index's offsets table)
  input     the trainer's input from ArrayRecord + a label store (N × 8): open, check every label,
            the first 20 batches of 64 (grain, no workers)
  embed     `labels embed` of the ArrayRecord images with a micro ViT (16 px)
  kmeans    `labels kmeans` of N × 32 embeddings into K = 1,000 (a sample of 64 per center: the
            same sample at every N), faiss, 5 iterations
  assign    `labels assign`, top-8 of 1,000 centers, faiss and jax (the embeddings keyed: the
            store's key table included)
  join      the trainer's join of N records with a label store by key (labels/join.py): the
            records' key table built on disk, then matched with the store's (its keys in another
            order; 1 % of records without labels, 1 % of labels without a record)
  lit       LiT's feature cache of the ArrayRecord images (micro ViT) and one epoch of its input
            (batches of 256: features, a caption each, tokens)

Peak memory is the child's high-water resident set (VmHWM) and, apart, its anonymous part
(RssAnon, sampled every 20 ms): what it allocated, without the pages of memory-mapped files it
read. The growth exponent is log(cost ratio) / log(N ratio) between the two largest N: 1 is
linear, 0 flat. Prints a table, writes JSON (--out) and a PNG of time and memory against N.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("convert", "lookup", "input", "embed", "kmeans", "assign", "join", "lit")


# ------------------------------------------------------------------------------------------------
# Memory of this process
# ------------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakAnon:
    """The highest RssAnon seen, sampled on a thread."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = _status()["RssAnon"], every, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        return max(self.peak, _status()["RssAnon"])


# ------------------------------------------------------------------------------------------------
# Inputs, made untimed
# ------------------------------------------------------------------------------------------------

def tiny_png(i: int) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(i % 64)  # 64 distinct images: encoding is not what is measured
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_tars(root: pathlib.Path, n: int, per_tar: int = 1000) -> str:
    root.mkdir(parents=True, exist_ok=True)
    pngs = [tiny_png(i) for i in range(64)]
    for t in range(-(-n // per_tar)):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for k in range(t * per_tar, min(n, (t + 1) * per_tar)):
                for name, data in ((f"{k:09d}.png", pngs[k % 64]),
                                   (f"{k:09d}.txt", f"image number {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = -(-n // per_tar) - 1
    return str(root / f"{{00000..{last:05d}}}.tar")


def prepared(work: pathlib.Path, n: int, what: str) -> pathlib.Path:
    """The inputs of size n under work/n, made once: tars, ar (converted), labels, emb."""
    base = work / str(n)
    done = base / f".{what}"
    if done.exists():
        return base
    if what == "tars":
        make_tars(base / "tars", n)
    elif what == "ar":
        prepared(work, n, "tars")
        from mlcd_jax.data import convert
        convert.convert(str(base / "tars" / f"{{00000..{-(-n // 1000) - 1:05d}}}.tar"),
                        str(base / "ar" / "data"), 1000, report=lambda s: None)
    elif what == "labels":  # a keyed store of the tars' keys, in another order
        random_store(base / "labels", [f"{k:09d}" for k in np.random.default_rng(3).permutation(n)])
    elif what == "keys":  # the join's inputs: records' key hashes, and a store of other keys
        from mlcd_jax.data import record_keys as keys
        (base / "keys").mkdir(parents=True, exist_ok=True)
        hashes = np.lib.format.open_memmap(base / "keys" / "records.npy", "w+", keys.HASH, (n,))
        for s in range(0, n, 1 << 20):
            part = range(s, min(n, s + (1 << 20)))
            hashes[s:s + len(part)] = keys.hashes(f"{k:09d}" for k in part)
        hashes.flush()
        del hashes
        order = np.random.default_rng(4).permutation(n)
        stored = [f"{k:09d}" for k in order if k % 100] + [f"x{k:09d}" for k in range(n // 100)]
        random_store(base / "keys" / "labels", stored)
    elif what == "emb":
        from mlcd_jax.labels import store
        means = np.random.default_rng(0).standard_normal((1000, 32), dtype=np.float32)

        def shards():
            rng = np.random.default_rng(1)
            for s in range(0, n, 500_000):
                m = min(500_000, n - s)
                yield means[rng.integers(0, 1000, m)] + rng.standard_normal((m, 32), np.float32)

        store.write_embeddings(base / "emb", shards(), model="bench",
                               keys=[[f"{k:09d}" for k in range(s, min(n, s + 500_000))]
                                     for s in range(0, n, 500_000)])
    done.touch()
    return base


def random_store(directory: pathlib.Path, names: list[str]) -> None:
    """A label store of random labels (N × 8 of K = 1,000) whose rows are the keys `names`."""
    from mlcd_jax.data import record_keys as keys
    from mlcd_jax.labels import store
    directory.mkdir(parents=True, exist_ok=True)
    n = len(names)
    labels = np.lib.format.open_memmap(directory / "labels.npy", "w+", np.int32, (n, 8))
    for s in range(0, n, 1 << 20):
        m = min(1 << 20, n - s)
        labels[s:s + m] = np.random.default_rng(s).integers(0, 1000, (m, 8))
    labels.flush()
    del labels
    keys.build(directory / "keys.npy", (keys.hashes(names[s:s + (1 << 20)])
                                        for s in range(0, n, 1 << 20)), n)
    fake = store.EmbeddingShards(directory, (), (n,), 32, "bench")
    store.write_label_manifest(directory, num_examples=n, num_classes=1000, num_labels=8,
                               embeddings=fake, index="flat", recall_at_l=1.0, keys="keys.npy")


class HashedRecords:
    """N records known only by their keys (`f"{k:09d}"`), their hashes memory-mapped as convert's
    index keeps them: the records side of the join, without images."""

    unkeyed = None

    def __init__(self, path: pathlib.Path):
        self.path, self.hashes = path, np.load(path, mmap_mode="r")

    def __len__(self):
        return len(self.hashes)

    def key(self, i):
        return f"{i:09d}"

    name = key

    def key_hashes(self, indices):
        return self.hashes[np.asarray(indices)]

    def fingerprint(self):
        return str(self.path)


# ------------------------------------------------------------------------------------------------
# Stages, each run in a child process
# ------------------------------------------------------------------------------------------------

def micro_model_dir(work: pathlib.Path) -> pathlib.Path:
    path = work / "micro_vit"
    if not (path / "vit_config.json").is_file():
        from flax import nnx

        from mlcd_jax.interop import weights
        from mlcd_jax.models import vit
        weights.save_model_dir(vit.ViT(vit.vit_config("micro", embed_dim=32), rngs=nnx.Rngs(0)),
                               path)
    return path


def run_stage(stage: str, n: int, work: pathlib.Path) -> dict:
    """The stage's own work at size n (inputs already made); returns what it did."""
    base = work / str(n)
    if stage == "convert":
        from mlcd_jax.data import convert
        out = base / "convert_out" / "data"
        result = convert.convert(str(base / "tars" / f"{{00000..{-(-n // 1000) - 1:05d}}}.tar"),
                                 str(out), 1000, overwrite=True, report=lambda s: None)
        return {"rows": result["records"], "shards": len(result["shards"])}
    if stage == "lookup":
        from mlcd_jax.data import sources
        t = time.perf_counter()
        src = sources.ArrayRecordSource(str(base / "ar" / "data-*.array_record"))
        opened = time.perf_counter() - t
        last = src.name(n - 1), src.captions(n - 1)
        assert last[1] == [f"image number {n - 1}"], last
        rng = np.random.default_rng(0)
        for i in rng.integers(0, n, 1000):
            assert src.captions(int(i)) == [f"image number {i}"]
            src.name(int(i))
        return {"rows": n, "open_s": opened}
    if stage == "input":
        import jax

        from mlcd_jax.config import schema as config_lib
        from mlcd_jax.runtime import mesh as mesh_lib
        from mlcd_jax.training import input as input_lib
        c = config_lib.base_config()
        c.data.source, c.data.path = "arrayrecord", str(base / "ar" / "data-*.array_record")
        c.data.labels, c.data.image_size, c.data.num_labels = str(base / "labels"), 16, 8
        c.data.workers, c.batch_size, c.head.num_classes = 0, 64, 1000
        mesh = mesh_lib.make_mesh([("data", -1)], jax.devices()[:1])
        t = time.perf_counter()
        inputs = input_lib.make_train_input(c, mesh_lib.batch_sharding(mesh, leading=1),
                                            input_lib.open_source(c))
        opened = time.perf_counter() - t
        for _ in range(20):
            batch, _ = inputs.next()
        jax.block_until_ready(batch)
        return {"rows": n, "open_s": opened}
    if stage == "embed":
        from mlcd_jax.data import sources
        from mlcd_jax.interop import weights
        from mlcd_jax.labels import embed
        model, _ = weights.load_encoder(micro_model_dir(work))
        src = sources.ArrayRecordSource(str(base / "ar" / "data-*.array_record"))
        out = base / "embed_out"
        for f in out.glob("*"):  # a rerun would reuse finished shards: embed them again
            f.unlink()
        result = embed.run(src, model, out, model_name="micro", image_size=16, batch_size=512,
                           shard_size=100_000, source_name="bench")
        return {"rows": n, "complete": result["complete"]}
    if stage == "kmeans":
        from mlcd_jax.labels import kmeans, store
        shards = store.open_embeddings(base / "emb")
        centers, info = kmeans.fit(shards, 1000, points_per_center=64, niter=5, verbose=False)
        return {"rows": n, "sample": info["sample"]}
    if stage in ("assign_faiss", "assign_jax"):
        from mlcd_jax.labels import assign, store
        centers_path = work / "centers_1000x32.npy"
        if not centers_path.is_file():
            np.save(centers_path, store.normalize(
                np.random.default_rng(2).standard_normal((1000, 32)).astype(np.float32)))
        out = base / f"{stage}_out"
        result = assign.run(base / "emb", centers_path, out, num_labels=8, index_kind="flat",
                            process_index=0, process_count=1, backend=stage.split("_")[1],
                            jax_dtype="float32")
        return {"rows": n, "index": result.get("index")}
    if stage == "join":
        import shutil

        from mlcd_jax.labels import join, store
        shutil.rmtree(base / "keys" / "labels" / "joins", ignore_errors=True)
        joined = join.join(HashedRecords(base / "keys" / "records.npy"),
                           store.open_label_store(base / "keys" / "labels"), missing="skip")
        assert (joined.missing, joined.unused) == (-(-n // 100), n // 100), joined.how
        disk = sum(f.stat().st_size for f in (base / "keys" / "labels" / "joins").rglob("*.npy"))
        return {"rows": n, "missing": joined.missing, "join_bytes_per_record": disk / n}
    if stage == "lit":
        import jax

        from mlcd_jax.config import schema as lit_config
        from mlcd_jax.data import sources, tokenizer as tokenizer_lib
        from mlcd_jax.evaluate import zero_shot
        from mlcd_jax.interop import weights
        from mlcd_jax.lit import trainer as lit
        from mlcd_jax.runtime import mesh as mesh_lib
        c = lit_config.lit_config()
        c.image.image_size, c.image.batch_size, c.batch_size = 16, 512, 256
        c.data.templates, c.text.context_length = ("{caption}",), 16
        workdir = base / "lit_out"
        (workdir / "features").mkdir(parents=True, exist_ok=True)
        for f in (workdir / "features").glob("*"):
            f.unlink()
        mesh = mesh_lib.make_mesh([("data", -1)], jax.devices()[:1])
        src = sources.ArrayRecordSource(str(base / "ar" / "data-*.array_record"))
        model, _ = weights.load_encoder(micro_model_dir(work))
        t = time.perf_counter()
        x, y, rows = lit.image_features(c, workdir, model, src, "train", mesh,
                                        size=c.image.image_size)
        featured = time.perf_counter() - t
        fill = lambda i, label: zero_shot.row_captions(rows, i, label, templates=c.data.templates,
                                                       names=())
        counts = lit.caption_counts(c, workdir, rows, y, (), fill)
        tok = tokenizer_lib.train([f"image number {i}" for i in range(1000)], 300, 16)
        inputs = lit.CaptionBatches(c, x, fill, y, counts, tok, mesh_lib.batch_sharding(mesh), 0)
        for _ in range(n // c.batch_size):
            batch, _ = inputs.next(None)
        jax.block_until_ready(batch)
        return {"rows": n, "features_s": featured}
    raise ValueError(f"unknown stage {stage!r}")


def child(stage: str, n: int, work: pathlib.Path) -> None:
    from mlcd_jax.runtime import backend  # noqa: I001
    backend.choose()  # before jax starts: the platform, quietly (as every command)
    import jax  # noqa: F401  (imports are not the stage's cost)

    from mlcd_jax.data import sources  # noqa: F401
    from mlcd_jax.labels import store  # noqa: F401
    print("RESULT " + json.dumps(measure(stage, n, work)), flush=True)


def measure(stage: str, n: int, work: pathlib.Path) -> dict:
    """One stage at size n: its time, rows/s and this process's peak memory."""
    peak = PeakAnon()
    before = _status()
    t = time.perf_counter()
    info = run_stage(stage, n, work)
    seconds = time.perf_counter() - t
    after = _status()
    return {"stage": stage, "n": n, "seconds": seconds, "rows_per_s": n / seconds,
            "peak_rss_mb": after["VmHWM"] / 2**20, "peak_anon_mb": peak.stop() / 2**20,
            "start_anon_mb": before["RssAnon"] / 2**20, **info}


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------

NEEDS = {"convert": ("tars",), "lookup": ("ar",), "input": ("ar", "labels"), "embed": ("ar",),
         "lit": ("ar",), "kmeans": ("emb",), "assign_faiss": ("emb",), "assign_jax": ("emb",),
         "join": ("keys",)}


def exponent(rows, key):
    a, b = rows[-2], rows[-1]
    if a[key] <= 0 or b[key] <= 0:
        return None
    return math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = sorted((r for r in results if r["stage"] == stage), key=lambda r: r["n"])
        n = [r["n"] for r in rows]
        ax_t.loglog(n, [r["seconds"] for r in rows], "o-", label=stage)
        ax_m.semilogx(n, [r["peak_anon_mb"] for r in rows], "o-", label=stage)
    ax_t.set(xlabel="rows N", ylabel="wall time (s)", title="time against N")
    ax_m.set(xlabel="rows N", ylabel="peak anonymous RSS (MiB)",
             title="memory against N (mapped file pages apart)")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(saved: dict) -> str:
    lines = ["| stage | N | seconds | rows/s | peak RSS (MiB) | of it anonymous (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(saved["results"], key=lambda r: (_order(r["stage"]), r["n"])):
        lines.append(f"| {r['stage']} | {r['n']:,} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} |")
    lines += ["", "| stage | largest N | time exponent (two largest N) | anonymous RSS ratio |",
              "|---|---:|---:|---:|"]
    for stage, v in sorted(saved["summary"].items(), key=lambda kv: _order(kv[0])):
        lines.append(f"| {stage} | {v['largest_n']:,} | {v['time_exponent']:.2f} | "
                     f"{v['anon_rss_ratio']:.2f} |")
    return "\n".join(lines)


def _order(stage: str) -> tuple[int, str]:
    """A result's stage in STAGES' order; assign's two backends (assign_faiss, assign_jax) apart."""
    return STAGES.index(stage.split("_")[0]), stage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e4,1e5,1e6")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default="", help="where the synthetic data goes (default: a temp "
                   "folder); reused between runs")
    p.add_argument("--out", default="bench/results/scale.json")
    p.add_argument("--png", default="docs/scale.png")
    p.add_argument("--append", action="store_true", help="add to the results already in --out "
                   "(a stage and N measured again replaces the old row)")
    p.add_argument("--markdown", action="store_true", help="print the results in --out as a "
                   "markdown table (docs/scale.md) and exit")
    p.add_argument("--smoke", action="store_true", help="every stage once at N = 1,000 in this "
                   "process (its memory figures then mean little): seconds, for the tests")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes = "1000"
    if a.markdown:
        print(markdown(json.loads(pathlib.Path(a.out).read_text())))
        return 0
    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="mlcd_scale_"))
    if a.child:
        child(a.child[0], int(a.child[1]), work)
        return 0
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    stages = [s for x in a.stages.split(",") for s in
              (("assign_faiss", "assign_jax") if x == "assign" else (x,))]
    results = (json.loads(pathlib.Path(a.out).read_text())["results"]
               if a.append and pathlib.Path(a.out).is_file() else [])
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    for n in sizes:
        for stage in stages:
            t = time.perf_counter()
            for what in NEEDS[stage]:
                prepared(work, n, what)
            made = time.perf_counter() - t
            if a.smoke:
                r = measure(stage, n, work)
            else:
                out = subprocess.run([sys.executable, __file__, "--work", str(work), "--child",
                                      stage, str(n)], capture_output=True, text=True, env=env)
                line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")),
                            None)
                if out.returncode or line is None:
                    print(f"{stage} at N = {n:,} failed:\n{out.stderr[-2000:]}",
                          file=sys.stderr)
                    return 1
                r = json.loads(line[len("RESULT "):])
            results = [x for x in results if (x["stage"], x["n"]) != (stage, n)] + [r]
            print(f"{stage:>13} N = {n:>11,}: {r['seconds']:9.2f} s, {r['rows_per_s']:>12,.0f} "
                  f"rows/s, peak RSS {r['peak_rss_mb']:8.1f} MiB (anonymous "
                  f"{r['peak_anon_mb']:7.1f}); inputs made in {made:.1f} s", flush=True)
    print(f"\n{'stage':>13} {'largest N':>12} {'time exp.':>10} {'anon RSS ratio':>15}")
    summary = {}
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = sorted((r for r in results if r["stage"] == stage), key=lambda r: r["n"])
        if len(rows) >= 2:
            summary[stage] = {"largest_n": rows[-1]["n"],
                              "time_exponent": exponent(rows, "seconds"),
                              "anon_rss_ratio": rows[-1]["peak_anon_mb"] / rows[-2]["peak_anon_mb"]}
            s = summary[stage]
            print(f"{stage:>13} {s['largest_n']:>12,} {s['time_exponent']:>10.2f} "
                  f"{s['anon_rss_ratio']:>15.2f}")
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    plot(results, pathlib.Path(a.png))
    print(f"wrote {a.out} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
