"""The matmul probe of the benchmarks: what one device multiplies right now (the MFU denominator,
and the machine-state check that DESIGN.md asks every measurement to carry)."""

import time

import jax
import jax.numpy as jnp


def xla_matmul_flops(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` n × n matmuls in `dtype` through XLA on the default
    device (the fastest: the one least disturbed by this machine's drifting speed)."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()  # compile
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
