"""Why the ViT blocks run their dense layers on 2-D token arrays: XLA:CPU's weight gradient of a
dense layer over (batch, tokens, width) against the same GEMM over (batch·tokens, width).

    .venv/bin/python bench/dense_grad.py            # the demo ViT's fc1 shape: 128 × 65 × 64 → 256
"""

import argparse
import time

import jax
import jax.numpy as jnp


def timed(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="128,65,64,256", help="batch,tokens,width,out")
    b, t, w, o = map(int, p.parse_args().shape.split(","))
    x, kernel = jnp.ones((b, t, w)), jnp.full((w, o), 0.01)
    three_d = lambda k, x: jnp.sum(jnp.tanh(x @ k))
    two_d = lambda k, x: jnp.sum(jnp.tanh(x.reshape(-1, w) @ k))
    print(f"{jax.devices()[0].platform}: dense layer {b} × {t} × {w} → {o}, float32")
    for name, f in (("(batch, tokens, width)", three_d), ("(batch·tokens, width)", two_d)):
        fwd = timed(jax.jit(f), kernel, x)
        grad_w = timed(jax.jit(jax.grad(f)), kernel, x)
        print(f"  {name:<24} forward {fwd * 1e3:6.2f} ms   weight gradient {grad_w * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
