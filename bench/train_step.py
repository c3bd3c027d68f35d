"""Train-step throughput, achieved TFLOP/s and MFU, side by side with PyTorch (same run, same machine).

    .venv/bin/python bench/train_step.py                          # tiny, B/32 (batch 32), 2 threads
    .venv/bin/python bench/train_step.py --models B/32,B/16 --batch 32 --dtype float32

Ours: the trainer's own jitted step (`train.build`: ViT forward + backward, the sharded MLCD head,
clipping and AdamW) on one device. PyTorch: transformers' CLIPVisionModel with the same config (a
bias-free projection to the same embedding width), a straightforward PyTorch MLCD loss over all
K classes (r = 1, so both compute the same thing), clipping and AdamW. Model FLOPs are analytic
(`mlcd_jax/flops.py`); MFU is against a float32 (or bf16) matmul probe measured in the same run, on
the same threads. Needs the test extra (torch, transformers). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,B/32", help="ViT sizes (mlcd_jax.models.vit.SIZES)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224, help="for the named sizes (tiny: 32)")
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch's threads; XLA:CPU uses every core, so keep this = cores")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--out", default="bench/results/train_step.json")
    return p.parse_args()


ARGS = parse()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlcd_jax import config as config_lib, flops, mesh as mesh_lib, train  # noqa: E402


def timed(fn, steps):
    fn()  # compile / warm up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def matmul_peak(dtype, n=2048, reps=5):
    """Matmul FLOP/s of one device now, in `dtype` (the MFU denominator)."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / timed(lambda: f(x).block_until_ready(), reps)


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
    built = train.build(c, mesh)
    compiled = built.step_fn.lower(built.abstract_state, built.abstract_batch).compile()
    state = jax.jit(built.init, out_shardings=built.shardings)(jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=built.abstract_batch[0].shape),
                         jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, c.head.num_classes,
                                                           built.abstract_batch[1].shape), jnp.int32)
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], (images, labels))
        jax.block_until_ready(metrics)
    return timed(step, ARGS.steps)


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
        cos = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(centers, dim=-1).T
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
    return timed(step, ARGS.steps)


def main():
    dtype = jnp.float32 if ARGS.dtype == "float32" else jnp.bfloat16
    peak_before = matmul_peak(dtype)
    rows = []
    for size in ARGS.models.split(","):
        c = config_for(size)
        model_flops = flops.train_step(c, 1)["per_step"]
        ours_s = ours(c)
        torch_s = None if ARGS.no_torch else pytorch(c)
        rows.append({"model": size, "image_size": c.data.image_size, "batch": c.batch_size,
                     "dtype": ARGS.dtype, "gflop_per_step": model_flops / 1e9,
                     "ours_s": ours_s, "ours_images_per_s": c.batch_size / ours_s,
                     "ours_tflops": model_flops / ours_s / 1e12,
                     "torch_s": torch_s,
                     "torch_images_per_s": c.batch_size / torch_s if torch_s else None,
                     "torch_tflops": model_flops / torch_s / 1e12 if torch_s else None})
        print(f"  {size}: ours {ours_s:.3f} s/step" + (f", PyTorch {torch_s:.3f} s/step"
                                                       if torch_s else ""), flush=True)
    peak = max(peak_before, matmul_peak(dtype))
    for r in rows:
        r["peak_tflops"] = peak / 1e12
        r["ours_mfu"] = r["ours_tflops"] * 1e12 / peak
        r["ours_over_torch"] = (r["ours_images_per_s"] / r["torch_images_per_s"]
                                if r["torch_s"] else None)
    device = jax.devices()[0]
    print(f"\n{device.platform} ({device.device_kind}), {ARGS.threads} threads, {ARGS.dtype}, "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s; K = {ARGS.classes:,}, l = {ARGS.labels}, r = 1")
    print(f"{'model':<6}{'batch':>6}{'GFLOP/step':>12}{'ours img/s':>12}{'ours GFLOP/s':>14}"
          f"{'MFU':>7}{'torch img/s':>13}{'ours/torch':>12}")
    for r in rows:
        torch_ips = f"{r['torch_images_per_s']:.1f}" if r["torch_s"] else "-"
        ratio = f"{r['ours_over_torch']:.2f}" if r["torch_s"] else "-"
        print(f"{r['model']:<6}{r['batch']:>6}{r['gflop_per_step']:>12,.0f}"
              f"{r['ours_images_per_s']:>12.1f}{r['ours_tflops'] * 1e3:>14.0f}"
              f"{r['ours_mfu']:>7.0%}{torch_ips:>13}{ratio:>12}")
    out = pathlib.Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "threads": ARGS.threads, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
