"""Causal softmax attention on CPU, side by side in one process: seqlab's XLA blockwise form
(``ops.softmax_attn(impl="chunked")``, which skips the tiles above the diagonal) against PyTorch's
``scaled_dot_product_attention(is_causal=True)``, forward and forward+backward.

    python experiments/bench_torch_softmax.py                       # T = 1k, 2k, 4k, 8k; H = 8, D = 64, B = 1
    python experiments/bench_torch_softmax.py --lengths=4096 --blocks=256,512,1024

PyTorch is an optional dependency of this script only (``pip install -e ".[bench]"``). Both run float32 on every
core (torch's intra-op threads = the machine's cores) with seqlab's host allocator policy (`seqlab.host_memory`),
set before either library runs. Times are the best of ``--repeats`` calls after a warm-up call (which also
compiles); the backward is the gradient of sum(o · w) with respect to q, k and v. A second table times the two
matmuls of one attention tile in each library (H of them batched, float32): the scores [block, D] @ [D, block]
and the output [block, block] @ [block, D], which bound what any XLA formulation of the tiles can reach. A third
table is a lower bound for any XLA formulation of the causal forward at the longest length: the pieces of one
row (H query blocks of ``block`` tokens against all T keys: the score matmul, the row maximum, the exponentials
and their sum, the output matmul), each timed alone, times the causal forward's share of such rows
((n + 1) / 2 of the n = T / block rows: its visited tiles, the diagonal ones included). It leaves out the mask,
the normalisation and every copy, so a real formulation is slower.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench_ops import best_seconds
from seqlab import host_memory, ops
from seqlab.ops.softmax_attn import DEFAULT_BLOCK_SIZE


def jax_times(q, k, v, w, block: int | None, repeats: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of the XLA blockwise causal form at `block` (None: the op's default)."""
    def attention(q, k, v):
        return ops.softmax_attn(q, k, v, causal=True, impl="chunked", block_size=block)

    forward = jax.jit(attention)
    backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * w), argnums=(0, 1, 2)))
    return tuple(1e3 * best_seconds(lambda f=f: jax.block_until_ready(f(q, k, v)), repeats)
                 for f in (forward, backward))


def torch_times(arrays: tuple[np.ndarray, ...], repeats: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of torch's causal scaled_dot_product_attention, inputs [B, T, H, D]."""
    import torch
    import torch.nn.functional as F

    q, k, v, w = (torch.tensor(np.swapaxes(a, 1, 2)) for a in arrays)  # [B, H, T, D]

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def backward():
        leaves = [a.clone().requires_grad_() for a in (q, k, v)]
        (F.scaled_dot_product_attention(*leaves, is_causal=True) * w).sum().backward()

    return tuple(1e3 * best_seconds(f, repeats) for f in (forward, backward))


def tile_matmul_rates(heads: int, dim: int, block: int, repeats: int) -> list[tuple[str, float, float]]:
    """(matmul, XLA GFLOP/s, torch GFLOP/s) of a tile's two batched matmuls."""
    import torch

    rng = np.random.default_rng(1)
    rows = []
    for name, (m, k, n) in {"scores": (block, dim, block), "output": (block, block, dim)}.items():
        a, b = (rng.normal(size=(heads, *shape)).astype(np.float32) for shape in ((m, k), (k, n)))
        xla = jax.jit(lambda x, y: jnp.einsum("hmk,hkn->hmn", x, y))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.tensor(a), torch.tensor(b)
        flops = 2 * heads * m * k * n
        t_xla = best_seconds(lambda: jax.block_until_ready(xla(ja, jb)), repeats)
        t_torch = best_seconds(lambda: torch.bmm(ta, tb), repeats)
        rows.append((f"{name} [{m}, {k}] @ [{k}, {n}] x {heads}", flops / t_xla / 1e9, flops / t_torch / 1e9))
    return rows


def causal_row_bound(length: int, heads: int, dim: int, block: int, repeats: int) -> list[tuple[str, float]]:
    """(piece, ms) of the causal forward's XLA lower bound at `length` (see the module docstring), and the total."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(heads, block, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(heads, length, dim)), jnp.float32)
    scores = jnp.einsum("hqd,hkd->hqk", q, k)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    pieces = {
        "score matmul": (lambda q, k: jnp.einsum("hqd,hkd->hqk", q, k), (q, k)),
        "row maximum": (lambda s: jnp.max(s, axis=-1), (scores,)),
        "exponentials and their sum": (lambda s, m: jnp.sum(jnp.exp(s - m), axis=-1), (scores, row_max)),
        "output matmul": (lambda p, v: jnp.einsum("hqk,hkv->hqv", p, v), (scores, k)),
    }
    share = (-(-length // block) + 1) / 2  # rows of full width that the causal forward's visited tiles add up to
    rows = []
    for name, (f, args) in pieces.items():
        f = jax.jit(f)
        rows.append((name, 1e3 * share * best_seconds(lambda f=f, args=args: jax.block_until_ready(f(*args)),
                                                      10 * repeats)))
    return rows + [("total", sum(ms for _, ms in rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", default="default", help="XLA blocks to time: comma-separated ints or 'default'")
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    host_memory.retain_freed_memory()  # before either library runs anything
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_torch_softmax.py needs PyTorch: pip install -e '.[bench]'")
    torch.set_num_threads(os.cpu_count() or 1)
    blocks = [None if b == "default" else int(b) for b in a.blocks.split(",")]
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"H={a.heads}, D={a.dim}, B=1, float32, device={jax.devices()[0].device_kind}")
    print("| T | implementation | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for length in map(int, a.lengths.split(",")):
        arrays = tuple(rng.normal(size=(1, length, a.heads, a.dim)).astype(np.float32) for _ in range(4))
        tf, tb = torch_times(arrays, a.repeats)
        print(f"| {length} | torch scaled_dot_product_attention | {tf:.1f} | {tb:.1f} |", flush=True)
        q, k, v, w = (jnp.asarray(x) for x in arrays)
        for block in blocks:
            jf, jb = jax_times(q, k, v, w, block, a.repeats)
            name = f"seqlab chunked, block {block or 'default'}"
            print(f"| {length} | {name} | {jf:.1f} | {jb:.1f} |", flush=True)
    tile = blocks[0] or DEFAULT_BLOCK_SIZE
    print(f"\n| one tile's matmul (block {tile}) | XLA GFLOP/s | torch GFLOP/s |\n|---|---|---|")
    for name, xla, torch_rate in tile_matmul_rates(a.heads, a.dim, tile, 10 * a.repeats):
        print(f"| {name} | {xla:.0f} | {torch_rate:.0f} |", flush=True)
    longest = max(map(int, a.lengths.split(",")))
    print(f"\n| XLA lower bound of the causal forward, T = {longest}, block {tile} | ms |\n|---|---|")
    for name, ms in causal_row_bound(longest, a.heads, a.dim, tile, a.repeats):
        print(f"| {name} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
