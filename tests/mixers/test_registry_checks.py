"""Token mixers (seqlab.mixers): decode == full sequence, forward and gradient; prefill + decode == full sequence
and prefill's cache == the stepped cache; impls agree; jit/grad work;
argument errors name the argument; shared layers (RoPE, feature maps, short conv) behave as documented.

The cases are discovered from the registry: every example of every registered mixer (`register(..., examples=...)`)
gets every check, so a new mixer is covered by registering it. Sizes are tiny and T = 37 with chunk_size 16, so the
chunked forms cross chunk boundaries and end on a partial chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_same_leaves, steps
from seqlab import mixers, ops
from seqlab.layers.conv import ShortConv
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.positional import RoPE
from seqlab.mixers import registry
from seqlab.mixers.caches import RecurrentCache

B, T, D, CHUNK = 2, 37, 32, 16
WINDOW = 8  # the registered examples' window: < T, so the ring buffer wraps several times
PROMPT = 21  # prefill length: > CHUNK and > WINDOW

# Every registered mixer's every example ("name-example"), split by causality; non-causal ones have no decode path.
EXAMPLES = {
    f"{name}-{example}": (name, example) for name in mixers.available() for example in mixers.info(name).examples
}
CASES = sorted(case for case, (name, example) in EXAMPLES.items()
               if mixers.info(name).causal_with(mixers.info(name).examples[example]))  # fmt: skip
NONCAUSAL_CASES = sorted(set(EXAMPLES) - set(CASES))


def make(case: str, **overrides) -> mixers.Mixer:
    """The registered example `case` ("name-example", or a bare name for its first example) at d_model D, with the
    linear ops' chunk_size CHUNK where the mixer runs one."""
    name, _, example = case.partition("-")
    entry = mixers.info(name)
    chunk = {"chunk_size": CHUNK} if "chunk_size" in mixers.keyword_arguments(entry.cls) else {}
    kwargs = {**chunk, **entry.examples[example or next(iter(entry.examples))], **overrides}
    return mixers.create(name, d_model=D, rngs=nnx.Rngs(0), **kwargs)


def inputs(seed: int = 0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, T, D), jnp.float32), jax.random.normal(kw, (B, T, D), jnp.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def decode(mixer: mixers.Mixer, x: jax.Array, max_len: int = T) -> jax.Array:
    """y [B, T, D] by feeding x one token at a time through init_cache + step."""
    y, _ = steps(mixer, x, mixer.init_cache(x.shape[0], max_len))
    return y


def test_every_registered_mixer_has_examples_and_metadata():
    assert {name for name, _ in EXAMPLES.values()} == set(mixers.available())
    assert all(make(case).causal for case in CASES) and not any(make(case).causal for case in NONCAUSAL_CASES)
    for name in mixers.available():
        entry = mixers.info(name)
        assert entry.name == name and entry.kind in mixers.KINDS and entry.paper and entry.causal == entry.cls.causal


@pytest.mark.parametrize("case", NONCAUSAL_CASES)
def test_noncausal_mixers_see_the_future_and_have_no_cache(case):
    mixer = make(case)
    x, _ = inputs(4)
    changed_last = x.at[:, -1].add(1.0)
    y, y_changed = nnx.jit(lambda m, a, b: (m(a), m(b)))(mixer, x, changed_last)
    assert rel_err(y_changed[:, :-1], y[:, :-1]) > 1e-6  # earlier outputs depend on the last token
    with pytest.raises(ValueError, match="non-causal mixer has no decode cache"):
        mixer.init_cache(B, T)


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_full_forward_and_gradient(case):
    """Full-sequence forward/gradient == token-by-token decode forward/gradient (an independent per-token path:
    recurrent op from a cached state, conv/KV caches, positions from the counter)."""
    mixer = make(case)
    x, w = inputs()
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    @nnx.jit
    def full_outputs_and_grad(m, x, w):
        def loss(m):
            y = m(x)
            return jnp.sum(y * w), y

        return nnx.value_and_grad(loss, has_aux=True)(m)

    @jax.jit
    def decode_outputs_and_grad(params, rest, x, w):
        def loss(p):
            y = decode(nnx.merge(graphdef, p, rest), x)
            return jnp.sum(y * w), y

        return jax.value_and_grad(loss, has_aux=True)(params)

    (loss_full, y_full), g_full = full_outputs_and_grad(mixer, x, w)
    (loss_dec, y_dec), g_dec = decode_outputs_and_grad(params, rest, x, w)

    assert y_full.shape == (B, T, D) and bool(jnp.all(jnp.isfinite(y_full)))
    assert rel_err(y_dec, y_full) < 1e-4, rel_err(y_dec, y_full)
    assert abs(float(loss_dec) - float(loss_full)) <= 1e-4 * max(1.0, abs(float(loss_full)))
    full_leaves = jax.tree_util.tree_leaves_with_path(g_full)
    dec_leaves = dict(jax.tree_util.tree_leaves_with_path(g_dec))
    assert len(full_leaves) == len(dec_leaves) > 0
    for path, g in full_leaves:
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(g))) > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
        err = rel_err(dec_leaves[path], g)
        assert err < 1e-3, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_matches_full_forward_and_stepped_cache(case):
    """prefill(first PROMPT tokens) + step(the rest) == the full forward; prefill's cache == the cache after
    stepping PROMPT tokens (PROMPT crosses a chunk boundary and wraps the sliding window's ring buffer)."""
    mixer = make(case)
    x, _ = inputs(3)

    @nnx.jit
    def run(m, x):
        y_prompt, prefilled = m.prefill(x[:, :PROMPT], m.init_cache(B, T))
        y_rest, _ = steps(m, x[:, PROMPT:], prefilled)
        _, stepped = steps(m, x[:, :PROMPT], m.init_cache(B, T))
        return m(x), jnp.concatenate([y_prompt, y_rest], axis=1), prefilled, stepped

    y_full, y_prefill, prefilled, stepped = run(mixer, x)
    assert rel_err(y_prefill, y_full) < 1e-5, rel_err(y_prefill, y_full)
    assert int(prefilled.pos) == PROMPT
    assert_same_leaves(prefilled, stepped, lambda got, want, name: rel_err(got, want) < 1e-5 or pytest.fail(
        f"{name}: {rel_err(got, want)}"))


def test_softmax_prefill_longer_than_the_cache_is_an_error():
    mixer = make("softmax-gqa")
    with pytest.raises(ValueError, match=r"^x: a prompt of 9 tokens does not fit a KV cache of max_len=8"):
        mixer.prefill(jnp.zeros((B, 9, D)), mixer.init_cache(B, 8))


@pytest.mark.parametrize("case", sorted(EXAMPLES))
def test_chunked_and_recurrent_impls_agree(case):
    x, _ = inputs(1)
    forward = jax.jit(lambda x: (make(case, impl="chunked")(x), make(case, impl="recurrent")(x)))
    chunked, recurrent = forward(x)
    assert rel_err(recurrent, chunked) < 1e-4, rel_err(recurrent, chunked)


def test_sliding_window_ring_buffer_size_and_full_window_equals_softmax():
    swa = make("sliding_window-ring")
    cache = swa.init_cache(B, 1000)
    assert cache.k.shape == (B, WINDOW, 1, D // 4) and cache.key_positions.shape == (WINDOW,)
    x, _ = inputs(2)
    wide = mixers.create("sliding_window", d_model=D, num_heads=4, num_kv_heads=1, window=T, rngs=nnx.Rngs(0))
    full = mixers.create("softmax", d_model=D, num_heads=4, num_kv_heads=1, rngs=nnx.Rngs(0))
    y_wide, y_full, y_swa = nnx.jit(lambda a, b, c, x: (a(x), b(x), c(x)))(wide, full, swa, x)
    assert rel_err(y_wide, y_full) < 1e-5
    assert rel_err(y_swa, y_full) > 1e-2  # the window matters


def test_recurrent_state_caches_have_documented_shapes():
    assert make("gla").init_cache(3, 5).state.shape == (3, 4, D // 8, D // 4)
    assert make("retnet").init_cache(3, 5).state.shape == (3, 4, D // 4, 2 * D // 4)
    la = make("linear_attn-elu1").init_cache(3, 5)
    assert la.state.shape == (3, 2, D // 2, D // 2 + 1) and la.conv is None
    taylor = make("linear_attn-taylor").init_cache(3, 5)
    assert taylor.state.shape == (3, 2, 1 + 8 + 64, D // 2 + 1)
    dn = make("deltanet").init_cache(3, 5)
    assert dn.state.shape == (3, 2, D // 2, D // 2) and dn.conv.shape == (3, 3, 3 * D)
    m2 = make("mamba2").init_cache(3, 5)
    assert m2.state.shape == (3, 4, 16, 2 * D // 4) and m2.conv.shape == (3, 3, 2 * D + 32)
    assert int(m2.pos) == 0


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(EXAMPLES))
def test_bad_input_shapes_name_the_argument(case):
    mixer = make(case)
    with pytest.raises(ValueError, match=r"^x "):
        mixer(jnp.zeros((B, D)))
    with pytest.raises(ValueError, match=r"^x last dim must equal d_model"):
        mixer(jnp.zeros((B, T, D + 1)))
    if not mixer.causal:
        return
    cache = mixer.init_cache(B, 4)
    with pytest.raises(ValueError, match=r"^x "):
        mixer.prefill(jnp.zeros((B, D)), cache)
    with pytest.raises(ValueError, match=r"^x_t "):
        mixer.step(jnp.zeros((B, 1, D)), cache)
    with pytest.raises(ValueError, match=r"^x_t last dim"):
        mixer.step(jnp.zeros((B, D - 1)), cache)


@pytest.mark.parametrize(
    "name, kwargs, arg",
    [
        ("softmax", dict(d_model=30, num_heads=4), "d_model"),
        ("softmax", dict(d_model=32, num_heads=4, num_kv_heads=3), "num_heads"),
        ("softmax", dict(d_model=32, num_heads=0), "num_heads"),
        ("softmax", dict(d_model=32, num_heads=4, impl="flash"), "impl"),
        ("softmax", dict(d_model=32, num_heads=4, block_size=0), "block_size"),
        ("gla", dict(d_model=32, num_heads=4, chunk_size=0), "chunk_size"),
        ("softmax", dict(d_model=32, num_heads=4, window=0), "window"),
        ("sliding_window", dict(d_model=32, num_heads=4, window=0), "window"),
        ("sliding_window", dict(d_model=32, num_heads=4, window=None), "window"),
        ("linear_attn", dict(d_model=32, num_heads=4, feature_map="cosformer"), "feature_map"),
        ("linear_attn", dict(d_model=32, num_heads=4, feature_map="elu1", num_features=4), "num_features"),
        ("retnet", dict(d_model=30, num_heads=6), "d_model / num_heads"),
        ("gla", dict(d_model=32, num_heads=4, expand_k=0.3), "expand_k"),
        ("deltanet", dict(d_model=30, num_heads=4), "expand_k"),
        ("gated_deltanet", dict(d_model=32, num_heads=4, key_dim=0), "key_dim"),
        ("mamba2", dict(d_model=32, num_heads=3), "expand"),
        ("mamba2", dict(d_model=32, num_heads=4, d_state=0), "d_state"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(name, kwargs, arg):
    with pytest.raises(ValueError) as info:
        mixers.create(name, **kwargs)
    assert str(info.value).startswith(arg), str(info.value)


def test_create_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        mixers.create("performer", d_model=32, num_heads=4)
    for known in mixers.available():
        assert known in str(info.value)


class ToyDecay(mixers.Mixer):
    """S_t = exp(-1/8) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t: a mixer defined outside seqlab, for the registry tests."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs | None = None, **kwargs):
        super().__init__(d_model, num_heads, **kwargs)
        self.head_dim = d_model // num_heads
        self._projections(self.head_dim, self.head_dim, self._rngs(rngs))

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.head_dim, self.head_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None):
        q, k, v = (self._heads(proj(x), self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        g = jnp.full(q.shape[:-1], -0.125, jnp.float32)
        o, state = ops.simple_gla(q, k, v, g, **self._op_kwargs(None if cache is None else cache.state))
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache


@pytest.fixture
def registry_copy(monkeypatch):
    """The registry as it is, restored after the test (registrations made by the test are dropped)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_a_mixer_defined_outside_seqlab_registers_and_is_created_by_name(registry_copy):
    mixers.register("toy_decay", kind="linear", paper="A toy", examples={"small": dict(num_heads=2)})(ToyDecay)
    assert "toy_decay" in mixers.available() and mixers.get("toy_decay") is ToyDecay
    entry = mixers.info("toy_decay")
    assert (entry.kind, entry.paper, entry.causal) == ("linear", "A toy", True)
    assert dict(entry.examples["small"]) == {"num_heads": 2}
    mixer = mixers.create("toy_decay", d_model=D, num_heads=2, chunk_size=CHUNK)
    assert isinstance(mixer, ToyDecay) and mixer.chunk_size == CHUNK
    x, _ = inputs()
    assert rel_err(decode(mixer, x), mixer(x)) < 1e-4
    mixers.register("toy_decay", kind="linear", paper="A toy")(ToyDecay)  # the same class again: accepted
    mixers.register("toy_bare")(ToyDecay)  # kind and paper are optional metadata
    assert (mixers.info("toy_bare").kind, mixers.info("toy_bare").paper) == (None, "")

    class Other(ToyDecay):
        pass

    with pytest.raises(ValueError, match="^name: mixer 'toy_decay' is already registered"):
        mixers.register("toy_decay", kind="linear", paper="A toy")(Other)
    assert mixers.get("toy_decay") is ToyDecay


def test_register_refuses_non_mixers_bad_metadata_and_unknown_example_arguments(registry_copy):
    with pytest.raises(TypeError, match="only a seqlab.mixers.Mixer subclass"):
        mixers.register("toy_dict", kind="linear", paper="A toy")(dict)
    with pytest.raises(ValueError, match="^kind must be None or one of"):
        mixers.register("toy_decay", kind="rnn", paper="A toy")
    with pytest.raises(ValueError, match="^examples: window not an argument of mixer 'toy_decay'"):
        mixers.register("toy_decay", kind="linear", paper="A toy", examples={"w": dict(window=4)})(ToyDecay)
    assert "toy_dict" not in mixers.available() and "toy_decay" not in mixers.available()


def test_keyword_arguments_follow_kwargs_up_the_hierarchy_in_declaration_order():
    params = mixers.keyword_arguments(mixers.SlidingWindowAttention)
    names = list(params)
    assert names[0] == "window" and params["window"].default == 64  # the subclass's own default first
    assert names.index("num_kv_heads") < names.index("impl") and "rngs" in names
    assert list(mixers.keyword_arguments(ToyDecay))[:2] == ["rngs", "impl"]


def test_create_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match="^expand_q: not an argument of mixer 'gla'"):
        mixers.create("gla", d_model=32, num_heads=4, expand_q=1)
    with pytest.raises(ValueError, match="^window: not an argument of mixer 'gla'"):
        mixers.create("gla", d_model=32, num_heads=4, window=8)
    # kwargs forwarded through a subclass's **kwargs are accepted
    assert mixers.create("sliding_window", d_model=32, num_heads=4, window=4, num_kv_heads=2).num_kv_heads == 2


# --------------------------------------------------------------------------------------------------------------
# Shared layers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("freqs", ["standard", "retnet"])
def test_rope_scores_depend_only_on_relative_position(interleaved, freqs):
    rope = RoPE(8, interleaved=interleaved, freqs=freqs)
    q, k = jax.random.normal(jax.random.key(3), (2, 1, 1, 1, 10))  # rotate 8 of 10 dims
    def score(pq, pk):
        rq = rope(q, jnp.array([pq]))
        rk = rope(k, jnp.array([pk]))
        return float(jnp.sum(rq * rk))
    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    np.testing.assert_array_equal(rope(q, jnp.array([7]))[..., 8:], q[..., 8:])


def test_taylor_and_hedgehog_feature_maps():
    q, k = jax.random.normal(jax.random.key(4), (2, 1, 3, 2, 16))
    taylor = make_feature_map("taylor", 16, num_heads=2, rngs=nnx.Rngs(0))
    s = jnp.sum(q * k, -1) / 4.0
    np.testing.assert_allclose(jnp.sum(taylor(q) * taylor(k), -1), 1 + s + s**2 / 2, rtol=1e-5)
    assert taylor.out_dim == 273 and taylor(q).shape[-1] == 273
    hedgehog = make_feature_map("hedgehog", 16, num_heads=2, num_features=6, rngs=nnx.Rngs(0))
    phi = hedgehog(q)
    assert phi.shape == (1, 3, 2, 12) and bool(jnp.all(phi > 0))
    np.testing.assert_allclose(jnp.sum(phi[..., :6], -1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(phi[..., 6:], -1), 1.0, rtol=1e-6)


def test_short_conv_is_causal_and_streams():
    conv = ShortConv(5, kernel_size=4, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 9, 5))

    @nnx.jit
    def run(conv, x):
        y, _ = conv(x)
        y_cut, _ = conv(x[:, :6])
        y_a, state = conv(x[:, :4])
        y_b, _ = conv(x[:, 4:], state)
        return y, y_cut, jnp.concatenate([y_a, y_b], 1)

    y, y_cut, y_streamed = run(conv, x)
    np.testing.assert_allclose(y[:, :6], y_cut, rtol=1e-6)  # no look-ahead
    np.testing.assert_allclose(y_streamed, y, rtol=1e-6, atol=1e-7)


def test_baseconv_matches_per_token_formula():
    """y_t = (W_p x_t + b_p) * (sum_i w_i x_{t-k+1+i} + b), zeros before the first token, as a plain loop."""
    mixer = make("baseconv")
    x, _ = inputs()
    w = np.asarray(mixer.conv.weight[...], np.float64)
    b = np.asarray(mixer.conv.bias[...], np.float64)
    wp = np.asarray(mixer.projection.kernel[...], np.float64)
    bp = np.asarray(mixer.projection.bias[...], np.float64)
    xs = np.asarray(x, np.float64)
    k = w.shape[0]
    expected = np.zeros_like(xs)
    for t in range(T):
        conv = b.copy()
        for i in range(k):
            s = t - k + 1 + i
            if s >= 0:
                conv = conv + w[i] * xs[:, s]
        expected[:, t] = (xs[:, t] @ wp + bp) * conv
    assert rel_err(mixer(x), expected) < 1e-5


def test_based_is_taylor_linear_attention():
    """Based's layer equals linear_attn with the Taylor map and the same weights."""
    based = make("based")
    reference = make("linear_attn-taylor", feature_dim=4)
    nnx.update(reference, nnx.state(based))
    x, _ = inputs()
    assert based.init_cache(1, 1).state.shape[2] == 1 + 4 + 10  # split-order state: 4 * 5 / 2 pairs
    assert rel_err(based(x), reference(x)) < 1e-6
