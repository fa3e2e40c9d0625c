"""TransNormer: NormAttention and DiagAttention (T1 / T2, with URPE), the block-local attention op behind
DiagAttention (seqlab.ops.block_local_attn), and the TransNormer layer layout.

Ground truth is written here from the equations (families.md §2), token by token, without seqlab code: each
reference takes the array module `xp` — numpy on float64 inputs (a Python loop over tokens) for the forward checks,
jax.numpy in float32 (the same per-token step under lax.scan, differentiated with jax.grad) for the gradient checks.
The mixers are only read for their parameters. Tolerances are relative errors over whole tensors: forward 1e-5,
gradients 1e-4.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    GRAD_TOL,
    QKVO_PARAMS,
    check_decode_prefill_and_cache,
    check_forms,
    f64,
    heads,
    inputs,
    loop,
    softmax,
    urpe_token,
)
from reference import rel_err

from seqlab.layers.lrpe import LRPE, URPE
from seqlab.mixers.caches import BlockCache
from seqlab.mixers.linear.tnl import TNLAttention
from seqlab.mixers.linear.transnormer import DiagAttention, NormAttention, transnormer_layout
from seqlab.ops.block_local_attn import block_local_attn, block_local_attn_cached

B, T, D, H = 2, 23, 16, 2  # head dim 8; T is not a multiple of any chunk / block size below
HEAD = D // H
CHUNKS = (4, 16)


# --------------------------------------------------------------------------------------------------------------
# Independent per-token references (xp = numpy or jax.numpy)
# --------------------------------------------------------------------------------------------------------------


def elu(xp, x):
    return xp.where(x > 0, x, xp.expm1(xp.minimum(x, 0.0)))


def transnormer_srms(xp, x, eps=1e-8):
    """x / (||x||_2 * D^-1/2 + eps) over the last axis (the root taken of positive sums only, so that a zero row,
    which T1's ReLU weights can produce, has a finite gradient under jax.grad)."""
    sum_sq = (x * x).sum(axis=-1, keepdims=True)
    norm = xp.where(sum_sq > 0, xp.sqrt(xp.where(sum_sq > 0, sum_sq, 1.0)), 0.0)
    return x / (norm / math.sqrt(x.shape[-1]) + eps)


def block_local_ref(xp, q, k, v, block, weights, scale=None):
    """o_t = sum over the keys s of t's block with s <= t of w(q_t.k_s * scale) v_s.

    q, k: [B, T, H, K]; v: [B, T, H, V]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = xp.arange(q.shape[1])

    def step(carry, t):
        logits = xp.einsum("bhk,bshk->bhs", q[:, t] * scale, k)
        visible = (keys // block == t // block) & (keys <= t)
        if weights == "softmax":
            w = softmax(xp, xp.where(visible, logits, -1e30))
        else:
            w = xp.where(visible, xp.maximum(logits, 0.0), 0.0)
        return carry, xp.einsum("bhs,bshv->bhv", w, v)

    return loop(xp, step, None, q.shape[1])


def transnormer_projections(xp, p, x):
    return tuple(heads(x @ p[f"w{n}"] + p[f"b{n}"], H) for n in "qkv")


def urpe_or_identity(xp, p, x, t):
    return urpe_token(xp, x, t, p["theta"], p["u"]) if "theta" in p else x


def norm_attention_ref(xp, p, x, variant):
    """S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) (URPE after phi); srms over the heads; W_o."""
    q, k, v = transnormer_projections(xp, p, x)
    phi = (lambda z: elu(xp, z) + 1.0) if variant == "t2" else (lambda z: elu(xp, z))

    def step(state, t):
        q_t, k_t = urpe_or_identity(xp, p, phi(q[:, t]), t), urpe_or_identity(xp, p, phi(k[:, t]), t)
        state = state + xp.einsum("bhk,bhv->bhkv", k_t, v[:, t])
        o = xp.einsum("bhkv,bhk->bhv", state, q_t).reshape(x.shape[0], -1)
        return state, transnormer_srms(xp, o) @ p["wo"] + p["bo"]

    return loop(xp, step, xp.zeros((x.shape[0], H, HEAD, HEAD)), x.shape[1])


def diag_attention_ref(xp, p, x, variant, block):
    """Block-local attention on the raw projections (+URPE); T1: relu weights + srms, T2: softmax; W_o."""
    q, k, v = transnormer_projections(xp, p, x)
    q = loop(xp, lambda c, t: (c, urpe_or_identity(xp, p, q[:, t], t)), None, x.shape[1])
    k = loop(xp, lambda c, t: (c, urpe_or_identity(xp, p, k[:, t], t)), None, x.shape[1])
    o = block_local_ref(xp, q, k, v, block, "relu" if variant == "t1" else "softmax")
    o = o.reshape(*x.shape[:2], -1)
    if variant == "t1":
        o = transnormer_srms(xp, o)
    return o @ p["wo"] + p["bo"]


# Parameters of the mixers, read by path (works for the module's Param state and for its gradients)
TRANSNORMER_PATHS = {**QKVO_PARAMS, "theta": ("urpe", "theta")}

# Every form of the linear ops; the variants that only change a feature map or a positional encoding run one form.
LINEAR_FORMS = [{"impl": "chunked", "chunk_size": c} for c in CHUNKS] + [{"impl": "recurrent"}, {"impl": "parallel"}]
ONE_FORM = LINEAR_FORMS[:1]


# --------------------------------------------------------------------------------------------------------------
# block_local_attn
# --------------------------------------------------------------------------------------------------------------


def qkv(rng, length=37, k_dim=8, v_dim=6):
    q = rng.normal(size=(B, length, H, k_dim)).astype(np.float32)
    k = rng.normal(size=(B, length, H, k_dim)).astype(np.float32)
    v = rng.normal(size=(B, length, H, v_dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("weights", ["softmax", "relu"])
@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_block_local_attn_matches_per_token_reference(weights, block, rng):
    q, k, v = qkv(rng)  # T = 37: a partial last block (and one block shorter than T for block = 64)
    o = block_local_attn(q, k, v, block_size=block, weights=weights)
    assert o.shape == v.shape and o.dtype == jnp.float32
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), block, weights)) <= FWD_TOL


@pytest.mark.parametrize("weights", ["softmax", "relu"])
@pytest.mark.parametrize("block", [1, 5, 16])
def test_block_local_attn_on_packed_rows_restarts_blocks_per_document(weights, block, rng):
    q, k, v = qkv(rng)  # row 0: documents of 1, 6, 17 and 13 tokens; row 1: one document
    lengths = (1, 6, 17, 13)
    positions = np.stack([np.concatenate([np.arange(n) for n in lengths]), np.arange(37)])
    o = block_local_attn(q, k, v, block_size=block, weights=weights, positions=positions)
    starts = np.cumsum((0,) + lengths)
    alone = np.concatenate([block_local_ref(np, *f64((q[:1, s:e], k[:1, s:e], v[:1, s:e])), block, weights)
                            for s, e in zip(starts[:-1], starts[1:])], axis=1)  # fmt: skip
    assert rel_err(o[:1], alone) <= FWD_TOL
    assert rel_err(o[1:], block_local_ref(np, *f64((q[1:], k[1:], v[1:])), block, weights)) <= FWD_TOL


def test_block_local_attn_scale_and_blocks_matter(rng):
    q, k, v = qkv(rng)
    o = block_local_attn(q, k, v, block_size=8, weights="softmax", scale=0.3)
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), 8, "softmax", scale=0.3)) <= FWD_TOL
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), 16, "softmax", scale=0.3)) > 1e-2


@pytest.mark.parametrize("weights", ["softmax", "relu"])
def test_block_local_attn_gradient(weights, rng):
    q, k, v = qkv(rng, length=T)
    w = rng.normal(size=v.shape).astype(np.float32)
    for block in (4, 16):

        def op_loss(q, k, v, block=block):
            return jnp.sum(block_local_attn(q, k, v, block_size=block, weights=weights) * w)

        def ref_loss(q, k, v, block=block):
            return jnp.sum(block_local_ref(jnp, q, k, v, block, weights) * w)

        got = jax.jit(jax.grad(op_loss, argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)
        for name, g, r in zip("qkv", got, want):
            assert rel_err(g, r) <= GRAD_TOL, (block, name, rel_err(g, r))


@pytest.mark.parametrize("weights", ["softmax", "relu"])
def test_block_local_attn_cached_matches_full_in_any_split(weights, rng):
    """Calls of 1, 5, 1, 13 and 3 tokens (block 4): prompts that start mid-block, end on a boundary and span
    several blocks, and single steps, continue exactly; the cache ends with the last block's keys, zeros after."""
    block = 4
    q, k, v = qkv(rng, length=T)
    want = block_local_ref(np, *f64((q, k, v)), block, weights)
    k_block = jnp.zeros((B, block, H, q.shape[-1]), jnp.float32)
    v_block = jnp.zeros((B, block, H, v.shape[-1]), jnp.float32)
    cached = jax.jit(lambda *a: block_local_attn_cached(*a, weights=weights))
    outs, pos = [], 0
    for size in (1, 5, 1, 13, 3):
        o, k_block, v_block = cached(q[:, pos : pos + size], k[:, pos : pos + size], v[:, pos : pos + size],
                                     k_block, v_block, jnp.int32(pos))  # fmt: skip
        outs.append(o)
        pos += size
        last_start = (pos - 1) - (pos - 1) % block
        filled = pos - last_start
        np.testing.assert_array_equal(k_block[:, :filled], k[:, last_start:pos])
        np.testing.assert_array_equal(v_block[:, :filled], v[:, last_start:pos])
        assert not np.any(np.asarray(k_block[:, filled:])), pos
    assert pos == T
    assert rel_err(jnp.concatenate(outs, axis=1), want) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# Mixers against the per-token references, every form, forward and gradient
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, use_urpe, forms", [("t1", True, LINEAR_FORMS), ("t2", True, ONE_FORM),
                                                      ("t1", False, ONE_FORM)])  # fmt: skip
def test_norm_attention_matches_reference(variant, use_urpe, forms):
    mixer = NormAttention(D, H, variant=variant, use_urpe=use_urpe, rngs=nnx.Rngs(1))
    x, w = inputs(1, (B, T, D))
    check_forms(mixer, forms, TRANSNORMER_PATHS, lambda xp, p, x: norm_attention_ref(xp, p, x, variant), x, w)


@pytest.mark.parametrize("variant, blocks", [("t1", (4, 8)), ("t2", (8,))])
def test_diag_attention_matches_reference(variant, blocks):
    x, w = inputs(2, (B, T, D))
    for block in blocks:
        mixer = DiagAttention(D, H, variant=variant, block_size=block, rngs=nnx.Rngs(2))
        reference = functools.partial(diag_attention_ref, variant=variant, block=block)
        check_forms(mixer, [{}], TRANSNORMER_PATHS, reference, x, w)


def test_outputs_keep_the_input_dtype(rng):
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(rng, length=9))
    assert jax.eval_shape(lambda: block_local_attn(q, k, v, block_size=4)).dtype == jnp.bfloat16
    blocks = (jnp.zeros((B, 4, H, 8), jnp.float32), jnp.zeros((B, 4, H, 6), jnp.float32))
    for length in (1, 9):
        o, *cache = jax.eval_shape(block_local_attn_cached, q[:, :length], k[:, :length], v[:, :length], *blocks, 0)
        assert o.dtype == jnp.bfloat16 and all(c.dtype == jnp.float32 for c in cache)
    pos = jnp.arange(9)
    assert jax.eval_shape(lambda: URPE(8, rngs=nnx.Rngs(0))(q, pos)).dtype == jnp.bfloat16
    assert jax.eval_shape(lambda: LRPE(H, 8)(q, pos)).dtype == jnp.bfloat16


def test_transnormer_layout():
    pattern, args = transnormer_layout(4, "t2")
    assert pattern == ("transnormer_diag",) * 2 + ("transnormer_norm",) * 2
    assert args == {"transnormer_diag": {"variant": "t2"}, "transnormer_norm": {"variant": "t2"}}
    assert transnormer_layout(5)[0] == ("transnormer_diag",) * 2 + ("transnormer_norm",) * 3


# --------------------------------------------------------------------------------------------------------------
# Decode: token-by-token and prefill + decode == the full forward
# --------------------------------------------------------------------------------------------------------------

DECODE_CASES = {
    "norm": lambda: NormAttention(D, H, chunk_size=4, rngs=nnx.Rngs(5)),
    "diag-t1": lambda: DiagAttention(D, H, block_size=8, rngs=nnx.Rngs(5)),
    "diag-t2": lambda: DiagAttention(D, H, variant="t2", block_size=8, rngs=nnx.Rngs(5)),
}


@pytest.mark.parametrize(  # prompts end mid-block (11) or on a block boundary (16); block 8, chunk 4, T = 23
    "case, prompt", [("norm", 11), ("diag-t1", 11), ("diag-t1", 16), ("diag-t2", 16)]
)
def test_decode_and_prefill_match_full_forward(case, prompt):
    check_decode_prefill_and_cache(DECODE_CASES[case](), inputs(6, (B, T, D))[0], prompt)


def test_cache_layouts():
    norm = NormAttention(D, H).init_cache(3, 5)
    assert norm.state.shape == (3, H, HEAD, HEAD) and norm.state.dtype == jnp.float32
    diag = DiagAttention(D, H, block_size=8).init_cache(3, 100)
    assert isinstance(diag, BlockCache) and diag.k.shape == diag.v.shape == (3, 8, H, HEAD)
    assert diag.k.dtype == jnp.float32 and int(diag.pos) == 0
    assert TNLAttention(D, H).init_cache(3, 5).state.shape == (3, H, 2 * HEAD, HEAD)
    assert TNLAttention(D, H, use_lrpe=False).init_cache(3, 5).state.shape == (3, H, HEAD, HEAD)


# --------------------------------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: NormAttention(D, H, variant="t3"), "variant"),
        (lambda: DiagAttention(D, H, variant="T1"), "variant"),
        (lambda: DiagAttention(D, H, block_size=0), "block_size"),
        (lambda: NormAttention(D, H, norm_eps=0.0), "norm_eps"),
        (lambda: NormAttention(6, 2), "head_dim"),  # URPE needs an even head dim
        (lambda: NormAttention(D, 3), "d_model"),
        (lambda: transnormer_layout(0), "num_layers"),
        (lambda: transnormer_layout(4, "t3"), "variant"),
        (lambda: NormAttention(D, H).init_cache(0, 4), "batch"),
        (lambda: DiagAttention(D, H).init_cache(2, 0), "max_len"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build()


def test_bad_op_arguments_name_the_argument(rng):
    q, k, v = qkv(rng, length=9)
    with pytest.raises(ValueError, match=r"^weights\b"):
        block_local_attn(q, k, v, weights="gelu")
    with pytest.raises(ValueError, match=r"^block_size\b"):
        block_local_attn(q, k, v, block_size=0)
    with pytest.raises(ValueError, match=r"^k\b"):
        block_local_attn(q, k[:, :5], v)
    with pytest.raises(ValueError, match=r"^v\b"):
        block_local_attn(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"^k_block\b"):
        block_local_attn_cached(q, k, v, np.zeros((B, 4, H, 3), np.float32), np.zeros((B, 4, H, 6), np.float32), 0)


def test_diag_attention_sequence_shards_must_hold_whole_blocks():
    mixer = DiagAttention(D, H, block_size=8)
    mixer.sequence_axis = "seq"
    with pytest.raises(ValueError, match=r"^x: a sequence shard of 23 tokens"):
        mixer(inputs(0, (B, T, D))[0])
