"""Every mask family of the mask algebra at one length: the XLA blockwise form's and the Pallas kernel's forward
and forward+backward time, against dense causal / bidirectional attention, and the fraction of (query tile, key
tile) pairs the mask's tile map visits. Besides the static masks: Combiner's span summaries (the tokens and one
summary slot per span, so a longer op sequence), a runtime ``BlockIndex`` as HiP and SEA select it (top-k key tiles
of each query tile plus its own; random here, the same cost), and Routing's clusters as segment ids under
``Causal() & Document()`` (runtime ids: every causal tile is visited).

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
import dataclasses
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
        "strided 64 and window 64 (Sparse Transformer)": masks.PerHead(
            (masks.Causal(window=64), masks.Strided(64)) * (heads // 2)),
        "S2-Attention (B 64, local 4, stride 8)": masks.s2_heads(heads, 64, 4, 8),
        "NATTEN 1-d causal k=255, dilation 2": masks.Neighborhood(kernel=255, dilation=2, causal=True),
        f"NATTEN 2-d k=13 on {grid}": masks.Neighborhood(kernel=13, grid=grid),
        f"HaloNet 2-d b=8, h=3 on {grid}": masks.Halo(block=8, halo=3, grid=grid),
        f"CLEAR r=8 on {grid}": masks.CircularWindow(radius=8.0, grid=grid),
        "HaloNet 1-d causal b=128, h=64": masks.Halo(block=128, halo=64, causal=True),
    }


@dataclasses.dataclass(frozen=True)
class RuntimeCase:
    """A family whose visited tiles are data: the op's static mask, the sequence length the op sees, and how to
    make its runtime arguments (block_index / segment_ids) from a numpy Generator."""

    mask: masks.Mask
    length: int
    arguments: object  # (rng, heads) -> dict of ops.softmax_attn keyword arguments
    block: int | None = None  # the runtime BlockIndex's tile, which is the op's block


def random_block_index(length: int, block: int, selected: int):
    """(rng, heads) -> {"block_index"}: each query tile's own tile and `selected` random earlier ones (causal)."""
    n = -(-length // block)

    def make(rng, heads):
        rows = np.arange(n)[:, None]
        earlier = np.floor(rng.random((1, heads, n, selected)) * np.maximum(rows, 1)).astype(np.int32)
        tiles = np.concatenate([np.broadcast_to(rows, (1, heads, n, 1)), np.where(rows > 0, earlier, n)], -1)
        return {"block_index": masks.BlockIndex.of(jnp.asarray(tiles), block, n)}

    return make


def runtime_cases(length: int) -> dict[str, RuntimeCase]:
    """name -> RuntimeCase at T = length tokens."""
    span = 64
    combiner = masks.SpanSummaries(span, length)
    return {
        f"Combiner span {span} (tokens + {length // span} summary slots)": RuntimeCase(combiner, combiner.length,
                                                                                   lambda rng, heads: {}),
        "HiP / SEA BlockIndex: own + 4 tiles of 128 (causal)": RuntimeCase(
            masks.Causal(), length, random_block_index(length, 128, 4), block=128),
        "Routing: 8 clusters as segment ids (causal)": RuntimeCase(
            masks.Causal() & masks.Document(), length,
            lambda rng, heads: {"segment_ids": jnp.asarray(rng.integers(0, 8, (1, length)), jnp.int32)}),
    }


def runtime_visited(case: RuntimeCase, arguments: dict, block: int) -> float:
    """The fraction of tile pairs visited: the BlockIndex's causal tiles, else the static mask's tile map."""
    if "block_index" not in arguments:
        return visited_fraction(case.mask, case.length, block)
    tiles = np.asarray(arguments["block_index"].tiles)
    n = -(-case.length // case.block)
    rows = np.arange(n)[None, None, :, None]
    return float(np.mean(np.sum((tiles < n) & (tiles <= rows), -1)) / n)


def visited_fraction(mask: masks.Mask, length: int, block: int) -> float:
    tiles = mask.tile_map(length, block, block)
    return float(np.mean(tiles))


def time_impl(mask: masks.Mask, impl: str, args: tuple, repeats: int, block: int | None,
              runtime: dict | None = None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ops.softmax_attn under mask (block: the XLA form's block size;
    runtime: block_index / segment_ids)."""
    runtime = runtime or {}
    block = None if "block_index" in runtime else block

    def attention(q, k, v):
        return ops.softmax_attn(q, k, v, mask=mask, impl=impl, block_size=block if impl == "chunked" else None,
                                **runtime)

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
    inputs = lambda length: tuple(jnp.asarray(rng.normal(size=(1, length, a.heads, a.dim)), jnp.float32)  # noqa: E731
                                  for _ in range(3))
    args = inputs(a.length)
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
    for name, case in runtime_cases(a.length).items():
        if a.only and not any(part in name for part in a.only.split(",")):
            continue
        runtime = case.arguments(rng, a.heads)
        block = case.block or a.block or default_block_size(None)
        visited = runtime_visited(case, runtime, block)
        kernel = visited if "block_index" in runtime else visited_fraction(case.mask, case.length, KERNEL_TILE)
        row = [name, f"{visited:.3f}", f"{kernel:.3f}"]  # the kernel's tiles: the index's block
        for impl in impls:
            row += [f"{ms:.0f}" for ms in time_impl(case.mask, impl, inputs(case.length), a.repeats, a.block, runtime)]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
