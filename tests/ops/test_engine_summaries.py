"""Chunk summaries: what a segment does to the state, combined across segments, against the per-token reference.

For every linear family, summarising [0, t) and [t, T) separately (each from a zero state), combining the two, and
applying the result to an initial state S0 must give the reference loop's final state from S0. This is the
contract sequence parallelism (LASP-2) relies on.
"""

import jax
import numpy as np
import pytest

import reference as ref
from reference import rel_err
from seqlab.core import chunk_math, combine_summaries, segment_summary
from seqlab.ops.delta_rule import delta_chunk_terms
from seqlab.ops.gla import vector_gate_chunk_terms
from seqlab.ops.simple_gla import scalar_decay_chunk_terms

B, T, H, K, V, SPLIT = 2, 70, 2, 8, 12, 29


def _inputs(rng, family):
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = -rng.uniform(0, 2, (B, T, H)).astype(np.float32)
    gk = -rng.uniform(0, 2, (B, T, H, K)).astype(np.float32)
    beta = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
    s0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    scaled = dict(q=q * K**-0.5, k=k, v=v)
    cases = {
        "linear": (scalar_decay_chunk_terms, scaled, lambda: ref.np_linear_attn(q, k, v, initial_state=s0)),
        "simple_gla": (scalar_decay_chunk_terms, {**scaled, "g": g},
                       lambda: ref.np_simple_gla(q, k, v, g, initial_state=s0)),
        "gla": (vector_gate_chunk_terms, {**scaled, "gk": gk}, lambda: ref.np_gla(q, k, v, gk, initial_state=s0)),
        "delta_rule": (delta_chunk_terms, {**scaled, "beta": beta},
                       lambda: ref.np_delta_rule(q, k, v, beta, initial_state=s0)),
        "gated_delta_rule": (delta_chunk_terms, {**scaled, "g": g, "beta": beta},
                             lambda: ref.np_gated_delta_rule(q, k, v, g, beta, initial_state=s0)),
    }
    return cases[family], s0


@pytest.mark.parametrize("chunk_size", [8, 16])
@pytest.mark.parametrize("family", ["linear", "simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_combined_segment_summaries_give_the_final_state(family, chunk_size, rng):
    (chunk_terms, inputs, reference), s0 = _inputs(rng, family)

    @jax.jit
    def combined_summary(inputs):
        first = segment_summary(chunk_terms, {n: x[:, :SPLIT] for n, x in inputs.items()}, chunk_size)
        second = segment_summary(chunk_terms, {n: x[:, SPLIT:] for n, x in inputs.items()}, chunk_size)
        return combine_summaries(first, second)

    combined = combined_summary(inputs)
    assert (combined.matrix is None) == family.endswith(("linear", "gla")), "diagonal families stay in log space"
    _, final_ref = reference()
    err = rel_err(np.asarray(combined.apply(s0)), final_ref)
    assert err <= 1e-5, f"final state rel err {err:.3g}"


@pytest.mark.parametrize("length", [1, 13, 64, 300])  # 300 > TRIANGULAR_MAX: the cumsum path
@pytest.mark.parametrize("axis", [-1, -2])
def test_chunk_cumsums_match_numpy(length, axis, rng):
    x = rng.uniform(-20, 0, (3, length, 5) if axis == -2 else (3, 5, length)).astype(np.float32)
    expected = np.cumsum(x.astype(np.float64), axis=axis)
    expected_reverse = np.flip(np.cumsum(np.flip(x.astype(np.float64), axis), axis), axis)
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(chunk_math.chunk_cumsum(x, axis)) - expected).max() <= 1e-6 * scale
    assert np.abs(np.asarray(chunk_math.chunk_reverse_cumsum(x, axis)) - expected_reverse).max() <= 1e-6 * scale
