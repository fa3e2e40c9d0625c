"""The HGRN2 layer ("HGRN2: Gated Linear RNNs with State Expansion") against a per-token loop of its equations,
written here from the paper and fla's layer with the module's own projections (no seqlab code):

    q_t = swish(x_t W_q),  f_t = lb + (1 - lb) sigmoid(x_t W_f),  i_t = x_t W_i            (per head: K, K, V)
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ,   o_t = S_tᵀ q_t / sqrt(K)
    y_t = (RMSNorm(concat_h o_t) ⊙ w) W_o

Forward against the loop in float64 numpy (1e-5; measured <= 2.4e-7); gradients of every parameter and of x against
jax.grad of the same steps scanned in float32 (1e-4; measured <= 7.3e-7). The shared mixer checks (decode = forward, prefill, jit, grad, bad inputs,
sequence-parallel models) cover HGRN2 through its registry examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import layer_gradient_errors
from reference import rel_err
from seqlab import mixers

B, T, D = 2, 37, 32
FWD_TOL = 1e-5
GRAD_TOL = 1e-4
PARAMS = ("q_proj", "f_proj", "i_proj", "o_proj", "norm")


def layer_step(xp, params, S, x_t, *, heads: int, expand_ratio: int, lower_bound: float, eps: float = 1e-5):
    """One token of the layer in array module ``xp`` (numpy or jax.numpy): S [B, H, K, V], x_t [B, D] -> (S, y_t)."""
    batch, d_model = x_t.shape
    K, V = expand_ratio, d_model // heads
    sigmoid = lambda z: 1.0 / (1.0 + xp.exp(-z))  # noqa: E731
    q = (x_t @ params["q_proj"]) * sigmoid(x_t @ params["q_proj"])
    f = lower_bound + (1.0 - lower_bound) * sigmoid(x_t @ params["f_proj"])
    i = x_t @ params["i_proj"]
    q, f, i = q.reshape(batch, heads, K), f.reshape(batch, heads, K), i.reshape(batch, heads, V)
    S = f[..., None] * S + (1.0 - f)[..., None] * i[:, :, None, :]
    o = xp.einsum("bhkv,bhk->bhv", S, q).reshape(batch, d_model) / np.sqrt(K)
    normed = o / xp.sqrt(xp.mean(o * o, axis=-1, keepdims=True) + eps) * params["norm"]
    return S, normed @ params["o_proj"]


def zero_state(xp, x, heads: int, expand_ratio: int):
    return xp.zeros((x.shape[0], heads, expand_ratio, x.shape[-1] // heads), x.dtype)


def layer_loop(params, x, **kw):
    """The layer on x [B, T, D] as a float64 numpy loop over tokens."""
    S, ys = zero_state(np, x, kw["heads"], kw["expand_ratio"]), []
    for t in range(x.shape[1]):
        S, y = layer_step(np, params, S, x[:, t], **kw)
        ys.append(y)
    return np.stack(ys, axis=1)


def layer_scan(params, x, **kw):
    """The same steps as a float32 ``lax.scan`` (differentiable)."""
    step = lambda S, x_t: layer_step(jnp, params, S, x_t, **kw)  # noqa: E731
    _, ys = jax.lax.scan(step, zero_state(jnp, x, kw["heads"], kw["expand_ratio"]), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def parameters(module) -> dict[str, jax.Array]:
    """The module's projections [in, out] and norm weight, by name."""
    return {
        "q_proj": module.q_proj.kernel[...], "f_proj": module.f_proj.kernel[...], "i_proj": module.i_proj.kernel[...],
        "o_proj": module.o_proj.kernel[...], "norm": module.norm.weight[...],
    }


def loss_weights():
    return jnp.cos(jnp.arange(B * T * D, dtype=jnp.float32)).reshape(B, T, D)


CASES = [  # (num_heads, expand_ratio, forget_lower_bound)
    (4, None, 0.0),  # fla's defaults: K = V = d_model / H
    (2, 8, 0.5),  # state expansion K != V, a lower bound
    (1, 4, 0.9),  # one head, a high lower bound (long memory)
]


@pytest.mark.parametrize("heads, expand_ratio, lower_bound", CASES)
def test_layer_matches_per_token_equations(heads, expand_ratio, lower_bound):
    module = mixers.create("hgrn2", d_model=D, num_heads=heads, expand_ratio=expand_ratio,
                           forget_lower_bound=lower_bound, chunk_size=16, impl="chunked", rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    kw = dict(heads=heads, expand_ratio=module.expand_ratio, lower_bound=lower_bound)
    params = parameters(module)

    y = jax.jit(lambda m, x: m(x))(module, x)
    y_ref = layer_loop({n: np.asarray(p, np.float64) for n, p in params.items()}, np.asarray(x, np.float64), **kw)
    assert rel_err(y, y_ref) <= FWD_TOL

    scan = lambda p, x: layer_scan(p, x, **kw)  # noqa: E731
    errs = layer_gradient_errors(module, parameters, scan, x, loss_weights())
    assert set(errs) == {*PARAMS, "x"} and max(errs.values()) <= GRAD_TOL, errs


def test_sizes_follow_fla():
    """K = expand_ratio forget rows per head (d_model / H by default), V = d_model / H inputs; forget_dim = H K."""
    module = mixers.create("hgrn2", d_model=D, num_heads=2, expand_ratio=8)
    assert (module.expand_ratio, module.head_dim, module.forget_dim) == (8, 16, 16)
    assert module.init_cache(3, 10).state.shape == (3, 2, 8, 16)
    default = mixers.create("hgrn2", d_model=D, num_heads=4)
    assert (default.expand_ratio, default.head_dim, default.forget_dim) == (8, 8, 32)


@pytest.mark.parametrize("kwargs, name", [
    (dict(forget_lower_bound=1.0), "forget_lower_bound"),
    (dict(forget_lower_bound=-0.1), "forget_lower_bound"),
    (dict(forget_lower_bound=True), "forget_lower_bound"),
    (dict(expand_ratio=0), "expand_ratio"),
    (dict(expand_ratio=2.5), "expand_ratio"),
    (dict(num_heads=3), "d_model"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    kwargs = {"num_heads": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        mixers.create("hgrn2", d_model=D, **kwargs)
