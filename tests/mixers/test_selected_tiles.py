"""HiP and SEA (softmax attention over data-selected key tiles) against their definitions written here with the
layer's own parameters: the tiles each query tile reads chosen in Python loops — HiP's hierarchical pruning (spans
halved round by round, each half scored by its first tile's mean key against the tile's first query, the best
top_k halves kept), SEA's one-shot top_k of the linear-attention estimate φ(q̂)·Σ φ(k) (φ = elu + 1) — plus the
local tiles, then a dense softmax over the visible keys of those tiles. The selection is a discrete choice (no
gradient), so the reference gradients differentiate the attention under the mask chosen in float64. Forward in
float64 (1e-5) and the gradients of the input and the projections (1e-4), T = 37 in tiles of 4 (a partial last
tile), GQA (4 query heads over 2), causal and non-causal; the blockwise form reads (top_k + local) tiles per row;
impl="pallas" (the flash-attention kernels over the same BlockIndex, interpreted on CPU) equals impl="chunked". A
subclass's score_mod (ALiBi) is checked against the formula with its term, and its decode against its forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge, prompt_then_steps, raises_naming
from reference import rel_err
from seqlab import mixers
from seqlab.mixers.softmax.hip import HiPAttention

B, T, D = 2, 37, 32


def elu1(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def hip_tiles(q_rep: list[np.ndarray], means: list[np.ndarray], row: int, top_k: int, local: int) -> set[int]:
    """HiP's pruning of row ``row``'s candidates [0, row - local + 1) in plain Python."""
    count = max(row - local + 1, 0)
    spans = [(s * count // top_k, (s + 1) * count // top_k) for s in range(top_k)]
    spans = [span for span in spans if span[1] > span[0]]
    while any(hi - lo > 1 for lo, hi in spans):
        halves = []
        for lo, hi in spans:
            mid = (lo + hi + 1) // 2
            halves += [h for h in ((lo, mid), (mid, hi)) if h[1] > h[0]]
        halves.sort(key=lambda h: -max(float(r @ means[h[0]]) for r in q_rep))
        spans = halves[:top_k]
    return {lo for lo, _ in spans}


def sea_tiles(q_rep: list[np.ndarray], features: list[np.ndarray], row: int, top_k: int, local: int,
              causal: bool) -> set[int]:
    """SEA's top_k of the estimate among row ``row``'s candidates in plain Python."""
    allowed = [j for j in range(len(features)) if (row - j >= local if causal else abs(row - j) >= local)]
    estimate = {j: sum(float(elu1(r) @ features[j]) for r in q_rep) for j in allowed}
    return set(sorted(allowed, key=lambda j: -estimate[j])[:top_k])


def selection(name: str, q: np.ndarray, k: np.ndarray, *, block: int, top_k: int, local: int,
              causal: bool) -> np.ndarray:
    """[B, H, T, T] bool: query t sees key s iff s's tile is local to or selected for t's tile (and s <= t when
    causal). q [B, T, H, d], k [B, T, Hkv, d] float64."""
    H, Hkv = q.shape[2], k.shape[2]
    G, n = H // Hkv, -(-T // block)
    visible = np.zeros((B, H, T, T), bool)
    for b in range(B):
        for h_kv in range(Hkv):
            tiles = [range(j * block, min(T, (j + 1) * block)) for j in range(n)]
            means = [k[b, list(r), h_kv].sum(0) / block for r in tiles]
            features = [elu1(k[b, list(r), h_kv]).sum(0) for r in tiles]
            for i in range(n):
                heads_of = [h_kv * G + g for g in range(G)]
                q_rep = [q[b, i * block, h] if causal else q[b, list(tiles[i]), h].mean(0) for h in heads_of]
                chosen = (hip_tiles(q_rep, means, i, top_k, local) if name == "hip"
                          else sea_tiles(q_rep, features, i, top_k, local, causal))
                near = {j for j in range(n) if (0 <= i - j < local if causal else abs(i - j) < local)}
                for t in tiles[i]:
                    for s in range(T):
                        seen = s // block in chosen | near and (s <= t or not causal)
                        visible[b, heads_of, t, s] = seen
    return visible


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes 2^(-8 (h + 1) / H)."""
    return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


class AlibiHiP(HiPAttention):
    """A researcher's variant defined here: HiP with ALiBi's linear distance penalty as its score_mod."""

    def score_mod(self):
        slopes = jnp.asarray(alibi_slopes(self.num_heads), jnp.float32)
        return lambda scores, q_idx, k_idx, head: scores - slopes[head] * jnp.abs(q_idx - k_idx)


def formula(name: str, *, num_heads: int, num_kv_heads: int, block: int, top_k: int, local: int, causal: bool,
            alibi: bool = False):
    """The layer as a function (xp, params, x); the mask is chosen on the float64 (numpy) call and reused. alibi:
    the scores less slope_h · |t − s| (the selection is unchanged: it scores tiles, not pairs)."""
    chosen = {}

    def layer(xp, params, x):
        q = heads(linear(x, params["q_proj"]), num_heads)
        k, v = (heads(linear(x, params[p]), num_kv_heads) for p in ("k_proj", "v_proj"))
        if xp is np:
            chosen["visible"] = selection(name, q, k, block=block, top_k=top_k, local=local, causal=causal)
        group = num_heads // num_kv_heads
        k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)
        scores = xp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
        if alibi:
            distance = np.abs(np.arange(T)[:, None] - np.arange(T)[None])
            scores = scores - alibi_slopes(num_heads)[:, None, None] * distance
        visible = chosen["visible"]
        scores = xp.where(visible, scores, -1e30)
        p = xp.exp(scores - scores.max(axis=-1, keepdims=True)) * visible
        o = xp.einsum("bhts,bshd->bthd", p / p.sum(axis=-1, keepdims=True), v)
        return linear(merge(o), params["o_proj"])

    return layer


CASES = [  # name, top_k, local, causal
    ("hip", 2, 1, True),
    ("hip", 3, 2, True),
    ("sea", 2, 1, True),
    ("sea", 2, 2, False),
]


@pytest.mark.parametrize("name, top_k, local, causal", CASES)
def test_layer_matches_its_definition(name, top_k, local, causal):
    kwargs = dict(num_heads=4, num_kv_heads=2, block_size=4, top_k=top_k, local=local)
    if not causal:
        kwargs["causal"] = False
    mixer = mixers.create(name, d_model=D, rngs=nnx.Rngs(0), **kwargs)
    reference = formula(name, num_heads=4, num_kv_heads=2, block=4, top_k=top_k, local=local, causal=causal)
    assert_layer_matches(mixer, reference, (B, T, D), param_grads=("q_proj", "k_proj", "v_proj", "o_proj"))


def test_a_score_mod_of_a_subclass_reaches_every_form():
    """AlibiHiP against the formula with the ALiBi term, and its prefill + decode against its forward: the
    score_mod runs over the BlockIndex's gathered tiles in the blockwise form and on the cache when decoding."""
    mixer = AlibiHiP(D, 4, num_kv_heads=2, block_size=4, top_k=2, local=1, rngs=nnx.Rngs(0))
    reference = formula("hip", num_heads=4, num_kv_heads=2, block=4, top_k=2, local=1, causal=True, alibi=True)
    assert_layer_matches(mixer, reference, (B, T, D), param_grads=("q_proj", "k_proj"))
    decoded, forward, _ = prompt_then_steps(mixer, jax.random.normal(jax.random.key(2), (B, T, D)), 13)
    assert rel_err(decoded, forward) <= 1e-5


@pytest.mark.parametrize("name, causal", [("hip", True), ("sea", True), ("sea", False)])
def test_pallas_form_matches_the_chunked_form(name, causal):
    """T = 100 in 16-token tiles (a kernel tile; a partial last tile): output and the gradients in x and in every
    parameter of sum(y²), impl="pallas" against impl="chunked" (1e-5)."""
    kwargs = dict(d_model=D, num_heads=4, num_kv_heads=2, block_size=16, top_k=2, local=1)
    if not causal:
        kwargs["causal"] = False
    pallas, chunked = (mixers.create(name, impl=impl, rngs=nnx.Rngs(0), **kwargs) for impl in ("pallas", "chunked"))
    x = jax.random.normal(jax.random.key(1), (B, 100, D))
    assert "pallas_call" in str(jax.make_jaxpr(lambda a: pallas(a))(x))

    def loss(mixer, a):
        y = mixer(a)
        return jnp.sum(y**2), y

    def output_and_grads(mixer):
        (_, y), grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(mixer, x)
        return y, grads

    (y, (dparams, dx)), (y_ref, (dparams_ref, dx_ref)) = output_and_grads(pallas), output_and_grads(chunked)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-5
    pairs = zip(jax.tree.leaves(nnx.to_pure_dict(dparams)), jax.tree.leaves(nnx.to_pure_dict(dparams_ref)))
    assert all(rel_err(a, b) <= 1e-5 for a, b in pairs)


def test_the_blockwise_form_reads_the_selected_and_local_tiles_only():
    mixer = mixers.create("hip", d_model=D, num_heads=4, num_kv_heads=2, block_size=4, top_k=2, local=2,
                          rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    q, k = mixer.queries_keys(x, jnp.arange(T))
    keys = k.transpose(0, 2, 1, 3)
    index = mixer.tile_index(mixer.representatives(q), keys, jnp.arange(10), 10)
    assert index.tiles.shape == (B, 2, 10, 4)  # top_k + local tiles per row, not the 10 tiles of the row


def test_arguments_are_checked():
    raises_naming(lambda: mixers.create("hip", d_model=D, num_heads=2, causal=False), "causal")
    raises_naming(lambda: mixers.create("sea", d_model=D, num_heads=2, top_k=0), "top_k")
    raises_naming(lambda: mixers.create("sea", d_model=D, num_heads=2, local=0), "local")
