"""MossFormer ("MossFormer: Pushing the Performance Limit of Monaural Speech Separation using Gated Single-Head
Transformer with Convolution-Augmented Joint Self-Attentions") against a per-query loop of its equations, written
here with the layer's own parameters: h = SiLU(W_in x) plus its depthwise conv (causal, or centred "same"), split
into v, u and the shared base z; four scale/offset heads of z, rotated; for query i the relu² scores pair by pair
with the keys of its chunk (up to i when causal) and an explicit sum of q_lin·k_lin over the global keys — the
chunks before i's divided by g (causal), every token divided by T (non-causal) — applied to v and to u; the
attentive gate (A(u) ⊙ v) ⊙ σ(A(v) ⊙ u) and the output projection. Odd lengths end in a partial chunk. Forward in
float64 (1e-5), gradients from the same loop in jnp (1e-4); bf16; decode from a prompt that ends mid-chunk; a
one-device sequence-parallel run; bad arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from mixer_references import (assert_layer_matches, causal_conv, check_decode_prefill_and_cache, depthwise_same, f64,
                              inputs, linear, perturbed_params, raises_naming, rope, sigmoid, silu, steps)
from reference import rel_err
from seqlab import mixers
from seqlab.core.documents import Documents

B, D, S = 2, 16, 8
E = 2 * D  # expansion 2


def layer(xp, params, x, *, chunk: int, causal: bool, rotary_dim: int = S):
    T = x.shape[1]
    h = silu(xp, linear(x, params["in_proj"]))
    conv = params["conv"]
    h = h + (causal_conv(xp, h, conv["weight"], conv["bias"]) if causal else depthwise_same(xp, h, conv["conv"], None))
    v, u, z = h[..., :E], h[..., E : 2 * E], h[..., 2 * E :]
    qk = z[:, :, None, :] * params["gamma"] + params["beta"]  # [B, T, 4, S]
    qk = xp.concatenate([rope(xp, qk[..., :rotary_dim], np.arange(T)), qk[..., rotary_dim:]], axis=-1)
    q_quad, q_lin, k_quad, k_lin = (qk[:, :, i] for i in range(4))
    w = xp.concatenate([v, u], axis=-1)
    rows = []
    for i in range(T):
        c = i // chunk
        local = [j for j in range(c * chunk, min((c + 1) * chunk, T)) if j <= i or not causal]
        pair = xp.maximum(xp.einsum("bs,bjs->bj", q_quad[:, i], k_quad[:, local]) / chunk, 0.0) ** 2  # each pair
        row = xp.einsum("bj,bje->be", pair, w[:, local])
        keys, scale = (list(range(c * chunk)), chunk) if causal else (list(range(T)), T)
        if keys:  # Σ_j (q_lin_i·k_lin_j / scale) w_j over the global keys
            pair = xp.einsum("bs,bjs->bj", q_lin[:, i], k_lin[:, keys]) / scale
            row = row + xp.einsum("bj,bje->be", pair, w[:, keys])
        rows.append(row)
    att = xp.stack(rows, axis=1)
    return linear(att[..., E:] * v * sigmoid(xp, att[..., :E] * u), params["o_proj"])


def make(**kw) -> mixers.Mixer:
    args = dict(num_heads=1, shared_dim=S, conv_size=3, chunk_size=8, rngs=nnx.Rngs(0))
    return mixers.create("mossformer", d_model=D, **{**args, **kw})


CASES = [  # chunk, causal, T, rotary_dim
    (4, True, 13, S), (5, True, 23, 4), (1, True, 13, S), (16, True, 13, S),
    (4, False, 13, S), (5, False, 23, 4), (1, False, 13, S),
]


@pytest.mark.parametrize("chunk, causal, T, rotary_dim", CASES)
def test_mossformer_matches_its_equations(chunk, causal, T, rotary_dim):
    mixer = make(chunk=chunk, causal=causal, rotary_dim=rotary_dim)

    def formula(xp, params, x):
        return layer(xp, params, x, chunk=chunk, causal=causal, rotary_dim=rotary_dim)

    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("in_proj", "conv", "gamma", "beta", "o_proj"))


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_matches_the_float32_equations(causal):
    T, chunk = 19, 4
    mixer = make(chunk=chunk, causal=causal, dtype=jnp.bfloat16)
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, T, D))
    y = mixer(x.astype(jnp.bfloat16))
    want = layer(np, f64(params), np.asarray(x, np.float64), chunk=chunk, causal=causal)
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 3e-2


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_decode_from_a_prompt_that_ends_mid_chunk(chunk):
    """Token by token and prefill(6 tokens) + steps == the forward across chunk boundaries; the prefilled cache ==
    the stepped one; the cache is O(g): a ring of g slots and one [S, 2E] state."""
    T, prompt = 17, 6
    mixer = make(chunk=chunk)
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(2, (B, T, D))
    check_decode_prefill_and_cache(mixer, x, prompt)
    _, cache = steps(mixer, x, mixer.init_cache(B, T))
    assert cache.local.k.shape == (B, chunk, 1, 2 * S) and cache.state.shape == (B, 1, S, 2 * E)


def test_outputs_see_only_the_past_when_causal():
    T = 12
    mixer = make(chunk=4)
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(1, (1, T, D))
    jac = jax.jit(jax.jacobian(lambda a: mixer(a)[0].sum(-1)))(x)[:, 0]  # [T_out, T_in, D]
    reach = np.abs(np.asarray(jac)).sum(-1) > 0
    assert not np.any(np.triu(reach, 1))  # no output sees a later token
    assert reach[-1].all()  # the last output sees the earlier chunks (global) and itself (relu² may zero a pair)


@pytest.mark.parametrize("causal", [True, False])
def test_a_one_device_sequence_split_equals_the_whole_sequence(causal):
    """The sequence-parallel path (the op or the means over the split, RoPE offset, the causal conv's halo, the
    centred conv all-gathered) on a mesh of one device; a device's segment must be whole chunks."""
    mixer = make(chunk=4, causal=causal)
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(3, (B, 16, D))
    want = mixer(x)
    mixer.shard_sequence("seq")
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    graphdef, state = nnx.split(mixer)
    run = jax.shard_map(lambda s, a: nnx.merge(graphdef, s)(a), mesh=mesh, in_specs=(P(), P(None, "seq")),
                        out_specs=P(None, "seq"))
    assert rel_err(jax.jit(run)(state, x), want) <= 1e-5
    with pytest.raises(ValueError, match="^x: under sequence parallelism each device's 15 tokens must be whole"):
        jax.jit(run)(state, x[:, :15])


def test_packed_documents_are_refused():
    mixer = make(chunk=4)
    ids = np.repeat(np.arange(2), (5, 8))[None].repeat(B, 0).astype(np.int32)
    with pytest.raises(ValueError, match="^documents: MossFormer does not take packed documents"):
        mixer(jnp.zeros((B, 13, D)), documents=Documents.of(ids))


@pytest.mark.parametrize("kwargs, arg", [
    (dict(chunk=0), "chunk"), (dict(chunk=-2), "chunk"), (dict(chunk=2.0), "chunk"),
    (dict(conv_size=4), "conv_size"), (dict(conv_size=0), "conv_size"),
    (dict(shared_dim=0), "shared_dim"), (dict(rotary_dim=3), "rotary_dim"), (dict(rotary_dim=2 * S), "rotary_dim"),
    (dict(expansion=0.3), "expansion"), (dict(expansion=0), "expansion"), (dict(causal="yes"), "causal"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    raises_naming(lambda: make(**kwargs), arg)


def test_bad_shapes_name_the_argument():
    mixer = make(chunk=4)
    raises_naming(lambda: mixer(jnp.zeros((B, D))), "x")
    raises_naming(lambda: mixer(jnp.zeros((B, 5, D + 1))), "x")
    raises_naming(lambda: mixer.step(jnp.zeros((B, D - 1)), mixer.init_cache(B, 4)), "x_t")
    raises_naming(lambda: make(chunk=4, causal=False).init_cache(B, 4), "MossFormer: a non-causal mixer")
