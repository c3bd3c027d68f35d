"""The demos' training runs: `python -m mlcd_jax.train` on 8 simulated devices, and the comparison
demos' sweep (`demo --regions`, `demo --native`) of every kind of run over seeds."""

from __future__ import annotations

import subprocess
import sys

from mlcd_jax.runtime import cli


def train(flags: list[str]) -> None:
    """`python -m mlcd_jax.train` with `flags`, on 8 simulated devices."""
    subprocess.run([sys.executable, "-m", "mlcd_jax.train", *flags], check=True,
                   env=cli.command_env())


def sweep(kinds, seeds: int, pretrain, probe) -> dict:
    """{kind: {metric: [a value per seed]}}, every kind at seed 0 first, so a sweep cut short has
    them all; pretrain(kind, seed) → its run's workdir, probe(run) → {metric: value}."""
    summary = {kind: {} for kind in kinds}
    for seed in range(seeds):
        for kind in kinds:
            print(f"[2/3] pretraining {kind}, seed {seed}", flush=True)
            run = pretrain(kind, seed)
            print(f"[3/3] probing {kind}, seed {seed}", flush=True)
            for key, value in probe(run).items():
                summary[kind].setdefault(key, []).append(value)
    return summary


def table(summary: dict, seeds: int, columns, names: dict, whole=()) -> str:
    """The sweep's markdown table: a row per kind (`names`), for each (key, heading) of `columns`
    the mean ± std over the seeds (blank where a kind has no such value; keys in `whole` without
    decimals)."""
    import numpy as np
    lines = [f"| run ({seeds} seeds, mean ± std) | " + " | ".join(c for _, c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for kind, name in names.items():
        cells = []
        for key, _ in columns:
            values = summary[kind].get(key)
            spread = np.std(values, ddof=1) if values and len(values) > 1 else 0.0
            digits = 0 if key in whole else 3
            cells.append("" if values is None else
                         f"{np.mean(values):.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

