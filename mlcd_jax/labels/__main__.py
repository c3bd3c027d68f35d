"""Cluster labels: python -m mlcd_jax.labels {embed,kmeans,assign,stats,all,ocr} ...

    python -m mlcd_jax.labels embed --model MODEL --source folder --path IMAGES --out EMB \\
        --image_size 224
    python -m mlcd_jax.labels kmeans --embeddings EMB --out LAB --num_centers 10000
    python -m mlcd_jax.labels assign --embeddings EMB --centers LAB/centers.npy --out LAB \\
        --num_labels 8
    python -m mlcd_jax.labels stats --labels LAB
    python -m mlcd_jax.labels all --embeddings EMB --out LAB --num_centers 10000 --num_labels 8

Regions (docs/regions.md): `embed --regions` embeds each object region's crop (keys
"RECORD_KEY#REGION_ID"), then kmeans / assign as above make the object regions' store;
`ocr` writes the OCR regions' store (their texts' token ids, K = the vocabulary):

    python -m mlcd_jax.labels embed --regions --model MODEL --source arrayrecord \\
        --path 'data/train-*.array_record' --out REG_EMB --image_size 224
    python -m mlcd_jax.labels all --embeddings REG_EMB --out OBJ_LAB --num_centers 10000 \\
        --num_labels 1
    python -m mlcd_jax.labels ocr --source arrayrecord --path 'data/train-*.array_record' \\
        --out OCR_LAB [--tokenizer CLIP_TOKENIZER_DIR] --num_labels 16

kmeans, assign and all take --backend: faiss (CPU), jax (every device of the job: the centers
split over the mesh, exact), or auto (jax where an accelerator is present, else faiss).

EMB: embedding shards (manifest.json + *.npy, or clip-retrieval's img_emb/img_emb_*.npy).
Every step is resumable: `assign` never redoes a finished shard.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

from mlcd_jax.data import regions as regions_lib, sources
from mlcd_jax.labels import assign, embed, kmeans, ocr, stats, store
from mlcd_jax.runtime import backend as platform, cli as flag_parsing, distributed, files as records

SOURCES = tuple(s for s in sources.SOURCES if s != "synthetic")  # real images
PROCESS_HELP = ("this process's share of the shards (default: the multi-process job's, else all); "
                "several independent processes may also split the work by these flags")


def make_source(a):
    """The dataset the --source/--path/--tfds_name/--split flags name."""
    import types

    if getattr(a, "annotations", None) and (a.source != "folder"
                                            or not getattr(a, "regions", True)):
        raise ValueError("--annotations gives a folder's regions to `embed --regions` and `ocr` "
                         "with --source folder (ArrayRecord files keep the regions convert "
                         "--regions put in their index)")
    return sources.make_source(types.SimpleNamespace(
        source=a.source, path=a.path, tfds_name=a.tfds_name, split=a.split,
        regions=getattr(a, "annotations", None), min_region_side=getattr(a, "min_region_side", 0),
        min_region_fraction=getattr(a, "min_region_fraction", 0)), field="--")


def run_embed(a):
    source = make_source(a)
    from mlcd_jax.interop import weights
    model, _ = weights.load_encoder(a.model, a.step)
    dtype = platform.embed_dtype(a.dtype)
    model = embed.with_dtype(model, dtype)
    if a.regions:
        source = embed.region_crops(source, a.out, a.region_kind)
        print(f"embed: {len(source):,} regions ({a.region_kind}) of {len(source.source):,} "
              "records", flush=True)
    native = weights.sizing(a.model, model, a.resolution, a.max_tokens, a.min_tokens,
                            a.image_size)
    if native is not None:
        print(f"embed: {native}", flush=True)
    result = embed.run(source, model, a.out, model_name=str(a.model), image_size=a.image_size,
                       batch_size=a.batch_size, shard_size=a.shard_size,
                       process_index=a.process_index, process_count=a.process_count,
                       source_name=f"{a.source}:{a.path or a.tfds_name}", native=native)
    print(f"embed: {json.dumps(result)}")


def run_ocr(a):
    result = ocr.run(make_source(a), a.out, tokenizer=a.tokenizer, num_labels=a.num_labels,
                     vocab_size=a.vocab_size, sample_records=a.tokenizer_records, seed=a.seed)
    print(f"ocr: {json.dumps(result)}")


def run_kmeans(a):
    shards = store.open_embeddings(a.embeddings)
    print(f"kmeans: {shards.total:,} embeddings of width {shards.dim} in {len(shards.files)} "
          f"shards → K = {a.num_centers:,}")
    centers, info = kmeans.fit(shards, a.num_centers, points_per_center=a.points_per_center,
                               niter=a.niter, two_level=a.two_level, seed=a.seed, init=a.init,
                               nredo=a.nredo, backend=a.backend, jax_dtype=a.jax_dtype)
    if jax.process_index() != 0:  # the jax backend clusters on every process; one writes
        return
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for f in ("labels.npy", "manifest.json") if (out / f).exists()]
    if stale:  # labels of the previous centers: `assign` makes new ones (and redoes its parts)
        for f in stale:
            (out / f).unlink()
        print(f"kmeans: removed {' and '.join(stale)} of the previous clustering in {out}; run "
              "`assign` for labels of the new centers")
    records.write_npy_atomic(out / "centers.npy", centers)
    records.write_json_atomic(out / "kmeans.json",
                            info | {"num_centers": a.num_centers,
                                    "source_fingerprint": shards.fingerprint()})
    print(f"kmeans: wrote {out / 'centers.npy'} ({info['points_per_s_per_iter']:,.0f} points/s per "
          f"iteration on a sample of {info['sample']:,})")


def run_assign(a):
    result = assign.run(a.embeddings, a.centers or pathlib.Path(a.out) / "centers.npy", a.out,
                        num_labels=a.num_labels, index_kind=a.index, nprobe=a.nprobe,
                        process_index=a.process_index, process_count=a.process_count,
                        backend=a.backend, jax_dtype=a.jax_dtype, key_column=a.key_column)
    print(f"assign: {json.dumps(result)}")


def run_stats(a):
    s = stats.compute(a.labels, make_source(a) if getattr(a, "source", None) else None)
    out = pathlib.Path(a.labels)
    stats.plot(s, out / "cluster_sizes.png")
    public = {k: v for k, v in s.items() if not k.startswith("_")}
    records.write_json_atomic(out / "stats.json", public)
    print(json.dumps(public, indent=2))
    print(f"stats: wrote {out / 'stats.json'} and {out / 'cluster_sizes.png'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd_jax.labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    km = argparse.ArgumentParser(add_help=False)
    km.add_argument("--num_centers", type=int, required=True)
    km.add_argument("--points_per_center", type=int, default=256)
    km.add_argument("--niter", type=int, default=20)
    km.add_argument("--two_level", type=int, default=1, help="parts clustered first (1 = off)")
    km.add_argument("--seed", type=int, default=0)
    km.add_argument("--init", default="random", choices=list(kmeans.INITS))
    km.add_argument("--nredo", type=int, default=1, help="restarts; the best objective is kept")
    asg = argparse.ArgumentParser(add_help=False)
    asg.add_argument("--num_labels", type=int, default=8)
    asg.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"])
    asg.add_argument("--nprobe", type=int, default=64)
    asg.add_argument("--process_index", type=int, default=None, help=PROCESS_HELP)
    asg.add_argument("--process_count", type=int, default=None, help=PROCESS_HELP)
    asg.add_argument("--key_column", default=None,
                     help="clip-retrieval's metadata/*.parquet column with each image's key "
                     f"(default {store.CLIP_RETRIEVAL_KEY}: webdataset's sample key)")
    be = argparse.ArgumentParser(add_help=False)
    be.add_argument("--backend", default="auto", choices=list(assign.BACKENDS),
                    help="faiss (CPU), jax (the device mesh), auto: jax on accelerators")
    be.add_argument("--jax_dtype", default="auto",
                    choices=["auto", "float32", "float16", "bfloat16"],
                    help="the jax backend's scored inputs (auto: float16 on GPUs, bfloat16 on "
                    "TPUs, float32 on CPU; accumulation is float32)")
    io = argparse.ArgumentParser(add_help=False)
    io.add_argument("--embeddings", required=True)
    io.add_argument("--out", required=True)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--path", default="")
    data.add_argument("--tfds_name", default="")
    data.add_argument("--split", default="train")
    # A folder source's regions (ArrayRecord files keep convert's in their index).
    boxes = argparse.ArgumentParser(add_help=False)
    boxes.add_argument("--annotations", default=None,
                       help="with --source folder: the images' boxes, as convert --regions takes "
                       "them (COCO-style .json, .jsonl keyed by record key, a folder of SA-1B "
                       "per-image JSON, or 'beside')")
    boxes.add_argument("--min_region_side", type=float, default=regions_lib.Rules.min_side)
    boxes.add_argument("--min_region_fraction", type=float,
                       default=regions_lib.Rules.min_fraction)
    p = sub.add_parser("embed", parents=[data, boxes])
    p.add_argument("--model", required=True, help="a training workdir, our model dir, or a "
                   "transformers checkpoint dir")
    p.add_argument("--step", type=int, default=None, help="with a training workdir: which step")
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--out", required=True)
    p.add_argument("--image_size", type=int, default=224)
    flag_parsing.add_sizing_flags(p)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--shard_size", type=int, default=100_000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the teacher's compute dtype (auto: bfloat16 on accelerators, float32 on "
                   "CPU); part of each shard's record")
    p.add_argument("--process_index", type=int, default=None, help=PROCESS_HELP)
    p.add_argument("--process_count", type=int, default=None, help=PROCESS_HELP)
    p.add_argument("--regions", action="store_true",
                   help="embed each region's crop instead of each image (keys RECORD_KEY#ID)")
    p.add_argument("--region_kind", default="objects", choices=list(regions_lib.KINDS),
                   help="which regions: objects (without a text: RICE's object regions, the "
                   "default), text (OCR regions) or all")
    p = sub.add_parser("ocr", parents=[data, boxes],
                       help="OCR regions' labels: each region text's token ids")
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="a CLIP tokenizer dir (tokenizer.json, or "
                   "vocab.json + merges.txt); default: a BPE trained on the region texts")
    p.add_argument("--num_labels", type=int, default=16, help="token ids kept per region")
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="without --tokenizer: the trained BPE's vocabulary (at most)")
    p.add_argument("--tokenizer_records", type=int, default=100_000,
                   help="without --tokenizer: records whose region texts train it (seeded)")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("kmeans", parents=[io, km, be])
    p = sub.add_parser("assign", parents=[io, asg, be])
    p.add_argument("--centers", default=None, help="default: OUT/centers.npy")
    p = sub.add_parser("stats", parents=[data])
    p.add_argument("--labels", required=True)
    p.add_argument("--source", default=None, choices=SOURCES,
                   help="also join a dataset's records with the store by key: how many have "
                   "labels, how many lack them, labels without a record")
    p = sub.add_parser("all", parents=[io, km, asg, be])
    a = parser.parse_args(argv)
    try:
        # In a multi-process job (mlcd_jax/runtime/distributed.py) the shards split by the job's
        # processes.
        distributed.initialize()
        if getattr(a, "process_index", 0) is None:
            a.process_index = jax.process_index()
        if getattr(a, "process_count", 0) is None:
            a.process_count = jax.process_count()
        first = jax.process_index() == 0
        if a.command == "embed":
            run_embed(a)
        if a.command == "ocr" and first:
            run_ocr(a)
        if hasattr(a, "backend"):
            a.backend = assign.resolve_backend(a.backend)
        if a.command in ("kmeans", "all"):
            if first or a.backend == "jax":  # faiss: one process clusters, the others wait
                run_kmeans(a)
            distributed.barrier("kmeans done")
        if a.command == "all":
            a.centers, a.labels = None, a.out
        if a.command in ("assign", "all"):
            run_assign(a)
        if a.command == "stats" or (a.command == "all" and first
                                 and (pathlib.Path(a.labels) / "labels.npy").exists()):
            run_stats(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
