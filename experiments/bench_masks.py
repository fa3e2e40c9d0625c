"""Every mask family of the mask algebra at one length: the XLA blockwise form's and the Pallas kernel's forward
and forward+backward time, against dense causal / bidirectional attention, and the fraction of (query tile, key
tile) pairs the mask's tile map visits.

    python experiments/bench_masks.py                                     # T = 4096, H = 8, D = 64, CPU
    python experiments/bench_masks.py --length=1024 --impls=chunked --repeats=2

Pallas runs interpreted on CPU (its time there measures the interpreter, not the kernel; on a GPU it is the
kernel). "visited" is the mean over heads of the fraction of tile pairs each head's mask visits at the XLA form's
block (``--block``, default the op's: 512, or the window's; a PerHead mask whose heads' maps differ enough runs one
call per head mask); "kernel tiles" is the union over heads at the Pallas kernel's 128-token tiles. Times are the
best of `repeats` calls after a warm-up call (which also compiles), jit-compiled, float32, B = 1.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from bench_ops import best_seconds
from seqlab import ops
from seqlab.core import masks
from seqlab.ops.softmax_attn import default_block_size

KERNEL_TILE = 128


def families(length: int, heads: int) -> dict[str, masks.Mask]:
    """name -> mask at T = length: the dense baselines and one setting of every family (2-d ones on a square
    grid of side √T)."""
    side = math.isqrt(length)
    grid = (side, length // side)
    return {
        "causal (dense)": masks.Causal(),
        "bidirectional (dense)": masks.Bidirectional(),
        "sliding window 256": masks.Causal(window=256),
        "block diagonal 256": masks.BlockDiagonal(256),
        "strided 64 | window 64 (Sparse Transformer)": masks.PerHead(
            (masks.Causal(window=64), masks.Strided(64)) * (heads // 2)),
        "S2-Attention (B 64, local 4, stride 8)": masks.s2_heads(heads, 64, 4, 8),
        "NATTEN 1-d causal k=255, dilation 2": masks.Neighborhood(kernel=255, dilation=2, causal=True),
        f"NATTEN 2-d k=13 on {grid}": masks.Neighborhood(kernel=13, grid=grid),
        f"HaloNet 2-d b=8, h=3 on {grid}": masks.Halo(block=8, halo=3, grid=grid),
        f"CLEAR r=8 on {grid}": masks.CircularWindow(radius=8.0, grid=grid),
        "HaloNet 1-d causal b=128, h=64": masks.Halo(block=128, halo=64, causal=True),
    }


def visited_fraction(mask: masks.Mask, length: int, block: int) -> float:
    tiles = mask.tile_map(length, block, block)
    return float(np.mean(tiles))


def time_impl(mask: masks.Mask, impl: str, args: tuple, repeats: int, block: int | None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ops.softmax_attn under mask (block: the XLA form's block size)."""
    def attention(q, k, v):
        return ops.softmax_attn(q, k, v, mask=mask, impl=impl, block_size=block if impl == "chunked" else None)

    forward = jax.jit(attention)
    backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * v), argnums=(0, 1, 2)))
    return tuple(1e3 * best_seconds(lambda f=f: jax.block_until_ready(f(*args)), repeats) for f in (forward, backward))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--impls", default="chunked,pallas")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings of family names to run")
    parser.add_argument("--block", type=int, default=None, help="the XLA form's block (default: the op's)")
    a = parser.parse_args()
    rng = np.random.default_rng(0)
    args = tuple(jnp.asarray(rng.normal(size=(1, a.length, a.heads, a.dim)), jnp.float32) for _ in range(3))
    impls = a.impls.split(",")
    header = ["mask", "visited", "kernel tiles"] + [f"{i} {p} ms" for i in impls for p in ("fwd", "fwd+bwd")]
    print(f"T={a.length}, H={a.heads}, D={a.dim}, device={jax.devices()[0].device_kind}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, mask in families(a.length, a.heads).items():
        if a.only and not any(part in name for part in a.only.split(",")):
            continue
        window = mask.window if isinstance(mask, (masks.Causal, masks.Bidirectional)) else None
        block = a.block or default_block_size(window)
        per_head = mask.masks if isinstance(mask, masks.PerHead) else (mask,)
        visited = np.mean([visited_fraction(m, a.length, block) for m in per_head])  # each head's own tiles
        row = [name, f"{visited:.3f}", f"{visited_fraction(mask, a.length, KERNEL_TILE):.3f}"]
        for impl in impls:
            row += [f"{ms:.0f}" for ms in time_impl(mask, impl, args, a.repeats, a.block)]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
