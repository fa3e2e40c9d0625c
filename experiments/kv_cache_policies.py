"""Softmax attention's KV-cache policies: cache bytes per token and how far decoding moves from the exact cache.

    python experiments/kv_cache_policies.py
    python experiments/kv_cache_policies.py --d_model=512 --num_heads=8 --num_kv_heads=2 --prompt=512 --decode=512

One softmax layer (random weights, RoPE, GQA) reads a random prompt and decodes `--decode` more tokens of random
input under each policy (`seqlab.mixers.softmax.softmax_attention`: kv_bits, kv_group, kv_sinks, kv_window,
kv_heavy for H2O's heavy hitters, kv_important for ZipVL's mixed precision). For each policy the table gives the
cache's bytes for the whole sequence (`stored_bytes`: keys, values, scales; H2O adds each slot's position and
score, ZipVL counts each slot at its precision plus the mask), and their share of the exact float32 cache's; the
relative error of the decoded outputs against decoding with the exact cache, ‖y − y_exact‖ / ‖y_exact‖ over the
decoded tokens; the decode time per token (a jitted scan, best of 3); and the slots each step reads (ZipVL: the
share of prompt tokens it keeps at high precision).
Random weights attend almost uniformly, so the eviction rows' errors say how much of the keys' mass is dropped,
not how a trained model (whose attention StreamingLLM and H2O find concentrated on sinks, recent tokens and a few
heavy hitters) would fare; for the same reason ZipVL's rule keeps most prompt tokens at high precision here.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from seqlab import host_memory, mixers

POLICIES = {
    "exact (float32)": {},
    "int8, groups of 32": dict(kv_bits=8, kv_group=32),
    "int4, groups of 32": dict(kv_bits=4, kv_group=32),
    "int4, groups of 16": dict(kv_bits=4, kv_group=16),
    "4 sinks + window 256": dict(kv_sinks=4, kv_window=256),
    "4 sinks + window 256, int8": dict(kv_sinks=4, kv_window=256, kv_bits=8),
    "4 sinks + window 252": dict(kv_sinks=4, kv_window=252),
    "H2O: 4 sinks + 124 heavy + window 128": dict(kv_sinks=4, kv_heavy=124, kv_window=128),
    "H2O: 4 sinks + 124 heavy + window 128, int8": dict(kv_sinks=4, kv_heavy=124, kv_window=128, kv_bits=8),
    "ZipVL τ=0.9: float32 / int4": dict(kv_important=0.9),
    "ZipVL τ=0.95: float32 / int4": dict(kv_important=0.95),
    "ZipVL τ=0.95: int8 / int4": dict(kv_important=0.95, kv_bits=8),
}


def decode(mixer: mixers.Mixer, x: jax.Array, prompt: int) -> tuple[jax.Array, object, float]:
    """(decoded outputs [B, T - prompt, D], the cache after the prompt, seconds per decoded token)."""
    _, cache = mixer.prefill(x[:, :prompt], mixer.init_cache(x.shape[0], x.shape[1]))

    @jax.jit
    def run(cache, xs):
        def body(c, x_t):
            y_t, c = mixer.step(x_t, c)
            return c, y_t

        return jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))[1]

    tail = x[:, prompt:]
    ys = jax.block_until_ready(run(cache, tail))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(cache, tail))
        best = min(best, time.perf_counter() - start)
    return jnp.swapaxes(ys, 0, 1), cache, best / tail.shape[1]


def cache_bytes(cache) -> int:
    """The policy's `stored_bytes`; the exact cache's keys and values (the per-slot arrays; positions and counters
    left out)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache) if leaf.ndim == 4)


def slots_read(cache, prompt: int) -> str:
    """The slots a decode step reads, or for ZipVL the share of prompt tokens kept at high precision."""
    if hasattr(cache, "high"):
        return f"high precision: {float(jnp.mean(cache.high[:, :prompt])):.0%} of the prompt"
    return f"{cache.k.shape[1]} slots"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=512)
    a = parser.parse_args()
    host_memory.retain_freed_memory()
    x = jax.random.normal(jax.random.key(0), (1, a.prompt + a.decode, a.d_model), jnp.float32)
    head_dim = a.d_model // a.num_heads
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; d_model {a.d_model}, {a.num_heads} heads, "
          f"{a.num_kv_heads} key/value heads of {head_dim}; prompt {a.prompt}, {a.decode} decoded tokens")
    print("| policy | cache bytes | share of exact | decoded-output error | decode ms/token | reads |")
    print("|---|---|---|---|---|---|")
    exact = None
    for name, policy in POLICIES.items():
        mixer = mixers.create("softmax", d_model=a.d_model, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                              **policy)
        ys, cache, seconds = decode(mixer, x, a.prompt)
        size = cache_bytes(cache)
        if exact is None:
            exact, exact_size = ys, size
        error = float(jnp.linalg.norm(ys - exact) / jnp.linalg.norm(exact))
        print(f"| {name} | {size:,} | {size / exact_size:.3f} | {error:.1e} | {1e3 * seconds:.3f} | "
              f"{slots_read(cache, a.prompt)} |", flush=True)


if __name__ == "__main__":
    main()
