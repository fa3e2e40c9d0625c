"""Activator ("Activator: GLU Activations as The Core Functions of a Vision Transformer") against its gating unit
written here in numpy with the layer's parameters: y = W_3 (LN(GELU(x W_1 + b_1)) ⊙ LN(x W_2 + b_2)) + b_3, one
LayerNorm shared by both branches, the exact erf GELU. Forward at 1e-5 (float64 reference), gradients against
jax.grad of the same formula in jnp at 1e-4; no token mixing (changing one token changes only its output); bf16."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from mixer_references import ReferenceCases, inputs, layer_norm, linear, raises_naming
from reference import rel_err

from seqlab.mixers.pointwise.activator import Activator

B, T, D = 2, 37, 32


def gelu(xp, a):
    erf = np.vectorize(math.erf) if xp is np else __import__("jax").scipy.special.erf
    return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))


def activator_reference(xp, p, x):
    norm = p["norm"]
    u = layer_norm(xp, gelu(xp, linear(x, p["proj_1"])), norm["scale"], norm["bias"])
    v = layer_norm(xp, linear(x, p["proj_2"]), norm["scale"], norm["bias"])
    return linear(u * v, p["proj_3"])


CASES = ReferenceCases(
    {"activator": (lambda chunk_size=None, **kw: Activator(D, 1, **kw), activator_reference),
     "activator-wide": (lambda chunk_size=None, **kw: Activator(D, 1, mlp_ratio=3.0, **kw), activator_reference)},
    shape=(B, T, D),
)


@pytest.mark.parametrize("case", CASES.names())
def test_forward_and_gradients_match_reference(case):
    CASES.check_forward_and_gradients(case, "auto", None)  # one form: no op


def test_each_output_reads_only_its_own_token():
    mixer = CASES.make("activator")
    x, _ = inputs(1, (B, T, D))
    y, y_changed = mixer(x), mixer(x.at[:, 11].add(1.0))
    np.testing.assert_array_equal(np.delete(np.asarray(y_changed), 11, axis=1), np.delete(np.asarray(y), 11, axis=1))
    assert rel_err(y_changed[:, 11], y[:, 11]) > 1e-3


def test_bf16_compute_stays_close_to_the_reference():
    CASES.check_bf16("activator")


@pytest.mark.parametrize("build, arg", [(lambda: Activator(D, 1, mlp_ratio=0.0), "mlp_ratio"),
                                        (lambda: Activator(D, 1, norm_eps=-1.0), "norm_eps"),
                                        (lambda: Activator(D, 1)(jnp.zeros((B, T, D + 1))), "x")])
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
