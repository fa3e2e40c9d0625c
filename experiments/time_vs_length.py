"""Time per token against sequence length: chunked scalar-decay linear attention (`ops.simple_gla`, the Lightning
Attention-2 / RetNet tiling: dense intra-chunk matmul, recurrent inter-chunk state) against causal softmax attention
(`ops.softmax_attn`, its blockwise online-softmax form), forward and forward+backward, jit-compiled, float32.

    python experiments/time_vs_length.py                                  # T = 256 .. 4096, B=1, H=4, D=64
    python experiments/time_vs_length.py --lengths=512,1024 --repeats=3 --no-backward

Each point is the median wall time of `repeats` calls after one warm-up call (which also compiles).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import ops

IMPLS = ("simple_gla (chunked)", "softmax_attn (chunked)")


def make_inputs(length: int, *, batch: int, heads: int, dim: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """q, k, v [B, T, H, D] float32 (unit-norm keys) and the log decay g [B, T, H] of a per-head constant
    decay (TNL's ALiBi-style slopes: log lambda_h = -2^(-8h/H), h = 1..H)."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    log_decay = -(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads))  # [H]
    g = jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32), shape[:3])
    return q, k, v, g


def attention_fn(impl: str, chunk_size: int) -> Callable[..., jax.Array]:
    """(q, k, v, g) -> o [B, T, H, D] for one of IMPLS (softmax ignores g)."""
    if impl == IMPLS[0]:
        return lambda q, k, v, g: ops.simple_gla(q, k, v, g, impl="chunked", chunk_size=chunk_size)[0]
    if impl == IMPLS[1]:
        return lambda q, k, v, g: ops.softmax_attn(q, k, v, causal=True, impl="chunked")
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time of fn(*args) (blocked until ready) over `repeats` calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(lengths: Sequence[int], *, batch: int = 1, heads: int = 4, dim: int = 64, repeats: int = 5,
            backward: bool = True, chunk_size: int = 64) -> list[dict]:
    """One row per (impl, pass, T): seq_len, impl, pass ("fwd" / "fwd+bwd"), ms, ms_per_token."""
    passes = {}  # (impl, pass) -> jitted fn; the lengths are the outer loop so both impls see the same load
    for impl in IMPLS:
        fn = attention_fn(impl, chunk_size)
        passes[impl, "fwd"] = jax.jit(fn)
        if backward:
            loss = lambda q, k, v, g, fn=fn: jnp.sum(fn(q, k, v, g) * v)  # noqa: E731 (a fixed cotangent)
            passes[impl, "fwd+bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    rows = []
    for length in lengths:
        args = make_inputs(length, batch=batch, heads=heads, dim=dim)
        for (impl, name), compiled in passes.items():
            ms = 1e3 * median_seconds(compiled, args, repeats)
            rows.append({"seq_len": length, "impl": impl, "pass": name, "ms": ms,
                         "ms_per_token": ms / (batch * length)})
    rows.sort(key=lambda r: (IMPLS.index(r["impl"]), r["pass"], r["seq_len"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| impl | pass | T | ms | us / token |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['pass']} | {r['seq_len']} | {r['ms']:.2f} | {1e3 * r['ms_per_token']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    args = parser.parse_args(argv)
    rows = measure([int(t) for t in args.lengths.split(",")], batch=args.batch, heads=args.heads, dim=args.dim,
                   repeats=args.repeats, backward=args.backward, chunk_size=args.chunk_size)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; B={args.batch} H={args.heads} D={args.dim} "
          f"float32, median of {args.repeats}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
