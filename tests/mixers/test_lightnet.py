"""LightNet (+ MD-LRPE) against an independent per-token reference written here from the equations (families.md
§12), and LightNet and Flowformer under sequence parallelism.

The reference reads only the mixer's parameters. It is written once over an array module `xp`: with numpy in
float64 it is the forward ground truth (rel. err <= 1e-5); with jax.numpy in float32 it is differentiated for the
gradient check (rel. err <= 1e-4 on every parameter). It is the ADDITIVE form (S'_t = Σ e^{k_s} v_sᵀ divided by
Z_t = Σ e^{k_s}), so it checks the gated rewrite the mixer runs on `ops.gla`. Every form (chunked with two chunk
sizes, recurrent, parallel) is checked, with T = 21 (not a multiple of either chunk size) and H = 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    check_forward_and_grad,
    decode_matches_forward,
    f64,
    inputs,
    mixer_loss,
    np_lrpe_angles,
    per_token,
    silu,
    time_major,
    weights,
)
from reference import rel_err

from seqlab.mixers.linear.lightnet import LightNet

B, T, D, H = 2, 21, 16, 2
F_DIM, LOW_RANK = 8, 4
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 8), ("parallel", 8)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LIGHTNET_PARAMS = {
    "wq": ("q_proj", "kernel"), "wk": ("k_proj", "kernel"), "wv": ("v_proj", "kernel"),
    "wg1": ("g_down", "kernel"), "wg2": ("g_up", "kernel"), "norm": ("norm", "weight"), "wo": ("o_proj", "kernel"),
}  # fmt: skip


def lightnet_reference(lrpe=None, grid=None):
    """The LightNet layer per token. No LRPE or cosine LRPE: the additive form S'_t = S'_{t-1} + e^{k_t} v_tᵀ,
    Z_t = Z_{t-1} + e^{k_t}, S_t = S'_t / Z_t (cosine: each key feature is the pair e^{k} [cos Θ, sin Θ], both
    divided by the feature's Z). Rotate LRPE mixes features with different normalisers, so it has no additive
    form: its reference is the gated recurrence S_t = (Z_{t-1}/Z_t) S_{t-1} + R_t(e^{k_t}/Z_t) v_tᵀ."""
    V = D // H
    index = np.arange(T)
    pos = index[:, None] if grid is None else np.stack([index // grid[1], index % grid[1]], -1)
    angles = None if lrpe is None else np_lrpe_angles(pos, H, F_DIM, lrpe)  # [T, H, n]

    def rotate(xp, a, ang):  # a [B, H, F] by angles [H, F/2] on adjacent pairs
        c, s = xp.cos(ang), xp.sin(ang)
        even, odd = a[..., 0::2], a[..., 1::2]
        return xp.stack([even * c - odd * s, even * s + odd * c], axis=-1).reshape(a.shape)

    def run(p, x, xp):
        q = silu(xp, x @ p["wq"]).reshape(B, T, H, F_DIM)
        k = (x @ p["wk"]).reshape(B, T, H, F_DIM)
        v = (x @ p["wv"]).reshape(B, T, H, V)
        width = 2 * F_DIM if lrpe == "cosine" else F_DIM
        carry = (xp.zeros((B, H, width, V)), xp.zeros((B, H, F_DIM)), xp.zeros((B, H, width, V)))
        ang = np.zeros((T, H, F_DIM)) if angles is None else angles

        def step(carry, token):
            num, z_prev, state = carry
            q_t, k_t, v_t, ang_t = token
            e = xp.exp(k_t)
            z = z_prev + e
            if lrpe == "rotate":
                ratio = xp.where(z_prev > 0, z_prev / z, 0.0)
                state = ratio[..., None] * state + rotate(xp, e / z, ang_t)[..., None] * v_t[..., None, :]
                q_t = rotate(xp, q_t, ang_t)
            else:
                feat, norm = e, z
                if lrpe == "cosine":
                    cos, sin = xp.cos(ang_t), xp.sin(ang_t)
                    feat, norm = xp.concatenate([e * cos, e * sin], -1), xp.concatenate([z, z], -1)
                    q_t = xp.concatenate([q_t * cos, q_t * sin], -1)
                num = num + feat[..., None] * v_t[..., None, :]
                state = num / norm[..., None]
            return (num, z, state), xp.einsum("bhf,bhfv->bhv", q_t, state) * F_DIM**-0.5

        o = per_token(xp, step, carry, time_major(xp, q, k, v) + [ang]).reshape(B, T, H * V)
        gate = x @ p["wg1"] @ p["wg2"]
        o = o / xp.sqrt(xp.mean(o * o, axis=-1, keepdims=True) + 1e-5) * p["norm"] * silu(xp, gate)
        return o @ p["wo"]

    return run


def make_lightnet(impl="chunked", chunk_size=8, **kw):
    return LightNet(D, H, feature_dim=F_DIM, gate_low_rank_dim=LOW_RANK, impl=impl, chunk_size=chunk_size,
                    rngs=nnx.Rngs(0), **kw)  # fmt: skip


def test_lightnet_matches_additive_reference():
    x, w = inputs(0, (B, T, D))
    check_forward_and_grad(make_lightnet, lightnet_reference(), LIGHTNET_PARAMS, x, w, FORMS)


@pytest.mark.parametrize("lrpe, grid", [("cosine", (3, 4)), ("rotate", None)])
def test_lightnet_lrpe_matches_reference(lrpe, grid):
    """MD-LRPE on a 3 x 4 grid (T = 21 runs past it: rows continue) and 1-D rotate. The positions are computed
    before the op, whose forms are all checked above; the decode test below runs the recurrent step with LRPE."""
    x, w = inputs(9, (B, T, D))
    make = lambda impl, c: make_lightnet(impl, c, lrpe=lrpe, grid_shape=grid)
    check_forward_and_grad(make, lightnet_reference(lrpe, grid), LIGHTNET_PARAMS, x, w, forms=[("chunked", 8)])


def test_lightnet_extreme_keys_stay_finite():
    """Key logits of magnitude ~30 (std 30, up to ~100) in the chunked form (log gates down to ~-100 inside a
    chunk): outputs and gradients finite, output still == the float64 reference."""
    mixer = make_lightnet("chunked", 8)
    kernel = mixer.k_proj.kernel
    kernel[...] = 30.0 / D**0.5 * kernel[...] / jnp.std(kernel[...])  # key logits k_proj(x) ~ N(0, 30^2)
    x, w = inputs(1, (B, T, D))
    k = x @ kernel[...]
    assert float(jnp.max(jnp.abs(k))) > 30.0
    want = lightnet_reference()(weights(mixer, LIGHTNET_PARAMS, f64), f64(x), np)
    (_, y), grads = nnx.jit(nnx.value_and_grad(mixer_loss, has_aux=True))(mixer, x, w)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert rel_err(y, want) < 1e-4


def test_lightnet_decode_matches_forward():
    """With 2-D MD-LRPE (positions from the cache's counter): prefill (5 tokens) -> prefill continuing from that
    cache (to 13) -> steps == full forward; the cached z is the logsumexp of all key logits, pos counts tokens."""
    mixer = make_lightnet("chunked", 8, lrpe="cosine", grid_shape=(3, 4))
    x, _ = inputs(2, (B, T, D))
    y_full, y_inc, cache = decode_matches_forward(mixer, x, (5, 13))
    assert rel_err(y_inc, y_full) < FWD_TOL
    k = f64(x) @ f64(mixer.k_proj.kernel[...])
    z = np.log(np.sum(np.exp(k), axis=1)).reshape(B, H, F_DIM)
    assert rel_err(cache.z, z) < FWD_TOL and int(cache.pos) == T


def test_lightnet_bad_args():
    bad = [
        ({"feature_dim": 0}, "feature_dim"),
        ({"lrpe": "bogus"}, "lrpe"),
        ({"grid_shape": (3, 4)}, "grid_shape"),  # positions without LRPE
        ({"lrpe": "rotate", "feature_dim": 6, "grid_shape": (3, 4)}, "feature_dim"),  # 3 angles over 2 axes
        ({"impl": "scan"}, "impl"),
        ({"gate_low_rank_dim": -1}, "gate_low_rank_dim"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            LightNet(D, H, **{"feature_dim": F_DIM, **kw})
    with pytest.raises(ValueError, match="batch"):
        make_lightnet().init_cache(0, 8)


# ----------------------------------------------------------------------------------------------------------------
# Sequence parallelism (2 host devices, own process): sharded forward and gradient == one device
# ----------------------------------------------------------------------------------------------------------------

SP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from seqlab.parallel.mesh import shard_sequence
    from seqlab.mixers.linear.flowformer import FlowAttention
    from seqlab.mixers.linear.lightnet import LightNet

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16))
    w = jax.random.normal(jax.random.key(1), (2, 16, 16))
    cases = {
        "lightnet-lrpe": LightNet(16, 2, feature_dim=8, gate_low_rank_dim=4, lrpe="cosine", grid_shape=(4, 4),
                                  chunk_size=4, rngs=nnx.Rngs(0)),
        "flowformer": FlowAttention(16, 2, chunk_size=4, rngs=nnx.Rngs(0)),
        "flowformer-bidirectional": FlowAttention(16, 2, causal=False, rngs=nnx.Rngs(0)),
    }
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
    for name, mixer in cases.items():
        graphdef, params = nnx.split(mixer)
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * w)
        shard_sequence(mixer, "seq")
        sgraph, _ = nnx.split(mixer)
        local = lambda p, x, w: jax.lax.psum(jnp.sum(nnx.merge(sgraph, p)(x) * w), "seq")
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "seq"), P(None, "seq")), out_specs=P())
        l_sp, g_sp = jax.jit(jax.value_and_grad(sharded))(params, x, w)
        l_1, g_1 = jax.jit(jax.value_and_grad(loss))(params, x)
        errs = [rel(l_sp, l_1)] + [rel(a, b) for a, b in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_1))]
        assert len(errs) > 4 and max(errs) < 1e-5, (name, errs)
        print(name, "ok", max(errs))
    """
)


def test_sequence_parallel_matches_single_device():
    """LightNet (with 2-D MD-LRPE) and Flowformer (both forms) sequence-sharded over 2 devices: the logcumsumexp
    prefix and the grid positions across devices, Flowformer's prefix sums / psums, the op's state summaries. Loss
    and every parameter gradient == one device. (DSF's only cross-token part is `linear_attn`'s own summary.)"""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    cmd = [sys.executable, "-c", SP_SCRIPT]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 3, proc.stdout
