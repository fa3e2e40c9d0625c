"""Pallas chunked linear attention (linear_attn, simple_gla, gla) in interpret mode against the per-token loops of
tests/reference.py (float64 numpy forward; float32 lax.scan for gradients) and against the XLA chunked path,
forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import _common
from pallas_kernels.linear_attention import LinearAttentionBlocks, linear_attention
from seqlab import ops
from seqlab.ops import _common as ops_common
import reference

FAMILIES = ("linear_attn", "simple_gla", "gla")
BLOCKS = [
    LinearAttentionBlocks(chunk=16, sub_chunk=16, chunk_bwd=32, sub_chunk_bwd=16),
    LinearAttentionBlocks(chunk=32, sub_chunk=16, chunk_bwd=16, sub_chunk_bwd=16, value_block=16),  # V' = 32: 2 blocks
    LinearAttentionBlocks(chunk=64, sub_chunk=32, chunk_bwd=64, sub_chunk_bwd=16),
]


def _inputs(family, batch, length, heads, key_dim, value_dim, seed=0, low=-5.0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((batch, length, heads, key_dim)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((batch, length, heads, value_dim)).astype(np.float32)
    state = rng.standard_normal((batch, heads, key_dim, value_dim)).astype(np.float32)
    gate_shape = {"linear_attn": None, "simple_gla": (batch, length, heads), "gla": (batch, length, heads, key_dim)}[family]
    gate = None if gate_shape is None else rng.uniform(low, 0.0, gate_shape).astype(np.float32)
    return q, k, v, gate, state


def _numpy_reference(family, q, k, v, gate, state):
    if family == "linear_attn":
        return reference.np_linear_attn(q, k, v, initial_state=state)
    if family == "simple_gla":
        return reference.np_simple_gla(q, k, v, gate, initial_state=state)
    return reference.np_gla(q, k, v, gate, initial_state=state)


def _scan_reference(family):
    """(q, k, v, gate, state) -> (o, final) by tests/reference.py's differentiable per-token ``lax.scan`` loops."""

    def run(q, k, v, gate, state):
        if family == "linear_attn":
            return reference.jnp_linear_attn(q, k, v, initial_state=state)
        if family == "simple_gla":
            return reference.jnp_simple_gla(q, k, v, gate, initial_state=state)
        return reference.jnp_gla(q, k, v, gate, initial_state=state)

    return jax.jit(run)


def _op(family, impl, chunk_size=16):
    """(q, k, v, gate, state) -> (o, final) through seqlab.ops with ``impl``."""
    op = getattr(ops, family)

    def run(q, k, v, gate, state):
        gates = () if gate is None else (gate,)
        return op(q, k, v, *gates, initial_state=state, output_final_state=True, impl=impl, chunk_size=chunk_size)

    return jax.jit(run)


def _kernel(blocks, backend="cpu"):
    def run(q, k, v, gate, state):
        return linear_attention(q, k, v, gate, scale=q.shape[-1] ** -0.5, initial_state=state, blocks=blocks, backend=backend)

    return jax.jit(run)


def _loss(fn):
    def loss(*xs):
        o, final = fn(*xs)
        weights = jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32))
        return jnp.sum(o.astype(jnp.float32) * weights) + jnp.sum(jnp.sin(final))

    return loss


def _gradients(fn, q, k, v, gate, state):
    argnums = (0, 1, 2, 4) if gate is None else (0, 1, 2, 3, 4)
    return jax.jit(jax.grad(_loss(fn), argnums))(q, k, v, gate, state)


CASES = [("linear_attn", BLOCKS[1], 70), ("simple_gla", BLOCKS[0], 37), ("simple_gla", BLOCKS[2], 70),
         ("gla", BLOCKS[0], 37), ("gla", BLOCKS[1], 70), ("gla", BLOCKS[2], 70)]


@pytest.mark.parametrize("family, blocks, length", CASES,
                         ids=lambda x: f"c{x.chunk}s{x.sub_chunk}-bwd{x.chunk_bwd}" if isinstance(x, LinearAttentionBlocks) else None)
def test_kernel_matches_references(family, blocks, length):
    x = _inputs(family, 2, length, 2, 12, 20)
    o, final = _kernel(blocks)(*x)
    o_np, final_np = _numpy_reference(family, *x)
    assert reference.rel_err(o, o_np) <= 1e-5
    assert reference.rel_err(final, final_np) <= 1e-5
    o_xla, final_xla = _op(family, "chunked")(*x)
    assert reference.rel_err(o, o_xla) <= 1e-5
    assert reference.rel_err(final, final_xla) <= 1e-5
    grads = _gradients(_kernel(blocks), *x)
    for got, want in zip(grads, _gradients(_op(family, "chunked"), *x)):
        assert reference.rel_err(got, want) <= 1e-5
    for got, want in zip(grads, _gradients(_scan_reference(family), *x)):
        assert reference.rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_extreme_gates(family):
    """Log gates spanning [-20, 0] (full decay within a step, and none), exact zeros and -20 included."""
    q, k, v, gate, state = _inputs(family, 1, 70, 2, 16, 16, seed=3, low=-20.0)
    gate = gate.copy()
    gate.reshape(-1)[::7] = 0.0
    gate.reshape(-1)[3::11] = -20.0
    x = (q, k, v, gate, state)
    blocks = LinearAttentionBlocks(chunk=32, sub_chunk=16, chunk_bwd=64, sub_chunk_bwd=32)
    o, final = _kernel(blocks)(*x)
    o_np, final_np = _numpy_reference(family, *x)
    assert reference.rel_err(o, o_np) <= 1e-5 and reference.rel_err(final, final_np) <= 1e-5
    grads = _gradients(_kernel(blocks), *x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    for got, want in zip(grads, _gradients(_op(family, "chunked"), *x)):
        assert reference.rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_bf16_inputs(family):
    """bf16 q, k, v (the kernels then multiply in bf16, accumulating in float32) against the float32 kernel on the same
    rounded inputs: outputs, the final state and the q, k, v and initial-state gradients within 1e-2 (measured
    <= 2.7e-3, about one bf16 rounding of the states and scores read); the gate gradient within 5e-2 (measured
    1.8e-2: q ⊙ dq - k ⊙ dk cancels, amplifying those roundings)."""
    q, k, v, gate, state = _inputs(family, 1, 70, 2, 16, 24, seed=5)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    blocks = LinearAttentionBlocks(chunk=32, sub_chunk=16, chunk_bwd=16, sub_chunk_bwd=16)
    rounded = [a.astype(jnp.float32) for a in (q, k, v)]
    o, final = _kernel(blocks)(q, k, v, gate, state)
    o32, final32 = _kernel(blocks)(*rounded, gate, state)
    assert o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o)))
    assert reference.rel_err(o, o32) <= 1e-2 and reference.rel_err(final, final32) <= 1e-2
    dq, dk, dv, d_gate, d_state = _gradients(_kernel(blocks), q, k, v, gate, state)
    dq32, dk32, dv32, d_gate32, d_state32 = _gradients(_kernel(blocks), *rounded, gate, state)
    assert [g.dtype for g in (dq, dk, dv)] == [jnp.bfloat16] * 3
    for got, want in [(dq, dq32), (dk, dk32), (dv, dv32), (d_state, d_state32)]:
        assert reference.rel_err(got.astype(jnp.float32), want) <= 1e-2
    assert reference.rel_err(d_gate, d_gate32) <= 5e-2


def _op_arguments(op, seed):
    """Positional arguments of ``op`` at a small size (keys L2-normalised, beta in (0, 1) for the delta rules)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 40, 2, 8)).astype(np.float32) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g = -rng.uniform(0.0, 2.0, (1, 40, 2)).astype(np.float32)
    gates = {"linear_attn": (), "simple_gla": (g,), "gla": (-rng.uniform(0.0, 2.0, q.shape).astype(np.float32),),
             "delta_rule": (rng.uniform(0.1, 0.9, g.shape).astype(np.float32),)}
    gates["gated_delta_rule"] = (g,) + gates["delta_rule"]
    return (q, k, v) + gates[op]


@pytest.mark.parametrize("op", FAMILIES + ("delta_rule", "gated_delta_rule"))
def test_op_dispatch(op):
    """impl="pallas" through seqlab.ops equals impl="chunked" (the kernels' gradients are checked above and in
    test_pallas_delta_rule); impl="auto" runs the XLA chunked path on this CPU (no pallas_call in its program)."""
    args = _op_arguments(op, seed=7)
    fn = getattr(ops, op)

    def run(impl):
        return jax.jit(lambda *xs: fn(*xs, impl=impl, chunk_size=16, output_final_state=True))

    o, final = run("pallas")(*args)
    o_xla, final_xla = run("chunked")(*args)
    assert reference.rel_err(o, o_xla) <= 1e-5 and reference.rel_err(final, final_xla) <= 1e-5
    assert ops_common.resolve_impl("auto", has_kernel=True, sequence_axis=None, length=40) == "chunked"
    assert "pallas_call" not in str(jax.make_jaxpr(run("auto"))(*args))
    assert "pallas_call" in str(jax.make_jaxpr(run("pallas"))(*args))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    family=st.sampled_from(FAMILIES),
    batch=st.integers(1, 2),
    length=st.integers(1, 80),
    heads=st.integers(1, 3),
    key_dim=st.integers(1, 33),
    value_dim=st.integers(1, 33),
    chunk=st.sampled_from([16, 32]),
)
def test_random_shapes(family, batch, length, heads, key_dim, value_dim, chunk):
    x = _inputs(family, batch, length, heads, key_dim, value_dim, seed=length)
    blocks = LinearAttentionBlocks(chunk=chunk, sub_chunk=16, chunk_bwd=16, sub_chunk_bwd=16)
    o, final = _kernel(blocks)(*x)
    o_np, final_np = _numpy_reference(family, *x)
    assert o.shape == (batch, length, heads, value_dim) and final.shape == (batch, heads, key_dim, value_dim)
    assert reference.rel_err(o, o_np) <= 1e-5 and reference.rel_err(final, final_np) <= 1e-5


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_lower_for_accelerators(backend, family):
    """Forward and gradient lower to Triton (GPU) and Mosaic (TPU) custom calls without the hardware."""
    q, k, v, gate, state = _inputs(family, 1, 64, 2, 32, 32)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    run = _kernel(LinearAttentionBlocks(), backend=backend)
    target = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    forward = _common.lowered_text(lambda *xs: run(*xs)[0], backend, q, k, v, gate, state)
    backward = _common.lowered_text(lambda *xs: _gradients(run, *xs), backend, q, k, v, gate, state)
    assert forward.count(target) == 2  # states, output
    assert backward.count(target) >= 4  # + recomputed states, state gradients, chunk gradients


def test_bad_arguments():
    x = _inputs("gla", 1, 8, 1, 4, 4)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        _op("gla", "pallas", chunk_size=24)(*x)
    with pytest.raises(ValueError, match="LinearAttentionBlocks.sub_chunk"):
        LinearAttentionBlocks(sub_chunk=8)
    with pytest.raises(ValueError, match="must not exceed its chunk"):
        LinearAttentionBlocks(chunk=16, sub_chunk=32)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(*x[:4], scale=1.0, backend="metal")
    with pytest.raises(ValueError, match="impl"):
        _op("gla", "triton")(*x)
    with pytest.raises(ValueError, match="one device"):
        ops_common.resolve_impl("pallas", has_kernel=True, sequence_axis="seq", length=40)
    with pytest.raises(ValueError, match="no Pallas kernel"):
        ops.based_attn(*(jnp.ones((1, 8, 1, 4)),) * 3, impl="pallas")


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
def test_auto_picks_the_kernel_on_accelerators(monkeypatch, backend):
    """impl="auto" on a GPU or TPU (the backend faked here): the kernel for a sequence on one device; the XLA chunked
    form for one token (a decode step), under sequence parallelism, or for an op without a kernel; on CPU always."""
    monkeypatch.setattr(ops_common.pallas_common, "resolve_backend", lambda _: backend)
    accelerated = backend != "cpu"
    resolve = ops_common.resolve_impl
    assert resolve("auto", has_kernel=True, sequence_axis=None, length=2) == ("pallas" if accelerated else "chunked")
    assert resolve("auto", has_kernel=True, sequence_axis=None, length=1) == "chunked"
    assert resolve("auto", has_kernel=True, sequence_axis="seq", length=64) == "chunked"
    assert resolve("auto", has_kernel=False, sequence_axis=None, length=64) == "chunked"
    assert resolve("recurrent", has_kernel=True, sequence_axis=None, length=64) == "recurrent"
