"""Train-step throughput, achieved TFLOP/s and MFU, side by side with PyTorch (same run, same
machine).

    .venv/bin/python bench/train_step.py                          # tiny, B/32 (batch 32), 2 threads
    .venv/bin/python bench/train_step.py --models B/32,B/16 --batch 32 --dtype float32

Ours: the trainer's own jitted step (`step.build`: ViT forward + backward, the sharded MLCD head,
clipping and AdamW) on one device. PyTorch: transformers' CLIPVisionModel with the same config (a
bias-free projection to the same embedding width), a straightforward PyTorch MLCD loss over all
K classes (r = 1, so both compute the same thing), clipping and AdamW. Model FLOPs are analytic
(`mlcd_jax/flops.py`); MFU is against the fastest of float32 (or bf16) matmul probes run between
the rounds, on the same threads, through XLA and (column "best") the faster of XLA and PyTorch.
The two sides are timed in alternating rounds, each in a fresh process, and each side's fastest
step counts, so a drift of this machine's speed (DESIGN.md) cannot favour one side. Needs the
test extra (torch, transformers). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def parse():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,B/32", help="ViT sizes (mlcd_jax.models.vit.SIZES)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224, help="for the named sizes (tiny: 32)")
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch's threads; XLA:CPU uses every core, so keep this = cores")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds alternating ours and PyTorch; each side's fastest step counts")
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)  # a child's job
    p.add_argument("--out", default="bench/results/train_step.json")
    return p.parse_args()


ARGS = parse()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlcd_jax import config as config_lib, flops, mesh as mesh_lib, step as step_lib  # noqa: E402


def fastest(fn, steps):
    """The fastest of `steps` calls of an already warm `fn` (the machine's speed drifts; the
    fastest call is the one least disturbed)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(dtype, n=2048, reps=5):
    """Matmul FLOP/s of one device now, in `dtype` (the MFU denominator)."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()  # compile
    return 2 * n ** 3 / fastest(lambda: f(x).block_until_ready(), reps)


def torch_matmul_peak(dtype, n=2048, reps=5):
    """The same probe through PyTorch's GEMM (MKL/oneDNN), which can be faster than XLA's."""
    import torch
    torch.set_num_threads(ARGS.threads)
    x = torch.ones((n, n), dtype=torch.float32 if dtype == jnp.float32 else torch.bfloat16)
    x @ x
    return 2 * n ** 3 / fastest(lambda: x @ x, reps)


def config_for(size):
    c = config_lib.base_config()
    c.model.size, c.model.embed_dim, c.model.dtype = size, ARGS.embed_dim, ARGS.dtype
    c.model.pos = "learned"  # CLIP-style, as the PyTorch side
    c.head.num_classes, c.head.sample_ratio = ARGS.classes, 1.0
    c.data.image_size = 32 if size == "tiny" else ARGS.image_size
    c.data.num_labels, c.data.source = ARGS.labels, "synthetic"
    c.batch_size, c.total_steps, c.optim.warmup_steps = ARGS.batch, 1000, 10
    return c


def ours(c):
    mesh = mesh_lib.make_mesh([("data", 1)], jax.devices()[:1])
    built = step_lib.build(c, mesh)
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
    return step


def pytorch(c):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.set_num_threads(ARGS.threads)
    cfg = config_lib.vit_config(c)
    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, image_size=cfg.image_hw[0], patch_size=cfg.patch,
        hidden_act="quick_gelu", attn_implementation="sdpa"))
    projection = torch.nn.Linear(cfg.width, c.model.embed_dim, bias=False)
    centers = torch.nn.Parameter(torch.randn(c.head.num_classes, c.model.embed_dim) * 0.05)
    params = list(model.parameters()) + list(projection.parameters()) + [centers]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2)
    images = torch.randn(c.batch_size, 3, cfg.image_hw[0], cfg.image_hw[1])
    labels = torch.randint(0, c.head.num_classes, (c.batch_size, c.data.num_labels))
    s, m = c.head.scale, c.head.margin
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=ARGS.dtype == "bfloat16")

    def mlcd_loss(emb):  # all K classes; ArcFace positives; log(1+Σe^-p) + log(1+Σe^n)
        cos = (torch.nn.functional.normalize(emb, dim=-1)
               @ torch.nn.functional.normalize(centers, dim=-1).T)
        pos_mask = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels, True)
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        pos = s * torch.cos(theta + m)
        neg = s * cos
        pos_term = torch.logsumexp(torch.cat([torch.zeros_like(cos[:, :1]),
                                              (-pos).masked_fill(~pos_mask, -torch.inf)], 1), 1)
        neg_term = torch.logsumexp(torch.cat([torch.zeros_like(cos[:, :1]),
                                              neg.masked_fill(pos_mask, -torch.inf)], 1), 1)
        return (pos_term + neg_term).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            emb = projection(model(pixel_values=images).pooler_output)
        loss = mlcd_loss(emb.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    step()  # warm up
    return step


def in_child(side, size):
    """The fastest of ARGS.steps warm steps of one side on one model, timed in a fresh process."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--models", size]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main():
    if ARGS.side:  # a child: time one side, print the result as the last line
        step = (ours if ARGS.side == "ours" else pytorch)(config_for(ARGS.models))
        for _ in range(ARGS.warmup):  # a fresh process runs its first steps slower
            step()
        print(json.dumps({"seconds": fastest(step, ARGS.steps)}))
        return
    dtype = jnp.float32 if ARGS.dtype == "float32" else jnp.bfloat16
    probes = [matmul_peak(dtype)]
    torch_probes = [] if ARGS.no_torch else [torch_matmul_peak(dtype)]
    rows = []
    for size in ARGS.models.split(","):
        c = config_for(size)
        model_flops = flops.train_step(c, 1)["per_step"]
        # Rounds alternate ours and PyTorch, so that a drift of the machine's speed hits both alike;
        # each side runs in its own process (in one process, holding both slowed ours ~1.4× at
        # B/16).
        ours_times, torch_times = [], []
        for _ in range(ARGS.rounds):
            ours_times.append(in_child("ours", size))
            if not ARGS.no_torch:
                torch_times.append(in_child("torch", size))
            probes.append(matmul_peak(dtype))
            if not ARGS.no_torch:
                torch_probes.append(torch_matmul_peak(dtype))
        ours_s, torch_s = min(ours_times), min(torch_times) if torch_times else None
        rows.append({"model": size, "image_size": c.data.image_size, "batch": c.batch_size,
                     "dtype": ARGS.dtype, "gflop_per_step": model_flops / 1e9,
                     "ours_s": ours_s, "ours_images_per_s": c.batch_size / ours_s,
                     "ours_tflops": model_flops / ours_s / 1e12,
                     "torch_s": torch_s,
                     "torch_images_per_s": c.batch_size / torch_s if torch_s else None,
                     "torch_tflops": model_flops / torch_s / 1e12 if torch_s else None,
                     "ours_round_s": ours_times, "torch_round_s": torch_times})
        print(f"  {size}: ours {ours_s:.3f} s/step" + (f", PyTorch {torch_s:.3f} s/step"
                                                       if torch_s else ""), flush=True)
    peak = max(probes)
    torch_peak = max(torch_probes) if torch_probes else None
    for r in rows:
        r["peak_tflops"] = peak / 1e12
        r["ours_mfu"] = r["ours_tflops"] * 1e12 / peak
        r["torch_mfu"] = r["torch_tflops"] * 1e12 / peak if r["torch_s"] else None
        if torch_peak:  # against the faster of the two GEMMs: the machine's best shown here
            best = max(peak, torch_peak)
            r["torch_peak_tflops"] = torch_peak / 1e12
            r["ours_mfu_vs_best"] = r["ours_tflops"] * 1e12 / best
            r["torch_mfu_vs_best"] = r["torch_tflops"] * 1e12 / best
        r["ours_over_torch"] = (r["ours_images_per_s"] / r["torch_images_per_s"]
                                if r["torch_s"] else None)
    device = jax.devices()[0]
    gemm = f"XLA matmul probe {peak / 1e9:,.0f} GFLOP/s" + (
        f", PyTorch's {torch_peak / 1e9:,.0f}" if torch_peak else "")
    print(f"\n{device.platform} ({device.device_kind}), {ARGS.threads} threads, {ARGS.dtype}, "
          f"{gemm}; K = {ARGS.classes:,}, l = {ARGS.labels}, r = 1")
    print("MFU: against the XLA probe; 'best': against the faster of the two probes")
    print(f"{'model':<6}{'batch':>6}{'GFLOP/step':>12}{'ours img/s':>12}{'ours GFLOP/s':>14}"
          f"{'MFU':>6}{'best':>6}{'torch img/s':>13}{'torch MFU':>10}{'best':>6}{'ours/torch':>12}")
    for r in rows:
        pct = lambda key: f"{r[key]:.0%}" if r.get(key) else "-"
        torch_ips = f"{r['torch_images_per_s']:.1f}" if r["torch_s"] else "-"
        ratio = f"{r['ours_over_torch']:.2f}" if r["torch_s"] else "-"
        print(f"{r['model']:<6}{r['batch']:>6}{r['gflop_per_step']:>12,.0f}"
              f"{r['ours_images_per_s']:>12.1f}{r['ours_tflops'] * 1e3:>14.0f}"
              f"{pct('ours_mfu'):>6}{pct('ours_mfu_vs_best'):>6}{torch_ips:>13}"
              f"{pct('torch_mfu'):>10}{pct('torch_mfu_vs_best'):>6}{ratio:>12}")
    out = pathlib.Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "threads": ARGS.threads, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
