"""Correctness tests for the linear-state ops in seqlab.ops.

The ops are the ones declared with ``seqlab.ops._common.linear_op`` (``seqlab.ops.linear_ops()``), each with its
flag variants; inputs come from the declarations (tests/linear_cases.py). Ground truth comes from tests/reference.py
(no shared code with seqlab), found by name: forward outputs and final states against float64 per-token loops
(``np_<op>``), gradients against float32 ``lax.scan`` per-token references (``jnp_<op>``). Every form runs, and
the Pallas kernel (interpreted) for the ops that declare one.

Tolerances (relative error ||a - b|| / ||b|| over the whole tensor):
* forward, float32 inputs:  1e-5  (float32 unit round-off is 6e-8; the
  reductions here are over <= 100 tokens x 24 features)
* gradients, float32:       1e-4  (both sides are float32 computations with
  different summation orders)
"""

from __future__ import annotations

import functools
import inspect
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import linear_cases as lc
import reference as ref
from reference import rel_err
from seqlab import ops
from seqlab.ops._common import Gate, linear_op

FWD_TOL = 1e-5
GRAD_TOL = 1e-4

IMPLS = ("chunked", "recurrent", "parallel")

# Every declared op (seqlab.ops.linear_ops()) with each of its flag variants: linear_attn is tested both plain
# and with normalize=True (state [B, H, K, V+1]).
VARIANTS = lc.cases()
WITH_KERNEL = [c for c in VARIANTS if c.spec.kernel is not None]  # impl="pallas" runs a kernel (interpreted)
GATED = [c for c in VARIANTS if lc.has_log_gate(c.spec)]
DIAGONAL = [c for c in VARIANTS if lc.diagonal_gated(c.spec)]


def ids(cases):
    return [c.id for c in cases]


def test_every_declared_op_has_references():
    """Each declared op has np_<op> and jnp_<op> in tests/reference.py, taking the op's positional inputs."""
    for spec in ops.linear_ops():
        for kind in ("np", "jnp"):
            fn = getattr(ref, f"{kind}_{spec.name}", None)
            assert fn is not None, f"tests/reference.py has no {kind}_{spec.name} for the declared op {spec.name}"
            params = inspect.signature(fn).parameters.values()
            positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
            assert positional == spec.inputs, f"{kind}_{spec.name} takes {positional}, the op {spec.inputs}"


def test_declarations_are_checked():
    """A declaration must name the op's gate inputs exactly, with a known shape and range and kernel."""
    def op(q, k, v, g, *, scale=None):
        return v, None

    with pytest.raises(ValueError, match="undeclared"):
        linear_op()(op)
    with pytest.raises(ValueError, match="not an input"):
        linear_op(gates={"g": Gate("head", "log"), "beta": Gate("head", "unit")})(op)
    with pytest.raises(ValueError, match="Gate.shape"):
        Gate("value", "log")
    with pytest.raises(ValueError, match="Gate.range"):
        Gate("head", "positive")
    with pytest.raises(ValueError, match="kernel"):
        linear_op(gates={"g": Gate("head", "log")}, kernel="no_such_kernel")(op)

    def gla(q, k, v, gk, *, scale=None):  # a second op named like seqlab.ops.gla, in another module
        return v, None

    with pytest.raises(ValueError, match="already declared"):
        linear_op(gates={"gk": Gate("key", "log")})(gla)


# ---------------------------------------------------------------------------
# calling the op and the references
# ---------------------------------------------------------------------------


def call_np_ref(case, args, **kw):
    return lc.call_reference(case, "np", args, **kw)


def call_jnp_ref(case, args, **kw):
    return lc.call_reference(case, "jnp", args, **kw)


def functional_weights(rng, args, variant):
    """Random weights for the linear functional L = <Wo, o> + <Ws, final_state>."""
    B, T, H, K = args["q"].shape
    V = args["v"].shape[-1]
    Wo = rng.standard_normal((B, T, H, V)).astype(np.float32)
    Ws = rng.standard_normal((B, H, K, variant.state_columns(V))).astype(np.float32)
    return Wo, Ws


@functools.lru_cache(maxsize=None)
def jnp_ref_grads(variant, scale):
    """Jitted gradient of <Wo, o> + <Ws, S> for the scan reference; one function
    object per (variant, scale) so jit reuses compilations across equal shapes."""

    def loss(a, Wo, Ws):
        o, S = call_jnp_ref(variant, a, scale=scale)
        return jnp.sum(o * Wo) + jnp.sum(S * Ws)

    grad = jax.jit(jax.grad(loss))
    return lambda a, Wo, Ws: {n: np.asarray(g) for n, g in grad(a, Wo, Ws).items()}


def check_forward_and_grads(variant, args, Wo, Ws, op_kw, ref_kw):
    B, T, H, K = args["q"].shape
    V = args["v"].shape[-1]
    o, S, g = lc.value_and_grads(
        lambda a: lc.call_op(variant, a, output_final_state=True, **op_kw), args, Wo, Ws)
    assert o.shape == (B, T, H, V)
    assert S.shape == (B, H, K, variant.state_columns(V))
    assert S.dtype == np.float32

    o_ref, S_ref = call_np_ref(variant, args, **ref_kw)
    e_o, e_S = rel_err(o, o_ref), rel_err(S, S_ref)
    assert e_o <= FWD_TOL, f"output rel err {e_o:.3g}"
    assert e_S <= FWD_TOL, f"final_state rel err {e_S:.3g}"

    g_ref = jnp_ref_grads(variant, ref_kw.get("scale"))(args, Wo, Ws)
    assert set(g) == set(args)
    errs = {n: rel_err(g[n], g_ref[n]) for n in args}
    bad = {n: e for n, e in errs.items() if not e <= GRAD_TOL}
    assert not bad, f"gradient rel errs above {GRAD_TOL}: {bad} (all: {errs})"


# ---------------------------------------------------------------------------
# the references themselves (so a wrong gradient reference cannot hide a bug)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=ids(VARIANTS))
def test_reference_scan_matches_loop_and_finite_differences(variant, rng):
    args = lc.make_inputs(rng, variant, B=1, T=12, H=2, K=4, V=3)
    o_np, S_np = call_np_ref(variant, args)
    o_j, S_j = jax.jit(lambda a: call_jnp_ref(variant, a))(args)
    assert rel_err(o_j, o_np) <= FWD_TOL
    assert rel_err(S_j, S_np) <= FWD_TOL

    # directional derivative of the float64 loop (central differences) vs the
    # scan reference's gradient, along a random direction in every input
    Wo, Ws = functional_weights(rng, args, variant)
    _, _, g = lc.value_and_grads(lambda a: call_jnp_ref(variant, a), args, Wo, Ws)
    d = {n: rng.standard_normal(x.shape) for n, x in args.items()}

    def L(eps):
        a = {n: x.astype(np.float64) + eps * d[n] for n, x in args.items()}
        o, S = call_np_ref(variant, a)
        return np.sum(o * Wo) + np.sum(S * Ws)

    h = 1e-5
    fd = (L(h) - L(-h)) / (2 * h)
    an = sum(np.sum(g[n].astype(np.float64) * d[n]) for n in args)
    assert abs(fd - an) <= 1e-4 * abs(fd), (fd, an)


# ---------------------------------------------------------------------------
# forward + gradients, every op x impl
# ---------------------------------------------------------------------------

# (impl, T, chunk_size, scale, with initial_state); chunk_size None = op default.
# Cases sharing (T, scale, initial_state) share one compiled gradient reference.
CASES = (
    ("chunked", 50, 16, None, True),  # T % C != 0, several chunks
    ("recurrent", 50, None, None, True),
    ("parallel", 50, None, None, True),
    ("chunked", 100, 32, 0.3, False),  # T % C != 0, explicit scale, no initial state
    ("recurrent", 100, None, 0.3, False),
    ("parallel", 100, None, 0.3, False),
    ("chunked", 63, 64, None, True),  # T < C
)
# (T % C == 0 is covered by test_long_sequence_bf16: T=16384 with the default C=64.)
# The ops with a Pallas kernel also run it (interpreted): several chunks, the last ragged, an explicit scale and an
# initial state (tests/kernels/test_linear_attention_kernel.py checks more kernel sizes, test_op_dispatch no initial state).
PALLAS_CASES = (("pallas", 50, 16, 0.3, True),)
FORWARD_CASES = [(v, c) for v in VARIANTS for c in CASES] + [(v, c) for v in WITH_KERNEL for c in PALLAS_CASES]


@pytest.mark.parametrize("variant,case", FORWARD_CASES,
                         ids=[f"{v.id}-{c[0]}-T{c[1]}-C{c[2]}-s{c[3]}-h0{int(c[4])}" for v, c in FORWARD_CASES])
def test_forward_and_grads(variant, case, rng):
    impl, T, chunk_size, scale, h0 = case
    args = lc.make_inputs(rng, variant, B=2, T=T, H=2, K=16, V=24, initial_state=h0)
    Wo, Ws = functional_weights(rng, args, variant)
    op_kw = {"impl": impl, "scale": scale}
    if chunk_size is not None:
        op_kw["chunk_size"] = chunk_size
    check_forward_and_grads(variant, args, Wo, Ws, op_kw, {"scale": scale})


# chunked with C=64 (two chunks, the second ragged) and C=128 (one chunk longer than T)
EXTREME_IMPLS = (("chunked", 64), ("chunked", 128), ("recurrent", None), ("parallel", None))
EXTREME_CASES = [(v, *form) for v in GATED for form in EXTREME_IMPLS] + [
    (v, "pallas", 32) for v in GATED if v in WITH_KERNEL]


@pytest.mark.parametrize("variant,impl,chunk_size", EXTREME_CASES,
                         ids=[f"{v.id}-{impl}-{chunk}" for v, impl, chunk in EXTREME_CASES])
def test_extreme_gates(variant, impl, chunk_size, rng):
    """Head 0: log gates uniform in [-20, 0] (decays down to 2e-9 per step;
    cumulative log decay reaches ~-1000 within a 100-token sequence / 64-chunk).
    Head 1: gates in [-1e-3, 0], a quarter of them exactly 0 (no decay)."""
    args = lc.make_inputs(rng, variant, B=1, T=100, H=2, K=16, V=24)
    for name, gate in variant.spec.gates.items():
        if gate.range == "log":
            x = args[name]
            x[:, :, 0] = lc.log_gates(rng, x[:, :, 0].shape, "extreme")
            x[:, :, 1] = lc.log_gates(rng, x[:, :, 1].shape, "near_zero")
    Wo, Ws = functional_weights(rng, args, variant)
    op_kw = {"impl": impl}
    if chunk_size is not None:
        op_kw["chunk_size"] = chunk_size
    check_forward_and_grads(variant, args, Wo, Ws, op_kw, {})


# ---------------------------------------------------------------------------
# defaults, state carry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=ids(VARIANTS))
def test_defaults(variant, rng):
    """impl / chunk_size / scale defaults; final_state is None unless asked for."""
    args = lc.make_inputs(rng, variant, B=1, T=100, H=2, K=16, V=24, initial_state=False)
    o, S = jax.jit(lambda a: lc.call_op(variant, a))(args)
    assert S is None
    o_ref, _ = call_np_ref(variant, args)  # scale = K ** -0.5
    assert rel_err(o, o_ref) <= FWD_TOL


CARRY_CASES = [(v, impl) for v in VARIANTS for impl in IMPLS] + [(v, "pallas") for v in WITH_KERNEL]


@pytest.mark.parametrize("variant,impl", CARRY_CASES, ids=[f"{v.id}-{impl}" for v, impl in CARRY_CASES])
def test_state_carry(variant, impl, rng):
    """Running [0, T) == running [0, t) then [t, T) from the carried final state.

    T=100 split at t=50 with chunk_size 32: neither half is chunk-aligned, and
    both halves have the same shape so one compiled function serves both.  The
    unsplit run is represented by the float64 reference over [0, T)
    (test_forward_and_grads ties the unsplit op to that same reference)."""
    T, t = 100, 50
    args = lc.make_inputs(rng, variant, B=2, T=T, H=2, K=16, V=24)
    kw = {"impl": impl, "output_final_state": True}
    if impl in ("chunked", "pallas"):
        kw["chunk_size"] = 32
    run = jax.jit(lambda a: lc.call_op(variant, a, **kw))

    first = {n: (x if n == "initial_state" else x[:, :t]) for n, x in args.items()}
    o1, S1 = run(first)
    second = {n: x[:, t:] for n, x in args.items() if n != "initial_state"}
    second["initial_state"] = S1
    o2, S2 = run(second)

    o_ref, S_ref = call_np_ref(variant, args)
    o_split = np.concatenate([np.asarray(o1), np.asarray(o2)], axis=1)
    assert rel_err(o_split, o_ref) <= FWD_TOL
    assert rel_err(S2, S_ref) <= FWD_TOL
    # the carried state is the true state at t
    _, S_ref_t = call_np_ref(variant, first)
    assert rel_err(S1, S_ref_t) <= FWD_TOL


# ---------------------------------------------------------------------------
# long sequences, bf16 inputs
# ---------------------------------------------------------------------------

# Bound on the relative error of bf16 runs vs the float64 reference evaluated
# on the float32 originals.  bf16 keeps 8 significant bits, so rounding an input
# to bf16 costs a relative error up to u = 2^-9 ~ 2e-3 per element.  The output
# is (at least) trilinear in q, k, v and also depends on the gates / beta, and
# may itself be rounded to bf16: first-order that is ~5 independent roundings
# of size <= u, i.e. ~5e-3 typically (running the float64 reference on the
# bf16-rounded inputs and rounding its output gives 2e-3 .. 4e-3 for these
# inputs).  The bound allows 2e-2 (~10 u, ~5x that unavoidable error) as room
# for bf16 matmul operands inside the op, while a state that is accumulated in
# bf16 or drifts over the 16k steps lands far above it.
BF16_TOL = 2e-2


_LONG_REF_CACHE = {}


def long_inputs_and_ref(variant):
    if variant.id not in _LONG_REF_CACHE:
        rng = np.random.default_rng(zlib.crc32(variant.id.encode()))
        args = lc.make_inputs(rng, variant, B=1, T=16384, H=2, K=16, V=16,
                              gates="loguniform", initial_state=False)
        _LONG_REF_CACHE[variant.id] = (args, call_np_ref(variant, args))
    return _LONG_REF_CACHE[variant.id]


@pytest.mark.parametrize("impl", ("chunked", "recurrent"))  # parallel is O(T^2)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids(VARIANTS))
def test_long_sequence_bf16(variant, impl):
    """T=16384, bf16 q/k/v/gates/beta; |log gate| log-uniform in [1e-4, 20]."""
    args, (o_ref, S_ref) = long_inputs_and_ref(variant)
    bf = {n: jnp.asarray(x, jnp.bfloat16) for n, x in args.items()}
    o, S = jax.jit(lambda a: lc.call_op(variant, a, impl=impl, output_final_state=True))(bf)
    o = np.asarray(o.astype(jnp.float32))
    S = np.asarray(S)
    assert S.dtype == np.float32
    assert np.isfinite(o).all() and np.isfinite(S).all()
    e_o, e_S = rel_err(o, o_ref), rel_err(S, S_ref)
    assert e_o <= BF16_TOL, f"output rel err {e_o:.3g}"
    assert e_S <= BF16_TOL, f"final_state rel err {e_S:.3g}"


@pytest.mark.parametrize("variant", DIAGONAL, ids=ids(DIAGONAL))
def test_key_dim_one(variant, rng):
    """K = 1: a per-key gate [B, T, H, 1] must not be mistaken for a per-head one in the chunked backward pass."""
    args = lc.make_inputs(rng, variant, B=1, T=40, H=2, K=1, V=3)
    Wo, Ws = functional_weights(rng, args, variant)
    check_forward_and_grads(variant, args, Wo, Ws, {"impl": "chunked", "chunk_size": 16}, {})


@pytest.mark.parametrize("variant", DIAGONAL, ids=ids(DIAGONAL))
def test_long_sequence_gate_gradients(variant):
    """The chunked form takes the gate's gradient from the identity dL/dG_t = q_t·dq_t - k_t·dk_t and one running
    sum over the whole sequence (``recurrence.DiagonalGate``), not by differentiating the chunk math: at T = 4096,
    with gates from near-perfect memory to instant forgetting, an initial state and a loss on the final state,
    every gradient must still match the per-token scan reference within the float32 gradient tolerance."""
    rng = np.random.default_rng(99)
    args = lc.make_inputs(rng, variant, B=1, T=4096, H=2, K=16, V=16, gates="loguniform")
    Wo, Ws = functional_weights(rng, args, variant)
    check_forward_and_grads(variant, args, Wo, Ws, {"impl": "chunked"}, {})


# ---------------------------------------------------------------------------
# invalid input
# ---------------------------------------------------------------------------


def names(*ns):
    """Regex matching any of the argument names as a whole word."""
    return "|".join(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" for n in ns)


def _bad_cases(variant):
    B, T, H, K, V = 1, 8, 2, 4, 6
    cols = variant.state_columns(V)
    yield "impl", {}, {"impl": "blocked"}, names("impl")
    yield "chunk_size0", {}, {"chunk_size": 0}, names("chunk_size")
    yield "chunk_size-16", {}, {"chunk_size": -16}, names("chunk_size")
    yield "q_rank", {"q": np.ones((B, T, H), np.float32)}, {}, names("q")
    if "k" in variant.spec.inputs:
        yield "k_dim", {"k": np.ones((B, T, H, K + 1), np.float32)}, {}, names("q", "k")
        yield "k_len", {"k": np.ones((B, T + 1, H, K), np.float32)}, {}, names("q", "k")
    yield "v_len", {"v": np.ones((B, T - 1, H, V), np.float32)}, {}, names("v", "k", "q")
    yield "v_heads", {"v": np.ones((B, T, H + 1, V), np.float32)}, {}, names("v", "k", "q")
    yield ("state_shape", {"initial_state": np.zeros((B, H, K, cols + 1), np.float32)}, {},
           names("initial_state"))
    yield ("state_heads", {"initial_state": np.zeros((B, H + 1, K, cols), np.float32)}, {},
           names("initial_state"))
    for name, gate in variant.spec.gates.items():
        fill = np.zeros if gate.range == "log" else np.ones
        if gate.shape == "head":
            yield f"{name}_shape", {name: fill((B, T, H, K), np.float32)}, {}, names(name)
            yield f"{name}_len", {name: fill((B, T + 3, H), np.float32)}, {}, names(name)
        else:
            yield f"{name}_shape", {name: fill((B, T, H), np.float32)}, {}, names(name)
            yield f"{name}_dim", {name: fill((B, T, H, K + 2), np.float32)}, {}, names(name)


@functools.lru_cache(maxsize=None)
def assert_valid_small_call_accepted(variant):
    args = lc.make_inputs(np.random.default_rng(0), variant, B=1, T=8, H=2, K=4, V=6)
    o, S = lc.call_op(variant, args, output_final_state=True)
    assert o.shape == (1, 8, 2, 6) and S.shape == (1, 2, 4, variant.state_columns(6))


BAD = [(variant, *c) for variant in VARIANTS for c in _bad_cases(variant)]


@pytest.mark.parametrize("variant,case,override,kw,pattern", BAD,
                         ids=[f"{b[0].id}-{b[1]}" for b in BAD])
def test_invalid_input_raises(variant, case, override, kw, pattern, rng):
    args = lc.make_inputs(rng, variant, B=1, T=8, H=2, K=4, V=6)
    assert_valid_small_call_accepted(variant)  # so the error is due to the change
    args.update(override)
    with pytest.raises(ValueError, match=pattern):
        lc.call_op(variant, args, output_final_state=True, **kw)


def test_normalized_state_needs_extra_column(rng):
    """normalize=True takes a [B, H, K, V+1] state; a [B, H, K, V] one is rejected,
    and vice versa."""
    args = lc.make_inputs(rng, lc.case("linear_attn"), B=1, T=8, H=2, K=4, V=6)  # [.., V] state
    with pytest.raises(ValueError, match=names("initial_state")):
        ops.linear_attn(args["q"], args["k"], args["v"], normalize=True,
                        initial_state=args["initial_state"])
    args = lc.make_inputs(rng, lc.case("linear_attn_normalized"), B=1, T=8, H=2, K=4, V=6)
    with pytest.raises(ValueError, match=names("initial_state")):
        ops.linear_attn(args["q"], args["k"], args["v"], normalize=False,
                        initial_state=args["initial_state"])
