"""Pallas chunked linear attention in interpret mode against the per-token loops of tests/reference.py (float64
numpy forward; float32 lax.scan for gradients) and against the XLA chunked path, forward and backward.

The kernel is tested in its gate modes (none, per head, per key) with block sizes of its own through the declared
ops that hand it their own arguments (``DIRECT``: linear_attn, simple_gla, gla); every declared op with a Pallas
kernel (``seqlab.ops.linear_ops()``: HGRN2, the delta rules, ...) is tested through its public op, impl="pallas".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linear_cases as lc
from pallas_kernels import _common
from pallas_kernels.linear_attention import LinearAttentionBlocks, linear_attention
from seqlab import ops
from seqlab.ops import _common as ops_common
import reference

SPECS = {spec.name: spec for spec in ops.linear_ops()}


def _direct(spec) -> bool:
    """The op gives the linear-attention kernels its own q, k, v and (at most one) gate."""
    return spec.kernel == "linear_attention" and spec.inputs == ("q", "k", "v", *spec.gates) and len(spec.gates) <= 1


def _gate_shape(family: str) -> str | None:
    """The kernel's gate mode for the direct op ``family``: None (no gate), "head" or "key"."""
    return next((gate.shape for gate in SPECS[family].gates.values()), None)


DIRECT = tuple(name for name, spec in SPECS.items() if _direct(spec))
GATED_DIRECT = tuple(family for family in DIRECT if _gate_shape(family) is not None)
WITH_KERNEL = [c for c in lc.cases() if c.spec.kernel is not None]
ON_THIS_KERNEL = [c for c in WITH_KERNEL if c.spec.kernel == "linear_attention"]
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
    gate_shape = {None: None, "head": (batch, length, heads), "key": (batch, length, heads, key_dim)}[_gate_shape(family)]
    gate = None if gate_shape is None else rng.uniform(low, 0.0, gate_shape).astype(np.float32)
    return q, k, v, gate, state


def _reference(family, kind, q, k, v, gate, state):
    """tests/reference.py's ``<kind>_<family>`` loop ("np" float64, "jnp" float32 scan) on the kernel's inputs."""
    gates = () if gate is None else (gate,)
    return getattr(reference, f"{kind}_{family}")(q, k, v, *gates, initial_state=state)


def _scan_reference(family):
    """(q, k, v, gate, state) -> (o, final) by tests/reference.py's differentiable per-token ``lax.scan`` loops."""
    return jax.jit(lambda *xs: _reference(family, "jnp", *xs))


def _op(family, impl, chunk_size=16):
    """(q, k, v, gate, state) -> (o, final) through seqlab.ops with ``impl``."""
    op = SPECS[family].fn

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


# (blocks, T) per gate mode: per-key gates use the sub-chunks, so they run every block set
CASES_BY_GATE = {None: [(BLOCKS[1], 70)], "head": [(BLOCKS[0], 37), (BLOCKS[2], 70)],
                 "key": [(BLOCKS[0], 37), (BLOCKS[1], 70), (BLOCKS[2], 70)]}
CASES = [(family, blocks, length) for family in DIRECT for blocks, length in CASES_BY_GATE[_gate_shape(family)]]


@pytest.mark.parametrize("family, blocks, length", CASES,
                         ids=lambda x: f"c{x.chunk}s{x.sub_chunk}-bwd{x.chunk_bwd}" if isinstance(x, LinearAttentionBlocks) else None)
def test_kernel_matches_references(family, blocks, length):
    x = _inputs(family, 2, length, 2, 12, 20)
    o, final = _kernel(blocks)(*x)
    o_np, final_np = _reference(family, "np", *x)
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


@pytest.mark.parametrize("family", GATED_DIRECT)
def test_extreme_gates(family):
    """Log gates spanning [-20, 0] (full decay within a step, and none), exact zeros and -20 included."""
    q, k, v, gate, state = _inputs(family, 1, 70, 2, 16, 16, seed=3, low=-20.0)
    gate = gate.copy()
    gate.reshape(-1)[::7] = 0.0
    gate.reshape(-1)[3::11] = -20.0
    x = (q, k, v, gate, state)
    blocks = LinearAttentionBlocks(chunk=32, sub_chunk=16, chunk_bwd=64, sub_chunk_bwd=32)
    o, final = _kernel(blocks)(*x)
    o_np, final_np = _reference(family, "np", *x)
    assert reference.rel_err(o, o_np) <= 1e-5 and reference.rel_err(final, final_np) <= 1e-5
    grads = _gradients(_kernel(blocks), *x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    for got, want in zip(grads, _gradients(_op(family, "chunked"), *x)):
        assert reference.rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", GATED_DIRECT)
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


@pytest.mark.parametrize("variant", WITH_KERNEL, ids=[c.id for c in WITH_KERNEL])
def test_op_dispatch(variant):
    """impl="pallas" through seqlab.ops equals impl="chunked" for every declared op with a kernel (the kernels'
    gradients are checked here and in test_delta_rule_kernel.py, every op's in test_linear_ops.py); impl="auto" runs the
    XLA chunked path on this CPU (no pallas_call in its program)."""
    args = lc.make_inputs(np.random.default_rng(7), variant, B=1, T=40, H=2, K=8, V=8, initial_state=False)

    def run(impl):
        return jax.jit(lambda a: lc.call_op(variant, a, impl=impl, chunk_size=16, output_final_state=True))

    o, final = run("pallas")(args)
    o_xla, final_xla = run("chunked")(args)
    assert reference.rel_err(o, o_xla) <= 1e-5 and reference.rel_err(final, final_xla) <= 1e-5
    assert ops_common.resolve_impl("auto", has_kernel=True, sequence_axis=None, length=40) == "chunked"
    assert "pallas_call" not in str(jax.make_jaxpr(run("auto"))(args))
    assert "pallas_call" in str(jax.make_jaxpr(run("pallas"))(args))


@pytest.mark.parametrize("variant", ON_THIS_KERNEL, ids=[c.id for c in ON_THIS_KERNEL])
def test_op_bf16_inputs(variant):
    """Every op on these kernels with bf16 q, k, v, through its public op (impl="pallas", so with whatever it
    derives from its arguments: HGRN2's keys 1 - f in bf16) against the same call on the float32-rounded inputs:
    outputs (rounded to bf16 by the op), the final state and the feature and initial-state gradients within 1e-2,
    the gate gradients within 5e-2 (as ``test_bf16_inputs``; measured for HGRN2: <= 3.1e-3, its gate 5.8e-3)."""
    rng = np.random.default_rng(5)
    args = lc.make_inputs(rng, variant, B=1, T=70, H=2, K=16, V=24)
    Wo, Ws = rng.standard_normal((1, 70, 2, 24)), rng.standard_normal((1, 2, 16, variant.state_columns(24)))
    features = [name for name in ("q", "k", "v") if name in args]
    args16 = {**args, **{name: jnp.asarray(args[name], jnp.bfloat16) for name in features}}
    rounded = {**args, **{name: args16[name].astype(jnp.float32) for name in features}}

    def run(a):
        return lc.call_op(variant, a, impl="pallas", chunk_size=32, output_final_state=True)

    o, final, grads = lc.value_and_grads(run, args16, Wo, Ws)
    o32, final32, grads32 = lc.value_and_grads(run, rounded, Wo, Ws)
    assert np.isfinite(o).all() and all(np.isfinite(g.astype(np.float32)).all() for g in grads.values())
    assert reference.rel_err(o, o32) <= 1e-2 and reference.rel_err(final, final32) <= 1e-2
    for name in args:
        tol = 5e-2 if name in variant.spec.gates else 1e-2
        assert reference.rel_err(grads[name].astype(np.float32), grads32[name]) <= tol, name


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    family=st.sampled_from(DIRECT),
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
    o_np, final_np = _reference(family, "np", *x)
    assert o.shape == (batch, length, heads, value_dim) and final.shape == (batch, heads, key_dim, value_dim)
    assert reference.rel_err(o, o_np) <= 1e-5 and reference.rel_err(final, final_np) <= 1e-5


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("family", DIRECT)
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


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("family", DIRECT)
def test_kernels_with_document_starts_lower_for_accelerators(backend, family):
    """The packed-documents masks lower too (their numerics: tests/ops/test_packed_ops.py, interpret mode)."""
    q, k, v, gate, state = _inputs(family, 1, 64, 2, 32, 32)
    starts = jnp.zeros((1, 64), bool).at[0, 5].set(True).at[0, 40].set(True)

    def run(q, k, v, gate, state):
        return linear_attention(q, k, v, gate, scale=0.2, initial_state=state, starts=starts, backend=backend)

    target = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert _common.lowered_text(lambda *xs: run(*xs)[0], backend, q, k, v, gate, state).count(target) == 2
    assert _common.lowered_text(lambda *xs: _gradients(run, *xs), backend, q, k, v, gate, state).count(target) >= 4
