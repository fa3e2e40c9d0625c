"""DSF normalised attention against an independent per-token reference written here from the equations (families.md
§25): o_t = η(x_t) q_tᵀ Σ_{s<=t} k_s v_sᵀ with η = exp(-n), 1 / softplus(n) or 1 + exp(-n).

The reference reads only the mixer's parameters and is written once over an array module `xp`: numpy in float64
for the forward (rel. err <= 1e-5), jax.numpy in float32 differentiated for the gradient check (rel. err <= 1e-4 on
every parameter). Every form (chunked with two chunk sizes, recurrent, parallel) is checked, with T = 21 (not a
multiple of either chunk size) and H = 2; prefill + decode == full forward.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    QKVO_PARAMS,
    check_forward_and_grad,
    decode_matches_forward,
    f64,
    inputs,
    per_token,
    time_major,
    weights,
)
from reference import rel_err

from seqlab.mixers.linear.dsf import DSFAttention

B, T, D, H = 2, 21, 16, 2
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 8), ("parallel", 8)]

DSF_PARAMS = {**QKVO_PARAMS, "wn": ("n_proj", "kernel"), "bn": ("n_proj", "bias")}
ETA = {
    "exp": lambda xp, n: xp.exp(-n),
    "softplus": lambda xp, n: 1.0 / xp.logaddexp(0.0, n),
    "sigmoid": lambda xp, n: 1.0 + xp.exp(-n),
}


def dsf_reference(norm_fn):
    def run(p, x, xp):
        d = D // H
        q = (x @ p["wq"] + p["bq"]).reshape(B, T, H, d)
        k = (x @ p["wk"] + p["bk"]).reshape(B, T, H, d)
        v = (x @ p["wv"] + p["bv"]).reshape(B, T, H, d)
        eta = ETA[norm_fn](xp, x @ p["wn"] + p["bn"])  # [B, T, H]

        def step(state, token):
            q_t, k_t, v_t, eta_t = token
            state = state + k_t[..., :, None] * v_t[..., None, :]
            return state, eta_t[..., None] * xp.einsum("bhk,bhkv->bhv", q_t, state)

        o = per_token(xp, step, xp.zeros((B, H, d, d)), time_major(xp, q, k, v, eta))
        return o.reshape(B, T, D) @ p["wo"] + p["bo"]

    return run


def make_dsf(impl="chunked", chunk_size=8, **kw):
    return DSFAttention(D, H, impl=impl, chunk_size=chunk_size, rngs=nnx.Rngs(0), **kw)


def test_dsf_matches_reference():
    x, w = inputs(6, (B, T, D))
    check_forward_and_grad(make_dsf, dsf_reference("exp"), DSF_PARAMS, x, w, FORMS)


@pytest.mark.parametrize("norm_fn", ["softplus", "sigmoid"])
def test_dsf_norm_variants(norm_fn):
    x, _ = inputs(7, (B, T, D))
    mixer = make_dsf(norm_fn=norm_fn)
    want = dsf_reference(norm_fn)(weights(mixer, DSF_PARAMS, f64), f64(x), np)
    assert rel_err(jax.jit(mixer.__call__)(x), want) < FWD_TOL


def test_dsf_decode_matches_forward():
    x, _ = inputs(8, (B, T, D))
    y_full, y_inc, _ = decode_matches_forward(make_dsf(), x, (9,))
    assert rel_err(y_inc, y_full) < FWD_TOL


def test_dsf_bad_args():
    with pytest.raises(ValueError, match="norm_fn"):
        make_dsf(norm_fn="tanh")
    with pytest.raises(ValueError, match="key_dim"):
        make_dsf(key_dim=0)
