"""LinFusion (non-causal linear attention with MLP-refined queries and keys) against a reference written here from
the equations, and LinFusion built from a softmax attention layer.

Forward: the dense formula in numpy float64, compared at rel err <= 1e-5 for every engine form (chunked at two
chunk sizes, recurrent, parallel) with T = 37 (not a multiple of the chunk sizes) and H = 2. Gradients: the same
reference in jax.numpy float32; gradients with respect to every parameter and the input compared at rel err
<= 1e-4, with all parameters perturbed away from their init (zero-initialised MLP outputs) so every one of them
matters. `from_softmax` copies the projections (its MLPs start at zero). No decode cache. Bad arguments raise
ValueError naming the argument.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    ReferenceCases,
    check_non_causal_has_no_cache,
    f64,
    heads,
    inputs,
    layer_norm,
    linear,
    merge,
    raises_naming,
)
from reference import rel_err

from seqlab.mixers.linear.linfusion import LinFusionAttention
from seqlab.mixers.linear.slab import SLAB
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention

B, T, D, H = 2, 37, 32, 2


# --------------------------------------------------------------------------------------------------------------
# Reference (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


def elu1(xp, a):
    return xp.where(a > 0, a + 1.0, xp.exp(xp.minimum(a, 0.0)))


def projection_mlp(xp, p, x):
    h = layer_norm(xp, linear(x, p["inner"]), p["norm"]["scale"], p["norm"]["bias"])
    return linear(xp.where(h > 0, h, 0.01 * h), p["outer"])


def linfusion_reference(xp, p, x, eps=1e-4):
    n = x.shape[1]
    q = elu1(xp, heads(linear(x + projection_mlp(xp, p["q_mlp"], x), p["q_proj"]), H))
    k = elu1(xp, heads(linear(x + projection_mlp(xp, p["k_mlp"], x), p["k_proj"]), H))
    v = heads(linear(x, p["v_proj"]), H)
    kv_mean = xp.einsum("bjhk,bjhv->bhkv", k, v) / n
    denominator = xp.einsum("bihk,bhk->bih", q, k.mean(axis=1)) + eps
    return linear(merge(xp.einsum("bihk,bhkv->bihv", q, kv_mean) / denominator[..., None]), p["o_proj"])


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

CASES = ReferenceCases({"linfusion": (lambda **kw: LinFusionAttention(D, H, **kw), linfusion_reference)}, (B, T, D))
make = CASES.make


@pytest.mark.parametrize("case, form", CASES.forms())
def test_forward_and_gradients_match_reference(case, form):
    CASES.check_forward_and_gradients(case, *form)


def test_linfusion_has_no_cache():
    check_non_causal_has_no_cache(make("linfusion"), B)


# --------------------------------------------------------------------------------------------------------------
# LinFusion from a softmax layer
# --------------------------------------------------------------------------------------------------------------


def test_linfusion_from_softmax_copies_projections():
    teacher = SoftmaxAttention(D, 4, num_kv_heads=2, use_bias=True, rngs=nnx.Rngs(3))
    student = LinFusionAttention.from_softmax(teacher, chunk_size=8, rngs=nnx.Rngs(4))
    x, _ = inputs(8, (B, T, D))
    y, q_mlp, k_mlp = nnx.jit(lambda m, x: (m(x), m.q_mlp(x), m.k_mlp(x)))(student, x)
    assert float(jnp.max(jnp.abs(q_mlp))) == 0.0 and float(jnp.max(jnp.abs(k_mlp))) == 0.0
    t = f64(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    xs = np.asarray(x, np.float64)
    dh = D // 4
    q = (xs @ t["q_proj"]["kernel"] + t["q_proj"]["bias"]).reshape(B, T, 4, dh)
    k = (xs @ t["k_proj"]["kernel"] + t["k_proj"]["bias"]).reshape(B, T, 2, dh)[:, :, [0, 0, 1, 1]]
    v = (xs @ t["v_proj"]["kernel"] + t["v_proj"]["bias"]).reshape(B, T, 2, dh)[:, :, [0, 0, 1, 1]]
    phi_q, phi_k = elu1(np, q), elu1(np, k)
    o = np.einsum("bihk,bjhk,bjhv->bihv", phi_q, phi_k, v) / T
    o = o / (np.einsum("bihk,bhk->bih", phi_q, phi_k.mean(1)) + 1e-4)[..., None]
    expected = o.reshape(B, T, D) @ t["o_proj"]["kernel"] + t["o_proj"]["bias"]
    assert rel_err(y, expected) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: LinFusionAttention(D, H, mlp_dim=0), "mlp_dim"),
        (lambda: LinFusionAttention(D, H, eps=-1.0), "eps"),
        (lambda: LinFusionAttention.from_softmax(SLAB(D, H)), "attention"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
