"""Cluster labels: python -m mlcd_jax.labels {embed,kmeans,assign,stats,all,ocr} ...

    python -m mlcd_jax.labels embed --model MODEL --source folder --path IMAGES --out EMB
    python -m mlcd_jax.labels kmeans --embeddings EMB --out LAB --num_centers 10000
    python -m mlcd_jax.labels assign --embeddings EMB --centers LAB/centers.npy --out LAB \\
        --num_labels 8
    python -m mlcd_jax.labels stats --labels LAB
    python -m mlcd_jax.labels all --embeddings EMB --out LAB --num_centers 10000 --num_labels 8

Regions (docs/regions.md): `embed --regions` embeds each object region's crop (keys
"RECORD_KEY#REGION_ID"), then kmeans / assign as above make the object regions' store;
`ocr` writes the OCR regions' store (their texts' token ids, K = the vocabulary):

    python -m mlcd_jax.labels embed --regions --model MODEL --source arrayrecord \\
        --path 'data/train-*.array_record' --out REG_EMB
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

import json
import pathlib
import sys
import types

from absl import flags

from mlcd_jax.data import regions as regions_lib, sources
from mlcd_jax.labels import kmeans, store
from mlcd_jax.runtime import backend as platform, cli

SOURCES = tuple(s for s in sources.SOURCES if s != "synthetic")  # real images
PROCESS_HELP = ("this process's share of the shards (default: the multi-process job's, else all); "
                "several independent processes may also split the work by these flags")


def make_source(a):
    """The dataset the --source/--path/--tfds_name/--split flags name."""
    import types

    if getattr(a, "annotations", None) and (a.source != "folder"
                                            or not getattr(a, "regions", True)):
        raise cli.UserError("--annotations gives a folder's regions to `embed --regions` and `ocr` "
                         "with --source folder (ArrayRecord files keep the regions convert "
                         "--regions put in their index)")
    return sources.make_source(types.SimpleNamespace(
        source=a.source, path=a.path, tfds_name=a.tfds_name, split=a.split,
        regions=getattr(a, "annotations", None), min_region_side=getattr(a, "min_region_side", 0),
        min_region_fraction=getattr(a, "min_region_fraction", 0)), field="--")


def run_embed(a):
    from mlcd_jax.interop import weights
    from mlcd_jax.labels import embed
    source = make_source(a)
    model, _ = weights.load_encoder(a.model, a.step)
    dtype = platform.embed_dtype(a.dtype)
    model = embed.with_dtype(model, dtype)
    if a.regions:
        source = embed.region_crops(source, a.out, a.region_kind)
        print(f"embed: {len(source):,} regions ({a.region_kind}) of {len(source.source):,} "
              "records", flush=True)
    native = weights.sizing(a.model, model, a.resolution, a.max_tokens, a.min_tokens,
                            a.image_size)
    size = weights.image_side(a.model, model, a.image_size, native)
    print(f"embed: {native or f'{size}² crops'}", flush=True)
    result = embed.run(source, model, a.out, model_name=str(a.model), image_size=size,
                       batch_size=a.batch_size, shard_size=a.shard_size,
                       process_index=a.process_index, process_count=a.process_count,
                       source_name=f"{a.source}:{a.path or a.tfds_name}", native=native)
    print(f"embed: {json.dumps(result)}")


def run_ocr(a):
    from mlcd_jax.labels import ocr
    result = ocr.run(make_source(a), a.out, tokenizer=a.tokenizer, num_labels=a.num_labels,
                     vocab_size=a.vocab_size, sample_records=a.tokenizer_records, seed=a.seed)
    print(f"ocr: {json.dumps(result)}")


def run_kmeans(a):
    import jax

    from mlcd_jax.runtime import files as records
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
    from mlcd_jax.labels import assign
    result = assign.run(a.embeddings, a.centers or pathlib.Path(a.out) / "centers.npy", a.out,
                        num_labels=a.num_labels, index_kind=a.index, nprobe=a.nprobe,
                        process_index=a.process_index, process_count=a.process_count,
                        backend=a.backend, jax_dtype=a.jax_dtype, key_column=a.key_column)
    print(f"assign: {json.dumps(result)}")


def run_stats(a):
    from mlcd_jax.labels import stats
    from mlcd_jax.runtime import files as records
    s = stats.compute(a.labels, make_source(a) if getattr(a, "source", None) else None)
    out = pathlib.Path(a.labels)
    stats.plot(s, out / "cluster_sizes.png")
    public = {k: v for k, v in s.items() if not k.startswith("_")}
    records.write_json_atomic(out / "stats.json", public)
    print(json.dumps(public, indent=2))
    print(f"stats: wrote {out / 'stats.json'} and {out / 'cluster_sizes.png'}")


# -- the command line: one set of flags per verb ------------------------------------------------

def _verb(*groups) -> flags.FlagValues:
    fv = flags.FlagValues()
    for group in groups:
        group(fv)
    return fv


def _io(fv):
    flags.DEFINE_string("embeddings", None, "Embedding shards (manifest.json + *.npy, or "
                        "clip-retrieval's img_emb/).", flag_values=fv)
    flags.DEFINE_string("out", None, "The label store's folder.", flag_values=fv)


def _kmeans(fv):
    flags.DEFINE_integer("num_centers", None, "K.", flag_values=fv)
    flags.DEFINE_integer("points_per_center", 256, "Points sampled per center.", flag_values=fv)
    flags.DEFINE_integer("niter", 20, "Iterations.", flag_values=fv)
    flags.DEFINE_integer("two_level", 1, "Parts clustered first (1 = off).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed.", flag_values=fv)
    flags.DEFINE_enum("init", "random", list(kmeans.INITS), "Initialisation.", flag_values=fv)
    flags.DEFINE_integer("nredo", 1, "Restarts; the best objective is kept.", flag_values=fv)


def _assign(fv):
    flags.DEFINE_integer("num_labels", 8, "l: labels per image.", flag_values=fv)
    flags.DEFINE_enum("index", "auto", ["auto", "flat", "ivf"], "faiss's index.", flag_values=fv)
    flags.DEFINE_integer("nprobe", 64, "ivf: lists searched.", flag_values=fv)
    _processes(fv)
    flags.DEFINE_string("key_column", None, "clip-retrieval's metadata/*.parquet column with "
                        f"each image's key (default {store.CLIP_RETRIEVAL_KEY}: webdataset's "
                        "sample key).", flag_values=fv)


def _processes(fv):
    flags.DEFINE_integer("process_index", None, PROCESS_HELP, flag_values=fv)
    flags.DEFINE_integer("process_count", None, PROCESS_HELP, flag_values=fv)


def _backend(fv):
    flags.DEFINE_enum("backend", "auto", list(platform.LABEL_BACKENDS), "faiss (CPU), jax (the "
                      "device mesh), auto: jax on accelerators.", flag_values=fv)
    flags.DEFINE_enum("jax_dtype", "auto", ["auto", "float32", "float16", "bfloat16"], "The jax "
                      "backend's scored inputs (auto: float16 on GPUs, bfloat16 on TPUs, float32 "
                      "on CPU; accumulation is float32).", flag_values=fv)


def _data(fv):
    flags.DEFINE_string("path", "", "The images: a folder, an ArrayRecord glob, a tfds "
                        "data_dir.", flag_values=fv)
    flags.DEFINE_string("tfds_name", "", "tfds: the dataset's name.", flag_values=fv)
    flags.DEFINE_string("split", "train", "The split.", flag_values=fv)


def _boxes(fv):  # a folder source's regions (ArrayRecord files keep convert's in their index)
    flags.DEFINE_string("annotations", None, "With --source folder: the images' boxes, as "
                        "convert --regions takes them (COCO-style .json, .jsonl keyed by record "
                        "key, a folder of SA-1B per-image JSON, or 'beside').", flag_values=fv)
    flags.DEFINE_float("min_region_side", regions_lib.Rules.min_side, "Drop boxes with a side "
                       "under this many pixels.", flag_values=fv)
    flags.DEFINE_float("min_region_fraction", regions_lib.Rules.min_fraction, "... or under "
                       "this fraction of the image's shorter side.", flag_values=fv)


def _source(required: bool):
    def group(fv):
        flags.DEFINE_enum("source", None, list(SOURCES), "The images' source"
                          + ("." if required else ": also join its records with the store by "
                             "key (how many have labels, lack them, labels without a record)."),
                          flag_values=fv)
    return group


def _embed(fv):
    flags.DEFINE_string("model", None, "A training workdir, our model dir, or a transformers "
                        "checkpoint dir.", flag_values=fv)
    flags.DEFINE_integer("step", None, "With a training workdir: which step.", flag_values=fv)
    flags.DEFINE_string("out", None, "The embedding shards' folder.", flag_values=fv)
    flags.DEFINE_integer("image_size", 0, "The side of the images fed to the model (default: "
                         "the model's own, as it was trained or exported).",
                         flag_values=fv)
    cli.sizing_flags(fv)
    flags.DEFINE_integer("batch_size", 256, "Images embedded at a time.", flag_values=fv)
    flags.DEFINE_integer("shard_size", 100_000, "Embeddings per shard.", flag_values=fv)
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "The teacher's compute "
                      "dtype (auto: bfloat16 on accelerators, float32 on CPU); part of each "
                      "shard's record.", flag_values=fv)
    _processes(fv)
    flags.DEFINE_bool("regions", False, "Embed each region's crop instead of each image (keys "
                      "RECORD_KEY#ID).", flag_values=fv)
    flags.DEFINE_enum("region_kind", "objects", list(regions_lib.KINDS), "Which regions: objects "
                      "(without a text: RICE's object regions), text (OCR regions) or all.",
                      flag_values=fv)


def _ocr(fv):
    flags.DEFINE_string("out", None, "The OCR regions' label store.", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "A CLIP tokenizer dir (tokenizer.json, or vocab.json "
                        "+ merges.txt); default: a BPE trained on the region texts.",
                        flag_values=fv)
    flags.DEFINE_integer("num_labels", 16, "Token ids kept per region.", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 4096, "Without --tokenizer: the trained BPE's vocabulary "
                         "(at most).", flag_values=fv)
    flags.DEFINE_integer("tokenizer_records", 100_000, "Without --tokenizer: records whose region "
                         "texts train it (seeded).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed.", flag_values=fv)


def _centers(fv):
    flags.DEFINE_string("centers", None, "Default: OUT/centers.npy.", flag_values=fv)


def _stats(fv):
    flags.DEFINE_string("labels", None, "The label store's folder.", flag_values=fv)


def _run(verb: str, fv: flags.FlagValues):
    def command(args) -> None:
        del args
        run_verb(types.SimpleNamespace(**fv.flag_values_dict(), command=verb))
    return command


def run_verb(a) -> None:
    import jax

    from mlcd_jax.labels import assign
    from mlcd_jax.runtime import distributed
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


VERBS = {
    "embed": ((_data, _boxes, _source(True), _embed), ("model", "source", "out"),
              "Embed images (or their regions) with a teacher: embedding shards + keys."),
    "ocr": ((_data, _boxes, _source(True), _ocr), ("source", "out"),
            "OCR regions' labels: each region text's token ids."),
    "kmeans": ((_io, _kmeans, _backend), ("embeddings", "out", "num_centers"),
               "Spherical k-means of the embeddings into K centers (OUT/centers.npy)."),
    "assign": ((_io, _assign, _backend, _centers), ("embeddings", "out"),
               "Each embedding's top-l centers: the label store (OUT/labels.npy + keys)."),
    "stats": ((_data, _stats, _source(False)), ("labels",),
              "Cluster sizes, labels per image, and (with --source) the join by key."),
    "all": ((_io, _kmeans, _assign, _backend), ("embeddings", "out", "num_centers"),
            "kmeans, assign and stats in one go."),
}


def commands() -> dict[str, cli.Subcommand]:
    out = {}
    for verb, (groups, required, help_text) in VERBS.items():
        fv = _verb(*groups)
        out[verb] = cli.Subcommand(_run(verb, fv), fv, help_text, required)
    return out


def main(argv=None) -> int:
    return cli.run_subcommands(commands(), argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
