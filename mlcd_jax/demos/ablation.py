"""Ablations of MLCD's choices (the paper's Table 5), on your data or the bundled demo data.

    python -m mlcd_jax.ablate --config=configs/demo.py:mlcd --workdir=runs/ablate \\
        --grid 'data.num_labels=1,2,4,8' --grid 'head.sample_ratio=0.1,0.3,1.0' --seeds 3

Each --grid is one swept config field, varied one at a time around the config's own values, as
the paper's ablations are (`--product`: every combination instead). Reads top to bottom: the
points and seeds → label stores, made once per (K, l) that a point needs (k-means of the teacher
embeddings into K = head.num_classes centers, once per K; the top-l assignment, l =
data.num_labels) → one pretraining per point and seed (`python -m mlcd_jax.train` in its own
workdir with config.seed = seed; an interrupted one resumes from its checkpoint) → the linear probe
and kNN of its encoder on the config's `evals` dataset (result.json; a point with one is skipped
on a rerun) → ablation.json, a table of mean ± standard deviation over the seeds, and a PNG per
swept field. The labels do not depend on the seed: the spread is the training's.

The teacher embeddings: `--embeddings DIR` (`python -m mlcd_jax.labels embed` of the config's
training data, in its order), or, for the demo's digits_canvas, the demo's teacher (the clean
digits). `--config.*` overrides apply to every run, e.g. `--config.total_steps=200`.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np

from mlcd_jax.config import schema
from mlcd_jax.demos import mlcd as demo, runs as demo_runs
from mlcd_jax.evaluate import run as eval_run
from mlcd_jax.evaluate.probes import PROBES
from mlcd_jax.interop import weights
from mlcd_jax.labels import assign, stats, store
from mlcd_jax.runtime import files
from mlcd_jax.runtime.errors import UserError


def parse_grid(c, grids: list[str]) -> dict[str, list]:
    """{field: [values]} from 'FIELD=V1,V2', each value of the type of the config's own."""
    out = {}
    for grid in grids:
        field, _, values = grid.partition("=")
        if not values:
            raise UserError(f"--grid {grid!r}: expected FIELD=V1,V2,... e.g. "
                             "'data.num_labels=1,2,4,8'")
        base = get(c, field)
        cast = {bool: lambda v: {"true": True, "false": False}[v.lower()], int: int,
                float: float}.get(type(base), str)
        try:
            out[field] = [cast(v.strip()) for v in values.split(",")]
        except (ValueError, KeyError):
            raise UserError(f"--grid {field}: {values!r} are not all {type(base).__name__}s "
                             f"(the config's value is {base!r})") from None
    return out


def get(c, field: str):
    node = c
    for i, part in enumerate(field.split(".")):
        if part not in node:
            raise UserError(f"--grid {field}: config has no field "
                             f"{'.'.join(field.split('.')[:i + 1])!r} (every field and its "
                             "default: mlcd_jax/config/schema.py:base_config)")
        node = node[part]
    return node


def points(c, grid: dict[str, list], product: bool) -> list[dict]:
    """The distinct points, each {field: value} of what differs from the config ({} = it)."""
    if product:
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    else:
        combos = [{field: v} for field, values in grid.items() for v in values]
    out = []
    for combo in combos:
        point = {f: v for f, v in combo.items() if v != get(c, f)}
        if point not in out:
            out.append(point)
    return out


def name(point: dict) -> str:
    return ",".join(f"{f}={v}" for f, v in point.items()) or "base"


def teacher(c, workdir: pathlib.Path, embeddings: str) -> store.EmbeddingShards:
    if embeddings:
        return store.open_embeddings(embeddings)
    if c.data.source == "digits_canvas":
        from mlcd_jax.data import sources
        return demo.teacher_embeddings(workdir, sources.DigitsCanvasSource(c.data.split))
    raise UserError("--embeddings: the teacher's embeddings of config.data (`python -m "
                     "mlcd_jax.labels embed`) are needed to cluster; only digits_canvas has a "
                     "built-in teacher")


def label_store(shards, workdir: pathlib.Path, k: int, l: int) -> pathlib.Path:
    """The top-l labels of K centers, made once (k-means once per K; assign resumes by itself)."""
    centers = workdir / "labels" / f"K{k}" / "centers.npy"
    made_from = files.digest(shards.fingerprint(), k)  # other embeddings: clustered again
    if (files.piece_record(centers) or {}).get("fingerprint") != made_from:
        centers.parent.mkdir(parents=True, exist_ok=True)
        files.write_piece(centers, demo.cluster(shards, k), {"fingerprint": made_from})
    out = centers.parent / f"l{l}"
    assign.run(shards.directory, centers, out, num_labels=l)
    return out


def pretrain_and_probe(run: pathlib.Path, labels: pathlib.Path, flags_: list[str]) -> dict:
    if not (run / "result.json").is_file():
        demo_runs.train(flags_ + [f"--config.data.labels={labels}"])
        encoder, step = weights.load_from_workdir(run)
        c = schema.upgrade(ml_collections.ConfigDict(json.loads((run / "config.json").read_text())))
        train, test = eval_run.splits_of(c.evals, "config.evals.")
        result = eval_run.evaluate(encoder, train, test, which=PROBES, desc=run.parent.name,
                                   image_size=c.model.image_size or c.data.image_size)
        files.write_json_atomic(run / "result.json", {p: result[p]["accuracy"] for p in PROBES}
                                | {"step": step})
    return json.loads((run / "result.json").read_text())


def label_purity(c, workdir: pathlib.Path) -> dict[str, list[float]]:
    """{"K64/l4": share of images per label rank whose label is a cluster of their own class}, for
    training data whose classes are known (the demo's digits); {} otherwise."""
    from mlcd_jax.data import sources
    source = sources.make_source(c.data)
    if getattr(source, "labels", None) is None:
        return {}
    out = {}
    for path in sorted((workdir / "labels").glob("K*/l*/labels.npy")):
        found = store.open_label_store(path.parent)
        out[f"{path.parent.parent.name}/{path.parent.name}"] = stats.purity(
            *stats.joined_labels(source, found), found.num_classes)
    return out


def summarize(c, grid, runs: list[dict], product: bool) -> list[dict]:
    """One row per point: the probes' mean and standard deviation over its seeds."""
    rows = []
    for point in points(c, grid, product):
        done = [r for r in runs if r["point"] == point]
        row = {"point": point, "name": name(point), "seeds": len(done),
               "values": {f: point.get(f, get(c, f)) for f in grid}}
        for p in PROBES:
            x = np.array([r[p] for r in done])
            row[p] = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                      "each": x.tolist()}
        rows.append(row)
    return rows


def table(rows, grid) -> str:
    fields = list(grid)
    head = "| " + " | ".join(fields) + " | linear probe | kNN | seeds |"
    lines = [head, "|" + "---|" * (len(fields) + 3)]
    for r in rows:
        cells = [str(r["values"][f]) for f in fields]
        cells += [f"{r[p]['mean']:.3f} ± {r[p]['std']:.3f}" for p in PROBES] + [str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, grid, workdir: pathlib.Path, product: bool) -> list[pathlib.Path]:
    """A PNG per swept field: each probe against the field's value, the other fields held (at
    the config's values; with `product`, one line per combination of theirs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for field in grid:
        fig, axes = plt.subplots(1, len(PROBES), figsize=(5 * len(PROBES), 3.6), squeeze=False)
        others = lambda r: tuple((f, r["values"][f]) for f in grid if f != field)
        swept = [r for r in rows if product or set(r["point"]) <= {field}]
        for held, group in itertools.groupby(sorted(swept, key=lambda r: str(others(r))),
                                             key=others):
            group = sorted(group, key=lambda r: r["values"][field])
            x = [r["values"][field] for r in group]
            numeric = all(isinstance(v, (int, float)) for v in x)
            for ax, p in zip(axes[0], PROBES):
                ax.errorbar(x if numeric else range(len(x)), [r[p]["mean"] for r in group],
                            yerr=[r[p]["std"] for r in group], marker="o", capsize=3,
                            label=", ".join(f"{f}={v}" for f, v in held) or None)
                if not numeric:
                    ax.set_xticks(range(len(x)), [str(v) for v in x])
                if numeric and min(x) > 0 and max(x) / min(x) >= 10:
                    ax.set_xscale("log")
                ax.set_xlabel(field), ax.set_ylabel(f"{p.replace('_', ' ')} accuracy")
        for ax in axes[0]:
            if product and len(grid) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(f"{field}: mean ± std over seeds")
        fig.tight_layout()
        path = workdir / f"{field}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def ablate(c, workdir: pathlib.Path, overrides: list[str], *, grids: list[str], seeds: int,
           product: bool, embeddings: str) -> int:
    """The sweep of the module's docstring; `overrides`: the trainer's --config and --config.*
    flags, as given. Returns the exit status (1: some pretrainings failed; rerun to retry)."""
    c = schema.upgrade(c)
    grid = parse_grid(c, grids)
    if not grid:
        raise UserError("--grid: give at least one, e.g. --grid 'data.num_labels=1,2,4,8'")
    if seeds < 1:
        raise UserError(f"--seeds must be ≥ 1, got {seeds}")
    todo = points(c, grid, product)
    workdir.mkdir(parents=True, exist_ok=True)
    shards = teacher(c, workdir, embeddings)
    # Seed by seed: a sweep cut short has every point at seed 0 (then 1, …), and a rerun with
    # fewer --seeds summarizes what finished.
    jobs = [(p, s) for s in range(seeds) for p in todo]
    print(f"ablate: {len(todo)} points × {seeds} seeds = {len(jobs)} pretrainings in "
          f"{workdir}", flush=True)
    runs, failed, start, trained = [], [], time.time(), 0
    for i, (point, seed) in enumerate(jobs, 1):
        run = workdir / "runs" / name(point) / f"seed{seed}"
        k = point.get("head.num_classes", c.head.num_classes)
        l = point.get("data.num_labels", c.data.num_labels)
        done = (run / "result.json").is_file()
        print(f"[{i}/{len(jobs)}] {name(point)}, seed {seed}: "
              f"{'done before' if done else f'K = {k}, l = {l}'}", flush=True)
        labels = None if done else label_store(shards, workdir, k, l)
        # Probed here at the end: no periodic evals while training, unless asked for.
        flags_ = [overrides[0], f"--workdir={run}", "--config.evals.every=0", *overrides[1:],
                  f"--config.seed={seed}",
                  *(f"--config.{f}={v}" for f, v in point.items())]
        try:
            result = pretrain_and_probe(run, labels, flags_)
        except subprocess.CalledProcessError as e:
            if e.returncode == 2:  # the trainer's one-line config error, the same for every point
                raise UserError(f"{name(point)}: the trainer refused its flags (above)") from None
            failed.append(f"{name(point)} seed {seed} (exit {e.returncode}; {run})")
            continue
        runs.append({"point": point, "seed": seed, **result})
        if not done:
            trained += 1
            left = sum(1 for p, s in jobs[i:]
                       if not (workdir / "runs" / name(p) / f"seed{s}" / "result.json").is_file())
            eta = (time.time() - start) / trained * left
            print(f"  linear probe {result['linear_probe']:.3f}, kNN {result['knn']:.3f}; "
                  f"{left} to go, ETA {eta / 60:.0f} min", flush=True)
    if failed:
        print(f"error: {len(failed)} pretrainings failed: {'; '.join(failed)}; rerun the same "
              "command to retry them (finished points are kept)", file=sys.stderr, flush=True)
        return 1
    rows, purity = summarize(c, grid, runs, product), label_purity(c, workdir)
    files.write_json_atomic(workdir / "ablation.json", {"grid": grid, "seeds": seeds,
                                                        "product": product, "rows": rows,
                                                        "label_purity": purity})
    text = table(rows, grid)
    if purity:
        text += ("\n\nShare of labels that are a cluster of the image's own class, by rank:\n"
                 + "\n".join(f"  {k}: {', '.join(f'{v:.2f}' for v in shares)}"
                              for k, shares in purity.items()))
    (workdir / "ablation.md").write_text(text + "\n")
    pngs = plot(rows, grid, workdir, product)
    print(f"\n{text}\n\n{time.time() - start:.0f} s; wrote {workdir / 'ablation.json'}, "
          f"ablation.md, {', '.join(p.name for p in pngs)}", flush=True)
    return 0
