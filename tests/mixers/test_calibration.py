"""Attention calibration (seqlab.mixers.calibration): ACT against its rule written here element by element in
numpy (column means over the queries that see each key, sinks above τ except the first key, β times a sink's
weight, the removed mass spread over the other keys in proportion); the dense weights against a numpy softmax; a
softmax mixer with the hook against the same formula on its own q, k, v; no hook = the mixer unchanged; refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab.core import masks
from seqlab.mixers.calibration import ACT, attention_weights, calibrate_attention
from seqlab.models import DecoderLM

B, T, H, D = 2, 9, 2, 16


def act_reference(a: np.ndarray, visible: np.ndarray, tau: float, beta: float, heads, keep_first=True):
    out = a.copy()
    for b in range(a.shape[0]):
        for h in range(a.shape[1]):
            if heads is not None and h not in heads:
                continue
            sinks = []
            for j in range(a.shape[3]):
                seen = [i for i in range(a.shape[2]) if visible[i, j]]
                mean = sum(a[b, h, i, j] for i in seen) / max(len(seen), 1)
                if mean > tau and (j > 0 or not keep_first):
                    sinks.append(j)
            for i in range(a.shape[2]):
                rest = sum(a[b, h, i, j] for j in range(a.shape[3]) if j not in sinks)
                if rest == 0:
                    continue
                removed = (1 - beta) * sum(a[b, h, i, j] for j in sinks)
                for j in range(a.shape[3]):
                    out[b, h, i, j] = beta * a[b, h, i, j] if j in sinks else a[b, h, i, j] * (1 + removed / rest)
    return out


def causal_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, H, T, T)) * 2
    logits[..., 3] += 3.0  # key 3 collects attention: a sink
    visible = np.tril(np.ones((T, T), bool))
    logits = np.where(visible, logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True), visible


@pytest.mark.parametrize("tau, beta, heads, keep_first", [(0.1, 0.4, None, True), (0.2, 0.0, (1,), True),
                                                          (0.05, 0.7, (0,), False)])
def test_act_matches_its_rule(tau, beta, heads, keep_first):
    a, visible = causal_weights(0)
    got = np.asarray(ACT(tau, beta, heads, keep_first)(jnp.asarray(a, jnp.float32), jnp.asarray(visible)))
    want = act_reference(a, visible, tau, beta, heads, keep_first)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(got, a)  # key 3 is a sink somewhere


def test_attention_weights_are_the_masked_softmax():
    kq, kk = jax.random.split(jax.random.key(0))
    q, k = jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, 1, D))
    weights, visible = attention_weights(q, k, masks.Causal(4))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for i in range(T):
        keys = [j for j in range(T) if i - 4 < j <= i]
        scores = np.einsum("bhd,bjd->bhj", qn[:, i], kn[:, keys, 0]) / np.sqrt(D)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(np.asarray(weights)[:, :, i, keys], e / e.sum(-1, keepdims=True), atol=1e-6)
        assert np.asarray(weights)[:, :, i, [j for j in range(T) if j not in keys]].max(initial=0) == 0
    assert visible.shape == (T, T)


def tiny_lm(**mixer_args) -> DecoderLM:
    return DecoderLM(vocab_size=32, d_model=32, num_layers=2, num_heads=H, mixers=("softmax",),
                     mixer_args={"softmax": mixer_args}, mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm",
                     position_embedding="none", max_len=T, embed_dropout=0.0, rngs=nnx.Rngs(0))


def test_a_hooked_mixer_is_act_on_its_own_weights_and_unhooked_is_unchanged():
    model = tiny_lm()
    mixer = model.backbone.blocks[1].mixer
    x = jax.random.normal(jax.random.key(1), (B, T, 32))
    plain = mixer(x)
    hook = ACT(tau=0.15, beta=0.3, heads=(0,))
    calibrate_attention(model, {1: hook})
    hooked = mixer(x)
    q, k = mixer.queries_keys(x, jnp.arange(T))
    a, visible = attention_weights(q, k, mixer.attention_mask())
    want_weights = act_reference(np.asarray(a, np.float64), np.asarray(visible), 0.15, 0.3, (0,))
    v = np.asarray(mixer.values(x), np.float64)
    o = np.einsum("bhij,bjhd->bihd", want_weights, np.repeat(v, H // v.shape[2], axis=2))
    want = np.asarray(o.reshape(B, T, -1) @ np.asarray(mixer.o_proj.kernel[...], np.float64))
    np.testing.assert_allclose(hooked, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(hooked, plain, atol=1e-4)
    calibrate_attention(model, {1: ACT(tau=0.15, beta=1.0)})  # beta 1 keeps every weight
    np.testing.assert_allclose(mixer(x), plain, rtol=1e-4, atol=1e-5)
    calibrate_attention(model, {1: None})
    np.testing.assert_allclose(mixer(x), plain, rtol=1e-6, atol=1e-6)


def test_a_hooked_mixer_refuses_decoding():
    model = tiny_lm()
    calibrate_attention(model, {0: ACT()})
    with pytest.raises(ValueError, match="attention_hook"):
        model.backbone.blocks[0].mixer.init_cache(B, T)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ACT(tau=0.0), "tau"),
        (lambda: ACT(beta=1.5), "beta"),
        (lambda: ACT(heads=(-1,)), "heads"),
        (lambda: ACT(heads=(5,))(jnp.ones((1, 2, 3, 3)) / 3, jnp.ones((3, 3), bool)), "heads"),
        (lambda: calibrate_attention(tiny_lm(), {2: ACT()}), "layer 2"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
