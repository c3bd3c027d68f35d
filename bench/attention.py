"""Attention implementations side by side: time of forward + backward and the difference from
float32 XLA attention, for the ViT's token counts (B/16 at 224 px: 197 tokens).

    python bench/attention.py                       # on a GPU: batch 256, 12 heads of 64, bf16
    .venv/bin/python bench/attention.py --batch 8   # on CPU the cuDNN rows say why they cannot run
    .venv/bin/python bench/attention.py --smoke     # every row at toy size, seconds (the tests)

Rows: XLA unpadded; XLA padded to 64 (the CPU twin of the cuDNN path); cuDNN unpadded; cuDNN padded
to 8 and to 64 (masked by sequence lengths, as `mlcd_jax.models.vit.attention`). A row that the
backend refuses prints the reason. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlcd_jax.models import vit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", default="197,257", help="token counts (B/16 and B/14 at 224 px)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="bench/results/attention.json")
    p.add_argument("--smoke", action="store_true", help="toy shapes (batch 2, 2 heads of 8, the "
                   "token counts / 10), one repetition: seconds on a CPU, for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.heads, a.head_dim, a.reps = 2, 2, 8, 1
        a.tokens = ",".join(str(max(int(t) // 10, 2)) for t in a.tokens.split(","))
    rows = []
    for tokens in [int(t) for t in a.tokens.split(",")]:
        rng = np.random.default_rng(tokens)
        shape = (a.batch, tokens, a.heads, a.head_dim)
        q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
        direction = jnp.asarray(rng.normal(size=shape), jnp.float32)

        def loss(q, k, v, implementation, multiple, dtype):
            out = vit.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                implementation=implementation, multiple=multiple)
            return jnp.sum(out.astype(jnp.float32) * direction)

        grad = lambda impl, mult, dtype: jax.jit(jax.value_and_grad(
            lambda q, k, v: loss(q, k, v, impl, mult, dtype), argnums=(0, 1, 2)))
        want = grad("xla", 1, jnp.float32)(q, k, v)
        for impl, multiple in [("xla", 1), ("xla", 64), ("cudnn", 1), ("cudnn", 8),
                               ("cudnn", 64)]:
            name = f"{impl}, tokens padded to a multiple of {multiple}"
            try:
                fn = grad(impl, multiple, jnp.dtype(a.dtype))
                got = jax.block_until_ready(fn(q, k, v))
                times = []
                for _ in range(a.reps):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v))
                    times.append(time.perf_counter() - t)
                scale = max(float(jnp.max(jnp.abs(g))) for g in want[1])
                err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got[1], want[1]))
                row = {"tokens": tokens, "implementation": impl, "multiple": multiple,
                       "ms": 1e3 * min(times), "grad_max_err_rel": err / scale}
                print(f"T={tokens} {name}: {row['ms']:.2f} ms forward+backward, gradient error "
                      f"{row['grad_max_err_rel']:.1e} of the largest", flush=True)
            except Exception as e:  # a backend that refuses: say why, go on
                text = str(e).strip()
                reason = text.splitlines()[0][:200] if text else type(e).__name__
                row = {"tokens": tokens, "implementation": impl, "multiple": multiple,
                       "refused": reason}
                print(f"T={tokens} {name}: refused ({reason})", flush=True)
            rows.append(row)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "batch": a.batch,
                               "heads": a.heads, "head_dim": a.head_dim, "dtype": a.dtype,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
