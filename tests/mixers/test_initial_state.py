"""Initial-state tuning (`Mixer.learn_initial_state`, Lina-Speech / RWKV state tuning): every registered causal mixer
whose decode cache holds a recurrent ``state`` starts its training path and its decode caches from one learnt
state; the others refuse it with a message naming the mixer.

Per stateful mixer (discovered from the registry): a zero learnt state leaves the mixer unchanged; a random one
changes its output, and decoding from `init_cache` token by token reproduces the forward; the gradient in the learnt
state matches central differences. GLA's forward with a learnt state is checked against the paper's recurrence,
written here as a per-token loop in float64, started from that state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import steps
from seqlab import mixers
from seqlab.core.documents import Documents

B, T, D, CHUNK = 2, 13, 32, 8


def make(name: str) -> mixers.Mixer:
    entry = mixers.info(name)
    chunk = {"chunk_size": CHUNK} if "chunk_size" in mixers.keyword_arguments(entry.cls) else {}
    return mixers.create(name, d_model=D, rngs=nnx.Rngs(0), **{**chunk, **next(iter(entry.examples.values()))})


def has_recurrent_state(name: str) -> bool:
    """A causal mixer whose cache has a float `state` array and whose training path updates no batch statistics."""
    mixer = make(name)
    if not mixer.causal or mixer.single_device_state:
        return False
    return isinstance(getattr(mixer.init_cache(1, T), "state", None), jax.Array)


CAUSAL = [name for name in mixers.available() if make(name).causal]
STATEFUL = [name for name in CAUSAL if has_recurrent_state(name)]
REFUSING = sorted(set(mixers.available()) - set(STATEFUL))


def inputs(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, T, D), jnp.float32), jax.random.normal(kw, (B, T, D), jnp.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_the_registry_has_mixers_of_both_kinds():
    assert {"gla", "linear_attn", "mamba2", "lolcats"} <= set(STATEFUL)
    assert {"softmax", "sliding_window", "routing", "longvq"} <= set(REFUSING)


@pytest.mark.parametrize("name", STATEFUL)
def test_learnt_initial_state_starts_forward_and_decode(name):
    x, w = inputs()
    plain = make(name)
    tuned = make(name)
    tuned.learn_initial_state()
    state_shape = plain.init_cache(B, T).state.shape
    assert tuned.learnt_initial_state.shape == state_shape[1:] and tuned.learnt_initial_state.dtype == jnp.float32
    assert rel_err(tuned(x), plain(x)) < 1e-5  # a zero state: the mixer as it was

    learnt = 0.5 * jax.random.normal(jax.random.key(3), state_shape[1:], jnp.float32)
    tuned.learnt_initial_state[...] = learnt
    y = tuned(x)
    assert rel_err(y, plain(x)) > 1e-3
    cache = tuned.init_cache(B, T)
    np.testing.assert_array_equal(cache.state, np.broadcast_to(learnt, state_shape))
    decoded, _ = steps(tuned, x, cache)
    assert rel_err(decoded, y) < 1e-4

    graphdef, state, rest = nnx.split(tuned, nnx.PathContains("learnt_initial_state"), ...)

    def loss(s):
        return jnp.sum(nnx.merge(graphdef, s, rest)(x) * w)

    grad = jax.grad(loss)(state)
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape, a.dtype), state)
    h = 2e-3  # the normalised families are far from linear in the state: a small step
    shifted = [jax.tree.map(lambda a, d, s=s: a + s * h * d, state, direction) for s in (1.0, -1.0)]
    central = (loss(shifted[0]) - loss(shifted[1])) / (2 * h)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(float(analytic)) > 1e-3
    assert abs(float(central - analytic)) <= 2e-2 * abs(float(analytic)) + 1e-3, (central, analytic)


@pytest.mark.parametrize("name", REFUSING)
def test_mixers_without_a_recurrent_state_refuse_it(name):
    with pytest.raises(ValueError, match=r"^learn_initial_state: \w+( is non-causal| updates|'s cache holds no)"):
        make(name).learn_initial_state()


def test_packed_documents_and_sequence_parallelism_are_refused():
    tuned = make("gla")
    tuned.learn_initial_state()
    x, _ = inputs()
    ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match="packed documents are not supported with a learnt initial state"):
        tuned(x, documents=Documents(ids, jnp.broadcast_to(jnp.arange(T), (B, T))))
    tuned.sequence_axis = "seq"
    with pytest.raises(ValueError, match="sequence parallelism is not supported with a learnt initial state"):
        tuned(x)


def test_gla_from_a_learnt_state_follows_the_recurrence():
    """S_t = diag(α_t) S_{t-1} + k_t v_tᵀ from S_0 = the learnt state, o_t = S_tᵀ q_t d_k^-1/2; then the per-head
    RMSNorm times swish(x W_g) and W_o (the GLA module's docstring), in float64."""
    mixer = make("gla")
    mixer.learn_initial_state()
    H, dk, dv = mixer.num_heads, mixer.key_dim, mixer.value_dim
    s0 = np.asarray(jax.random.normal(jax.random.key(5), (H, dk, dv)), np.float64)
    mixer.learnt_initial_state[...] = jnp.asarray(s0, jnp.float32)
    x, _ = inputs(1)
    xn = np.asarray(x, np.float64)

    def proj(layer, a):
        out = a @ np.asarray(layer.kernel[...], np.float64)
        return out + np.asarray(layer.bias[...], np.float64) if layer.bias is not None else out

    q = proj(mixer.q_proj, xn).reshape(B, T, H, dk)
    k = proj(mixer.k_proj, xn).reshape(B, T, H, dk)
    v = proj(mixer.v_proj, xn).reshape(B, T, H, dv)
    g = proj(mixer.g_proj, xn).reshape(B, T, H, dv)
    logits = proj(mixer.gk_up, proj(mixer.gk_down, xn)).reshape(B, T, H, dk)
    alpha = (1.0 / (1.0 + np.exp(-logits))) ** (1.0 / mixer.gate_logit_normalizer)
    o = np.zeros((B, T, H, dv))
    for b in range(B):
        for h in range(H):
            s = s0[h].copy()
            for t in range(T):
                s = alpha[b, t, h][:, None] * s + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = s.T @ q[b, t, h] / np.sqrt(dk)
    normed = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + 1e-5) * np.asarray(mixer.norm.weight[...])
    gated = normed * g / (1.0 + np.exp(-g))
    want = proj(mixer.o_proj, gated.reshape(B, T, H * dv))
    assert rel_err(mixer(x), want) < 1e-5
