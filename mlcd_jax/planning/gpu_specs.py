"""GPU targets for planning: XLA's GpuTargetConfigProto specs, as text.

The specs are package data, `mlcd_jax/planning/specs/<name>.txtpb`, one per GPU, copied from XLA
(github.com/openxla/xla, Apache License 2.0, Copyright The OpenXLA Authors),
xla/backends/gpu/target_config/specs/<file>.txtpb at the commit SOURCES names beside each (and
specs/README.md), without the license header; nothing else changed. XLA compiles for a GPU it
does not see from such a spec
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`).
`target_config` leaves out fields that the XLA of some jax this project supports cannot parse
(jax 0.10.2's refuses `collective_memory_granularity`, the alignment of collective buffers; XLA
then uses its default). Read with importlib.resources, so an installed wheel (or a zip) serves
them as a checkout does.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from importlib import resources

# Fields XLA added after some jax release this project supports.
NEWER_FIELDS = ("collective_memory_granularity",)

# name: (XLA's file, commit). The GPUs `names()` lists, in this order; each is specs/<name>.txtpb.
SOURCES = {
    "h100": ("h100_sxm.txtpb", "0774019d97e77dc433ce97604295f6fc0f5b3b65"),
    "h200": ("h200.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657"),
    "b200": ("b200.txtpb", "300ec95ab85fa9f40af388054f7d43707407cb52"),
    "a100-80g": ("a100_sxm_80.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657"),
}


@functools.cache
def spec(name: str) -> str:
    """The spec of GPU `name` (one of `names()`) as XLA has it; KeyError for another name."""
    if name not in SOURCES:
        raise KeyError(name)
    return (resources.files(__package__) / "specs" / f"{name}.txtpb").read_text(encoding="utf-8")


class _Specs(Mapping):
    """name -> spec text, read when first asked for."""

    def __getitem__(self, name: str) -> str:
        return spec(name)

    def __iter__(self) -> Iterator[str]:
        return iter(SOURCES)

    def __len__(self) -> int:
        return len(SOURCES)


SPECS: Mapping[str, str] = _Specs()


def names() -> tuple[str, ...]:
    return tuple(SOURCES)


def target_config(name: str) -> str:
    """The spec of GPU `name` (one of `names()`) without NEWER_FIELDS."""
    return re.sub(rf"^\s*({'|'.join(NEWER_FIELDS)}):.*\n", "", spec(name), flags=re.M)


def field(name: str, key: str) -> float | None:
    """A number from GPU `name`'s spec (the first `key: value`), e.g. memory_bandwidth."""
    m = re.search(rf"^\s*{key}: ([0-9.e+]+)$", spec(name), flags=re.M)
    return float(m.group(1)) if m else None


def matrix_peak_flops(name: str, dtype_key: int = 16) -> float | None:
    """Peak dense matmul FLOP/s of GPU `name` for an XLA PrimitiveType (16 = BF16) from the
    spec's matrix units: 2 × clock × units per core × ops per clock × cores; None where the
    spec has no matrix units."""
    matrix = spec(name).partition("matrix_unit_description")[2]
    block = re.search(rf"rate_infos {{\s*key: {dtype_key}\s*value {{([^}}]*)}}", matrix)
    cores = field(name, "core_count")
    if not block or not cores:
        return None
    get = lambda k: float(re.search(rf"{k}: ([0-9.]+)", block.group(1)).group(1))
    return 2 * get("clock_rate_ghz") * 1e9 * get("units_per_core") * get("ops_per_clock") * cores
