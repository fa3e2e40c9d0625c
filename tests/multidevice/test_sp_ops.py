"""Sequence-parallel linear ops (LASP-2 on the engine's chunk summaries) against the single-device ops, forward and
gradient, for seq-axis sizes 2, 4 and 8. Runs in its own process with 8 host devices (tests/test_multidevice.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqlab import ops

B, H, K, V = 2, 2, 8, 6
CHUNK = 16
T = 8 * 24  # 24 tokens per device at 8 devices: local segments end on partial chunks of CHUNK

FAMILIES = {
    "linear_attn": (ops.linear_attn, ()),
    "linear_attn_normalized": (functools.partial(ops.linear_attn, normalize=True), ()),
    "simple_gla": (ops.simple_gla, ("g",)),
    "gla": (ops.gla, ("gk",)),
    "delta_rule": (ops.delta_rule, ("beta",)),
    "gated_delta_rule": (ops.gated_delta_rule, ("g", "beta")),
}


def make_inputs(family: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    if family.startswith("delta") or family.startswith("gated_delta"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    if family == "linear_attn_normalized":  # positive features (elu + 1), as the normalised form is used
        q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    gates = {
        "g": jnp.asarray(-rng.uniform(0.0, 0.3, size=(B, T, H)), jnp.float32),
        "gk": jnp.asarray(-rng.uniform(0.0, 0.3, size=(B, T, H, K)), jnp.float32),
        "beta": jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32),
    }
    state_v = V + 1 if family == "linear_attn_normalized" else V
    s0 = jnp.asarray(rng.normal(size=(B, H, K, state_v)) * 0.1, jnp.float32)
    return (q, k, v) + tuple(gates[name] for name in FAMILIES[family][1]), s0


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
    op, _ = FAMILIES[family]
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
