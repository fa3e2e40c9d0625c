"""Sequence-parallel softmax attention ("allgather" = LASP-2H, "ring" = ring attention, and the sliding-window halo)
against the single-device ``ops.softmax_attn`` on the full sequence, forward and gradients w.r.t. q, k, v, for
seq-axis sizes 2, 4 and 8. Runs in its own process with 8 host devices.

T = 80 and block_size 16: T_local is 40, 20 or 10, never a multiple of the block. GQA throughout (4 query heads
over 2 key/value heads). Window 8 exchanges a halo (w - 1 <= T_local at every size); window 50 does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqlab import ops
from seqlab.core import masks

B, T, H, H_KV, D = 2, 80, 4, 2, 8
BLOCK = 16
TOL = 1e-5

FULL = [
    pytest.param(size, mode, causal, window, marks=() if size == 4 or (causal and window is None) else pytest.mark.slow)
    for causal, window in [(True, None), (False, None), (True, 50), (False, 50)]
    for mode in ("allgather", "ring") for size in (2, 4, 8)
]  # CI runs every case at 4 devices and plain causal at 2 and 8; `pytest -m slow` runs the rest
# The halo path does not depend on the mode: each size runs once, the modes alternating.
HALO = [(2, "allgather", True, 8), (4, "ring", True, 8), (8, "allgather", True, 8),
        (2, "ring", False, 8), (4, "allgather", False, 8), (8, "ring", False, 8)]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs() -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    shapes = [(B, T, H, D), (B, T, H_KV, D), (B, T, H_KV, D), (B, T, H, D)]
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def value_and_grads(attn, q, k, v, w):
    def loss(q, k, v):
        o = attn(q, k, v)
        return jnp.sum(o * w), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


@functools.lru_cache(maxsize=None)
def reference(causal: bool, window: int | None):
    attn = functools.partial(ops.softmax_attn, causal=causal, window=window, block_size=BLOCK)
    return value_and_grads(attn, *inputs())


def sharded(size: int, **kwargs):
    mesh = Mesh(np.array(jax.devices()[:size]), ("seq",))
    seq = P(None, "seq")
    attn = functools.partial(ops.softmax_attn, sequence_axis="seq", **kwargs)
    return jax.shard_map(attn, mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq)


def check(size: int, causal: bool, window: int | None, **kwargs) -> None:
    o, grads = value_and_grads(sharded(size, causal=causal, window=window, **kwargs), *inputs())
    o_ref, grads_ref = reference(causal, window)
    errors = {"o": rel(o, o_ref)} | {name: rel(g, r) for name, g, r in zip("qkv", grads, grads_ref)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("size, mode, causal, window", FULL + HALO)
def test_sequence_parallel_softmax_equals_single_device(size, mode, causal, window):
    check(size, causal, window, sequence_parallel=mode, block_size=BLOCK)


@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_parallel_form(mode):
    """impl='parallel': one block of T_local per device."""
    check(4, True, None, sequence_parallel=mode, impl="parallel")


def test_rejects_unknown_mode_and_recurrent_form():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="sequence_parallel must be one of"):
        ops.softmax_attn(q, k, v, sequence_parallel="tree")
    with pytest.raises(ValueError, match="impl must be 'chunked' or 'parallel'"):
        ops.softmax_attn(q, k, v, sequence_axis="seq", impl="recurrent")


# Packed rows at 4 devices (borders at 20, 40 and 60): documents crossing one border each, or all of them; row 1
# packs the reverse. The single-device packed op is itself checked against each document alone (tests/ops).
PACKINGS = {"one_border": (3, 30, 17, 25, 5), "all_borders": (5, 70, 5)}
PACKED = [(mode, causal, window, packing) for packing in PACKINGS
          for mode, causal, window in [("allgather", True, None), ("ring", True, None), ("ring", False, None),
                                       ("allgather", False, 50), ("allgather", True, 8), ("ring", False, 8)]]


@pytest.mark.parametrize("mode, causal, window, packing", PACKED)
def test_packed_sequence_parallel_softmax_equals_single_device(mode, causal, window, packing):
    lengths = PACKINGS[packing]
    ids = jnp.asarray(np.stack([np.repeat(np.arange(len(order)), order) for order in (lengths, lengths[::-1])]),
                      jnp.int32)  # fmt: skip
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    seq = P(None, "seq")
    kwargs = dict(causal=causal, window=window, block_size=BLOCK)

    def local(q, k, v, ids):
        return ops.softmax_attn(q, k, v, segment_ids=ids, sequence_axis="seq", sequence_parallel=mode, **kwargs)

    sp = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq)
    q, k, v, w = inputs()
    o, grads = value_and_grads(lambda q, k, v: sp(q, k, v, ids), q, k, v, w)
    o_ref, grads_ref = value_and_grads(lambda q, k, v: ops.softmax_attn(q, k, v, segment_ids=ids, **kwargs), q, k, v, w)
    assert rel(o_ref, ops.softmax_attn(q, k, v, **kwargs)) > 1e-2  # the documents do change the result
    errors = {"o": rel(o, o_ref)} | {name: rel(g, r) for name, g, r in zip("qkv", grads, grads_ref)}
    assert max(errors.values()) <= TOL, errors


# Masks of the mask algebra beyond Causal / Bidirectional: the keys travel whole (all-gather or ring) and every
# head's predicate is evaluated on global positions (the single-device op is checked pair by pair in tests/ops).
ALGEBRA_MASKS = {
    "s2-heads": masks.s2_heads(H, block=8, local_blocks=2, stride=3, dense_heads=1),
    "natten-2d": masks.Neighborhood(kernel=(3, 5), dilation=(1, 2), grid=(8, 10)),
    "halo-causal": masks.Halo(block=8, halo=3, causal=True),
}


@pytest.mark.parametrize("name, mode", [("s2-heads", "allgather"), ("natten-2d", "ring"), ("halo-causal", "allgather")])
def test_any_mask_sequence_parallel_equals_single_device(name, mode):
    mask = ALGEBRA_MASKS[name]
    q, k, v, w = inputs()
    o, grads = value_and_grads(sharded(4, mask=mask, sequence_parallel=mode, block_size=BLOCK), q, k, v, w)
    attn = functools.partial(ops.softmax_attn, mask=mask, block_size=BLOCK)
    o_ref, grads_ref = value_and_grads(attn, q, k, v, w)
    errors = {"o": rel(o, o_ref)} | {n: rel(g, r) for n, g, r in zip("qkv", grads, grads_ref)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("mode, window", [("ring", None), ("allgather", 8)])
def test_score_mod_sequence_parallel_equals_single_device(mode, window):
    """A relative-position bias per head (score_mod at global positions) under every exchange: output and the
    gradients in q, k, v. (The table's own gradient is left out here: its psum and the all-gather's transpose are
    independent collectives, which XLA:CPU's concurrent thunk runtime may order differently on different devices
    and deadlock; the sequence-parallel path has no custom gradient, so JAX differentiates the table through the
    same scores.)"""
    table = jnp.asarray(np.random.default_rng(3).normal(size=(H, 2 * T - 1)), jnp.float32)

    def mod(s, q_idx, k_idx, head):
        return s + table[head, q_idx - k_idx + T - 1]

    kwargs = dict(window=window, score_mod=mod, block_size=BLOCK)
    o, grads = value_and_grads(sharded(4, sequence_parallel=mode, **kwargs), *inputs())
    o_ref, grads_ref = value_and_grads(functools.partial(ops.softmax_attn, **kwargs), *inputs())
    assert rel(o_ref, value_and_grads(functools.partial(ops.softmax_attn, window=window), *inputs())[0]) > 1e-2
    errors = {"o": rel(o, o_ref)} | {n: rel(g, r) for n, g, r in zip("qkv", grads, grads_ref)}
    assert max(errors.values()) <= TOL, errors
