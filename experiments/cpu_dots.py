"""How fast XLA:CPU runs the matmul shapes the chunked ops are made of, and on how many cores.

    python experiments/cpu_dots.py

Prints wall and user CPU time per call for: the 2048x2048 square matmul (the "% of matmul" reference of
bench_ops.py); one batched [1024, 64, 64] @ [1024, 64, 64] dot (a per-chunk matmul of B=1, H=8 at T=8k, C=64);
the same batch as 2, 4, 8 and 16 independent slices in one jitted function; other per-chunk tile shapes; and the
same FLOPs as one tall unbatched [65536, 64] @ [64, 64] dot. user/wall near 1 means one core was busy.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import host_memory


def _per_call(f: Callable, args: tuple, repeats: int = 20) -> tuple[float, float]:
    """(wall seconds, user CPU seconds) per call of the jitted f, after one warm-up call."""
    jax.block_until_ready(f(*args))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(*args))
    wall = time.perf_counter() - start
    user = resource.getrusage(resource.RUSAGE_SELF).ru_utime - before.ru_utime
    return wall / repeats, user / repeats


def _sliced(pieces: int) -> Callable:
    def dots(a, b):
        size = a.shape[0] // pieces
        return [a[i * size : (i + 1) * size] @ b[i * size : (i + 1) * size] for i in range(pieces)]

    return dots


def _row(name: str, f: Callable, args: tuple, flops: float) -> None:
    wall, user = _per_call(jax.jit(f), args)
    print(f"| {name} | {1e3 * wall:.2f} | {1e3 * user:.2f} | {user / wall:.2f} | {flops / wall / 1e9:.0f} |", flush=True)


def main() -> None:
    host_memory.retain_freed_memory()
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; host allocator: seqlab.host_memory policy")
    print("| dot | wall ms | user ms | user/wall | GFLOP/s |")
    print("|---|---|---|---|---|")
    square = normal(2048, 2048)
    _row("2048x2048 @ 2048x2048", lambda x: x @ x, (square,), 2 * 2048**3)
    a, b = normal(1024, 64, 64), normal(1024, 64, 64)
    batch_flops = 2 * 1024 * 64**3
    _row("batched 1024 x (64x64 @ 64x64)", lambda x, y: x @ y, (a, b), batch_flops)
    for pieces in (2, 4, 8, 16):
        _row(f"the same as {pieces} independent slices", _sliced(pieces), (a, b), batch_flops)
    for batch, m, k, n in ((512, 128, 64, 64), (512, 128, 128, 64), (256, 256, 64, 64), (1024, 64, 128, 64)):
        x, y = normal(batch, m, k), normal(batch, k, n)
        _row(f"batched {batch} x ({m}x{k} @ {k}x{n})", lambda x, y: x @ y, (x, y), 2 * batch * m * k * n)
    tall, weight = normal(65536, 64), normal(64, 64)
    _row("unbatched 65536x64 @ 64x64", lambda x, w: x @ w, (tall, weight), batch_flops)


if __name__ == "__main__":
    main()
