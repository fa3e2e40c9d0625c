"""Sequence-parallel linear ops (LASP-2 on the engine's chunk summaries) against the single-device ops, forward and
gradient, for seq-axis sizes 2, 4 and 8: every op declared in ``seqlab.ops.linear_ops()``, with each of its flag
variants. Runs in its own process with 8 host devices (tests/test_multidevice.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import linear_cases as lc
from seqlab.core import documents

B, H, K, V = 2, 2, 8, 6
CHUNK = 16
T = 8 * 24  # 24 tokens per device at 8 devices: local segments end on partial chunks of CHUNK

FAMILIES = [case.id for case in lc.cases()]


def op_of(family: str):
    """The op of case ``family`` with its variant's flags."""
    case = lc.case(family)
    return functools.partial(case.spec.fn, **case.variant.kwargs)


def make_inputs(family: str, seed: int = 0):
    """The op's positional inputs (gentle decays, so the state crosses device boundaries) and an initial state."""
    case = lc.case(family)
    args = lc.make_inputs(np.random.default_rng(seed), case, B=B, T=T, H=H, K=K, V=V, gates="gentle")
    s0 = jnp.asarray(args.pop("initial_state"))
    return tuple(jnp.asarray(x) for x in lc.positional(case, args)), s0


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sharded(op, num_devices: int, num_args: int, **kwargs):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("seq",))
    seq = P(None, "seq")

    def local(args, s0):
        return op(*args, initial_state=s0, output_final_state=True, sequence_axis="seq", **kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=((seq,) * num_args, P()), out_specs=(seq, P()))


CI_AT_EVERY_SIZE = ("gla",)  # the other families run at 2 and 8 devices under `pytest -m slow`
CASES = [
    pytest.param(family, n, "chunked", marks=() if n == 4 or family in CI_AT_EVERY_SIZE else pytest.mark.slow)
    for family in FAMILIES for n in (2, 4, 8)
] + [
    ("gla", 4, "parallel"),
    ("delta_rule", 4, "parallel"),
]


@pytest.mark.parametrize("family, num_devices, impl", CASES)
def test_sequence_parallel_equals_single_device(family, num_devices, impl):
    op = op_of(family)
    args, s0 = make_inputs(family)
    kwargs = dict(impl=impl, chunk_size=CHUNK)
    o_ref, s_ref = jax.jit(functools.partial(op, output_final_state=True, **kwargs))(*args, initial_state=s0)
    o_sp, s_sp = jax.jit(sharded(op, num_devices, len(args), **kwargs))(args, s0)
    assert rel(o_sp, o_ref) < 1e-5 and rel(s_sp, s_ref) < 1e-5

    def loss(fn, args, s0):
        o, s = fn(args, s0)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s)

    ref_fn = lambda a, s: op(*a, initial_state=s, output_final_state=True, **kwargs)  # noqa: E731
    g_ref = jax.jit(jax.grad(functools.partial(loss, ref_fn), argnums=(0, 1)))(args, s0)
    g_sp = jax.jit(jax.grad(functools.partial(loss, sharded(op, num_devices, len(args), **kwargs)), argnums=(0, 1)))(
        args, s0
    )
    for got, want in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)):
        assert rel(got, want) < 1e-5


# Packed documents under sequence parallelism (4 devices of 24 tokens, borders at 24, 48 and 72): documents that
# cross one border, two, all three, and documents that start exactly on a border. Row 1 packs the reverse.
PACKINGS = {
    "one_border": (10, 20, 18, 30, 18),
    "two_borders": (5, 50, 41),
    "all_borders": (3, 90, 3),
    "on_borders": (24, 24, 1, 47),
}
PACKED_CASES = [(family, "all_borders") for family in FAMILIES] + [
    (family, packing) for family in ("gla", "delta_rule") for packing in PACKINGS if packing != "all_borders"
]


def packed_ids(lengths) -> jnp.ndarray:
    rows = [np.repeat(np.arange(len(order)), order) for order in (lengths, lengths[::-1])]
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("family, packing", PACKED_CASES)
def test_packed_sequence_parallel_equals_single_device(family, packing):
    op = op_of(family)
    args, s0 = make_inputs(family, seed=1)
    args = tuple(x[:, : 4 * 24] for x in args)
    segment_ids = packed_ids(PACKINGS[packing])
    kwargs = dict(impl="chunked", chunk_size=8)
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    seq = P(None, "seq")

    def local(args, s0, ids):
        return op(*args, initial_state=s0, output_final_state=True, sequence_axis="seq", segment_ids=ids, **kwargs)

    sp = jax.shard_map(local, mesh=mesh, in_specs=((seq,) * len(args), P(), seq), out_specs=(seq, P()))

    def one_device(args, s0, ids):
        return op(*args, initial_state=s0, output_final_state=True, segment_ids=ids, **kwargs)

    def loss(fn, args, s0):
        o, s = fn(args, s0, segment_ids)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s)

    (o_sp, s_sp), (o_ref, s_ref) = jax.jit(sp)(args, s0, segment_ids), jax.jit(one_device)(args, s0, segment_ids)
    assert rel(o_sp, o_ref) < 1e-5 and rel(s_sp, s_ref) < 1e-5
    unpacked, _ = jax.jit(functools.partial(op, output_final_state=True, **kwargs))(*args, initial_state=s0)
    assert rel(o_ref, unpacked) > 1e-2  # the documents do change the result
    g_sp = jax.jit(jax.grad(functools.partial(loss, sp), argnums=(0, 1)))(args, s0)
    g_ref = jax.jit(jax.grad(functools.partial(loss, one_device), argnums=(0, 1)))(args, s0)
    for got, want in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_document_positions_and_scans_continue_across_devices(packing):
    """positions_in_document and document_scan on 4 devices equal a counter and a running sum over whole rows."""
    segment_ids = packed_ids(PACKINGS[packing])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=segment_ids.shape + (3,)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    seq = P(None, "seq")

    def local(ids, x):
        starts = documents.document_starts(ids, "seq")
        return documents.positions_in_document(ids, "seq"), documents.document_scan(x, starts, jnp.add, 0.0, "seq")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq), out_specs=(seq, seq))
    positions, sums = jax.jit(sharded)(segment_ids, x)
    ids, values = np.asarray(segment_ids), np.asarray(x, np.float64)
    for b in range(ids.shape[0]):
        count, total = 0, np.zeros(3)
        for t in range(ids.shape[1]):
            if t and ids[b, t] != ids[b, t - 1]:
                count, total = 0, np.zeros(3)
            total = total + values[b, t]
            assert positions[b, t] == count
            np.testing.assert_allclose(sums[b, t], total, rtol=1e-5, atol=1e-5)
            count += 1
