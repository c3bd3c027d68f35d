"""Capacity planning without the hardware: compile the train step for a TPU topology ahead of time.

    python -m mlcd_jax.plan --config=configs/mlcd_laion400m.py:L/14 --topology=v5p:4x4x4
    python -m mlcd_jax.plan --config=configs/mlcd_laion400m.py:B/16 --topology=v5e:16x16 \
        --config.mesh="(('data', 64), ('fsdp', -1))" --json=plan.json

libtpu's compiler builds the trainer's own train step (`step.build`: the same mesh, ViT, sharded
head, optimizer and jit) over the virtual devices of `jax.experimental.topologies`, from abstract
inputs: no data, no parameters, no TPU. It prints per-device memory (arguments, temporaries, total)
against the chip's HBM, FLOPs per step, the compiler's step-time estimate, images/s and days for the
configured duration, and says which knob helps when the recipe does not fit.

Needs libtpu (`make plan-env`, or `pip install "jax[tpu]==<installed jax version>"`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys

# The TPU compiler runs on the host CPU; jax itself needs no TPU backend for this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mlcd_jax import (  # noqa: E402
    config as config_lib,
    flag_parsing,
    flops,
    mesh as mesh_lib,
    step as step_lib,
    validation,
    weights,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]), as "
                                          "the trainer's.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology name libtpu accepts, e.g. "
                                "v5e:4x4, v5p:4x4x4, v4:4x4x4, v6e:8x8.")
_JSON = flags.DEFINE_string("json", None, "Also write the table to this JSON file.")
_MFU = flags.DEFINE_float("mfu", 0.5, "Assumed model FLOPs utilisation for images/s and days.")

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float          # per chip
    bf16_tflops: float      # peak dense bf16 matmul per chip
    name: str


# Public per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm), keyed by the
# device_kind libtpu reports.
CHIPS = {
    "TPU v4": Chip(32, 275, "v4"),
    "TPU v5 lite": Chip(16, 197, "v5e"),
    "TPU v5": Chip(95, 459, "v5p"),
    "TPU v6 lite": Chip(32, 918, "v6e"),
}


def topology_devices(name: str):
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # jax raises RuntimeError/XlaRuntimeError/ValueError by cause
        message = str(e).splitlines()[0][:300]
        if not _libtpu_installed():
            raise SystemExit(
                "error: planning for a TPU needs libtpu, which is not installed: run `make "
                f'plan-env` or `pip install "jax[tpu]=={jax.__version__}"` in this '
                "environment") from e
        if "lockfile" in message:  # libtpu allows one process per machine
            raise SystemExit(
                f"error: {message}\nAnother process on this machine holds libtpu (a jax job "
                "started without JAX_PLATFORMS=cpu in an environment with libtpu, e.g. training "
                "or tests). Plan when it has ended, or run that job with "
                "JAX_PLATFORMS=cpu.") from None
        raise SystemExit(f"error: --topology={name!r}: {message}. Names look like v5e:4x4, "
                         "v5p:4x4x4, v4:2x2x2, v6e:8x8 (generation:chips per "
                         "dimension)") from None


def _libtpu_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def num_chips(topology: str) -> int:
    dims = re.search(r"[:=_]([0-9x]+)", topology)
    return math.prod(int(d) for d in dims.group(1).split("x")) if dims else 0


def plan(c, topology: str, mfu: float = 0.5) -> dict:
    """Compile config `c`'s train step for `topology`; the plan as a dict (also printed)."""
    devices = topology_devices(topology)
    model_cfg, head_cfg = validation.validate(c, len(devices))
    mesh = mesh_lib.make_mesh(c.mesh, devices=devices)
    built = step_lib.build(c, mesh, config_lib.total_steps(c), model_cfg, head_cfg)  # no data
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    chips = num_chips(topology) or len(devices)
    per_device = len(devices) / chips  # v4 topologies list TensorCores (2 per chip)
    arguments = sum(_shard_bytes(x) for x in jax.tree.leaves((built.abstract_state,
                                                               built.abstract_batch)))
    try:
        compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    except Exception as e:  # libtpu refuses a program that cannot fit; its message has the sizes
        needed = re.search(r"required for HLO temporaries \(([0-9.]+)([KMGT])", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        temporaries = float(needed.group(1)) * 2 ** (10 * "KMGT".index(needed.group(2)) + 10)
        mem, cost = None, {}
    else:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
        arguments, temporaries = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    total = arguments + temporaries + (mem.output_size_in_bytes - mem.alias_size_in_bytes
                                       if mem else 0)
    model_flops = flops.train_step(c, built.model_cfg, len(devices))["per_step"]
    # libtpu's estimate; a lax.scan body (scanned blocks) is costed once, so only without scan.
    estimate = None if c.model.scan else cost.get("optimal_seconds")
    result = {
        "config": c.model.size or f"width {built.model_cfg.width} depth {built.model_cfg.depth}",
        "topology": topology, "device_kind": kind,
        "devices": len(devices), "mesh": dict(mesh.shape), "global_batch": c.batch_size,
        "grad_accum": c.grad_accum, "num_classes": c.head.num_classes,
        "remat": bool(c.model.remat), "dtype": c.model.dtype,
        "compiled": mem is not None,
        "argument_gib": arguments / GiB,
        "temporary_gib": temporaries / GiB,
        "total_gib": total / GiB,
        "hbm_gib": chip.hbm_gib / per_device if chip else None,
        "tflops_per_step": model_flops / 1e12,   # analytic model FLOPs (mlcd_jax.flops)
        "compiler_tflops_per_step": float(cost.get("flops", 0.0)) * len(devices) / 1e12,
        "total_steps": built.total_steps,
        "replicated": built.replicated,
    }
    peak = chip.bf16_tflops * 1e12 * chips if chip else None
    result["step_s_at_peak"] = model_flops / peak if peak else None
    result["step_s_compiler"] = float(estimate) if estimate and float(estimate) > 0 else None
    result["mfu_assumed"] = mfu
    # Images/s and days at the assumed MFU (the compiler's estimate, where given, is shown beside).
    step_s = result["step_s_at_peak"] / mfu if peak else None
    result["step_s"] = step_s
    result["images_per_s"] = c.batch_size / step_s if step_s else None
    result["days"] = built.total_steps * step_s / 86400 if step_s else None
    result["fits"] = mem is not None and (chip is None or result["total_gib"] <= result["hbm_gib"])
    result["advice"] = [] if result["fits"] else advice(c, mesh, result)
    return result


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def advice(c, mesh, r) -> list[str]:
    """Knobs that lower per-device memory, most effective first."""
    over = r["total_gib"] / r["hbm_gib"] if r["hbm_gib"] else 2.0
    tips = []
    if not c.model.remat:
        tips.append("--config.model.remat=True --config.model.scan=True: recompute block "
                    "activations in the backward pass")
    elif not c.model.scan:
        tips.append("--config.model.scan=True: remat of unrolled blocks may save nothing")
    elif c.model.remat_policy != "full":
        tips.append("--config.model.remat_policy=full: keep no activation of a block")
    micro = c.batch_size // c.grad_accum // mesh_lib.num_batch_shards(mesh)
    if micro > 1:
        tips.append(f"--config.grad_accum={c.grad_accum * 2 ** math.ceil(math.log2(over))}: a "
                    f"smaller micro-batch per device (now {micro})")
    if "fsdp" not in mesh.shape:
        tips.append("--config.mesh=\"(('data', D), ('fsdp', F))\": shard parameters and optimizer "
                    "state over F devices (FSDP)")
    tips.append(f"more devices: memory needs ~{over:.1f}× this topology's per-device HBM")
    return tips


def show(r: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    hbm = fmt(r["hbm_gib"], ".1f")
    lines = [
        f"{r['config']} on {r['topology']} ({r['devices']} × {r['device_kind']}), mesh "
        f"{r['mesh']}, global batch {r['global_batch']:,} (grad_accum {r['grad_accum']}), "
        f"K = {r['num_classes']:,}, {r['dtype']}, remat {r['remat']}",
        f"  per device: arguments {r['argument_gib']:.2f} GiB + temporaries "
        f"{r['temporary_gib']:.2f} GiB = {r['total_gib']:.2f} GiB of {hbm} GiB HBM"
        f" → {'fits' if r['fits'] else 'DOES NOT FIT'}"
        + ("" if r["compiled"] else " (the TPU compiler refused it; temporaries from its message)"),
        f"  {r['tflops_per_step']:,.1f} TFLOP per step (model); step "
        f"{fmt(r['step_s_at_peak'], '.3f')}"
        f" s at peak bf16, {fmt(r['step_s'], '.3f')} s at {r['mfu_assumed']:.0%} MFU; compiler's "
        "estimate " + (f"{r['step_s_compiler']:.3f} s" if r["step_s_compiler"] is not None else
                       "n/a with scanned blocks (--config.model.scan=False gives it)"),
        f"  at {r['mfu_assumed']:.0%} MFU: {fmt(r['images_per_s'], ',.0f')} images/s, "
        f"{fmt(r['days'], ',.2f')} days for {r['total_steps']:,} steps",
    ]
    lines += [f"  warning: {line}" for line in r["replicated"]]
    lines += [f"  try: {tip}" for tip in r["advice"]]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    c = _CONFIG.value
    try:
        if c.model.init_from:  # the architecture of the encoder the run would continue from
            explicit = set(config_flags.get_override_values(flags.FLAGS["config"]))
            print(f"encoder: {weights.adopt_architecture(c, explicit)}", flush=True)
        result = plan(c, _TOPOLOGY.value, _MFU.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(show(result), flush=True)
    if _JSON.value:
        pathlib.Path(_JSON.value).write_text(json.dumps(result, indent=2))
        print(f"wrote {_JSON.value}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main, flags_parser=flag_parsing.parse_flags)
