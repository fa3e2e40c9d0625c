"""pallas_kernels.delta_rule (interpret mode on CPU) against the XLA chunked path and the float64 per-token loops.

Tolerances (relative error ||a - b|| / ||b|| over the whole tensor), float32 inputs:
* outputs and final state: 1e-5 against both ``seqlab.ops`` (impl="chunked") and tests/reference.py's np loops;
* gradients (q, k, v, beta, g, initial_state; the loss includes the final state): 1e-5 against jax.grad of the
  chunked XLA path and of the float32 per-token ``lax.scan`` references (measured: at most ~1.2e-6).
bf16 q, k, v: finite outputs and gradients, within 3e-2 of the float32 result (the chunked XLA path on the
float32 inputs before rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linear_cases as lc
from reference import rel_err
from pallas_kernels import _common
from pallas_kernels.delta_rule import DeltaRuleBlocks, delta_rule

FWD_TOL = 1e-5
GRAD_TOL = 1e-5
BF16_TOL = 3e-2


def make_inputs(rng, *, B=2, T=37, H=2, K=16, V=24, gates="default", initial_state=True):
    """L2-normalised keys, β in (0, 1), log gates (None when ``gates`` is None: DeltaNet)."""
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    k = normal(B, T, H, K)
    args = {
        "q": normal(B, T, H, K),
        "k": (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32),
        "v": normal(B, T, H, V),
        "beta": rng.uniform(0.05, 0.95, (B, T, H)).astype(np.float32),
    }
    if gates == "default":
        args["g"] = (-np.exp(rng.normal(-1.0, 1.0, (B, T, H)))).astype(np.float32)
    elif gates == "extreme":  # a quarter each: 0 (no decay), down to -20 (the state wiped), and the default
        g = -np.exp(rng.normal(-1.0, 1.0, (B, T, H)))
        pick = rng.uniform(size=g.shape)
        g[pick < 0.25] = 0.0
        g[pick > 0.75] = rng.uniform(-20.0, -5.0, g.shape)[pick > 0.75]
        args["g"] = g.astype(np.float32)
    if initial_state:
        args["initial_state"] = 0.5 * normal(B, H, K, V)
    return args


def run_pallas(args, blocks, **kw):
    K = args["q"].shape[-1]
    return delta_rule(
        args["q"], args["k"], args["v"], args["beta"], g=args.get("g"), scale=K**-0.5,
        initial_state=args.get("initial_state"), blocks=blocks, **kw,
    )


DELTA_OPS = lc.cases(lambda spec: spec.kernel == "delta_rule")  # the declared ops on this kernel


def delta_op(args) -> lc.Case:
    """The declared op on this kernel whose inputs ``args`` holds: DeltaNet (beta), Gated DeltaNet (g and beta)."""
    return next(c for c in DELTA_OPS if set(c.spec.inputs) == set(args) - {"initial_state"})


def run_chunked(args, chunk):
    return lc.call_op(delta_op(args), args, output_final_state=True, impl="chunked", chunk_size=chunk)


def run_scan(args):
    return lc.call_reference(delta_op(args), "jnp", args)


def run_np(args):
    return lc.call_reference(delta_op(args), "np", args)


def test_every_op_on_the_kernel_is_tested():
    """The cases below (DeltaNet inputs, gated inputs) reach every declared op on this kernel."""
    reached = {delta_op(make_inputs(np.random.default_rng(0), gates=gates)).id for gates in (None, "default")}
    assert reached == {c.id for c in DELTA_OPS}


def loss_weights(rng, args):
    B, T, H, K = args["q"].shape
    V = args["v"].shape[-1]
    return rng.standard_normal((B, T, H, V)).astype(np.float32), rng.standard_normal((B, H, K, V)).astype(np.float32)


@pytest.mark.parametrize(
    "gates, chunk, chunk_bwd, T, initial_state",
    [
        (None, 16, 32, 37, False),
        ("extreme", 32, 16, 70, True),
    ],
)
def test_matches_chunked_and_float64(rng, gates, chunk, chunk_bwd, T, initial_state):
    """o and the final state equal the chunked XLA path and the float64 loops; every gradient equals the chunked
    XLA path's and the per-token scan's, with forward and backward chunks differing, T not a multiple of either,
    H > 1 and K != V (both padded)."""
    args = make_inputs(rng, T=T, gates=gates, initial_state=initial_state)
    Wo, Ws = loss_weights(rng, args)
    blocks = DeltaRuleBlocks(chunk=chunk, chunk_bwd=chunk_bwd, value_block=16)  # V' = 32: two column blocks
    o, S, grads = lc.value_and_grads(lambda a: run_pallas(a, blocks), args, Wo, Ws)
    assert o.shape == args["v"].shape and o.dtype == np.float32
    assert S.shape == (2, 2, 16, 24) and S.dtype == np.float32

    o_np, S_np = run_np(args)
    o_xla, S_xla, grads_xla = lc.value_and_grads(lambda a: run_chunked(a, chunk), args, Wo, Ws)
    for name, got, want in (("o", o, o_np), ("S", S, S_np), ("o vs xla", o, o_xla), ("S vs xla", S, S_xla)):
        assert rel_err(got, want) <= FWD_TOL, f"{name}: rel err {rel_err(got, want):.3g}"
    assert set(grads) == set(args)
    _, _, grads_scan = lc.value_and_grads(run_scan, args, Wo, Ws)
    for reference_grads in (grads_xla, grads_scan):
        errs = {n: rel_err(grads[n], reference_grads[n]) for n in args}
        assert max(errs.values()) <= GRAD_TOL, errs


def test_bf16_inputs(rng):
    """bf16 q, k, v: outputs, state and gradients finite and within BF16_TOL of the float32 result (the chunked
    XLA path on the float32 inputs before rounding); the gradients arrive in the inputs' dtypes."""
    args = make_inputs(rng, T=40)
    args16 = {n: (jnp.asarray(x, jnp.bfloat16) if n in ("q", "k", "v") else x) for n, x in args.items()}
    Wo, Ws = loss_weights(rng, args)
    blocks = DeltaRuleBlocks(chunk=16, chunk_bwd=32)
    results16 = lc.value_and_grads(lambda a: run_pallas(a, blocks), args16, Wo, Ws)
    results32 = lc.value_and_grads(lambda a: run_chunked(a, 16), args, Wo, Ws)
    assert {n: g.dtype for n, g in results16[2].items()} == {n: x.dtype for n, x in args16.items()}
    pairs = [("o", results16[0], results32[0]), ("S", results16[1], results32[1])]
    pairs += [(f"d{n}", results16[2][n], results32[2][n]) for n in args]
    for name, got, want in ((name, np.asarray(got, np.float32), want) for name, got, want in pairs):
        assert np.all(np.isfinite(got)), name
        assert rel_err(got, want) <= BF16_TOL, f"{name}: rel err {rel_err(got, want):.3g}"


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2), T=st.integers(1, 80), H=st.integers(1, 2), K=st.sampled_from([8, 16, 32]),
    V=st.sampled_from([8, 24, 32]), chunk=st.sampled_from([16, 32]), gated=st.booleans(),
)
def test_forward_matches_float64_over_shapes(B, T, H, K, V, chunk, gated):
    """Any shape (T from 1, feature sizes below and between the padded sizes): o and S equal the float64 loops."""
    args = make_inputs(np.random.default_rng(T), B=B, T=T, H=H, K=K, V=V, gates="default" if gated else None)
    o, S = jax.jit(lambda a: run_pallas(a, DeltaRuleBlocks(chunk=chunk, chunk_bwd=chunk)))(args)
    o_np, S_np = run_np(args)
    assert rel_err(o, o_np) <= FWD_TOL
    assert rel_err(S, S_np) <= FWD_TOL


@pytest.mark.parametrize("packed", [False, True], ids=["one_document", "packed_documents"])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_lowers_for_gpu_and_tpu(backend, packed):
    """The forward and jax.grad lower for CUDA (Triton custom calls) and TPU (Mosaic) from this CPU machine, with
    and without packed documents' masks (their numerics: tests/ops/test_packed_ops.py, interpret mode)."""
    B, T, H, K, V = 1, 20, 1, 16, 24
    args = [jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H, V)), jnp.zeros((B, T, H)),
            jnp.zeros((B, T, H)), jnp.zeros((B, H, K, V))]
    blocks = DeltaRuleBlocks(chunk=16, chunk_bwd=16)
    starts = jnp.zeros((B, T), bool).at[:, 7].set(True) if packed else None

    def forward(q, k, v, beta, g, h0):
        return delta_rule(q, k, v, beta, g=g, scale=0.25, initial_state=h0, starts=starts, blocks=blocks,
                          backend=backend)

    def loss(*a):
        o, S = forward(*a)
        return jnp.sum(o) + jnp.sum(S)

    for fn in (forward, jax.grad(loss, argnums=tuple(range(6)))):
        text = _common.lowered_text(fn, backend, *args)
        if backend == "gpu":
            assert "__gpu$xla.gpu.triton" in text
        else:
            assert "tpu_custom_call" in text


@pytest.mark.parametrize("field", ["chunk", "chunk_bwd", "value_block"])
@pytest.mark.parametrize("size", [8, 24, 0])
def test_bad_blocks_raise(field, size):
    with pytest.raises(ValueError, match=field):
        DeltaRuleBlocks(**{field: size})


def test_bad_backend_and_blocks_argument_raise():
    args = make_inputs(np.random.default_rng(0), B=1, T=4, H=1, gates=None, initial_state=False)
    with pytest.raises(ValueError, match="backend"):
        run_pallas(args, DeltaRuleBlocks(), backend="metal")
    with pytest.raises(ValueError, match="blocks"):
        run_pallas(args, {"chunk": 16})
