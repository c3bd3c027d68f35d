"""Capacity planning without the hardware: the train step compiled for a TPU topology or a GPU
cluster ahead of time, on this machine's CPU (`python -m mlcd_jax.plan`, its flags in
mlcd_jax/plan.py).

XLA builds the trainer's own train step (`step.build`: the same mesh, ViT, sharded head,
optimizer and jit) over virtual devices, from abstract inputs: no data, no parameters, no
accelerator. TPUs: libtpu's compiler, any topology name libtpu accepts (v5e:4x4, v5p:4x4x4).
GPUs: XLA's GPU compiler from a device spec in `mlcd_jax/planning/specs/` (`gpu_specs.py` reads
it), GPU:N (one host of N GPUs) or GPU:HxN (H hosts of N), GPU one of h100, h200, b200, a100-80g.

It prints per-device memory (arguments, temporaries, total) against the device's memory, model
FLOPs per step, images/s and days at an assumed MFU, which knob helps when the recipe does not
fit; and what the compiled program is (`mlcd_jax/planning/hlo.py`): cuDNN attention or not, kernels
(fusions and library calls) and their launches per step, collectives and their bytes, the
largest temporary buffers, and a roofline estimate (model FLOPs at the bf16 peak beside the bytes
the kernels move at the memory's bandwidth).

Needs libtpu for TPUs and the CUDA plugin (and cuDNN, for its attention) for GPUs, both matching
the installed jax: `make plan-env`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from mlcd_jax.config import schema as config_lib
from mlcd_jax.data import transforms
from mlcd_jax.models import vit
from mlcd_jax.planning import flops, gpu_specs, hlo
from mlcd_jax.runtime import backend, mesh as mesh_lib
from mlcd_jax.runtime.errors import UserError
from mlcd_jax.training import step as step_lib, validation

GiB = 2 ** 30
# Without a device XLA cannot autotune: its default Triton GEMM tiles failed on a 197-token shape
# (cuBLAS's GEMMs compile), and rewriting a large sort (the head's top-k) to CUB's radix sort asks
# the CUDA runtime for scratch sizes on an H100 or B200 (XLA's own sort compiles everywhere).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cub_radix_sort": False}
# jax's GPU allocator takes this fraction of the device's memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float          # per chip
    bf16_tflops: float      # peak dense bf16 matmul per chip
    hbm_gbps: float         # memory bandwidth per chip, GB/s
    usable: float = 1.0     # the fraction of hbm_gib a program may hold


# Public per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm), keyed by the
# device_kind libtpu reports.
CHIPS = {
    "TPU v4": Chip("v4", 32, 275, 1200),
    "TPU v5 lite": Chip("v5e", 16, 197, 819),
    "TPU v5": Chip("v5p", 95, 459, 2765),
    "TPU v6 lite": Chip("v6e", 32, 918, 1640),
}
# bf16 peaks a GPU spec does not carry (NVIDIA's A100 datasheet: 312 TFLOP/s dense).
GPU_BF16_TFLOPS = {"a100-80g": 312}


def gpu_chip(name: str) -> Chip:
    """A GPU's memory, bf16 peak and bandwidth, from its XLA spec."""
    peak = gpu_specs.matrix_peak_flops(name)
    return Chip(name, gpu_specs.field(name, "device_memory_size") / GiB,
                peak / 1e12 if peak else GPU_BF16_TFLOPS[name],
                gpu_specs.field(name, "memory_bandwidth") / 1e9, GPU_MEM_FRACTION)


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str           # "gpu" or "tpu"
    devices: list
    chips: int
    chip: Chip | None


def _gpu_topology(name: str) -> tuple[str, int, int] | None:
    """(GPU, hosts, GPUs per host) of a name like h200:8 or h100:2x8; None if not a GPU name."""
    m = re.fullmatch(r"([a-z][\w-]*?):(?:(\d+)x)?(\d+)", name)
    if not m or not re.match(r"[abh]\d", m.group(1)):  # TPU names are v<generation>
        return None
    if m.group(1) not in gpu_specs.names():
        raise UserError(f"--topology={name!r}: unknown GPU {m.group(1)!r}; known: "
                         f"{', '.join(gpu_specs.names())} (e.g. h200:8, h100:2x8)")
    return m.group(1), int(m.group(2) or 1), int(m.group(3))


def target(name: str) -> Target:
    """The virtual devices of topology `name` and what each chip has."""
    gpu = _gpu_topology(name)
    if gpu:
        kind, hosts, per_host = gpu
        return Target("gpu", _gpu_devices(name, kind, hosts, per_host), hosts * per_host,
                      gpu_chip(kind))
    devices = _tpu_devices(name)
    return Target("tpu", devices, num_chips(name) or len(devices),
                  CHIPS.get(devices[0].device_kind))


def _gpu_devices(name: str, kind: str, hosts: int, per_host: int):
    if not backend.gpu_plugin_installed():
        raise UserError(
            "planning for a GPU needs jax's CUDA plugin, which is not installed: run "
            f'`make plan-env` or `pip install "jax-cuda12-plugin=={jax.__version__}"` in this '
            "environment")
    from jax.experimental import topologies

    try:
        with backend.quiet_native_logs():
            return topologies.get_topology_desc(
                platform="cuda", target_config=gpu_specs.target_config(kind),
                topology=f"1x{hosts}x{per_host}").devices
    except Exception as e:  # XLA's message, e.g. a spec it cannot parse
        raise UserError(f"--topology={name!r}: {str(e).splitlines()[0][:300]}") from None


def _tpu_devices(name: str):
    # A topology uses no chip, so libtpu's one-process-per-machine lockfile need not stop a second
    # plan (or tests, or a sweep of plans) running beside this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        with backend.quiet_native_logs():
            return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # jax raises RuntimeError/XlaRuntimeError/ValueError by cause
        message = str(e).splitlines()[0][:300]
        if not _libtpu_installed():
            raise UserError(
                "planning for a TPU needs libtpu, which is not installed: run `make "
                f'plan-env` or `pip install "jax[tpu]=={jax.__version__}"` in this '
                "environment") from e
        if "lockfile" in message:  # libtpu allows one process per machine
            raise UserError(
                f"{message}. Another process on this machine holds libtpu (a jax job "
                "started without JAX_PLATFORMS=cpu in an environment with libtpu, e.g. training "
                "or tests). Plan when it has ended, or run that job with "
                "JAX_PLATFORMS=cpu.") from None
        raise UserError(f"--topology={name!r}: {message}. Names look like v5e:4x4, "
                         "v5p:4x4x4, v4:2x2x2, v6e:8x8 (generation:chips per dimension), or "
                         f"GPUs: {', '.join(gpu_specs.names())} as h200:8 or h100:2x8") from None


def _libtpu_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def num_chips(topology: str) -> int:
    dims = re.search(r"[:=_]([0-9x]+)", topology)
    return math.prod(int(d) for d in dims.group(1).split("x")) if dims else 0


def compile_step(built, t: Target):
    """The compiled step and its buffer assignment's text (None, "" where libtpu refuses a
    program that cannot fit: its message, re-raised, has the sizes)."""
    options = GPU_COMPILER_OPTIONS if t.platform == "gpu" else {}
    try:
        lowered = built.step_fn.lower(built.abstract_state, built.abstract_batch)
    except RuntimeError as e:
        if "cuDNN" in str(e):
            raise UserError(
                f"{str(e).splitlines()[0]}: cuDNN's attention needs the cuDNN library "
                "to plan it: run `make plan-env` (nvidia-cudnn-cu12), or plan "
                "--config.model.attention=xla") from None
        raise
    with backend.quiet_native_logs():
        return hlo.compile_and_read(lowered, options)


def plan(c, topology: str, mfu: float = 0.5) -> dict:
    """Compile config `c`'s train step for `topology`; the plan as a dict (also printed)."""
    c = config_lib.upgrade(c)
    t = target(topology)
    devices = t.devices
    model_cfg, head_cfg = validation.validate(c, len(devices))
    mesh = mesh_lib.make_mesh(c.mesh, devices=devices)
    built = step_lib.build(c, mesh, config_lib.total_steps(c), model_cfg, head_cfg)  # no data
    kind, chip = devices[0].device_kind, t.chip
    native = transforms.native_sizing(c.data, built.model_cfg.patch)  # None: square crops
    per_device = len(devices) / t.chips  # v4 topologies list TensorCores (2 per chip)
    arguments = sum(_shard_bytes(x) for x in jax.tree.leaves((built.abstract_state,
                                                               built.abstract_batch)))
    program = None
    try:
        compiled, assignment = compile_step(built, t)
    except Exception as e:  # libtpu refuses a program that cannot fit; its message has the sizes
        needed = re.search(r"required for HLO temporaries \(([0-9.]+)([KMGT])", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        temporaries = float(needed.group(1)) * 2 ** (10 * "KMGT".index(needed.group(2)) + 10)
        mem, cost = None, {}
    else:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
        arguments, temporaries = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        program = hlo.Program(compiled.as_text())
    total = arguments + temporaries + (mem.output_size_in_bytes - mem.alias_size_in_bytes
                                       if mem else 0)
    model_flops = flops.per_step(c, built.model_cfg, len(devices))["per_step"]
    # libtpu's estimate; a lax.scan body (scanned blocks) is costed once, so only without scan.
    estimate = None if c.model.scan else cost.get("optimal_seconds")
    result = {
        "config": c.model.size or f"width {built.model_cfg.width} depth {built.model_cfg.depth}",
        "topology": topology, "platform": t.platform, "device_kind": kind,
        "devices": len(devices), "mesh": dict(mesh.shape), "global_batch": c.batch_size,
        "grad_accum": c.grad_accum, "num_classes": c.head.num_classes,
        "remat": bool(c.model.remat), "dtype": c.model.dtype,
        "max_tokens": getattr(native, "max_tokens", None),
        "resolution": str(native or "square crops"),
        "attention": built.model_cfg.attention,
        "compiled": mem is not None,
        "argument_gib": arguments / GiB,
        "temporary_gib": temporaries / GiB,
        "total_gib": total / GiB,
        "hbm_gib": chip.hbm_gib / per_device if chip else None,
        "usable_gib": chip.hbm_gib * chip.usable / per_device if chip else None,
        "tflops_per_step": model_flops / 1e12,   # analytic model FLOPs (mlcd_jax.planning.flops)
        "compiler_tflops_per_step": float(cost.get("flops", 0.0)) * len(devices) / 1e12,
        "total_steps": built.total_steps,
        "replicated": built.replicated,
    }
    peak = chip.bf16_tflops * 1e12 * t.chips if chip else None
    result["step_s_at_peak"] = model_flops / peak if peak else None
    result["step_s_compiler"] = float(estimate) if estimate and float(estimate) > 0 else None
    result["mfu_assumed"] = mfu
    # Images/s and days at the assumed MFU (the compiler's estimate, where given, is shown beside).
    step_s = result["step_s_at_peak"] / mfu if peak else None
    result["step_s"] = step_s
    result["images_per_s"] = c.batch_size / step_s if step_s else None
    result["days"] = built.total_steps * step_s / 86400 if step_s else None
    result["fits"] = mem is not None and (chip is None or result["total_gib"]
                                          <= result["usable_gib"])
    if program:
        result["program"] = program_report(program, assignment, chip, per_device,
                                           result["step_s_at_peak"])
        result["program"]["attention_scores"] = attention_scores(program, c, built.model_cfg,
                                                                 mesh)
    else:
        result["program"] = None
    result["advice"] = [] if result["fits"] else advice(c, mesh, result)
    return result


def program_report(program: hlo.Program, assignment: str, chip: Chip | None, per_device: float,
                   flops_s: float | None) -> dict:
    """What the compiled program is, and the roofline estimate of one step on one device."""
    report = program.summary()
    report["largest_temporaries"] = hlo.largest_temporaries(assignment, 5, program.op_names())
    report["heaviest_kernels"] = program.heaviest(5)
    bandwidth = chip.hbm_gbps * 1e9 / per_device if chip else None
    hbm_s = report["hbm_bytes"] / bandwidth if bandwidth else None
    report["roofline"] = {
        "estimate": True,  # a bound from two numbers, not a prediction of the step time
        "flops_s": flops_s, "hbm_s": hbm_s,
        "step_s": max(flops_s or 0.0, hbm_s or 0.0) or None,
        "bound": (None if not (flops_s and hbm_s) else "memory" if hbm_s > flops_s
                  else "compute"),
    }
    return report


def attention_scores(program: hlo.Program, c, model_cfg, mesh) -> list[str]:
    """Arrays of one device's attention scores, (micro-batch, heads, T, T) with T the tokens or
    the padded tokens: what fused attention never holds."""
    micro = c.batch_size // c.grad_accum // mesh_lib.num_batch_shards(mesh)
    h, w = (s // model_cfg.patch for s in model_cfg.image_hw)
    native = transforms.native_sizing(c.data, model_cfg.patch)
    tokens = 1 + (native.max_tokens if native else h * w)
    _, multiple = vit.attention_implementation(model_cfg)
    found = set()
    for t in {tokens, -(-tokens // multiple) * multiple, -(-tokens // 64) * 64}:
        found |= set(program.arrays_shaped([micro, model_cfg.heads, t, t]))
    return sorted(found)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def advice(c, mesh, r) -> list[str]:
    """Knobs that lower per-device memory, most effective first."""
    tips = []
    if r["platform"] == "gpu" and r["compiled"] and r["total_gib"] <= 0.95 * r["hbm_gib"]:
        tips.append(f"XLA_PYTHON_CLIENT_MEM_FRACTION=.95 in the trainer's environment: jax's GPU "
                    f"allocator takes {GPU_MEM_FRACTION:.0%} of the memory by default")
    over = r["total_gib"] / r["usable_gib"] if r["usable_gib"] else 2.0
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
    tips.append(f"more devices: memory needs ~{over:.1f}× this topology's per-device memory")
    return tips


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def show(r: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    hbm = fmt(r["hbm_gib"], ".1f")
    memory = f"{hbm} GiB"
    if r["usable_gib"] is not None and r["usable_gib"] < r["hbm_gib"]:
        memory += f" (jax's allocator: {r['usable_gib']:.1f} GiB)"
    lines = [
        f"{r['config']} on {r['topology']} ({r['devices']} × {r['device_kind']}), mesh "
        f"{r['mesh']}, global batch {r['global_batch']:,} (grad_accum {r['grad_accum']}), "
        f"K = {r['num_classes']:,}, {r['dtype']}, remat {r['remat']}, attention "
        f"{r['attention']}" + (f", {r['resolution']}" if r.get("max_tokens") else ""),
        f"  per device: arguments {r['argument_gib']:.2f} GiB + temporaries "
        f"{r['temporary_gib']:.2f} GiB = {r['total_gib']:.2f} GiB of {memory}"
        f" → {'fits' if r['fits'] else 'DOES NOT FIT'}"
        + ("" if r["compiled"] else " (the TPU compiler refused it; temporaries from its message)"),
        f"  {r['tflops_per_step']:,.1f} TFLOP per step (model); step "
        f"{fmt(r['step_s_at_peak'], '.3f')}"
        f" s at peak bf16, {fmt(r['step_s'], '.3f')} s at {r['mfu_assumed']:.0%} MFU; compiler's "
        "estimate " + (f"{r['step_s_compiler']:.3f} s" if r["step_s_compiler"] is not None else
                       "n/a" + (" with scanned blocks (--config.model.scan=False gives it)"
                                if r["platform"] == "tpu" else "")),
        f"  at {r['mfu_assumed']:.0%} MFU: {fmt(r['images_per_s'], ',.0f')} images/s, "
        f"{fmt(r['days'], ',.2f')} days for {r['total_steps']:,} steps",
    ]
    p = r["program"]
    if p:
        libs = ", ".join(f"{n} {t.strip('_').replace('$', ' ')}" for t, n in
                         sorted(p["library_targets"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  program: {p['fusions']} fusions + {p['library_calls']} library calls"
                     f"{f' ({libs})' if libs else ''} + {p['other_kernels']} other kernels, "
                     f"{p['launches_per_step']:,.0f} launches per step")
        scores = p["attention_scores"]
        lines.append(f"  attention: {'cuDNN fused' if p['cudnn_attention'] else 'XLA'}, scores "
                     f"held: {', '.join(scores) if scores else 'none'}; transposes: "
                     f"{p['transposes']['kernels']} kernels, {_gib(p['transposes']['bytes'])} "
                     "per step")
        coll = "; ".join(f"{k} ×{v['count']:,.0f} {_gib(v['bytes'])}"
                         for k, v in sorted(p["collectives"].items()))
        lines.append(f"  collectives per step: {coll or 'none'}")
        lines.append("  largest temporaries: " + "; ".join(
            f"{_gib(b['bytes'])} {' '.join(b['shapes'][:2])}" for b in p["largest_temporaries"]))
        roof = p["roofline"]
        unknown = p["loops_of_unknown_length"]
        lines.append(
            f"  roofline (an estimate): {p['hbm_bytes'] / 1e9:,.1f} GB through memory per step "
            f"per device = {fmt(roof['hbm_s'], '.4f')} s at its bandwidth, model FLOPs "
            f"{fmt(roof['flops_s'], '.4f')} s at peak bf16: ≥ {fmt(roof['step_s'], '.4f')} s "
            f"per step, {roof['bound'] or 'n/a'}-bound"
            + (f" ({unknown} loop{'s' * (unknown > 1)} of run-time length counted once)"
               if unknown else ""))
    lines += [f"  warning: {line}" for line in r["replicated"]]
    lines += [f"  try: {tip}" for tip in r["advice"]]
    return "\n".join(lines)
