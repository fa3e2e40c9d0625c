"""Time every op and form: forward and forward+backward, tokens/s and achieved GFLOP/s.

    python experiments/bench_ops.py                      # the full table (T = 1k .. 64k, B=1, H=8, K=V=64)
    python experiments/bench_ops.py --ops=simple_gla --lengths=8192

FLOPs are counted per the chunked algorithm at C = 64 whatever chunk size an implementation uses, so the figure
compares implementations: per chunk of C tokens per head 2C²K + 2C²V + 4CKV forward, backward twice the forward;
causal softmax 2T²(K+V)/2 per head; vq_attn (one form, blocks of L = 64, S = 64 codes) 2T(2L + S)(K+V) per head.
The machine's matmul GFLOP/s is measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import host_memory, ops

FLOP_CHUNK = 64
LINEAR_OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
ALL_OPS = LINEAR_OPS + ("softmax_attn", "xla_dot_product_attention", "vq_attn")
VQ_BLOCK, VQ_CODES = 64, 64  # vq_attn's blocks and codebook (LongVQ's defaults)
# Forms whose cost or memory grows with T² (or that step token by token) run only up to these lengths.
MAX_LENGTH = {"parallel": 4096, "recurrent": 16384, "xla": 16384}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = _time(f, (a,), repeats)
    return 2 * size**3 / seconds / 1e9


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``run()`` (which must block until its work is done) over ``repeats``, after a warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _time(f: Callable, args: tuple, repeats: int) -> float:
    return best_seconds(lambda: jax.block_until_ready(f(*args)), repeats)


def make_inputs(op: str, length: int, heads: int, dim: int, batch: int = 1) -> tuple:
    rng = np.random.default_rng(0)
    shape = (batch, length, heads, dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = jnp.asarray(-rng.uniform(0.01, 0.5, size=shape[:3]), jnp.float32)
    gk = jnp.asarray(-rng.uniform(0.01, 0.5, size=shape), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=shape[:3]), jnp.float32)
    codebook = jnp.asarray(rng.normal(size=(heads, VQ_CODES, dim)), jnp.float32) / np.sqrt(dim)
    extra = {"simple_gla": (g,), "gla": (gk,), "delta_rule": (beta,), "gated_delta_rule": (g, beta),
             "vq_attn": (codebook,)}.get(op, ())
    return (q, k, v) + extra


def op_fn(op: str, impl: str) -> Callable:
    if op == "xla_dot_product_attention":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    if op == "softmax_attn":
        return lambda q, k, v: ops.softmax_attn(q, k, v, impl=impl)
    if op == "vq_attn":  # its keys quantised in the timed function, with their straight-through gradient
        def quantised(q, k, v, codebook):
            codes = ops.nearest_codes(k, codebook)
            return ops.vq_attn(q, ops.quantize(k, codebook, codes), codes, v, codebook, block_size=VQ_BLOCK)

        return quantised
    fn = getattr(ops, op)
    return lambda *args: fn(*args, impl=impl)[0]


def forward_flops(op: str, length: int, heads: int, dim: int) -> float:
    if op in ("softmax_attn", "xla_dot_product_attention"):
        return heads * 2 * length**2 * (2 * dim) / 2
    if op == "vq_attn":
        return heads * 2 * length * (2 * VQ_BLOCK + VQ_CODES) * (2 * dim)
    c = FLOP_CHUNK
    return heads * (length / c) * (2 * c * c * dim + 2 * c * c * dim + 4 * c * dim * dim)


def bench(op: str, impl: str, length: int, heads: int, dim: int, repeats: int) -> dict:
    args = make_inputs(op, length, heads, dim)
    fn = op_fn(op, impl)
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * a[2]), argnums=tuple(range(len(args)))))
    t_fwd = _time(fwd, args, repeats)
    t_bwd = _time(grad, args, repeats)
    flops = forward_flops(op, length, heads, dim)
    return {"fwd_s": t_fwd, "fwdbwd_s": t_bwd, "tok_s": length / t_bwd,
            "gflops_fwd": flops / t_fwd / 1e9, "gflops_fwdbwd": 3 * flops / t_bwd / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(ALL_OPS))
    parser.add_argument("--impls", default="chunked,recurrent,parallel")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--glibc_default_malloc", action="store_true",
                        help="keep glibc's default allocator policy (see seqlab.host_memory) to show its cost")
    args = parser.parse_args()
    retained = not args.glibc_default_malloc and host_memory.retain_freed_memory()
    peak = matmul_gflops()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"measured matmul: {peak:.1f} GFLOP/s (2048x2048 float32); "
          f"host allocator: {'seqlab.host_memory policy' if retained else 'glibc default'}")
    print(f"B=1 H={args.heads} K=V={args.dim}; FLOPs counted at C={FLOP_CHUNK}; fwd+bwd = 3x fwd FLOPs")
    print("| op | impl | T | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | GFLOP/s fwd | GFLOP/s fwd+bwd | % of matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op in args.ops.split(","):
        impls = {"xla_dot_product_attention": ["xla"], "vq_attn": ["chunked"]}.get(op, args.impls.split(","))
        for impl in impls:
            for length in map(int, args.lengths.split(",")):
                if length > MAX_LENGTH.get(impl, length):
                    continue
                r = bench(op, impl, length, args.heads, args.dim, args.repeats)
                print(f"| {op} | {impl} | {length} | {1e3 * r['fwd_s']:.1f} | {1e3 * r['fwdbwd_s']:.1f} | "
                      f"{r['tok_s']:,.0f} | {r['gflops_fwd']:.1f} | {r['gflops_fwdbwd']:.1f} | "
                      f"{100 * r['gflops_fwdbwd'] / peak:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
