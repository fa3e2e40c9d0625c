"""The runtime block mask (``seqlab.core.masks.BlockIndex``) through ``ops.softmax_attn``'s chunked, parallel,
recurrent and pallas (interpreted on CPU) forms and the decode step, forward and gradients in q, k, v, against a
dense masked softmax whose mask is built here pair by pair: the static mask's predicate (``reference_visible``) and
the selected tiles as Python sets of the raw index (repeats, negative and out-of-range entries included, which
select nothing more).

Shapes: B = 2, odd T (37, 70), tiles of 16 and 32, GQA (4 query heads over 2 or 1 key/value heads). Tolerance
1e-5 relative (float32 on both sides), bf16 inputs 1e-2 against float32 on the same rounded inputs. A score_mod
(a learnt per-head relative-position bias and a softcap) goes with a block index in the XLA forms, checked against
the bias table read pair by pair, its gradient included; sequence_axis, score_mod with impl="pallas" and, with
impl="pallas", a block that is not a kernel tile are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import (attention_inputs, attention_value_and_grads, dense_reference, reference_mask, rel_err,
                       selection_mask)
from reference import segment_ids as reference_segment_ids
from seqlab import ops
from seqlab.core import masks as M

B, D, V = 2, 16, 8
TOL = 1e-5


def raw_tiles(seed: int, T: int, H_kv: int, block: int, S: int) -> np.ndarray:
    """[B, H_kv, nq, S] int32 drawn from [-2, nq + 2) (negatives and entries past the last tile), the last entry of
    every row a repeat of its first."""
    n = -(-T // block)
    tiles = np.random.default_rng(seed).integers(-2, n + 2, (B, H_kv, n, S)).astype(np.int32)
    tiles[..., -1] = tiles[..., 0]
    return tiles


def inputs(seed: int, T: int, H: int, H_kv: int):
    return attention_inputs(seed, B=B, T=T, H=H, H_kv=H_kv, D=D, V=V)


def value_and_grads(attention, q, k, v, W) -> list[np.ndarray]:
    """[o, dq, dk, dv]."""
    o, grads = attention_value_and_grads(attention, q, k, v, W)
    return [o, *grads]


# (id, static mask, T, H, H_kv, block, S)
CASES = [
    ("causal", M.Causal(), 37, 4, 2, 16, 2),
    ("window-gqa1", M.Causal(window=20), 70, 4, 1, 16, 3),
    ("bidirectional", M.Bidirectional(), 70, 4, 2, 32, 2),
    ("per-head", M.PerHead((M.Causal(), M.Bidirectional(), M.Causal(window=5), M.Strided(3))), 37, 4, 2, 16, 2),
    ("document", M.Causal() & M.Document(), 70, 4, 2, 16, 4),
]
IMPLS = ("chunked", "parallel", "recurrent", "pallas")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_index_matches_the_pairwise_reference(case, impl):
    _, mask, T, H, H_kv, block, S = case
    q, k, v, W = inputs(T + S, T, H, H_kv)
    tiles = raw_tiles(T * S + H_kv, T, H_kv, block, S)
    index = M.BlockIndex.of(jnp.asarray(tiles), block, -(-T // block))
    segment_ids = reference_segment_ids(T) if M.needs_segments(mask) else None
    visible = reference_mask(mask, T, H) & selection_mask(tiles, T, H, block)
    want = value_and_grads(dense_reference(visible), q, k, v, W)
    got = value_and_grads(lambda q, k, v: ops.softmax_attn(q, k, v, mask=mask, impl=impl, block_index=index,
                                                           segment_ids=segment_ids), q, k, v, W)
    errors = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, want)}
    assert all(e <= TOL for e in errors.values()), errors


CAP = 4.0  # the softcap of the score_mod test: s -> CAP·tanh(s / CAP) + bias[h, q − k]


def capped_relative_bias(table: jax.Array):
    """The score_mod under test: softcap, then the learnt bias table [H, 2T − 1] at (head, q − k + T − 1)."""
    span = (table.shape[1] + 1) // 2

    def score_mod(scores, q_idx, k_idx, head):
        return CAP * jnp.tanh(scores / CAP) + table[head, q_idx - k_idx + span - 1]

    return score_mod


def pairwise_capped_bias_reference(visible: np.ndarray):
    """Dense masked softmax with the softcap and bias written out: the bias [H, T, T] gathered from the table pair
    by pair in Python loops, for (q, k, v, table)."""

    def attention(q, k, v, table):
        T, H, group = q.shape[1], q.shape[2], q.shape[2] // k.shape[2]
        pairs = np.array([[[(h, t - s + T - 1) for s in range(T)] for t in range(T)] for h in range(H)])
        bias = table[pairs[..., 0], pairs[..., 1]]  # [H, T, T]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * q.shape[-1] ** -0.5
        logits = jnp.where(visible, CAP * jnp.tanh(logits / CAP) + bias, -jnp.inf)
        p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        return jnp.einsum("bhts,bshv->bthv", p / jnp.sum(p, axis=-1, keepdims=True), v, precision="highest")

    return attention


@pytest.mark.parametrize("impl", ("chunked", "parallel", "recurrent"))
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_score_mod_with_a_block_index_matches_the_pairwise_bias(case, impl):
    _, mask, T, H, H_kv, block, S = case
    q, k, v, W = inputs(2 * T + S, T, H, H_kv)
    table = jnp.asarray(np.random.default_rng(T).standard_normal((H, 2 * T - 1)), jnp.float32)
    tiles = raw_tiles(3 * T + H_kv, T, H_kv, block, S)
    tiles[:, :, :, 0] = np.arange(-(-T // block))  # every query sees its own tile: no empty rows
    index = M.BlockIndex.of(jnp.asarray(tiles), block, -(-T // block))
    visible = reference_mask(mask, T, H) & selection_mask(tiles, T, H, block)
    assert visible.any(axis=-1).all()

    def values_and_grads(attention) -> list[jax.Array]:
        """[o, dq, dk, dv, dtable] of the loss sum(o * W)."""

        def loss(*args):
            o = attention(*args)
            return jnp.sum(o * W), o

        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, table)
        return [o, *grads]

    def under_test(q, k, v, table):
        return ops.softmax_attn(q, k, v, mask=mask, impl=impl, block_index=index,
                                score_mod=capped_relative_bias(table))

    got, want = values_and_grads(under_test), values_and_grads(pairwise_capped_bias_reference(visible))
    errors = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv", "dtable"), got, want)}
    assert all(e <= TOL for e in errors.values()), errors


def test_block_index_bf16():
    T, H, H_kv, block, S = 37, 4, 2, 16, 2
    q, k, v, W = inputs(3, T, H, H_kv)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    tiles = raw_tiles(5, T, H_kv, block, S)
    index = M.BlockIndex.of(jnp.asarray(tiles), block, 3)
    visible = reference_mask(M.Causal(), T, H) & selection_mask(tiles, T, H, block)
    want = value_and_grads(dense_reference(visible), *[jnp.asarray(x, jnp.float32) for x in (q, k, v)], W)
    got = value_and_grads(lambda q, k, v: ops.softmax_attn(q, k, v, impl="chunked", block_index=index), q, k, v, W)
    errors = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errors) <= 1e-2, errors


def test_decode_step_reads_the_query_row_only():
    T, H, H_kv, block, S = 37, 4, 2, 16, 2
    q, k, v, _ = inputs(7, T, H, H_kv)
    tiles = raw_tiles(9, T, H_kv, block, S)
    visible = reference_mask(M.Causal(), T, H) & selection_mask(tiles, T, H, block)
    want = dense_reference(visible)(q, k, v)
    index = M.BlockIndex.of(jnp.asarray(tiles), block, 3)
    for t in (0, 15, 16, 36):
        row = M.BlockIndex(index.tiles[:, :, t // block][:, :, None], block)
        got = ops.softmax_decode_step(q[:, t], k, v, jnp.arange(T), t, block_index=row)
        if np.any(want[:, t]):
            assert rel_err(got, want[:, t]) <= TOL
        else:  # no selected tile holds a key at or before t
            assert not np.any(got)


def test_of_marks_repeats_and_out_of_range_entries_unused():
    index = M.BlockIndex.of(jnp.asarray([[[[3, 1, 1, -1, 7, 0]]]]), 16, 4)
    assert index.tiles.tolist() == [[[[0, 1, 4, 3, 4, 4]]]]  # sorted; the repeat, -1 and 7 become the sentinel 4


def test_block_index_errors_name_the_argument():
    q = jnp.zeros((B, 37, 4, D))
    kv = jnp.zeros((B, 37, 2, D))
    good = M.BlockIndex.of(jnp.zeros((B, 2, 3, 2), jnp.int32), 16, 3)
    with pytest.raises(ValueError, match=r"block_index: tiles must be \[2, 2, 3, S\]"):
        ops.softmax_attn(q, kv, kv, block_index=M.BlockIndex.of(jnp.zeros((B, 2, 4, 2), jnp.int32), 16, 3))
    with pytest.raises(ValueError, match="block_index: a runtime block index runs without sequence_axis"):
        ops.softmax_attn(q, kv, kv, block_index=good, sequence_axis="x")
    with pytest.raises(ValueError, match="score_mod is not supported by the Pallas flash_attention kernels"):
        ops.softmax_attn(q, kv, kv, block_index=good, score_mod=lambda s, *_: s, impl="pallas")
    with pytest.raises(ValueError, match="block_index: block must be a power of two >= 16"):
        ops.softmax_attn(q, kv, kv, block_index=M.BlockIndex.of(jnp.zeros((B, 2, 5, 2), jnp.int32), 8, 5),
                         impl="pallas")
    with pytest.raises(ValueError, match="BlockIndex.tiles must be integers"):
        M.BlockIndex.of(jnp.zeros((B, 2, 3)), 16, 3)
    with pytest.raises(ValueError, match="block_index must be a seqlab.core.masks.BlockIndex"):
        ops.softmax_attn(q, kv, kv, block_index=np.zeros((B, 2, 3, 2), np.int32))
