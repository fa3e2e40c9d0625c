"""How fast XLA:CPU runs the matmul shapes the chunked ops are made of, and on how many cores.

    python experiments/cpu_dots.py

Prints wall and user CPU time per call for: the 2048x2048 square matmul (the "% of matmul" reference of
bench_ops.py); one batched [1024, 64, 64] @ [1024, 64, 64] dot (a per-chunk matmul of B=1, H=8 at T=8k, C=64);
the same batch as 2, 4, 8 and 16 independent slices in one jitted function; other per-chunk tile shapes; and the
same FLOPs as one tall unbatched [65536, 64] @ [64, 64] dot; the batched dot with a transposed operand; the
matmuls of softmax_attn's chunked rows; and 1, 2 and 4 independent chains of 6 dependent batched dots in one jitted
function (whether XLA's executor runs independent work on both cores). user/wall near 1 means one core was busy.
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
    _transposed_operands(normal(1024, 64, 64), normal(1024, 64, 64), batch_flops)
    _attention_rows(normal)
    _independent_chains(normal)


def _independent_chains(normal: Callable, length: int = 6) -> None:
    """``chains`` independent chains of ``length`` dependent batched dots (each x <- x @ w + 1), one jitted function."""

    def run(*pairs):
        outs = []
        for x, w in zip(pairs[::2], pairs[1::2]):
            for _ in range(length):
                x = x @ w + 1.0
            outs.append(x)
        return outs

    for chains in (1, 2, 4):
        pairs = tuple(0.1 * normal(1024, 64, 64) for _ in range(2 * chains))
        _row(f"{chains} independent chain(s) of {length} batched 1024 x 64^3 dots", run, pairs,
             chains * length * 2 * 1024 * 64**3)


def _transposed_operands(a: jax.Array, b: jax.Array, flops: float) -> None:
    """The batched per-chunk dot with each operand layout: N = as stored, T = contracted over its first axis."""
    for name, spec in (("NN", "bik,bkj->bij"), ("NT", "bik,bjk->bij"), ("TN", "bki,bkj->bij")):
        _row(f"batched 1024 x 64x64x64, {name}", lambda x, y, spec=spec: jnp.einsum(spec, x, y), (a, b), flops)


def _attention_rows(normal: Callable) -> None:
    """softmax_attn's chunked rows at T = 4k (H = 8, D = 64, 512-query blocks) against the slot layout it replaced:
    the 36 causal 512x512 tiles as one batched dot of 72 tiles, and as rows of one query block against L keys."""
    tiles_q, tiles_k = normal(72, 512, 64), normal(72, 512, 64)
    _row("72 tiles (512x64 @ 64x512), NT", lambda x, y: jnp.einsum("rqd,rkd->rqk", x, y), (tiles_q, tiles_k),
         2 * 72 * 512 * 512 * 64)
    for keys in (512, 2048, 4096):
        q, k, scores_t = normal(8, 512, 64), normal(8, keys, 64), normal(8, keys, 512)
        flops = 2 * 8 * 512 * keys * 64
        _row(f"row of 8 heads: S = Q K^T, 512 x {keys}", lambda x, y: jnp.einsum("hqd,hkd->hqk", x, y), (q, k), flops)
        _row(f"row: dK = dS^T Q, NN on [{keys}, 512]", lambda s, x: jnp.einsum("hkq,hqd->hkd", s, x), (scores_t, q),
             flops)
        _row(f"row: dQ = dS K, TN on [{keys}, 512]", lambda s, y: jnp.einsum("hkq,hkd->hqd", s, y), (scores_t, k),
             flops)


if __name__ == "__main__":
    main()
