"""Train-step throughput, achieved TFLOP/s, MFU and peak memory, side by side with PyTorch (same
run, same machine).

    .venv/bin/python bench/train_step.py                          # CPU: tiny, B/32 (batch 32)
    .venv/bin/python bench/train_step.py --models B/32,B/16 --batch 32 --dtype float32
    python bench/train_step.py                                    # on a GPU: the GPU cases below

On a GPU (`--preset gpu`, the default where jax sees one): ViT-B/16 at 224 px, batch 256, bf16,
three cases — the MLCD recipe (RoPE encoder, K = 1,000,000, r = 0.1), the RoPE encoder with
K = 1,000 (r = 1), and a CLIP-style encoder with K = 1,000 — each run by ours and (the first and
last) by transformers' MLCDVisionModel / CLIPVisionModel with the same MLCD loss, K and r in
PyTorch (bf16 autocast, SDPA attention, fused AdamW), eager and `torch.compile`d. `--variant
NAME=field=value,...` adds rows of ours on the MLCD recipe with config overrides (e.g.
`--variant xla_attention=model.attention=xla`). Every row runs in its own process, the rows in
alternating rounds; MFU is against a bf16 matmul probe of the same run; memory is the compiled
step's temporaries and the device's peak bytes (ours), `torch.cuda.max_memory_allocated`
(PyTorch).

CPU (`--preset cpu`). Ours: the trainer's own jitted step (`step.build`: ViT forward + backward,
the sharded MLCD head, clipping and AdamW) on one device. PyTorch: transformers' CLIPVisionModel
with the same config (a bias-free projection to the same embedding width), the same MLCD loss over
all K classes (r = 1, so both compute the same thing), clipping and AdamW. Model FLOPs are analytic
(`mlcd_jax/planning/flops.py`); MFU is against the fastest of float32 (or bf16) matmul probes run
between
the rounds, on the same threads, through XLA and (column "best") the faster of XLA and PyTorch.
The two sides are timed in alternating rounds, each in a fresh process, and each side's fastest
step counts, so a drift of this machine's speed (DESIGN.md) cannot favour one side. Needs the
test extra (torch, transformers). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu where jax sees one")
    p.add_argument("--models", help="ViT sizes (mlcd_jax.models.vit.SIZES); CPU: tiny,B/32, "
                   "GPU: B/16")
    p.add_argument("--batch", type=int, help="CPU: 32, GPU: 256")
    p.add_argument("--image_size", type=int, default=224,
                   help="for the named sizes without their own (tiny: 32, micro: 16)")
    p.add_argument("--classes", type=int, help="K of the CPU preset (10,000; smoke: 100)")
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="CPU: float32, GPU: bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch's threads; XLA:CPU uses every core, so keep this = cores")
    p.add_argument("--steps", type=int, help="timed steps per row per round (CPU 2, GPU 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per row per round (CPU 3, GPU 5)")
    p.add_argument("--rounds", type=int,
                   help="rounds alternating the rows; each row's fastest step counts "
                   "(CPU 3, GPU 1)")
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="GPU: leave out torch.compile rows")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=field=value,field=value: a row of ours on the MLCD recipe with "
                   "config overrides (GPU preset)")
    p.add_argument("--smoke", action="store_true",
                   help="every row of the preset at toy size (micro ViT, 16 px, batch 8, K / "
                   "1000), one step each in this process, torch.compile without code "
                   "generation: seconds on a CPU, for the test suite")
    p.add_argument("--row", help=argparse.SUPPRESS)  # a child's job: one row, as JSON
    p.add_argument("--out", help="default: bench/results/train_step[_gpu].json")
    a = p.parse_args(argv)
    gpu = a.preset == "gpu" if a.preset else _has_gpu()
    a.preset = "gpu" if gpu else "cpu"
    a.models = a.models or ("micro" if a.smoke else "B/16" if gpu else "tiny,B/32")
    a.batch = a.batch or (8 if a.smoke else 256 if gpu else 32)
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.out = a.out or f"bench/results/train_step{'_gpu' if gpu else ''}.json"
    a.steps = a.steps or (1 if a.smoke else 10 if gpu else 2)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.smoke else 5 if gpu else 3)
    a.rounds = a.rounds or (1 if a.smoke or gpu else 3)
    a.classes = a.classes or (100 if a.smoke else 10_000)
    if a.smoke:
        a.embed_dim = min(a.embed_dim, 32)
    return a


def _has_gpu() -> bool:
    """Whether jax sees a GPU, asked in a child so this process leaves the device alone."""
    probe = ("from mlcd_jax.runtime import backend; backend.choose(); import jax; "
             "print(jax.default_backend())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip().endswith("gpu")


ARGS = ARGV = None  # main's parsed arguments, and the command line they came from

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import probe  # noqa: E402  (bench/probe.py)

from mlcd_jax.config import schema as config_lib  # noqa: E402
from mlcd_jax.models import vit  # noqa: E402
from mlcd_jax.planning import flops  # noqa: E402
from mlcd_jax.runtime import mesh as mesh_lib  # noqa: E402
from mlcd_jax.training import step as step_lib, validation  # noqa: E402


def fastest(fn, steps):
    """The fastest of `steps` calls of an already warm `fn` (the machine's speed drifts; the
    fastest call is the one least disturbed)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_matmul_peak(dtype, n=None, reps=5):
    """The same probe through PyTorch's GEMM (MKL/oneDNN), which can be faster than XLA's."""
    import torch
    torch.set_num_threads(ARGS.threads)
    n = n or (256 if ARGS.smoke else 2048)
    x = torch.ones((n, n), dtype=torch.float32 if dtype == jnp.float32 else torch.bfloat16)
    x @ x
    return 2 * n ** 3 / fastest(lambda: x @ x, reps)


def rows_to_run():
    """The rows of this run: (side, case) with the case's model and head, as JSON-able dicts."""
    rows = []
    for size in ARGS.models.split(","):
        if ARGS.preset == "cpu":  # CLIP-style, all K classes (r = 1): both sides compute the same
            case = {"size": size, "case": "clip", "pos": "learned", "classes": ARGS.classes,
                    "ratio": 1.0}
            rows.append(case | {"side": "ours"})
            if not ARGS.no_torch:
                rows.append(case | {"side": "torch", "compile": False})
            continue
        small = 1_000 if ARGS.smoke else 1  # the smoke run's K: a thousandth
        mlcd = {"size": size, "case": "mlcd_recipe", "pos": "rope", "classes": 1_000_000 // small,
                "ratio": 0.1}
        cases = [mlcd, {"size": size, "case": "rope_k1000", "pos": "rope",
                        "classes": max(1_000 // small, 64), "ratio": 1.0},
                 {"size": size, "case": "clip", "pos": "learned",
                  "classes": max(1_000 // small, 64), "ratio": 1.0}]
        for case in cases:
            rows.append(case | {"side": "ours"})
        for variant in ARGS.variant:
            name, _, overrides = variant.partition("=")
            rows.append(mlcd | {"side": "ours", "case": f"mlcd_recipe+{name}",
                                "overrides": overrides})
        for case in (cases[0], cases[2]):
            if not ARGS.no_torch:
                rows.append(case | {"side": "torch", "compile": False})
                if not ARGS.no_compile:
                    rows.append(case | {"side": "torch", "compile": True})
    return rows


def label(row):
    side = row["side"] + (" compile" if row.get("compile") else "")
    return f"{row['size']} {row['case']}: {side}"


def config_for(row):
    c = config_lib.base_config()
    c.model.size, c.model.embed_dim, c.model.dtype = row["size"], ARGS.embed_dim, ARGS.dtype
    c.model.pos = row["pos"]
    c.head.num_classes, c.head.sample_ratio = row["classes"], row["ratio"]
    c.data.image_size = vit.SIZES[row["size"]].get("image_size", ARGS.image_size)
    c.data.num_labels, c.data.source = ARGS.labels, "synthetic"
    c.batch_size, c.total_steps, c.optim.warmup_steps = ARGS.batch, 1000, 10
    for item in filter(None, row.get("overrides", "").split(",")):
        field, _, value = item.partition("=")
        section, name = field.split(".")
        old = c[section][name]
        c[section][name] = type(old)(value == "True" if isinstance(old, bool) else value)
    return c


def ours(c):
    """The trainer's step on one device; and its memory: the compiled step's temporaries."""
    mesh = mesh_lib.make_mesh([("data", 1)], jax.devices()[:1])
    model_cfg, head_cfg = validation.validate(c, mesh.size)
    built = step_lib.build(c, mesh, config_lib.total_steps(c), model_cfg, head_cfg)
    compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    state = jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=built.abstract_batch[0].shape),
                         jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, c.head.num_classes,
                                                           built.abstract_batch[1].shape),
                         jnp.int32)
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], (images, labels))
        jax.block_until_ready(metrics)
    step()  # warm up
    mem = compiled.memory_analysis()
    return step, {"temporaries_gib": mem.temp_size_in_bytes / 2 ** 30,
                  "arguments_gib": mem.argument_size_in_bytes / 2 ** 30}


def ours_peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


def torch_mlcd_loss(emb, centers, labels, *, scale, margin, ratio):
    """The MLCD loss in PyTorch, written as a PyTorch user would (Partial FC's sampling): ArcFace
    positives; ceil(r·K) sampled classes minus each sample's positives as negatives;
    log(1 + Σ e^-p) + log(1 + Σ e^n)."""
    import torch
    import torch.nn.functional as F
    num_classes = centers.shape[0]
    e = F.normalize(emb.float(), dim=-1)
    pos_cos = (F.normalize(centers[labels.clamp(min=0)], dim=-1) * e[:, None]).sum(-1)
    pos = scale * torch.cos(torch.acos(pos_cos.clamp(-1 + 1e-7, 1 - 1e-7)) + margin)
    m = max(1, math.ceil(ratio * num_classes))
    sampled = (torch.arange(num_classes, device=e.device) if m == num_classes
               else torch.rand(num_classes, device=e.device).topk(m).indices)
    cos = e @ F.normalize(centers[sampled], dim=-1).T                    # (B, m)
    column = torch.full((num_classes,), m, device=e.device, dtype=torch.long)
    column[sampled] = torch.arange(m, device=e.device)
    own = torch.where(labels >= 0, column[labels.clamp(min=0)], m)        # (B, l)
    is_pos = torch.zeros(cos.shape[0], m + 1, dtype=torch.bool, device=e.device)
    is_pos = is_pos.scatter_(1, own, True)[:, :m]
    zero = torch.zeros_like(cos[:, :1])
    pos_term = torch.logsumexp(torch.cat([zero, (-pos).masked_fill(labels < 0, -torch.inf)], 1), 1)
    neg_term = torch.logsumexp(torch.cat([zero, (scale * cos).masked_fill(is_pos, -torch.inf)], 1),
                               1)
    return (pos_term + neg_term).mean()


def pytorch(c, compiled: bool):
    """transformers' MLCDVisionModel (RoPE) or CLIPVisionModel (learned positions) with the same
    config, a bias-free projection, the MLCD loss, clipping and AdamW; and its peak memory."""
    import torch
    import transformers
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(ARGS.threads)
    cfg = vit.from_config(c)
    common = dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                  num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                  image_size=cfg.image_hw[0], patch_size=cfg.patch, attn_implementation="sdpa")
    if cfg.pos == "rope":
        model = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**common))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            **common, hidden_act="quick_gelu"))
    model = model.to(device).train()
    projection = torch.nn.Linear(cfg.width, c.model.embed_dim, bias=False).to(device)
    centers = torch.nn.Parameter(torch.randn(c.head.num_classes, c.model.embed_dim,
                                             device=device) * 0.05)
    params = list(model.parameters()) + list(projection.parameters()) + [centers]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, fused=cuda)
    images = torch.randn(c.batch_size, 3, cfg.image_hw[0], cfg.image_hw[1], device=device)
    labels = torch.randint(0, c.head.num_classes, (c.batch_size, c.data.num_labels),
                           device=device)
    bf16 = ARGS.dtype == "bfloat16"

    def forward_loss(images, labels):
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            emb = projection(model(pixel_values=images).pooler_output)
            return torch_mlcd_loss(emb, centers, labels, scale=c.head.scale,
                                   margin=c.head.margin, ratio=c.head.sample_ratio)

    # The smoke run traces with torch.compile but generates no code (minutes on a CPU).
    forward = (torch.compile(forward_loss, backend="eager" if ARGS.smoke else "inductor")
               if compiled else forward_loss)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(images, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
    step()  # warm up (and compile)
    return step, {}


def torch_peak_gib():
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def in_child(row):
    """The fastest of ARGS.steps warm steps of one row, timed in a fresh process (in this one
    for the smoke run)."""
    if ARGS.smoke:
        return run_row(row)
    cmd = [sys.executable, __file__, *ARGV, "--preset", ARGS.preset, "--row", json.dumps(row)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{label(row)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(row) -> dict:
    """Time one row: warm-up, then the fastest of ARGS.steps steps; memory."""
    c = config_for(row)
    if row["side"] == "ours":
        step, memory = ours(c)
    else:
        step, memory = pytorch(c, row["compile"])
    for _ in range(ARGS.warmup):  # a fresh process runs its first steps slower
        step()
    seconds = fastest(step, ARGS.steps)
    memory["peak_gib"] = ours_peak_gib() if row["side"] == "ours" else torch_peak_gib()
    return {"seconds": seconds, **memory}


def main(argv=None):
    global ARGS, ARGV
    ARGV = list(sys.argv[1:] if argv is None else argv)
    ARGS = parse(ARGV)
    if ARGS.row:  # a child: one row, its result as the last line
        print(json.dumps(run_row(json.loads(ARGS.row))))
        return
    dtype = jnp.float32 if ARGS.dtype == "float32" else jnp.bfloat16
    gpu = ARGS.preset == "gpu"
    size = 256 if ARGS.smoke else 8192 if gpu else 2048
    measure = lambda: probe.xla_matmul_flops(dtype, n=size, reps=10 if gpu else 5)
    cpu_torch = not gpu and not ARGS.no_torch
    probes = [measure()]
    torch_probes = [torch_matmul_peak(dtype)] if cpu_torch else []
    rows = rows_to_run()
    results = {json.dumps(r): [] for r in rows}
    # Rounds alternate the rows, so that a drift of the machine's speed hits all alike; each row
    # runs in its own process (in one process, holding both sides slowed ours ~1.4× at B/16).
    for _ in range(ARGS.rounds):
        for row in rows:
            results[json.dumps(row)].append(in_child(row))
            print(f"  {label(row)}: {results[json.dumps(row)][-1]['seconds']:.4f} s/step",
                  flush=True)
        probes.append(measure())
        if cpu_torch:
            torch_probes.append(torch_matmul_peak(dtype))
    peak, torch_peak = max(probes), max(torch_probes) if torch_probes else None
    table = []
    for row in rows:
        runs = results[json.dumps(row)]
        best = min(runs, key=lambda r: r["seconds"])
        c = config_for(row)
        model_flops = flops.per_step(c, vit.from_config(c), 1)["per_step"]
        table.append(row | best | {
            "image_size": c.data.image_size, "batch": c.batch_size, "dtype": ARGS.dtype,
            "gflop_per_step": model_flops / 1e9, "images_per_s": c.batch_size / best["seconds"],
            "tflops": model_flops / best["seconds"] / 1e12,
            "mfu": model_flops / best["seconds"] / peak,
            "mfu_vs_best": (model_flops / best["seconds"] / max(peak, torch_peak)
                            if torch_peak else None),
            "round_s": [r["seconds"] for r in runs]})
    for r in table:  # ours against the fastest PyTorch row of the same case
        peers = [t for t in table if t["side"] == "torch" and t["case"] == r["case"]
                 and t["size"] == r["size"]]
        if r["side"] == "ours" and peers:
            r["over_best_torch"] = r["images_per_s"] / max(p["images_per_s"] for p in peers)
    device = jax.devices()[0]
    gemm = f"XLA {ARGS.dtype} matmul probe {peak / 1e12:,.1f} TFLOP/s" + (
        f", PyTorch's {torch_peak / 1e12:,.2f}" if torch_peak else "")
    print(f"\n{device.platform} ({device.device_kind}), {ARGS.dtype}, batch {ARGS.batch}, "
          f"{gemm}; l = {ARGS.labels}; MFU against the XLA probe"
          + ("; 'best': against the faster of the two probes" if torch_peak else ""))
    print(f"{'row':<34}{'K':>10}{'r':>5}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>6}{'best':>6}"
          f"{'temp GiB':>9}{'peak GiB':>9}{'vs torch':>9}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in table:
        print(f"{label(r):<34}{r['classes']:>10,}{r['ratio']:>5.2g}{r['images_per_s']:>9.1f}"
              f"{r['tflops']:>9.2f}{fmt(r['mfu'], '.0%'):>6}{fmt(r['mfu_vs_best'], '.0%'):>6}"
              f"{fmt(r.get('temporaries_gib'), '.1f'):>9}{fmt(r.get('peak_gib'), '.1f'):>9}"
              f"{fmt(r.get('over_best_torch'), '.2f'):>9}")
    out = pathlib.Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "device_kind": device.device_kind,
                               "preset": ARGS.preset, "peak_tflops": peak / 1e12,
                               "torch_peak_tflops": torch_peak / 1e12 if torch_peak else None,
                               "rows": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
