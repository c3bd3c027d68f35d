"""Why the ViT blocks run their dense layers on 2-D token arrays: XLA:CPU's weight gradient of a
dense layer over (batch, tokens, width) against the same GEMM over (batch·tokens, width).

    .venv/bin/python bench/dense_grad.py            # the demo ViT's fc1 shape: 128 × 65 × 64 → 256
    .venv/bin/python bench/dense_grad.py --smoke    # toy shape, seconds (the tests)
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mlcd_jax.runtime import backend  # noqa: E402, I001

backend.choose()  # before jax starts: the platform, quietly (as every command)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def timed(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="128,65,64,256", help="batch,tokens,width,out")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="shape 2,5,8,16 and 2 repetitions")
    a = p.parse_args(argv)
    if a.smoke:
        a.shape, a.reps = "2,5,8,16", 2
    b, t, w, o = map(int, a.shape.split(","))
    x, kernel = jnp.ones((b, t, w)), jnp.full((w, o), 0.01)
    three_d = lambda k, x: jnp.sum(jnp.tanh(x @ k))
    two_d = lambda k, x: jnp.sum(jnp.tanh(x.reshape(-1, w) @ k))
    print(f"{jax.devices()[0].platform}: dense layer {b} × {t} × {w} → {o}, float32")
    for name, f in (("(batch, tokens, width)", three_d), ("(batch·tokens, width)", two_d)):
        fwd = timed(jax.jit(f), kernel, x, reps=a.reps)
        grad_w = timed(jax.jit(jax.grad(f)), kernel, x, reps=a.reps)
        print(f"  {name:<24} forward {fwd * 1e3:6.2f} ms   weight gradient {grad_w * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
