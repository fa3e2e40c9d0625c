"""Independent reference implementations for the seqlab functional ops.

Nothing here calls seqlab (the mask references read the parameters of the
``seqlab.core.masks`` classes, never their methods).  Every recurrence is written literally, one
token at a time, straight from the defining equations (flash-linear-attention
conventions):

* layout ``[B, T, H, dim]``; q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``
* gates are natural-log decays (``<= 0``); ``scale`` multiplies q and
  defaults to ``K ** -0.5``
* states are ``[B, H, K, V]``; each linear op returns ``(o, final_state)``

Two families:

* ``np_*``: numpy float64 loops. Inputs are promoted to float64, so for
  float32 inputs these are exact ground truth (up to float64 round-off).
* ``jnp_*``: differentiable float32 references: ``jax.lax.scan`` over time for
  the recurrences, a dense masked softmax for attention.  Used for gradients.

The op tests find the references of every op declared in ``seqlab.ops.linear_ops()``
by name: ``np_<op>`` and ``jnp_<op>``, taking the op's positional inputs in its
order, then ``scale``, ``initial_state`` and the op's variant flags as keywords.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.core import masks as M

HIGHEST = jax.lax.Precision.HIGHEST


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _scale(scale, K):
    return K ** -0.5 if scale is None else scale


# ---------------------------------------------------------------------------
# numpy float64 per-token loops: linear-attention family
# ---------------------------------------------------------------------------


def np_linear_attn(q, k, v, *, scale=None, normalize=False, eps=1e-6,
                   initial_state=None):
    """S_t = S_{t-1} + k_t v_t^T;  o_t = S_t^T (scale q_t).

    normalize=True: o_t = S_t^T (scale q_t) / ((scale q_t) . z_t + eps) with
    z_t = z_{t-1} + k_t, and the state is [B, H, K, V+1] = [S | z].
    """
    q, k, v, h0 = _f64(q), _f64(k), _f64(v), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V))
    z = np.zeros((B, H, K))
    if h0 is not None:
        S = h0[..., :V].copy()
        if normalize:
            z = h0[..., V].copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        q_t = scale * q[:, t]
        S = S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        num = np.einsum("bhkv,bhk->bhv", S, q_t)
        if normalize:
            z = z + k[:, t]
            den = np.einsum("bhk,bhk->bh", q_t, z) + eps
            o[:, t] = num / den[..., None]
        else:
            o[:, t] = num
    final = np.concatenate([S, z[..., None]], axis=-1) if normalize else S
    return o, final


def np_simple_gla(q, k, v, g, *, scale=None, initial_state=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = S_t^T (scale q_t).  g: [B,T,H]."""
    q, k, v, g, h0 = _f64(q), _f64(k), _f64(v), _f64(g), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        decay = np.exp(g[:, t])  # [B, H]
        S = decay[:, :, None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S


def np_gla(q, k, v, gk, *, scale=None, initial_state=None):
    """S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T;  gk: [B,T,H,K]."""
    q, k, v, gk, h0 = _f64(q), _f64(k), _f64(v), _f64(gk), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        decay = np.exp(gk[:, t])  # [B, H, K]: row k of S decays by exp(gk[k])
        S = decay[..., None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S


def np_delta_rule(q, k, v, beta, *, scale=None, initial_state=None):
    """S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T;  beta: [B,T,H]."""
    q, k, v, beta, h0 = _f64(q), _f64(k), _f64(v), _f64(beta), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t]
        v_old = np.einsum("bhkv,bhk->bhv", S, k_t)  # S_{t-1}^T k_t
        S = S + b_t[:, :, None, None] * np.einsum("bhk,bhv->bhkv", k_t, v_t - v_old)
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S


def np_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None):
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    g, beta, h0 = _f64(g), _f64(beta), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    eye = np.eye(K)
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t]
        # the K x K transition matrix, formed explicitly
        A = eye - b_t[:, :, None, None] * np.einsum("bhi,bhj->bhij", k_t, k_t)
        S = (np.exp(g[:, t])[:, :, None, None] * np.einsum("bhij,bhjv->bhiv", A, S)
             + b_t[:, :, None, None] * np.einsum("bhk,bhv->bhkv", k_t, v_t))
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S


def np_hgrn2(q, v, g, *, scale=None, initial_state=None):
    """HGRN2: S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T, f_t = exp(g_t);  o_t = S_t^T (scale q_t).  g: [B,T,H,K]."""
    q, v, g, h0 = _f64(q), _f64(v), _f64(g), _f64(initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        f = np.exp(g[:, t])  # [B, H, K]: forget gate of each state row
        S = f[..., None] * S + np.einsum("bhk,bhv->bhkv", 1.0 - f, v[:, t])
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S


# ---------------------------------------------------------------------------
# jnp float32 lax.scan references (differentiable): linear-attention family
# ---------------------------------------------------------------------------


def _tmajor(x):
    """[B, T, ...] -> [T, B, ...]."""
    return jnp.moveaxis(x, 1, 0)


def _bmajor(x):
    return jnp.moveaxis(x, 0, 1)


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST)


def jnp_linear_attn(q, k, v, *, scale=None, normalize=False, eps=1e-6,
                    initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    if initial_state is None:
        S0 = jnp.zeros((B, H, K, V), jnp.float32)
        z0 = jnp.zeros((B, H, K), jnp.float32)
    else:
        S0 = initial_state[..., :V]
        z0 = initial_state[..., V] if normalize else jnp.zeros((B, H, K), jnp.float32)

    def step(carry, xs):
        S, z = carry
        q_t, k_t, v_t = xs
        q_t = scale * q_t
        S = S + _ein("bhk,bhv->bhkv", k_t, v_t)
        num = _ein("bhkv,bhk->bhv", S, q_t)
        if normalize:
            z = z + k_t
            den = jnp.sum(q_t * z, axis=-1) + eps
            return (S, z), num / den[..., None]
        return (S, z), num

    (S, z), o = jax.lax.scan(step, (S0, z0), (_tmajor(q), _tmajor(k), _tmajor(v)))
    final = jnp.concatenate([S, z[..., None]], axis=-1) if normalize else S
    return _bmajor(o), final


def _jnp_state0(initial_state, B, H, K, V):
    if initial_state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    return initial_state


def jnp_simple_gla(q, k, v, g, *, scale=None, initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)

    def step(S, xs):
        q_t, k_t, v_t, g_t = xs
        S = jnp.exp(g_t)[:, :, None, None] * S + _ein("bhk,bhv->bhkv", k_t, v_t)
        return S, _ein("bhkv,bhk->bhv", S, scale * q_t)

    S, o = jax.lax.scan(step, _jnp_state0(initial_state, B, H, K, V),
                        (_tmajor(q), _tmajor(k), _tmajor(v), _tmajor(g)))
    return _bmajor(o), S


def jnp_gla(q, k, v, gk, *, scale=None, initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)

    def step(S, xs):
        q_t, k_t, v_t, g_t = xs
        S = jnp.exp(g_t)[..., None] * S + _ein("bhk,bhv->bhkv", k_t, v_t)
        return S, _ein("bhkv,bhk->bhv", S, scale * q_t)

    S, o = jax.lax.scan(step, _jnp_state0(initial_state, B, H, K, V),
                        (_tmajor(q), _tmajor(k), _tmajor(v), _tmajor(gk)))
    return _bmajor(o), S


def jnp_delta_rule(q, k, v, beta, *, scale=None, initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)

    def step(S, xs):
        q_t, k_t, v_t, b_t = xs
        v_old = _ein("bhkv,bhk->bhv", S, k_t)
        S = S + b_t[:, :, None, None] * _ein("bhk,bhv->bhkv", k_t, v_t - v_old)
        return S, _ein("bhkv,bhk->bhv", S, scale * q_t)

    S, o = jax.lax.scan(step, _jnp_state0(initial_state, B, H, K, V),
                        (_tmajor(q), _tmajor(k), _tmajor(v), _tmajor(beta)))
    return _bmajor(o), S


def jnp_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)
    eye = jnp.eye(K, dtype=jnp.float32)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs
        A = eye - b_t[:, :, None, None] * _ein("bhi,bhj->bhij", k_t, k_t)
        S = (jnp.exp(g_t)[:, :, None, None] * _ein("bhij,bhjv->bhiv", A, S)
             + b_t[:, :, None, None] * _ein("bhk,bhv->bhkv", k_t, v_t))
        return S, _ein("bhkv,bhk->bhv", S, scale * q_t)

    S, o = jax.lax.scan(step, _jnp_state0(initial_state, B, H, K, V),
                        (_tmajor(q), _tmajor(k), _tmajor(v), _tmajor(g), _tmajor(beta)))
    return _bmajor(o), S


def jnp_hgrn2(q, v, g, *, scale=None, initial_state=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _scale(scale, K)

    def step(S, xs):
        q_t, v_t, g_t = xs
        # 1 - f_t as -expm1(g_t): 1 - exp(g_t) loses its relative precision in float32 for g_t near 0
        S = jnp.exp(g_t)[..., None] * S + _ein("bhk,bhv->bhkv", -jnp.expm1(g_t), v_t)
        return S, _ein("bhkv,bhk->bhv", S, scale * q_t)

    S, o = jax.lax.scan(step, _jnp_state0(initial_state, B, H, K, V),
                        (_tmajor(q), _tmajor(v), _tmajor(g)))
    return _bmajor(o), S


# ---------------------------------------------------------------------------
# softmax attention
# ---------------------------------------------------------------------------


def visible(t, s, *, causal=True, window=None):
    """Whether query position t may attend to key position s."""
    if causal:
        ok = s <= t
        if window is not None:
            ok = ok & (s > t - window)
    else:
        ok = np.ones_like(s, dtype=bool) if isinstance(s, np.ndarray) else True
        if window is not None:
            ok = ok & (abs(t - s) < window)
    return ok


def np_softmax_attn(q, k, v, *, scale=None, causal=True, window=None):
    """Plain per-query loop in float64.  GQA: query head h uses kv head h // (H // H_kv)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, T, H, K = q.shape
    Tk, H_kv = k.shape[1], k.shape[2]
    V = v.shape[-1]
    group = H // H_kv
    scale = _scale(scale, K)
    s_all = np.arange(Tk)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        vis = visible(t, s_all, causal=causal, window=window)
        for h in range(H):
            hk = h // group
            logits = scale * np.einsum("bsk,bk->bs", k[:, vis, hk], q[:, t, h])
            logits = logits - logits.max(axis=-1, keepdims=True)
            p = np.exp(logits)
            p = p / p.sum(axis=-1, keepdims=True)
            o[:, t, h] = np.einsum("bs,bsv->bv", p, v[:, vis, hk])
    return o


def np_decode_step(q, k_cache, v_cache, key_positions, query_position, *,
                   scale=None, window=None):
    """One decode query against a cache of (possibly unordered, possibly empty) slots."""
    q, k_cache, v_cache = _f64(q), _f64(k_cache), _f64(v_cache)
    key_positions = np.asarray(key_positions)
    B, H, K = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    scale = _scale(scale, K)
    vis = (key_positions >= 0) & (key_positions <= query_position)
    if window is not None:
        vis &= query_position - key_positions < window
    o = np.zeros((B, H, v_cache.shape[-1]))
    for h in range(H):
        hk = h // group
        logits = scale * np.einsum("blk,bk->bl", k_cache[:, vis, hk], q[:, h])
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
        o[:, h] = np.einsum("bl,blv->bv", p, v_cache[:, vis, hk])
    return o


def jnp_softmax_attn(q, k, v, *, scale=None, causal=True, window=None):
    """Dense masked softmax attention in float32 (for gradients)."""
    B, T, H, K = q.shape
    Tk, H_kv = k.shape[1], k.shape[2]
    group = H // H_kv
    scale = _scale(scale, K)
    k = jnp.repeat(k, group, axis=2)  # head h -> kv head h // group
    v = jnp.repeat(v, group, axis=2)
    t = np.arange(T)[:, None]
    s = np.arange(Tk)[None, :]
    mask = visible(t, s, causal=causal, window=window)
    mask = np.broadcast_to(mask, (T, Tk))
    logits = _ein("bthk,bshk->bhts", scale * q, k)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return _ein("bhts,bshv->bthv", p, v)


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b.ravel())
    assert nb > 0, "reference is identically zero; the comparison would be vacuous"
    return float(np.linalg.norm((a - b).ravel()) / nb)


# ---------------------------------------------------------------------------
# masks: visibility pair by pair, from the definitions (the mask classes are
# read for their parameters only; none of their methods is called)
# ---------------------------------------------------------------------------


def reference_visible(mask, t: int, s: int, segments) -> bool:
    """Key s visible to query t (segments: this batch element's segment id per position)."""
    if isinstance(mask, M.Causal):
        return s <= t and (mask.window is None or t - s < mask.window)
    if isinstance(mask, M.Lagged):
        return s <= t - mask.lag
    if isinstance(mask, M.Bidirectional):
        return mask.window is None or abs(t - s) < mask.window
    if isinstance(mask, M.BlockDiagonal):
        return t // mask.size == s // mask.size and (s <= t or not mask.causal)
    if isinstance(mask, M.Strided):
        return (t - s) % mask.stride == 0 and (s <= t or not mask.causal)
    if isinstance(mask, M.BlockSparse):
        return mask.layout[t // mask.block][s // mask.block] and (s <= t or not mask.causal)
    if isinstance(mask, M.Terraced):  # the query's block of `window` tokens up to itself, and the block before
        return s <= t and s // mask.window in (t // mask.window, t // mask.window - 1)
    if isinstance(mask, M.Document):
        return segments[t] == segments[s]
    if isinstance(mask, M.VerticalStride):
        I, J = t // mask.block, s // mask.block
        if mask.causal:
            return s <= t and (I - J < mask.local_blocks or (J + mask.residue) % mask.stride == 0)
        return abs(I - J) < mask.local_blocks or (I - J + mask.residue) % mask.stride == 0
    if isinstance(mask, M.SpanSummaries):  # tokens [0, tokens), then the summary of span j at tokens + j
        if t >= mask.tokens:
            return False
        if s < mask.tokens:
            return s // mask.span == t // mask.span and (s <= t or not mask.causal)
        j = s - mask.tokens
        return j < t // mask.span if mask.causal else j != t // mask.span
    if isinstance(mask, (M.Neighborhood, M.Halo, M.CircularWindow)):
        return grid_visible(mask, t, s)
    if isinstance(mask, M.And):
        return all(reference_visible(m, t, s, segments) for m in mask.masks)
    if isinstance(mask, M.Or):
        return any(reference_visible(m, t, s, segments) for m in mask.masks)
    raise TypeError(mask)


def grid_coordinates(grid, p: int) -> list[int]:
    """Raster-order coordinates of position p on a grid (None: 1-d), the last axis fastest."""
    if grid is None:
        return [p]
    coords = []
    for n in reversed(grid):
        coords.append(p % n)
        p //= n
    return coords[::-1]


def natten_window(u: int, n_g: int | None, k: int, s: int, causal: bool) -> range:
    """NATTEN's in-group window of in-group coordinate u (csrc/include/natten/cuda/reference/mask.hpp)."""
    L, R = k // 2, k // 2 + k % 2 - 1
    if causal:
        c = (u // s) * s + s - 1 if n_g is None else min((u // s) * s + s - 1, n_g - 1)
        return range(max(c - L - R, 0), u + 1)
    c = min((u // s) * s + s // 2, n_g - 1)
    start = max(c - L, 0) - (c + R + 1 - n_g if c + R >= n_g else 0)
    return range(start, start + k)


def grid_visible(mask, t: int, s: int) -> bool:
    """Neighborhood (NATTEN's per-axis windows), Halo (haloed blocks) and CircularWindow (distance) by axis."""
    xs, ys = grid_coordinates(mask.grid, t), grid_coordinates(mask.grid, s)
    if isinstance(mask, M.CircularWindow):
        return sum((x - y) ** 2 for x, y in zip(xs, ys)) <= mask.radius ** 2
    for axis, (x, y) in enumerate(zip(xs, ys)):
        if isinstance(mask, M.Halo):
            b, h = mask.block[axis], mask.halo[axis]
            top = (x // b) * b
            if not (top - h <= y <= (x if mask.causal else top + b + h - 1)):
                return False
            continue
        d, n = mask.dilation[axis], None if mask.grid is None else mask.grid[axis]
        n_g = None if n is None else len(range(x % d, n, d))
        if y % d != x % d or y // d not in natten_window(x // d, n_g, mask.kernel[axis], mask.stride[axis],
                                                         mask.causal[axis]):
            return False
    return True


def has_document(mask) -> bool:
    if isinstance(mask, M.Document):
        return True
    return isinstance(mask, (M.And, M.Or, M.PerHead)) and any(has_document(m) for m in mask.masks)


def segment_ids(T: int) -> np.ndarray:
    """[B, T] int32: sorted documents in batch element 0, ids scattered at random in batch element 1."""
    rng = np.random.default_rng(T)
    return np.stack([np.sort(rng.integers(0, 4, T)), rng.integers(0, 3, T)]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def reference_mask(mask, T: int, H: int) -> np.ndarray:
    """[B, H, T, T] bool from Python loops over (t, s), over ``segment_ids(T)`` for a mask with a Document term;
    [1, H, T, T] for any other."""
    per_head = mask.masks if isinstance(mask, M.PerHead) else (mask,) * H
    ids = segment_ids(T) if has_document(mask) else [None]
    return np.array([[[[reference_visible(m, t, s, seg) for s in range(T)] for t in range(T)] for m in per_head]
                     for seg in ids])


def dense_reference(visible: np.ndarray, scale: float | None = None, score_mod=None):
    """Masked softmax attention with the [B or 1, H, T, T] mask ``visible`` (0 for a query that sees no key);
    scale None: D ** -0.5."""

    def attention(q, k, v):
        group, (T, H) = q.shape[2] // k.shape[2], q.shape[1:3]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST) * (scale or q.shape[-1] ** -0.5)
        if score_mod is not None:
            logits = score_mod(logits, jnp.arange(T)[:, None], jnp.arange(T)[None], jnp.arange(H)[:, None, None])
        logits = jnp.where(visible, logits, -1e30)
        m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(logits - m), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = jnp.where(l > 0, p / jnp.where(l > 0, l, 1.0), 0.0)
        return jnp.einsum("bhts,bshv->bthv", p, v, precision=HIGHEST)

    return attention


def attention_inputs(seed: int, *, B: int = 2, T: int = 37, H: int = 4, H_kv: int = 2, D: int = 16, V: int = 24):
    """q [B, T, H, D], k [B, T, H_kv, D], v [B, T, H_kv, V] and the output weights W [B, T, H, V] of the loss
    sum(o * W), float32 standard normal."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return n(B, T, H, D), n(B, T, H_kv, D), n(B, T, H_kv, V), n(B, T, H, V)


def attention_value_and_grads(attention, q, k, v, W):
    """(o, [dq, dk, dv]) as float32 numpy: attention(q, k, v) and the gradients of sum(o * W), from one jitted
    function."""

    def loss(q, k, v):
        o = attention(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * W), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(o.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def nonempty_tiles(visible: np.ndarray, block_q: int, block_k: int, padded: int) -> np.ndarray:
    """[padded / block_q, padded / block_k] bool from the element mask [T, T] (nothing visible past T): the tiles
    holding a visible pair."""
    grid = np.zeros((padded, padded), bool)
    grid[: visible.shape[0], : visible.shape[1]] = visible
    return grid.reshape(padded // block_q, block_q, padded // block_k, block_k).any(axis=(1, 3))


def selection_mask(tiles: np.ndarray, T: int, H: int, block: int) -> np.ndarray:
    """[B, H, T, T] bool, in Python loops: key s is selected for query t of head h iff s's tile is among the
    entries of a runtime block index's tiles [B, H_kv, nq, S] for t's tile, batch row and kv head h // (H / H_kv)."""
    group = H // tiles.shape[1]
    out = np.zeros((tiles.shape[0], H, T, T), bool)
    for b in range(tiles.shape[0]):
        for h in range(H):
            for t in range(T):
                chosen = {int(j) for j in tiles[b, h // group, t // block]}
                for s in range(T):
                    out[b, h, t, s] = s // block in chosen
    return out
