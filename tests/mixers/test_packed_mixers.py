"""Packed rows through every registered causal mixer: a row of several documents, given as
``Documents(segment_ids, positions)``, equals running each document alone, forward and gradient (inputs and
parameters); a mixer that does not take documents refuses them with a clear error. Cases follow the registry.

Document lengths (T = 37, chunk 16): row 0 holds 7, 1, 16 (crossing the chunk border) and 13 tokens; row 1 holds
one chunk exactly, then 21 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import mixers
from seqlab.core.documents import Documents
from seqlab.models import DecoderLM
from test_registry_checks import CASES, D, T, make

ROWS = ((7, 1, 16, 13), (16, 21))
TAKES = [case for case in CASES if make(case).takes_documents]


def segment_ids() -> np.ndarray:
    """[2, T]: document d of a row holds id d."""
    return np.stack([np.repeat(np.arange(len(row)), row) for row in ROWS]).astype(np.int32)


def each_alone(mixer: mixers.Mixer, x: jax.Array) -> jax.Array:
    """Every document of every row through the mixer on its own (a batch of one), concatenated back to [2, T, D]."""
    rows = []
    for b, row in enumerate(ROWS):
        bounds = np.cumsum((0,) + row)
        rows.append(jnp.concatenate([mixer(x[b : b + 1, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], axis=1))
    return jnp.concatenate(rows, axis=0)


def loss_and_grads(mixer: mixers.Mixer, x: jax.Array, weights: jax.Array, run):
    """(run(mixer, x), the gradients of sum(run(mixer, x) * weights) with respect to the mixer's parameters and
    x), in one jitted program."""

    def loss(m, inputs):
        y = run(m, inputs)
        return jnp.sum(y * weights), y

    (_, y), grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(mixer, x)
    return y, grads


def test_every_causal_mixer_takes_documents_or_says_why_not():
    refusing = [case for case in CASES if case not in TAKES]
    assert all(make(case).documents_refused for case in refusing), refusing
    for case in refusing:
        with pytest.raises(ValueError, match=f"takes_documents is False \\({make(case).documents_refused}\\)"):
            make(case)(jnp.zeros((len(ROWS), T, D)), documents=Documents.of(segment_ids()))


# Variants that change only per-token maps or gate ranges (feature maps, activations, the gate's bound) run under
# `pytest -m slow`; CI runs each mixer's first example and the variants whose documents take another path.
PER_TOKEN_VARIANTS = ("deltanet-negeig_gate", "hgrn2-lower_bound", "linear_attn-hedgehog", "linear_attn-identity",
                      "linear_attn-relu", "linear_attn-taylor", "selective-linear", "transnormer_diag-t2",
                      "transnormer_norm-t2")
PACKED_CASES = [pytest.param(case, marks=pytest.mark.slow) if case in PER_TOKEN_VARIANTS else case for case in TAKES]


@pytest.mark.parametrize("case", PACKED_CASES)
def test_a_packed_row_equals_each_document_alone(case):
    mixer = make(case)
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (len(ROWS), T, D), jnp.float32)
    weights = jax.random.normal(kw, x.shape, jnp.float32)
    documents = Documents.of(segment_ids())
    packed, (g_model, g_x) = loss_and_grads(mixer, x, weights, lambda m, a: m(a, documents=documents))
    alone, (ref_model, ref_x) = loss_and_grads(mixer, x, weights, each_alone)
    np.testing.assert_allclose(packed, alone, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(g_x, ref_x, rtol=2e-4, atol=2e-5)
    leaves, ref_leaves = jax.tree.leaves(nnx.state(g_model)), jax.tree.leaves(nnx.state(ref_model))
    assert len(leaves) == len(ref_leaves) > 0
    for leaf, ref in zip(leaves, ref_leaves):
        np.testing.assert_allclose(leaf, ref, rtol=5e-4, atol=5e-5)


def test_a_mixer_without_documents_and_a_non_causal_one_refuse_them():
    x, documents = jnp.zeros((len(ROWS), T, D)), Documents.of(segment_ids())

    class OwnMixer(type(make("gla"))):  # a mixer of one's own that does not declare takes_documents
        takes_documents = False

    with pytest.raises(ValueError, match="^documents: OwnMixer does not take packed documents"):
        OwnMixer(D, 2)(x, documents=documents)
    with pytest.raises(ValueError, match="^documents: LinFusionAttention is non-causal here"):
        mixers.create("linfusion", d_model=D, num_heads=2)(x, documents=documents)


def test_documents_of_a_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"^documents\.segment_ids must be \[batch, time\]"):
        make("gla")(jnp.zeros((len(ROWS), T, D)), documents=Documents.of(segment_ids()[:, :-1]))


def test_a_packed_row_through_a_model_equals_each_document_alone():
    """Learned position embeddings restart per document too: the whole DecoderLM's logits."""
    pattern = ("deltanet", "softmax")
    model = DecoderLM(
        vocab_size=32, d_model=D, num_layers=len(pattern), num_heads=2, mixers=pattern, mixer_args={}, mlp="swiglu",
        mlp_ratio=2.0, norm="rmsnorm", position_embedding="learned", max_len=T, embed_dropout=0.0, rngs=nnx.Rngs(0),
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(2), (len(ROWS), T), 0, 32)
    packed = nnx.jit(lambda m, t: m(t, documents=Documents.of(segment_ids())))(model, tokens)
    run = nnx.jit(lambda m, t: m(t))
    for b, row in enumerate(ROWS):
        bounds = np.cumsum((0,) + row)
        alone = jnp.concatenate([run(model, tokens[b : b + 1, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], 1)
        np.testing.assert_allclose(packed[b : b + 1], alone, rtol=2e-4, atol=2e-5)


# The recurrent form and the Pallas kernels (interpret mode) at mixer level, each mixer's first example, forward
# (every form's gradients and the parallel form: tests/ops/test_packed_ops.py). Pallas only where every op of the
# mixer has a kernel (Based's Taylor op has none; the flash kernel takes no score_mod).
NO_KERNEL = ("based", "softplus_attn", "gpsa")  # Based: no Taylor kernel; the others: a score_mod
FIRST_EXAMPLES = [f"{name}-{next(iter(mixers.info(name).examples))}" for name in mixers.available()]
FORM_CASES = [(case, impl) for case in TAKES if case in FIRST_EXAMPLES for impl in ("recurrent", "pallas")
              if "impl" in mixers.keyword_arguments(mixers.get(case.split("-")[0]))
              and not (impl == "pallas" and case.split("-")[0] in NO_KERNEL)]  # fmt: skip


@pytest.mark.parametrize("case, impl", FORM_CASES, ids=[f"{c}-{i}" for c, i in FORM_CASES])
def test_every_form_of_a_packed_mixer_equals_each_document_alone(case, impl):
    mixer = make(case, impl=impl)
    x = jax.random.normal(jax.random.key(4), (len(ROWS), T, D), jnp.float32)
    packed = nnx.jit(lambda m, a: m(a, documents=Documents.of(segment_ids())))(mixer, x)
    np.testing.assert_allclose(packed, nnx.jit(each_alone)(mixer, x), rtol=2e-4, atol=2e-5)
