"""Helpers shared by several test files of the token mixers, the positional layers and the distillation losses.

Imported as a plain module (`import mixer_references`), like `reference`. Each family's own reference formula is in
that family's test file; what is here is used by more than one file:

* inputs and small utilities (float64 copies, a token-by-token decode, "the error names the argument");
* pieces of the per-token references, written once over the array module `xp` (numpy in float64 for forwards,
  jax.numpy in float32 for gradients): loops over tokens, head reshapes, activations, causal conv, layer norm,
  RoPE, and the positional encodings URPE, LRPE and MD-LRPE (their layers' tests and the mixers using them);
* the drivers that compare a mixer with its reference: forward and gradients over the engine forms, and decode /
  prefill against the full forward, one set per group of files that shares it (named in each section).

Tolerances (relative error over whole tensors): forward 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

from seqlab.mixers import aux_losses
from seqlab.mixers.hybrid.liger import LigerAttention
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
B = 2  # the batch of the inputs made here (mixer_input, distill_inputs)


# --------------------------------------------------------------------------------------------------------------
# Inputs and utilities
# --------------------------------------------------------------------------------------------------------------


def inputs(seed: int, shape: tuple[int, ...]):
    """(x, w): an input and a loss weight of `shape`, N(0, 1) float32 from two keys split from `seed`."""
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape, jnp.float32), jax.random.normal(kw, shape, jnp.float32)


def f64(tree):
    """Every array of a pytree (or one array) as a float64 numpy array."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def perturbed_params(mixer: nnx.Module, seed: int = 1) -> dict:
    """The mixer's parameters as a pure nested dict, each moved by 0.1·N(0, 1)."""
    pure = nnx.to_pure_dict(nnx.state(mixer, nnx.Param))
    leaves, treedef = jax.tree.flatten(pure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


def assert_layer_matches(mixer: nnx.Module, formula, shape: tuple[int, ...], *, param_grads: tuple[str, ...] = (),
                         forward_tol: float = 1e-5, grad_tol: float = 1e-4) -> None:
    """The mixer (its parameters perturbed) against ``formula(xp, params, x)``, a test's own statement of the
    layer: forward in float64 numpy (forward_tol); the gradients of sum(y·w) in x and in the parameters named
    ``param_grads`` against jax.grad of the formula in jnp at full matmul precision (grad_tol)."""
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, w = inputs(0, shape)
    y = nnx.jit(lambda m, a: m(a))(mixer, x)
    assert rel_err(y, formula(np, f64(params), np.asarray(x, np.float64))) <= forward_tol
    dx, dparams = nnx.jit(nnx.grad(lambda m, a: jnp.sum(m(a) * w), argnums=(1, 0)))(mixer, x)
    params = jax.tree.map(jnp.asarray, params)
    with jax.default_matmul_precision("highest"):
        want_dx = jax.jit(jax.grad(lambda a: jnp.sum(formula(jnp, params, a) * w)))(x)
        want_dp = jax.jit(jax.grad(lambda p: jnp.sum(formula(jnp, p, x) * w)))(params) if param_grads else {}
    assert rel_err(dx, want_dx) <= grad_tol
    for name in param_grads:
        got, want = jax.tree.leaves(nnx.to_pure_dict(dparams)[name]), jax.tree.leaves(want_dp[name])
        assert all(rel_err(a, b) <= grad_tol for a, b in zip(got, want)), name


def steps(mixer, x, cache):
    """(y [B, T, D], cache) feeding x one token at a time through `step` (a scan over time)."""

    def body(c, x_t):
        y_t, c = mixer.step(x_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


def assert_same_leaves(got_tree, want_tree, close) -> None:
    """Two caches leaf by leaf: the same shape and dtype, integer leaves equal, float leaves `close(got, want,
    name)` (an assertion)."""
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_tree), jax.tree_util.tree_leaves(want_tree)):
        name = jax.tree_util.keystr(path)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if jnp.issubdtype(want.dtype, jnp.integer):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            close(got, want, name)


def rel_close(tol: float):
    """A `close` for `assert_same_leaves`: relative error (reference.rel_err) at most tol."""

    def close(got, want, name):
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))

    return close


@nnx.jit
def aux_losses_of(mixer, x) -> dict:
    """Jitted: the auxiliary losses (``seqlab.mixers.aux_losses``) the call mixer(x) adds, by name."""
    with aux_losses.collect() as losses:
        mixer(x)
    return losses


def prompt_then_steps(mixer, x, prompt: int):
    """Jitted: (prefill(x[:, :prompt]) + token-by-token decode of the rest [B, T, D], the full forward, the cache
    after all T tokens), from init_cache(B, T)."""

    @nnx.jit
    def run(m, x):
        y_prompt, cache = m.prefill(x[:, :prompt], m.init_cache(*x.shape[:2]))
        y_rest, cache = steps(m, x[:, prompt:], cache)
        return jnp.concatenate([y_prompt, y_rest], axis=1), m(x), cache

    return run(mixer, x)


def decode_paths(mixer, x, prompt: int):
    """The decode paths of a causal mixer over x [B, T, D], jitted: (full forward, token-by-token decode,
    prefill(x[:, :prompt]) + token-by-token decode of the rest, caches) with the caches after stepping all of x
    ("stepped_all"), after the prefill ("prefilled"), after the prefill and the rest ("continued") and after stepping
    the prompt ("stepped"). Every path starts from init_cache(B, T)."""
    batch, length = x.shape[:2]

    @nnx.jit
    def run(m, x):
        y_steps, stepped_all = steps(m, x, m.init_cache(batch, length))
        y_prompt, prefilled = m.prefill(x[:, :prompt], m.init_cache(batch, length))
        y_rest, continued = steps(m, x[:, prompt:], prefilled)
        _, stepped = steps(m, x[:, :prompt], m.init_cache(batch, length))
        caches = dict(stepped_all=stepped_all, prefilled=prefilled, continued=continued, stepped=stepped)
        return m(x), y_steps, jnp.concatenate([y_prompt, y_rest], axis=1), caches

    return run(mixer, x)


def raises_naming(build, arg: str):
    """build() raises a ValueError whose message starts with the argument's name."""
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(arg), str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Pieces of the per-token references (xp = numpy or jax.numpy)
# --------------------------------------------------------------------------------------------------------------


def sigmoid(xp, a):
    return 1.0 / (1.0 + xp.exp(-a))


def silu(xp, a):
    return a * sigmoid(xp, a)


def softmax(xp, z, axis=-1):
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm(xp, x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * scale + bias


def linear(x, layer: dict):
    """x @ kernel (+ bias) of a layer given as its pure parameter dict."""
    y = x @ layer["kernel"]
    return y + layer["bias"] if "bias" in layer else y


def heads(x, num_heads: int):
    """[..., num_heads * d] -> [..., num_heads, d]."""
    return x.reshape(*x.shape[:-1], num_heads, -1)


def merge(x):
    """[..., H, d] -> [..., H * d]."""
    return x.reshape(*x.shape[:-2], -1)


def over_tokens(xp, step, carry, xs):
    """The per-token loop: step(carry, x_t) -> (carry, y_t) over axis 1 of xs [B, T, ...] (an array or a tuple of
    arrays); ys stacked on axis 1. A Python loop in numpy; lax.scan in jax.numpy (one compiled body)."""
    xs = xs if isinstance(xs, tuple) else (xs,)
    if xp is np:
        ys = []
        for t in range(xs[0].shape[1]):
            carry, y = step(carry, *(a[:, t] for a in xs))
            ys.append(y)
        return np.stack(ys, axis=1)
    _, ys = jax.lax.scan(lambda c, x_t: step(c, *x_t), carry, tuple(jnp.moveaxis(a, 1, 0) for a in xs))
    return jnp.moveaxis(ys, 0, 1)


def per_token(xp, step, carry, xs):
    """Run step(carry, x_t) -> (carry, y_t) over the time-major arrays xs ([T, ...] each) and stack y: [B, T, ...].
    numpy: a plain Python loop over t; jax.numpy: the same step under lax.scan (a small program to differentiate)."""
    if xp is np:
        ys = []
        for t in range(len(xs[0])):
            carry, y = step(carry, [a[t] for a in xs])
            ys.append(y)
        return np.stack(ys, axis=1)
    _, ys = jax.lax.scan(lambda c, x_t: step(c, list(x_t)), carry, [jnp.asarray(a) for a in xs])
    return jnp.moveaxis(ys, 0, 1)


def time_major(xp, *arrays):
    return [xp.moveaxis(a, 1, 0) for a in arrays]


def loop(xp, step, carry, length):
    """Outputs of `carry, out = step(carry, t)` for t = 0..length-1, stacked on axis 1: a Python loop for numpy,
    `lax.scan` for jax.numpy (the same per-token step, traced once)."""
    if xp is np:
        outs = []
        for t in range(length):
            carry, out = step(carry, t)
            outs.append(out)
        return np.stack(outs, axis=1)
    _, outs = jax.lax.scan(step, carry, jnp.arange(length))
    return jnp.moveaxis(outs, 0, 1)


def causal_conv(xp, x, weight, bias=None):
    """y_t = sum_i w_i * x_{t-K+1+i} (+ b), zeros before the first token; x [B, T, ...C], weight [K, C]."""
    size = weight.shape[0]
    taps = weight.reshape(size, *[1] * (x.ndim - 3), weight.shape[-1])  # broadcast over the axes between T and C

    def step(previous, x_t):  # previous: x_{t-K+1} .. x_{t-1}
        window = xp.concatenate([previous, x_t[:, None]], axis=1)
        y = (window * taps).sum(axis=1)
        return window[:, 1:], y if bias is None else y + bias

    return over_tokens(xp, step, xp.zeros_like(x[:, : size - 1]), x)


def depthwise_same(xp, v, conv, grid):
    """Zero-padded centred depthwise convolution of v [B, N, C] (kernel [K, 1, C] or [K, K, 1, C], bias [C])."""
    kernel = conv["kernel"]
    size, half = kernel.shape[0], kernel.shape[0] // 2
    if grid is None:
        padded = xp.pad(v, ((0, 0), (half, half), (0, 0)))
        return sum(padded[:, i : i + v.shape[1]] * kernel[i, 0] for i in range(size)) + conv["bias"]
    image = xp.pad(v.reshape(v.shape[0], *grid, -1), ((0, 0), (half, half), (half, half), (0, 0)))
    taps = sum(image[:, i : i + grid[0], j : j + grid[1]] * kernel[i, j, 0] for i in range(size) for j in range(size))
    return (taps + conv["bias"]).reshape(v.shape)


def rope(xp, x, positions, base=10000.0):
    """Half-split rotary embedding of [B, T, H, d] at the positions [T] (numpy ints)."""
    d = x.shape[-1]
    angle = np.asarray(positions)[:, None] * base ** (-np.arange(d // 2) * 2.0 / d)  # [T, d/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return xp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def np_rope(x, base=10000.0):
    """Half-split rotary embedding of [B, T, H, d] at positions 0..T-1 (numpy)."""
    return rope(np, x, np.arange(x.shape[1]), base)


# --------------------------------------------------------------------------------------------------------------
# Positional encodings (tests/mixers/test_positional_layers.py and the TransNormer, TNL and LightNet tests)
# --------------------------------------------------------------------------------------------------------------


def urpe_token(xp, x, t, theta, u):
    """x [..., d] at position t: Householder reflection by u, then rotation of the pairs (2i, 2i+1) by t theta_i."""
    y = x - 2.0 * (x * u).sum(axis=-1, keepdims=True) * u
    even, odd = y[..., 0::2], y[..., 1::2]
    c, s = xp.cos(t * theta), xp.sin(t * theta)
    return xp.stack([even * c - odd * s, even * s + odd * c], axis=-1).reshape(x.shape)


def lrpe_token(xp, x, t, theta):
    """x [B, H, d] at position t, theta [H, d] -> [B, H, 2d]."""
    return xp.concatenate([x * xp.cos(theta * t), x * xp.sin(theta * t)], axis=-1)


def np_lrpe_angles(positions, num_heads, head_dim, kind, base=10000.0):
    """MD-LRPE's Θ [T, H, n]: θ_{h,j} = base^(-2 (h n + j) / (H d)), axis a uses the head's first n/m, times p_a."""
    n = head_dim // 2 if kind == "rotate" else head_dim
    m = positions.shape[1]
    theta = np.array([[base ** (-2.0 * (h * n + j) / (num_heads * head_dim)) for j in range(n)]
                      for h in range(num_heads)])  # fmt: skip
    out = np.zeros((positions.shape[0], num_heads, n))
    for t, p in enumerate(np.asarray(positions, np.float64)):
        out[t] = np.concatenate([p[a] * theta[:, : n // m] for a in range(m)], axis=-1)
    return out


# --------------------------------------------------------------------------------------------------------------
# InLine, SLAB and LinFusion (tests/mixers/test_inline.py, test_slab.py, test_linfusion.py)
# --------------------------------------------------------------------------------------------------------------


def loss_and_grads(forward, params, x, w):
    """(y, d loss / d (params, x)) for loss = sum(forward(params, x) * w), jitted."""

    def loss(params, x):
        y = forward(params, x)
        return jnp.sum(y * w), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def check_forward_and_gradients(mixer, params, x, w, y64, ref_grads):
    """The mixer (one form) at `params`: output == y64, and every gradient (parameters and x) is nonzero and equals
    the reference's."""
    graphdef, _, rest = nnx.split(mixer, nnx.Param, ...)
    (_, y), grads = loss_and_grads(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x, w)
    assert rel_err(y, y64) <= FWD_TOL, rel_err(y, y64)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) > 0
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
        assert rel_err(g, flat_ref[path]) <= GRAD_TOL, (jax.tree_util.keystr(path), rel_err(g, flat_ref[path]))


class ReferenceCases:
    """One test file's mixers by case name, each a (constructor, reference) pair; reference(xp, params, x) reads the
    mixer's pure parameter dict.

    `make(case, **kw)` builds the mixer (rngs=nnx.Rngs(0)). `check_forward_and_gradients(case, impl, chunk_size)`
    compares that form with the reference at the mixer's parameters moved away from their init (`perturbed_params`),
    on inputs(0, shape): the float64 numpy forward and the float32 jnp gradients are computed once per case and
    shared by the forms. `forms()` parametrises a test over every case in every form of FORMS (chunked at two chunk
    sizes, recurrent, parallel)."""

    FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 16), ("parallel", 16)]  # (impl, chunk_size)

    def __init__(self, cases: dict, shape: tuple[int, ...]):
        self.cases, self.shape, self._results = cases, shape, {}

    def names(self) -> list[str]:
        return sorted(self.cases)

    def forms(self) -> list:
        """pytest params (case, (impl, chunk_size)) for every case and form, with ids "case-impl-chunk_size"."""
        return [pytest.param(case, (impl, chunk), id=f"{case}-{impl}-{chunk}")
                for case in self.names() for impl, chunk in self.FORMS]  # fmt: skip

    def make(self, case: str, **kw) -> nnx.Module:
        return self.cases[case][0](rngs=nnx.Rngs(0), **kw)

    def _reference_results(self, case: str):
        """(params, x, w, numpy float64 forward, jnp float32 gradients)."""
        if case not in self._results:
            reference = self.cases[case][1]
            params = perturbed_params(self.make(case))
            x, w = inputs(0, self.shape)
            y64 = reference(np, f64(params), np.asarray(x, np.float64))
            (_, _), grads = loss_and_grads(lambda p, x: reference(jnp, p, x), params, x, w)
            self._results[case] = (params, x, w, y64, grads)
        return self._results[case]

    def check_forward_and_gradients(self, case: str, impl: str, chunk_size: int):
        mixer = self.make(case, impl=impl, chunk_size=chunk_size)
        check_forward_and_gradients(mixer, *self._reference_results(case))

    def check_bf16(self, case: str, tol: float = 3e-2):
        """`check_bf16` of the case's mixer at its parameters moved by `perturbed_params`, on inputs(0, shape)."""
        mixer = self.make(case, dtype=jnp.bfloat16)
        check_bf16(mixer, perturbed_params(mixer), inputs(0, self.shape)[0], self.cases[case][1], tol)


def check_bf16(mixer, params, x, reference, tol: float = 3e-2):
    """The mixer built with dtype=jnp.bfloat16, at float32 parameters `params`, returns finite bfloat16 outputs on
    x within `tol` of reference(np, params, x) in float64."""
    nnx.update(mixer, params)
    y = nnx.jit(lambda m, a: m(a))(mixer, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    expected = reference(np, f64(params), np.asarray(x, np.float64))
    assert rel_err(y, expected) <= tol, rel_err(y, expected)


def check_decode_and_prefill(mixer, x, prompt: int):
    """Token-by-token decode and prefill(x[:, :prompt]) + decode == the full forward; both end at pos T with the
    same float32 state."""
    y_full, y_steps, y_prefill, caches = decode_paths(mixer, x, prompt)
    assert rel_err(y_steps, y_full) <= FWD_TOL, rel_err(y_steps, y_full)
    assert rel_err(y_prefill, y_full) <= FWD_TOL, rel_err(y_prefill, y_full)
    stepped, continued = caches["stepped_all"], caches["continued"]
    assert int(stepped.pos) == int(continued.pos) == x.shape[1]
    assert rel_err(continued.state, stepped.state) <= FWD_TOL
    assert stepped.state.dtype == jnp.float32


def check_non_causal_has_no_cache(mixer, batch: int):
    assert mixer.causal is False
    with pytest.raises(ValueError, match="non-causal"):
        mixer.init_cache(batch, 8)


# --------------------------------------------------------------------------------------------------------------
# LightNet, Flowformer and DSF (tests/mixers/test_lightnet.py, test_flowformer.py, test_dsf.py)
# --------------------------------------------------------------------------------------------------------------

QKVO_PARAMS = {
    "wq": ("q_proj", "kernel"), "bq": ("q_proj", "bias"), "wk": ("k_proj", "kernel"), "bk": ("k_proj", "bias"),
    "wv": ("v_proj", "kernel"), "bv": ("v_proj", "bias"), "wo": ("o_proj", "kernel"), "bo": ("o_proj", "bias"),
}  # fmt: skip  # reference name: (layer, parameter) of the q, k, v and output projections with biases


def weights(module, names: dict[str, tuple[str, str]], to) -> dict:
    """{name: to(module.<layer>.<param>)}: the parameters the references read."""
    return {name: to(getattr(getattr(module, layer), param)[...]) for name, (layer, param) in names.items()}


def mixer_loss(mixer, x, w):
    y = mixer(x)
    return jnp.sum(y * w), y


def _value_and_grad(graphdef, params, x, w):
    """((sum(y * w), y), d/dparams) of the mixer (graphdef, params), jitted."""
    return jax.jit(jax.value_and_grad(lambda p: mixer_loss(nnx.merge(graphdef, p), x, w), has_aux=True))(params)


def layer_gradient_errors(module, parameters, scan, x, w) -> dict[str, float]:
    """Relative errors of the gradients of sum(module(x) * w), per parameter (parameters(module) -> {name: array})
    and for the input ("x"), against jax.grad of sum(scan(parameters, x) * w), the per-token loop as a scan."""
    graphdef, state = nnx.split(module)
    module_loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) * w)  # noqa: E731
    d_state, dx = jax.jit(jax.grad(module_loss, argnums=(0, 1)))(state, x)
    grads = parameters(nnx.merge(graphdef, d_state))
    loop_loss = lambda p, x: jnp.sum(scan(p, x) * w)  # noqa: E731
    grads_ref, dx_ref = jax.jit(jax.grad(loop_loss, argnums=(0, 1)))(parameters(module), x)
    assert set(grads) == set(grads_ref)
    return {n: rel_err(grads[n], grads_ref[n]) for n in grads} | {"x": rel_err(dx, dx_ref)}


def check_forward_and_grad(make, reference, names, x, w, forms):
    """For every form: the mixer's output == the float64 numpy reference, and its parameter gradients of
    sum(y * w) == those of the float32 jnp reference. make(impl, chunk_size) builds the mixer (same parameters)."""
    base = make("chunked", 8)
    want = reference(weights(base, names, f64), f64(x), np)
    graphdef, params = nnx.split(base, nnx.Param)

    def reference_loss(p):  # differentiated through the module's parameters: the same tree as the mixer's gradient
        return jnp.sum(reference(weights(nnx.merge(graphdef, p), names, lambda a: a), x, jnp) * w)

    g_ref = jax.jit(jax.grad(reference_loss))(params)
    for impl, chunk in forms:
        mixer = make(impl, chunk)
        gdef, prm = nnx.split(mixer, nnx.Param)

        (_, y), g = _value_and_grad(gdef, prm, x, w)
        assert rel_err(y, want) < FWD_TOL, (impl, chunk, rel_err(y, want))
        got = dict(jax.tree_util.tree_leaves_with_path(g))
        ref_leaves = jax.tree_util.tree_leaves_with_path(g_ref)
        assert len(ref_leaves) == len(got) > 0
        for path, g_want in ref_leaves:
            assert bool(jnp.all(jnp.isfinite(got[path]))), (impl, jax.tree_util.keystr(path))
            err = rel_err(got[path], g_want)
            assert err < GRAD_TOL, (impl, chunk, jax.tree_util.keystr(path), err)


def decode_matches_forward(mixer, x, splits: tuple[int, ...]):
    """y of the full forward vs. prefill(x[:, :s0]) -> prefill continuing from that cache (x[:, s0:s1]) -> steps
    over the rest; returns (full y, incremental y, final cache)."""

    @jax.jit
    def incremental(x):
        cache = mixer.init_cache(x.shape[0], x.shape[1])
        pieces, start = [], 0
        for stop in splits:
            y, cache = mixer.prefill(x[:, start:stop], cache)
            pieces.append(y)
            start = stop

        def body(c, x_t):
            y_t, c = mixer.step(x_t, c)
            return c, y_t

        cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x[:, start:], 0, 1))
        return jnp.concatenate(pieces + [jnp.swapaxes(ys, 0, 1)], axis=1), cache

    y_inc, cache = incremental(x)
    return jax.jit(mixer.__call__)(x), y_inc, cache


# --------------------------------------------------------------------------------------------------------------
# TransNormer and TNL (tests/mixers/test_transnormer.py, test_tnl.py)
# --------------------------------------------------------------------------------------------------------------


def pick(state, paths):
    """The parameters by reference name from a module's state (or its gradients): {name: state[module][leaf]}."""
    return {name: state[module][leaf][...] for name, (module, leaf) in paths.items() if module in state}


def mixer_params(mixer, paths):
    """The mixer's parameters by reference name (plus URPE's fixed Householder vector), as float32 arrays."""
    params = pick(nnx.state(mixer, nnx.Param), paths)
    if getattr(mixer, "urpe", None) is not None:
        params["u"] = mixer.urpe.householder[...]
    return params


@nnx.jit
def mixer_value_and_grads(mixer, x, w):
    def loss(m):
        y = m(x)
        return jnp.sum(y * w), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(mixer)
    return y, grads


def check_forms(mixer, forms, paths, reference, x, w):
    """For every (attribute overrides) in forms: forward == numpy reference, parameter gradients == jax.grad of the
    jnp reference (both references from the mixer's own parameters)."""
    params = mixer_params(mixer, paths)
    want = reference(np, f64(params), f64(x))
    trainable = {n: a for n, a in params.items() if n != "u"}
    fixed = {n: a for n, a in params.items() if n == "u"}
    ref_grads = jax.jit(jax.grad(lambda p: jnp.sum(reference(jnp, {**p, **fixed}, x) * w)))(trainable)
    for form in forms:
        for attr, value in form.items():
            setattr(mixer, attr, value)
        y, grads = mixer_value_and_grads(mixer, x, w)
        assert rel_err(y, want) <= FWD_TOL, (form, rel_err(y, want))
        got = pick(grads, paths)
        assert set(got) == set(ref_grads), (form, sorted(got), sorted(ref_grads))
        for name, g in got.items():
            assert rel_err(g, ref_grads[name]) <= GRAD_TOL, (form, name, rel_err(g, ref_grads[name]))


def check_decode_prefill_and_cache(mixer, x, prompt: int):
    """Token-by-token decode and prefill(x[:, :prompt]) + decode == the full forward; prefill's cache == the cache
    after stepping the prompt, leaf by leaf."""
    y_full, y_steps, y_prefill, caches = decode_paths(mixer, x, prompt)
    assert rel_err(y_steps, y_full) <= FWD_TOL, rel_err(y_steps, y_full)
    assert rel_err(y_prefill, y_full) <= FWD_TOL, rel_err(y_prefill, y_full)
    prefilled, stepped = caches["prefilled"], caches["stepped"]
    assert int(prefilled.pos) == prompt and int(caches["stepped_all"].pos) == x.shape[1]
    assert_same_leaves(prefilled, stepped, rel_close(FWD_TOL))


# --------------------------------------------------------------------------------------------------------------
# LoLCATs and Liger (tests/mixers/test_lolcats.py, test_liger.py)
# --------------------------------------------------------------------------------------------------------------

D_MODEL, T_MIX, PROMPT = 32, 21, 11  # the mixers' width, sequence length and decode prompt


def mixer_input(seed: int = 0, length: int = T_MIX):
    return jax.random.normal(jax.random.key(seed), (B, length, D_MODEL), jnp.float32)


def liger(**kw) -> LigerAttention:
    args = dict(num_heads=4, num_kv_heads=2, window=4, chunk_size=8, rngs=nnx.Rngs(0))
    return LigerAttention(D_MODEL, **{**args, **kw})


def trained_softmax() -> SoftmaxAttention:
    return SoftmaxAttention(D_MODEL, 4, num_kv_heads=2, use_bias=True, rope_base=500.0, rngs=nnx.Rngs(7))


def np_projections(mixer, x):
    """q [B, T, H, d], k, v [B, T, H_kv, d] (pre-RoPE) from the mixer's kernels (and biases)."""
    x = np.asarray(x, np.float64)

    def project(name):
        layer = getattr(mixer, name)
        y = x @ f64(layer.kernel[...])
        return (y if layer.bias is None else y + f64(layer.bias[...])).reshape(*x.shape[:2], -1, mixer.head_dim)

    return project("q_proj"), project("k_proj"), project("v_proj")


def np_output(mixer, o):
    return o.reshape(*o.shape[:2], -1) @ f64(mixer.o_proj.kernel[...])


def check_decode_prefill_and_cache_allclose(mixer, x):
    """Token by token decode == the training path; prefill(PROMPT tokens) + decode == the training path, and the
    prefilled cache == the cache after stepping the same tokens (integers exactly, floats to rtol 1e-5)."""
    y_full, y_decode, y_prefill, caches = decode_paths(mixer, x, PROMPT)
    assert rel_err(y_decode, y_full) < FWD_TOL and rel_err(y_prefill, y_full) < FWD_TOL
    prefilled, stepped = caches["prefilled"], caches["stepped"]
    assert int(prefilled.pos) == PROMPT
    assert_same_leaves(prefilled, stepped,
                       lambda got, want, name: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name))


def check_bad_inputs_name_the_argument(mixer):
    with pytest.raises(ValueError, match=r"^x "):
        mixer(jnp.zeros((B, D_MODEL)))
    with pytest.raises(ValueError, match=r"^x_t last dim"):
        mixer.step(jnp.zeros((B, D_MODEL - 1)), mixer.init_cache(B, 4))


# --------------------------------------------------------------------------------------------------------------
# Attention distillation (tests/training/test_distill.py, tests/mixers/test_feature_maps.py)
# --------------------------------------------------------------------------------------------------------------

TD, HD, DD, FD = 9, 2, 8, 5  # time, heads, head dim, feature count for the distillation tests


def distill_inputs(rng, t=TD):
    """Teacher queries and keys [B, t, HD, DD] and positive student features [B, t, HD, FD]."""
    q = rng.normal(size=(B, t, HD, DD)).astype(np.float32) * 2.0
    k = rng.normal(size=(B, t, HD, DD)).astype(np.float32)
    phi_q = rng.uniform(0.1, 1.0, size=(B, t, HD, FD)).astype(np.float32)
    phi_k = rng.uniform(0.1, 1.0, size=(B, t, HD, FD)).astype(np.float32)
    return q, k, phi_q, phi_k
