"""The Mamba2 layer ("Transformers are SSMs", Dao & Gu 2024) against a per-token loop of mamba_ssm's layer,
written here with the module's own parameters (no seqlab code):

    [z, xBC, dt] = u_t W_in;  xBC <- SiLU(causal depthwise conv_4(xBC) + b);  xBC = [x (H, P), B (G, N), C (G, N)]
    Delta_h = softplus(dt_h + dt_bias_h),  A_h = -exp(A_log_h),  g = h // (H / G)  (the group of head h)
    S_h <- exp(Delta_h A_h) S_h + B_g (Delta_h x_h)ᵀ          S_h [N, P]
    y_h = S_hᵀ C_g + D_h x_h;   out = (RMSNorm(concat_h y_h * SiLU(z)) * w) W_out

Forward against the loop in float64 numpy (1e-5); gradients of every parameter and of the input against jax.grad
of the same steps scanned in float32 (1e-4). Cases cover shared B/C (ngroups 1), one group per head, and groups
of two heads. The shared mixer checks cover decode, prefill, jit and the sharded model via the registry examples.
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

B, T, D = 2, 29, 16
FWD_TOL = 1e-5
GRAD_TOL = 1e-4
PARAMS = ("in_proj", "conv_w", "conv_b", "A_log", "dt_bias", "D", "norm", "out_proj")


def layer_step(xp, p, carry, u_t, *, H: int, G: int, N: int, P: int, eps: float = 1e-5):
    """One token: carry = (S [B, H, N, P], conv window [B, 3, C]), u_t [B, D] -> (carry, out_t [B, D])."""
    S, window = carry
    d_inner = H * P
    proj = u_t @ p["in_proj"]
    z, xbc, dt = proj[:, :d_inner], proj[:, d_inner : 2 * d_inner + 2 * G * N], proj[:, 2 * d_inner + 2 * G * N :]
    window = xp.concatenate([window, xbc[:, None]], axis=1)  # the last 4 inputs, oldest first
    conv = (window * p["conv_w"][None]).sum(axis=1) + p["conv_b"]
    xbc = conv / (1.0 + xp.exp(-conv))
    x = xbc[:, :d_inner].reshape(-1, H, P)
    b = xbc[:, d_inner : d_inner + G * N].reshape(-1, G, N)
    c = xbc[:, d_inner + G * N :].reshape(-1, G, N)
    group = np.arange(H) // (H // G)
    b, c = b[:, group], c[:, group]  # [B, H, N]
    delta = xp.log1p(xp.exp(dt + p["dt_bias"]))  # softplus, [B, H]
    decay = xp.exp(delta * -xp.exp(p["A_log"]))
    S = decay[..., None, None] * S + b[..., :, None] * (delta[..., None] * x)[..., None, :]
    y = xp.einsum("bhnp,bhn->bhp", S, c) + p["D"][:, None] * x
    y = y.reshape(-1, d_inner) * (z / (1.0 + xp.exp(-z)))
    y = y / xp.sqrt(xp.mean(y * y, axis=-1, keepdims=True) + eps) * p["norm"]
    return (S, window[:, 1:]), y @ p["out_proj"]


def zero_carry(xp, u, *, H, G, N, P):
    return xp.zeros((u.shape[0], H, N, P), u.dtype), xp.zeros((u.shape[0], 3, H * P + 2 * G * N), u.dtype)


def layer_loop(p, u, **kw):
    """The layer on u [B, T, D] as a float64 numpy loop over tokens."""
    carry, ys = zero_carry(np, u, **kw), []
    for t in range(u.shape[1]):
        carry, y = layer_step(np, p, carry, u[:, t], **kw)
        ys.append(y)
    return np.stack(ys, axis=1)


def layer_scan(p, u, **kw):
    """The same steps as a float32 ``lax.scan`` (differentiable)."""
    _, ys = jax.lax.scan(lambda c, u_t: layer_step(jnp, p, c, u_t, **kw), zero_carry(jnp, u, **kw), jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def parameters(m) -> dict[str, jax.Array]:
    return {
        "in_proj": m.in_proj.kernel[...], "conv_w": m.conv.weight[...], "conv_b": m.conv.bias[...],
        "A_log": m.A_log[...], "dt_bias": m.dt_bias[...], "D": m.D[...], "norm": m.norm.weight[...],
        "out_proj": m.out_proj.kernel[...],
    }  # fmt: skip


def perturbed(module, seed: int = 5):
    """Moves D, the norm weight and the conv bias off their inits (ones, ones) so the checks see them."""
    keys = jax.random.split(jax.random.key(seed), 3)
    module.D[...] = 1.0 + 0.5 * jax.random.normal(keys[0], module.D.shape)
    module.norm.weight[...] = 1.0 + 0.3 * jax.random.normal(keys[1], module.norm.weight.shape)
    module.conv.bias[...] = 0.2 * jax.random.normal(keys[2], module.conv.bias.shape)
    return module


CASES = [  # (num_heads, ngroups, d_state, expand, chunk_size)
    (2, 1, 8, 2.0, 8),  # mamba_ssm's default: B and C shared by all heads
    (4, 4, 4, 1.0, 16),  # one group per head
    (4, 2, 8, 2.0, 32),  # groups of two heads; one chunk longer than T
]


@pytest.mark.parametrize("heads, groups, d_state, expand, chunk", CASES)
def test_layer_matches_per_token_equations(heads, groups, d_state, expand, chunk):
    module = perturbed(mixers.create("mamba2", d_model=D, num_heads=heads, ngroups=groups, d_state=d_state,
                                     expand=expand, chunk_size=chunk, impl="chunked", rngs=nnx.Rngs(2)))
    kw = dict(H=heads, G=groups, N=d_state, P=module.value_dim)
    u = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    params = parameters(module)

    y = jax.jit(lambda m, u: m(u))(module, u)
    y_ref = layer_loop({n: np.asarray(a, np.float64) for n, a in params.items()}, np.asarray(u, np.float64), **kw)
    assert rel_err(y, y_ref) <= FWD_TOL

    weights = jnp.sin(jnp.arange(B * T * D, dtype=jnp.float32)).reshape(B, T, D)
    scan = lambda p, u: layer_scan(p, u, **kw)  # noqa: E731
    errs = layer_gradient_errors(module, parameters, scan, u, weights)
    assert set(errs) == {*PARAMS, "x"} and max(errs.values()) <= GRAD_TOL, errs


def test_groups_change_the_projections_not_the_state():
    """ngroups widens in_proj and the conv by 2 (G - 1) N channels; the recurrent state stays [B, H, N, P]."""
    shared = mixers.create("mamba2", d_model=D, num_heads=4, d_state=8)
    grouped = mixers.create("mamba2", d_model=D, num_heads=4, d_state=8, ngroups=4)
    assert grouped.in_proj.kernel.shape[1] - shared.in_proj.kernel.shape[1] == 2 * 3 * 8
    assert grouped.conv.weight.shape[1] - shared.conv.weight.shape[1] == 2 * 3 * 8
    assert grouped.init_cache(3, 7).state.shape == shared.init_cache(3, 7).state.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("ngroups", [0, 3, 2.0])
def test_bad_ngroups_names_the_argument(ngroups):
    with pytest.raises(ValueError, match="ngroups"):
        mixers.create("mamba2", d_model=D, num_heads=4, ngroups=ngroups)
