"""The mask algebra of softmax attention: which keys each query sees, shared by the XLA paths
(``seqlab.core.online_softmax``, ``seqlab.core.softmax_parallel``, the LoLCATs and block-local ops) and the Pallas
kernels (``pallas_kernels.flash_attention``).

A mask is a frozen, hashable dataclass (it is static: it keys compilation caches and custom_vjp plans). The basic
masks are ``Causal(window)``, ``Lagged(lag)``, ``Bidirectional(window)``, ``BlockDiagonal(size, causal)``,
``Strided(stride, causal)``, ``BlockSparse(layout, block, causal)``, ``Terraced(window)`` (LoLCATs' "tk" window),
``VerticalStride`` (S2-Attention's per-head stripes; ``s2_heads``), ``SpanSummaries`` (Combiner: tokens, then one
summary slot per span), the token-grid masks ``Neighborhood`` (NATTEN,
1-3 d with dilation), ``Halo`` (HaloNet) and ``CircularWindow`` (CLEAR), on raster-order positions of a grid,
``Document()`` (segment ids) and ``InDocument(mask)`` (a mask on positions within each document); ``And(a, b,
...)`` / ``a & b`` and ``Or(a, b, ...)`` / ``a | b`` compose them, and ``PerHead(masks)``
gives one per query head (``PerHead & m`` combines head by head). Every element mask (``ElementMask``) gives:

- the element predicate ``visible(q_pos, k_pos, *, segments=None, cells=None)``: bool, in jnp, from int32 absolute
  positions of one broadcast shape (iota positions of a tile inside a Pallas kernel, an outer grid in XLA). It must
  be right for positions in [0, T) only: callers make keys outside the sequence (padding, a dummy tile, empty cache
  slots, tokens before the sequence) invisible themselves, as ``pairwise`` does. ``segments = (q_segment,
  k_segment)``: int segment ids broadcasting like the positions, which a ``Document`` term compares (a query sees a
  key of its own segment only); segment ids are runtime arrays, so masks hold none and the attention functions take
  ``segment_ids [B, T]`` when ``needs_segments(mask)``. ``cells``: for each ``BlockSparse`` term, its value on the
  current tile (a scalar bool), where the caller knows it statically (a Pallas tile lies inside one layout cell);
  without it the layout is looked up element by element.
- statically, in numpy, ``any_visible(q_first, q_last, k_first, k_last)`` (broadcasting) and from it
  ``tile_map(T, block_q, block_k)`` [ceil(T / block_q), ceil(T / block_k)] bool: which key tiles each query tile
  must visit. A tile map never misses a visible pair; it may mark a tile whose pairs are all masked (the predicate
  then masks it, so visiting it is only wasted work). The basic masks' maps are exact; ``And``'s is the AND of its
  terms' maps (conservative), ``Or``'s the OR; a ``Document`` term marks every tile (the ids are not static).
  ``PerHead``'s map is the union of its heads' maps.
- ``check(T)``: ValueError, naming the argument, if the mask does not fit T tokens.

``visit_lists(mask, T, block_q, block_k)``: per query tile, the ascending key tiles it visits (its tile-map row;
``by_key=True``: per key tile, the query tiles that visit it). ``is_span(visits)``: whether they are one contiguous
run of tiles — the fast path of the XLA blockwise form reads such a row with one slice.

``BlockIndex(tiles, block)`` is the one runtime block mask: per (batch row, key/value head, query tile), the key
tiles chosen from the data (``seqlab.core.block_select``: top-k tiles, hierarchical pruning). It is a traced
pytree, not a static mask: the attention functions take it as ``block_index=`` beside a static mask, and a query
sees a key only where both allow it.

Masked scores take ``MASKED`` (``masked_fill``, or ``scores + mask_bias(visible)`` where the addition fuses into
the score matmul), a finite "minus infinity": exp(MASKED − m) is 0 and never inf − inf; scores are masked before
they are exponentiated.

A ``ScoreMod`` ``score_mod(scores, q_idx, k_idx, head) -> scores`` rewrites float32 scaled scores before masking
(bias, temperature, softcap): scores [B, H, Tq, Tk] float32, q_idx [Tq, 1] and k_idx [1, Tk] int32 absolute
positions (clipped into [0, T)), head [H, 1, 1] int32 query head indices; it returns scores of the same shape. It
must act on each score independently of the others (no reduction over Tq or Tk): the blockwise form calls it tile
by tile. Under a runtime ``BlockIndex`` the blockwise form's k_idx is [B, H, 1, Tk] (each batch row and head reads
its own tiles), so a score_mod should combine its arguments by broadcasting, not by their exact shapes.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.core import documents

Array = jax.Array
ScoreMod = Callable[[Array, Array, Array, Array], Array]
Segments = tuple[Array, Array]  # (query segment ids, key segment ids), broadcasting like the positions

MASKED = -1e30  # finite "minus infinity": exp(MASKED - m) is 0 and never produces inf - inf


def masked_fill(scores: Array, visible: Array) -> Array:
    """scores where visible, MASKED elsewhere (visible: bool, broadcasting against scores)."""
    return jnp.where(visible, scores, MASKED)


def mask_bias(visible: Array) -> Array:
    """0 where visible, MASKED elsewhere (float32): ``scores + mask_bias(visible)`` is ``masked_fill`` for finite
    scores below 1e22 in magnitude (MASKED absorbs them), and XLA:CPU fuses the addition into the score matmul."""
    return jnp.where(visible, 0.0, MASKED)


def _check_positive(owner: str, name: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


class Mask(abc.ABC):
    """Which keys each query sees: an element mask (``ElementMask``) shared by every head, or ``PerHead``."""

    @abc.abstractmethod
    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        """One element mask shared by every head, or one per query head (ValueError if there are not num_heads)."""

    @abc.abstractmethod
    def tile_map(self, length: int, block_q: int, block_k: int) -> np.ndarray:
        """[ceil(T / block_q), ceil(T / block_k)] bool: the (query tile, key tile) pairs to visit."""

    def check(self, length: int) -> None:
        """ValueError if the mask does not fit a sequence of ``length`` tokens."""

    def __and__(self, other: object) -> Mask:
        return _combine(And, self, other)

    def __or__(self, other: object) -> Mask:
        return _combine(Or, self, other)


class ElementMask(Mask):
    """A mask given by an element predicate and, statically, the map of the tiles holding a visible pair."""

    @abc.abstractmethod
    def visible(self, q_pos: Array, k_pos: Array, *, segments: Segments | None = None,
                cells: Mapping[BlockSparse, Array] | None = None) -> Array:
        """Bool, from int32 positions broadcasting together: key k_pos visible to query q_pos (positions in [0, T);
        see the module docstring for segments and cells)."""

    @abc.abstractmethod
    def any_visible(self, q_first: np.ndarray, q_last: np.ndarray, k_first: np.ndarray,
                    k_last: np.ndarray) -> np.ndarray:
        """Whether some query in [q_first, q_last] may see some key in [k_first, k_last] (numpy, broadcasting)."""

    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        return (self,)

    def tile_map(self, length: int, block_q: int, block_k: int) -> np.ndarray:
        q_first, q_last = _tile_bounds(length, block_q)
        k_first, k_last = _tile_bounds(length, block_k)
        shape = (q_first.size, k_first.size)
        return np.broadcast_to(self.any_visible(q_first[:, None], q_last[:, None], k_first[None], k_last[None]), shape)


def _tile_bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each tile of ``block`` tokens, the last one clipped to the sequence."""
    first = np.arange(0, length, block)
    return first, np.minimum(first + block, length) - 1


def _differences(q_first, q_last, k_first, k_last) -> tuple[np.ndarray, np.ndarray]:
    """The range [lo, hi] of t − s over a tile pair; every integer in it occurs."""
    return q_first - k_last, q_last - k_first


def _all(*arrays: np.ndarray) -> np.ndarray:
    return np.full(np.broadcast_shapes(*(np.shape(a) for a in arrays)), True)


def _rectangle_sum(a: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
                   cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sum of a[r0 : r1 + 1, c0 : c1 + 1] for broadcasting index arrays rows = (r0, r1), cols = (c0, c1)."""
    table = np.pad(np.cumsum(np.cumsum(a, axis=0), axis=1), ((1, 0), (1, 0)))
    (r0, r1), (c0, c1) = rows, cols
    return table[r1 + 1, c1 + 1] - table[r0, c1 + 1] - table[r1 + 1, c0] + table[r0, c0]


@dataclasses.dataclass(frozen=True)
class Causal(ElementMask):
    """Key s visible to query t iff s <= t and t − s < window (a sliding window; None: no limit)."""

    window: int | None = None

    def __post_init__(self):
        _check_positive("Causal", "window", self.window, optional=True)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        diff = q_pos - k_pos
        return (diff >= 0) if self.window is None else (diff >= 0) & (diff < self.window)

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        return (hi >= 0) if self.window is None else (hi >= 0) & (lo < self.window)


@dataclasses.dataclass(frozen=True)
class Lagged(ElementMask):
    """Key s visible to query t iff s <= t − lag: causal attention to strictly earlier positions (HiLo's pooled
    blocks: a query sees the blocks completed before its own)."""

    lag: int = 1

    def __post_init__(self):
        _check_positive("Lagged", "lag", self.lag)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        return q_pos - k_pos >= self.lag

    def any_visible(self, q_first, q_last, k_first, k_last):
        return _differences(q_first, q_last, k_first, k_last)[1] >= self.lag


@dataclasses.dataclass(frozen=True)
class Bidirectional(ElementMask):
    """Every key visible to every query; with a window, iff |t − s| < window."""

    window: int | None = None

    def __post_init__(self):
        _check_positive("Bidirectional", "window", self.window, optional=True)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        diff = q_pos - k_pos
        if self.window is None:
            return jnp.full(diff.shape, True)
        return (diff < self.window) & (diff > -self.window)

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        if self.window is None:
            return _all(lo, hi)
        return (hi > -self.window) & (lo < self.window)


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(ElementMask):
    """t and s in the same block of ``size`` tokens (t // size == s // size), and s <= t if ``causal``."""

    size: int
    causal: bool = True

    def __post_init__(self):
        _check_positive("BlockDiagonal", "size", self.size)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        same = jax.lax.div(q_pos, self.size) == jax.lax.div(k_pos, self.size)  # positions are >= 0
        return same & (k_pos <= q_pos) if self.causal else same

    def any_visible(self, q_first, q_last, k_first, k_last):
        # Some block meets both ranges; with causal, the latest query of that block is then at or after its
        # earliest key as soon as k_first <= q_last.
        shared = (q_first // self.size <= k_last // self.size) & (k_first // self.size <= q_last // self.size)
        return shared & (k_first <= q_last) if self.causal else shared


@dataclasses.dataclass(frozen=True)
class Strided(ElementMask):
    """(t − s) % stride == 0, and s <= t if ``causal`` (the strided heads of the Sparse Transformer)."""

    stride: int
    causal: bool = True

    def __post_init__(self):
        _check_positive("Strided", "stride", self.stride)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        diff = q_pos - k_pos
        on_stride = jax.lax.rem(diff, self.stride) == 0
        return on_stride & (diff >= 0) if self.causal else on_stride

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        if self.causal:
            lo = np.maximum(lo, 0)
        return (hi // self.stride) * self.stride >= lo  # the largest multiple of stride <= hi lies in [lo, hi]


@dataclasses.dataclass(frozen=True)
class Terraced(ElementMask):
    """LoLCATs' "terracing" window: the query's own block of ``window`` tokens (causal) plus the whole previous
    block, s <= t and s >= window · (t // window − 1) (blocks aligned to position 0)."""

    window: int

    def __post_init__(self):
        _check_positive("Terraced", "window", self.window)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        return (k_pos <= q_pos) & (k_pos >= self.window * (jax.lax.div(q_pos, self.window) - 1))

    def any_visible(self, q_first, q_last, k_first, k_last):
        # Both ends of a query's key range grow with the query: the earliest query at or after k_first decides.
        query = np.maximum(q_first, k_first)
        return (query <= q_last) & (self.window * (query // self.window - 1) <= k_last)


@dataclasses.dataclass(frozen=True)
class BlockSparse(ElementMask):
    """A static [nq, nk] layout over tiles of ``block`` tokens: within a tile marked True every pair is visible
    (intersected with s <= t if ``causal``); nq = nk = ceil(T / block). Lists of bools are turned into tuples."""

    layout: tuple[tuple[bool, ...], ...]
    block: int
    causal: bool = False

    def __post_init__(self):
        _check_positive("BlockSparse", "block", self.block)
        try:
            rows = tuple(tuple(bool(x) for x in row) for row in self.layout)
        except TypeError:
            raise ValueError("BlockSparse.layout must be a 2-d nesting of bools") from None
        if not rows or len({len(row) for row in rows}) != 1:
            raise ValueError("BlockSparse.layout must be a non-empty rectangle of bools")
        object.__setattr__(self, "layout", rows)

    def check(self, length: int) -> None:
        tiles = -(-length // self.block)
        shape = (len(self.layout), len(self.layout[0]))
        if shape != (tiles, tiles):
            raise ValueError(f"BlockSparse.layout must have shape ({tiles}, {tiles}) for T={length} and "
                             f"block={self.block}, got {shape}")

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        shape = jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos))
        cell = cells[self] if cells is not None and self in cells else self._lookup(q_pos, k_pos)
        return jnp.broadcast_to(cell, shape) & (k_pos <= q_pos) if self.causal else jnp.broadcast_to(cell, shape)

    def _lookup(self, q_pos: Array, k_pos: Array) -> Array:
        layout = np.asarray(self.layout)
        rows = jnp.clip(q_pos // self.block, 0, layout.shape[0] - 1)
        cols = jnp.clip(k_pos // self.block, 0, layout.shape[1] - 1)
        return jnp.asarray(layout)[rows, cols]

    def any_visible(self, q_first, q_last, k_first, k_last):
        layout = np.asarray(self.layout)
        rows, cols = (q_first // self.block, q_last // self.block), (k_first // self.block, k_last // self.block)
        if not self.causal:
            return _rectangle_sum(layout, rows, cols) > 0
        # Cells below the diagonal are wholly causal; a diagonal cell holds a pair with s <= t iff k_first <= q_last.
        below = _rectangle_sum(np.tril(layout, -1), rows, cols) > 0
        first, last = np.maximum(rows[0], cols[0]), np.minimum(rows[1], cols[1])
        diagonal = np.concatenate([[0], np.cumsum(np.diag(layout))])
        on_diagonal = (last >= first) & (diagonal[np.maximum(last + 1, first)] > diagonal[first])
        return below | on_diagonal & (k_first <= q_last)

    @property
    def aligned_block(self) -> int:
        """The largest power of two dividing ``block``: tiles of at most this size never straddle cells."""
        return self.block & -self.block


def _array_module(x: object):
    """numpy for numpy inputs (static tile maps), jax.numpy for traced or device arrays."""
    return np if isinstance(x, (np.ndarray, np.generic, int)) else jnp


def _floor_div(x, d: int):
    """x // d for x >= 0 (jax.lax.div in jnp: no floor correction in a kernel)."""
    return x // d if _array_module(x) is np else jax.lax.div(x, jnp.asarray(d, x.dtype))


@dataclasses.dataclass(frozen=True)
class VerticalStride(ElementMask):
    """S2-Attention's block pattern for one head ("S2-Attention: Hardware-Aware Context Sharding Among Attention
    Heads"): with query block I = t // block and key block J = s // block, the key is visible iff it is local,
    0 <= I − J < local_blocks, or on this head's vertical stripes, (J + residue) % stride == 0 (and J <= I), and
    s <= t. Non-causal: |I − J| < local_blocks or (I − J + residue) % stride == 0 (relative stripes). Heads with
    residues h·σ + o (``s2_heads``) shard the remote context between them."""

    block: int
    local_blocks: int
    stride: int
    residue: int = 0
    causal: bool = True

    def __post_init__(self):
        for name in ("block", "local_blocks", "stride"):
            _check_positive("VerticalStride", name, getattr(self, name))
        if not isinstance(self.residue, int) or isinstance(self.residue, bool) or self.residue < 0:
            raise ValueError(f"VerticalStride.residue must be a non-negative int, got {self.residue!r}")

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        xp = _array_module(q_pos)
        rows, cols = _floor_div(q_pos, self.block), _floor_div(k_pos, self.block)
        diff = rows - cols
        if self.causal:
            stripe = (cols + self.residue) % self.stride == 0
            return (k_pos <= q_pos) & ((diff < self.local_blocks) | stripe)
        stripe = (diff + self.residue) % self.stride == 0
        return (xp.abs(diff) < self.local_blocks) | stripe

    def any_visible(self, q_first, q_last, k_first, k_last):
        rows = (q_first // self.block, q_last // self.block)
        cols = (k_first // self.block, k_last // self.block)
        lo, hi = rows[0] - cols[1], rows[1] - cols[0]  # the block differences I − J over the pair of ranges
        if not self.causal:
            local = (hi > -self.local_blocks) & (lo < self.local_blocks)
            return local | _has_residue(lo + self.residue, hi + self.residue, self.stride)
        last_col = np.minimum(cols[1], rows[1])  # a stripe key needs J <= I
        stripe = _has_residue(cols[0] + self.residue, last_col + self.residue, self.stride)
        return (k_first <= q_last) & (((hi >= 0) & (lo < self.local_blocks)) | stripe)


def _has_residue(lo: np.ndarray, hi: np.ndarray, stride: int) -> np.ndarray:
    """Whether [lo, hi] holds a multiple of stride (lo <= hi; empty ranges give False)."""
    return (hi >= lo) & (np.floor_divide(hi, stride) * stride >= lo)


def s2_heads(num_heads: int, block: int, local_blocks: int, stride: int, *, head_step: int | None = None,
             offset: int = 0, dense_heads: int = 0, causal: bool = True) -> PerHead:
    """S2-Attention's per-head masks: head h < num_heads − dense_heads takes ``VerticalStride`` with residue
    h·σ + offset (σ = head_step, default max(1, stride // num_heads)), so the heads' stripes cover the context;
    the last ``dense_heads`` heads are dense (``Causal()`` / ``Bidirectional()``)."""
    if not isinstance(dense_heads, int) or not 0 <= dense_heads <= num_heads:
        raise ValueError(f"dense_heads must be an int in [0, {num_heads}], got {dense_heads!r}")
    step = max(1, stride // num_heads) if head_step is None else head_step
    _check_positive("s2_heads", "head_step", step)
    sparse = [VerticalStride(block, local_blocks, stride, (h * step + offset) % stride, causal)
              for h in range(num_heads - dense_heads)]
    dense = [Causal() if causal else Bidirectional()] * dense_heads
    return PerHead(tuple(sparse + dense))


DENSE_TILE_MAP_LIMIT = 8192  # grid masks evaluate their tile map pair by pair up to this many tokens


@dataclasses.dataclass(frozen=True)
class SpanSummaries(ElementMask):
    """Combiner's layout ("Combiner: Full Attention Transformer with Sparse Computation Cost"): positions
    [0, tokens) are tokens, cut into spans of ``span``; position tokens + j is the summary slot of span j (its
    abstraction key and local expectation), one per span. A token query t sees the tokens of its own span (s <= t
    if ``causal``) and the summaries of the other spans (causal: those of the spans completed before its own,
    j < t // span); a summary slot's query sees nothing."""

    span: int
    tokens: int
    causal: bool = True

    def __post_init__(self):
        _check_positive("SpanSummaries", "span", self.span)
        _check_positive("SpanSummaries", "tokens", self.tokens)

    @property
    def length(self) -> int:
        """tokens + ⌈tokens / span⌉: the tokens and their spans' summary slots."""
        return self.tokens + -(-self.tokens // self.span)

    def check(self, length: int) -> None:
        if length != self.length:
            raise ValueError(f"SpanSummaries: a sequence of {self.tokens} tokens in spans of {self.span} takes "
                             f"length {self.length} (tokens, then one summary slot per span), got {length}")

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        q_span, k_span = _floor_div(q_pos, self.span), k_pos - self.tokens  # k_span: the summary's span
        is_token = k_pos < self.tokens
        local = is_token & (q_span == _floor_div(k_pos, self.span))
        remote = ~is_token & ((k_span < q_span) if self.causal else (k_span != q_span))
        if self.causal:
            local = local & (k_pos <= q_pos)
        return (q_pos < self.tokens) & (local | remote)

    def any_visible(self, q_first, q_last, k_first, k_last):
        q_last = np.minimum(q_last, self.tokens - 1)  # token queries only
        local = BlockDiagonal(self.span, self.causal).any_visible(q_first, q_last, k_first,
                                                                   np.minimum(k_last, self.tokens - 1))
        local &= k_first < self.tokens
        first_summary = np.maximum(k_first, self.tokens) - self.tokens
        last_summary = k_last - self.tokens
        q_spans = (q_first // self.span, q_last // self.span)
        if self.causal:
            remote = first_summary < q_spans[1]
        else:  # some summary j and some query span differ, unless both are one and the same span
            remote = ~((first_summary == last_summary) & (q_spans[0] == q_spans[1]) & (q_spans[0] == first_summary))
        return (q_first <= q_last) & (local | ((first_summary <= last_summary) & remote))


@dataclasses.dataclass(frozen=True)
class _GridMask(ElementMask):
    """A mask on a token grid of shape ``grid`` (axis sizes; None: a 1-d sequence of any length) laid out in
    raster order (the last axis fastest): position p has coordinates x_a = (p // Π_{b>a} n_b) % n_a.
    Subclasses give ``_visible_coordinates`` and, per query, the box of key coordinates it can see
    (``_key_box``). The tile map is exact up to DENSE_TILE_MAP_LIMIT tokens (the predicate on every pair, in
    numpy), above it (and in ``any_visible``) conservative: the raster range of each query's key box."""

    grid: tuple[int, ...] | None

    def _check_grid(self, name: str) -> None:
        if self.grid is None:
            return
        grid = tuple(self.grid) if isinstance(self.grid, (tuple, list)) else ()
        if not grid or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
            raise ValueError(f"{name}.grid must be None or a non-empty tuple of positive ints, got {self.grid!r}")
        object.__setattr__(self, "grid", grid)

    @property
    def ndim(self) -> int:
        return 1 if self.grid is None else len(self.grid)

    def _axis_size(self, axis: int) -> int | None:
        return None if self.grid is None else self.grid[axis]

    def check(self, length: int) -> None:
        if self.grid is not None and length > math.prod(self.grid):
            raise ValueError(f"{type(self).__name__}.grid {self.grid} holds {math.prod(self.grid)} tokens, fewer "
                             f"than the sequence's T={length}")

    def coordinates(self, pos) -> list:
        """Per axis, the coordinate of raster positions pos (any shape)."""
        if self.grid is None:
            return [pos]
        strides = [math.prod(self.grid[a + 1 :]) for a in range(self.ndim)]
        return [_floor_div(pos, st) % n if a else _floor_div(pos, st)
                for a, (st, n) in enumerate(zip(strides, self.grid))]

    def _visible_coordinates(self, q: list, k: list):
        raise NotImplementedError

    def _key_box(self, q: list) -> tuple[list, list]:
        """Per axis, the least and greatest key coordinate the queries at coordinates q may see (numpy)."""
        raise NotImplementedError

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        return self._visible_coordinates(self.coordinates(q_pos), self.coordinates(k_pos))

    def _raster(self, coords: list) -> np.ndarray:
        if self.grid is None:
            return coords[0]
        return sum(c * math.prod(self.grid[a + 1 :]) for a, c in enumerate(coords))

    def any_visible(self, q_first, q_last, k_first, k_last):
        q_first, q_last, k_first, k_last = np.broadcast_arrays(q_first, q_last, k_first, k_last)
        queries = np.arange(int(q_last.max()) + 1)
        lo, hi = self._key_box(self.coordinates(queries))
        lo, hi = self._raster(lo), self._raster(hi)
        out = np.zeros(q_first.shape, bool)
        for index in np.ndindex(q_first.shape):
            span = slice(q_first[index], q_last[index] + 1)
            out[index] = lo[span].min() <= k_last[index] and hi[span].max() >= k_first[index]
        return out

    def tile_map(self, length: int, block_q: int, block_k: int) -> np.ndarray:
        if length > DENSE_TILE_MAP_LIMIT:
            return super().tile_map(length, block_q, block_k)
        keys = np.arange(length)
        k_tiles = -(-length // block_k)
        rows = []
        for first in range(0, length, block_q):
            queries = np.arange(first, min(first + block_q, length))
            seen = self.visible(queries[:, None], keys[None]).any(axis=0)
            rows.append(np.pad(seen, (0, k_tiles * block_k - length)).reshape(k_tiles, block_k).any(axis=1))
        return np.stack(rows)


def _per_axis(owner: str, name: str, value: object, ndim: int) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{owner}.{name} must be one value or one per grid axis ({ndim}), got {value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class Neighborhood(_GridMask):
    """Neighborhood attention ("Neighborhood Attention Transformer"; "Dilated Neighborhood Attention Transformer";
    "Faster Neighborhood Attention"), 1-d, 2-d or 3-d with dilation, stride and causality per axis. On each axis
    (size n, window k, dilation δ, stride s) a position x lies in dilation group g = x % δ at in-group coordinate
    u = x // δ; a group holds n_g = ceil((n − g) / δ) positions. A key at y is visible iff it is in the query's
    group on every axis and, with w = y // δ, inside the query's window there:
      non-causal: c = min((u // s)·s + s // 2, n_g − 1), start = clip(c − k // 2, 0, n_g − k), w in
                  [start, start + k) — k keys, shifted inward at the borders;
      causal:     c = min((u // s)·s + s − 1, n_g − 1), w in [max(c − k + 1, 0), u].
    kernel, dilation, stride, causal: one value or one per axis; grid None: one unbounded axis (causal only)."""

    kernel: int | tuple[int, ...] = 7
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        self._check_grid("Neighborhood")
        for name in ("kernel", "dilation", "stride"):
            values = _per_axis("Neighborhood", name, getattr(self, name), self.ndim)
            for v in values:
                _check_positive("Neighborhood", name, v)
            object.__setattr__(self, name, values)
        causal = _per_axis("Neighborhood", "causal", self.causal, self.ndim)
        if not all(isinstance(c, bool) for c in causal):
            raise ValueError(f"Neighborhood.causal must be a bool or one per grid axis, got {self.causal!r}")
        object.__setattr__(self, "causal", causal)
        for a in range(self.ndim):
            n = self._axis_size(a)
            if n is None and not causal[a]:
                raise ValueError("Neighborhood.grid: a non-causal axis needs its size (the window shifts inward at "
                                 "its end); give grid=(n, ...)")
            if n is not None and self.kernel[a] * self.dilation[a] > n:
                raise ValueError(f"Neighborhood.kernel: kernel × dilation must fit axis {a} of size {n}, got "
                                 f"{self.kernel[a]} × {self.dilation[a]}")

    def _window(self, axis: int, x):
        """(group, first, last) in-group coordinates of the keys the queries at coordinate x see on ``axis``."""
        xp = _array_module(x)
        k, d, s, n = self.kernel[axis], self.dilation[axis], self.stride[axis], self._axis_size(axis)
        group, u = x % d, _floor_div(x, d)
        size = None if n is None else _floor_div(n - group + d - 1, d)
        if self.causal[axis]:
            c = (u // s) * s + s - 1 if xp is np else jax.lax.div(u, s) * s + s - 1
            c = c if size is None else xp.minimum(c, size - 1)
            return group, xp.maximum(c - k + 1, 0), u
        c = xp.minimum((u // s) * s + s // 2 if xp is np else jax.lax.div(u, s) * s + s // 2, size - 1)
        first = xp.clip(c - k // 2, 0, size - k)
        return group, first, first + k - 1

    def _visible_coordinates(self, q, k):
        result = None
        for axis, (x, y) in enumerate(zip(q, k)):
            group, first, last = self._window(axis, x)
            d = self.dilation[axis]
            w = _floor_div(y, d)
            inside = (y % d == group) & (w >= first) & (w <= last)
            result = inside if result is None else result & inside
        return result

    def _key_box(self, q):
        lo, hi = [], []
        for axis, x in enumerate(q):
            group, first, last = self._window(axis, x)
            lo.append(first * self.dilation[axis] + group)
            hi.append(last * self.dilation[axis] + group)
        return lo, hi


@dataclasses.dataclass(frozen=True)
class Halo(_GridMask):
    """HaloNet's blocked local attention with halos ("Scaling Local Self-Attention for Parameter Efficient Visual
    Backbones"): queries in non-overlapping blocks of ``block`` positions per axis see the keys of their block
    widened by ``halo`` positions on each side, per axis: key y visible to query x iff ⌊x/b⌋·b − h <= y <
    ⌊x/b⌋·b + b + h on every axis (keys off the grid do not exist). causal (1-d language models): the left halo
    and the block up to the query, ⌊x/b⌋·b − h <= y <= x."""

    block: int | tuple[int, ...] = 8
    halo: int | tuple[int, ...] = 3
    causal: bool = False
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        self._check_grid("Halo")
        for name, least in (("block", 1), ("halo", 0)):
            values = _per_axis("Halo", name, getattr(self, name), self.ndim)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values):
                raise ValueError(f"Halo.{name} must be ints >= {least} (one, or one per axis), got {values!r}")
            object.__setattr__(self, name, values)
        if not isinstance(self.causal, bool):
            raise ValueError(f"Halo.causal must be a bool, got {self.causal!r}")
        if self.grid is None and not self.causal:
            raise ValueError("Halo.grid: a non-causal halo needs the grid shape, e.g. grid=(H, W)")
        if self.causal and self.ndim != 1:
            raise ValueError(f"Halo.causal: the causal halo is 1-d (grid None or (n,)), got grid={self.grid}")

    def _window(self, axis: int, x):
        b, h = self.block[axis], self.halo[axis]
        start = _floor_div(x, b) * b
        return start - h, (x if self.causal else start + b + h - 1)

    def _visible_coordinates(self, q, k):
        result = None
        for axis, (x, y) in enumerate(zip(q, k)):
            first, last = self._window(axis, x)
            inside = (y >= first) & (y <= last)
            result = inside if result is None else result & inside
        return result

    def _key_box(self, q):
        windows = [self._window(axis, x) for axis, x in enumerate(q)]
        return [np.maximum(w[0], 0) for w in windows], [w[1] for w in windows]


@dataclasses.dataclass(frozen=True)
class CircularWindow(_GridMask):
    """CLEAR's local attention for 2-d (DiT) tokens ("CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
    Transformers Up"): key y visible to query x iff their grid coordinates are within Euclidean distance
    ``radius``, Σ_a (x_a − y_a)² <= radius²; non-causal, on a grid of any dimension."""

    radius: float = 8.0
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        self._check_grid("CircularWindow")
        if self.grid is None:
            raise ValueError("CircularWindow.grid must be the token grid's shape, e.g. grid=(H, W), got None")
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) or not self.radius >= 0:
            raise ValueError(f"CircularWindow.radius must be a non-negative number, got {self.radius!r}")

    def _visible_coordinates(self, q, k):
        return sum((x - y) * (x - y) for x, y in zip(q, k)) <= self.radius**2

    def _key_box(self, q):
        r = int(math.floor(self.radius))
        return [np.maximum(x - r, 0) for x in q], [x + r for x in q]


@dataclasses.dataclass(frozen=True)
class Document(ElementMask):
    """Document (segment-id) masking: key s visible to query t iff both lie in the same segment,
    segment_ids[t] == segment_ids[s]. The ids are runtime values passed with the call (``segments``); statically
    every tile may hold a visible pair. Compose for more: ``Causal() & Document()``."""

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        if segments is None:
            raise ValueError("segment_ids: a Document mask needs the segment ids [B, T] of the sequence")
        return segments[0] == segments[1]

    def any_visible(self, q_first, q_last, k_first, k_last):
        return _all(q_first, q_last, k_first, k_last)


@dataclasses.dataclass(frozen=True)
class InDocument(ElementMask):
    """``mask`` on positions counted from each document's start, within the document: key s visible to query t
    iff start(t) == start(s) and mask.visible(t − start(t), s − start(s)). The segment ids passed with the call
    must be the documents' start positions (``document_start_ids``), so a block-, stripe- or grid-aligned mask
    aligns to every document of a packed row as if it were alone (each document must fit ``mask``: its length
    check, for the row's T, is not applied). Statically every tile may hold a visible pair."""

    mask: ElementMask

    def __post_init__(self):
        if not isinstance(self.mask, ElementMask) or needs_segments(self.mask):
            raise ValueError(f"InDocument.mask must be an element mask without a Document term, got {self.mask!r}")

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        if segments is None:
            raise ValueError("segment_ids: an InDocument mask needs the documents' start positions [B, T]")
        q_start, k_start = segments
        return (q_start == k_start) & self.mask.visible(q_pos - q_start, k_pos - k_start)

    def any_visible(self, q_first, q_last, k_first, k_last):
        return _all(q_first, q_last, k_first, k_last)


def in_document(mask: Mask) -> Mask:
    """``InDocument`` of mask, head by head for ``PerHead``."""
    if isinstance(mask, PerHead):
        return PerHead(tuple(InDocument(m) for m in mask.masks))
    return InDocument(mask)


def document_start_ids(positions: Array, offset: Array | int = 0) -> Array:
    """The segment ids an ``InDocument`` mask takes: each token's document start, its absolute position (offset +
    its index) less its position within the document, positions [B, T]."""
    return offset + jnp.arange(positions.shape[-1], dtype=jnp.int32) - positions.astype(jnp.int32)


def _element_terms(owner: str, masks: object) -> tuple[ElementMask, ...]:
    terms = tuple(masks) if isinstance(masks, (tuple, list)) else ()
    if not terms or not all(isinstance(m, ElementMask) for m in terms):
        raise ValueError(f"{owner}.masks must be a non-empty tuple of element masks (not PerHead), got {masks!r}")
    return terms


@dataclasses.dataclass(frozen=True, init=False)
class _Combination(ElementMask):
    """Terms combined pair by pair with ``_jnp_op`` (the predicate) and ``_np_op`` (``any_visible``)."""

    masks: tuple[ElementMask, ...]
    _jnp_op = staticmethod(jnp.logical_and)
    _np_op = staticmethod(np.logical_and)

    def __init__(self, *masks: ElementMask):
        object.__setattr__(self, "masks", _element_terms(type(self).__name__, masks))

    def check(self, length: int) -> None:
        _check_terms(self.masks, length)

    def visible(self, q_pos, k_pos, *, segments=None, cells=None):
        terms = (m.visible(q_pos, k_pos, segments=segments, cells=cells) for m in self.masks)
        return functools.reduce(self._jnp_op, terms)

    def any_visible(self, q_first, q_last, k_first, k_last):
        return functools.reduce(self._np_op, (m.any_visible(q_first, q_last, k_first, k_last) for m in self.masks))


def _check_terms(masks: tuple[ElementMask, ...], length: int) -> None:
    for mask in masks:
        mask.check(length)


@dataclasses.dataclass(frozen=True, init=False)
class And(_Combination):
    """Key visible iff every term sees it; tile map: the AND of the terms' maps (a superset of the tiles holding a
    visible pair)."""


@dataclasses.dataclass(frozen=True, init=False)
class Or(_Combination):
    """Key visible iff some term sees it; tile map: the OR of the terms' maps."""

    _jnp_op = staticmethod(jnp.logical_or)
    _np_op = staticmethod(np.logical_or)


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
    """One element mask per query head (their number must equal H), e.g. the Sparse Transformer's
    ``PerHead((Causal(window=w), Strided(w)))``. Its tile map is the union of the heads' maps."""

    masks: tuple[ElementMask, ...]

    def __post_init__(self):
        object.__setattr__(self, "masks", _element_terms("PerHead", self.masks))

    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        if len(self.masks) != num_heads:
            raise ValueError(f"PerHead.masks must have one mask per query head ({num_heads}), got {len(self.masks)}")
        return self.masks

    def tile_map(self, length: int, block_q: int, block_k: int) -> np.ndarray:
        return functools.reduce(np.logical_or, (m.tile_map(length, block_q, block_k) for m in self.masks))

    def check(self, length: int) -> None:
        _check_terms(self.masks, length)


def _combine(kind: type[And] | type[Or], a: Mask, b: object) -> Mask:
    """``a & b`` / ``a | b``: nested terms of the same kind flattened; with a PerHead, head by head."""
    if not isinstance(b, Mask):
        return NotImplemented
    if isinstance(a, PerHead) or isinstance(b, PerHead):
        counts = sorted({len(m.masks) for m in (a, b) if isinstance(m, PerHead)})
        if len(counts) > 1:
            raise ValueError(f"PerHead.masks: combined PerHead masks need as many heads, got {counts}")
        per_head = [m.masks if isinstance(m, PerHead) else (m,) * counts[0] for m in (a, b)]
        return PerHead(tuple(_combine(kind, x, y) for x, y in zip(*per_head)))
    flat = [m.masks if isinstance(m, kind) else (m,) for m in (a, b)]
    return kind(*flat[0], *flat[1])


def resolve(mask: Mask | None, causal: bool = True, window: int | None = None) -> Mask:
    """The mask of a call: ``mask``, or from the shorthands ``Causal(window)`` (causal) / ``Bidirectional(window)``;
    ValueError if both are given or mask is not a Mask."""
    if mask is None:
        return Causal(window) if causal else Bidirectional(window)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a Mask (Causal, Bidirectional, BlockDiagonal, Strided, BlockSparse, Terraced, "
                         f"Document, And, Or or PerHead), got {mask!r}")
    if causal is not True or window is not None:
        raise ValueError("mask: give either mask or the causal / window shorthands, not both")
    return mask


def leaves(mask: Mask) -> tuple[ElementMask, ...]:
    """The basic masks ``mask`` is built from, in order, each once."""
    if not isinstance(mask, (And, Or, PerHead)):
        return (mask,)
    return tuple(dict.fromkeys(leaf for term in mask.masks for leaf in leaves(term)))


def needs_segments(mask: Mask) -> bool:
    """Whether the mask has a ``Document`` or ``InDocument`` term (its calls need segment ids)."""
    return any(isinstance(leaf, (Document, InDocument)) for leaf in leaves(mask))


def cell_terms(mask: Mask) -> tuple[BlockSparse, ...]:
    """The ``BlockSparse`` terms of ``mask``: constant on a tile inside one layout cell (see ``cells``)."""
    return tuple(leaf for leaf in leaves(mask) if isinstance(leaf, BlockSparse))


def check_segment_ids(mask: Mask, segment_ids: Array | None, batch: int, length: int) -> Array | None:
    """segment_ids as int32 [B, T] when the mask has a Document term, else None; ValueError naming segment_ids if
    they are missing, not needed or of the wrong shape."""
    if not needs_segments(mask):
        if segment_ids is not None:
            raise ValueError("segment_ids: given, but the mask has no Document term (use e.g. Causal() & Document())")
        return None
    if segment_ids is None:
        raise ValueError(f"segment_ids: the mask {mask!r} has a Document term and needs segment_ids [B, T]")
    return documents.check_segment_ids(segment_ids, batch, length)


def pairwise(mask: ElementMask, q_pos: Array, k_pos: Array, *, length: int | None = None,
             segments: Segments | None = None) -> Array:
    """[..., Tq, Tk] bool: ``mask.visible`` on every pair of q_pos [..., Tq] and k_pos [..., Tk]; keys at negative
    positions (empty cache slots, tokens before the sequence, front padding) or, given ``length``, at or after it
    are invisible. segments: (q_segment [..., Tq], k_segment [..., Tk]), paired the same way."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    if segments is not None:
        segments = (segments[0][..., :, None], segments[1][..., None, :])
    in_range = (k >= 0) if length is None else (k >= 0) & (k < length)
    return in_range & mask.visible(q, k, segments=segments)


def head_pairwise(mask: Mask, kv_heads: int, group: int, q_pos: Array, k_pos: Array, *, length: int | None = None,
                  segments: Segments | None = None) -> Array:
    """Bool broadcasting to [(B,) Hkv, G, Tq, Tk]: ``pairwise`` of each query head's mask (head h = i·G + g) on
    q_pos [Tq] and k_pos [Tk] (or [B, Hkv, Tk]: each key/value head's own keys, as a ``BlockIndex`` row gathers
    them); segments ([B, Tq], [B, Tk]) for Document terms ([B, 1, Tq], [B, Hkv, Tk] with per-head keys)."""
    head_masks = mask.head_masks(kv_heads * group)
    per_mask = {m: pairwise(m, q_pos, k_pos, length=length, segments=segments) for m in dict.fromkeys(head_masks)}
    if jnp.ndim(k_pos) == 3:  # per key/value head keys: per_mask values are [B, Hkv, Tq, Tk]
        if len(set(head_masks)) == 1:
            return per_mask[head_masks[0]][:, :, None]
        heads = [per_mask[m][:, h // group] for h, m in enumerate(head_masks)]
        return jnp.stack(heads, axis=1).reshape(k_pos.shape[0], kv_heads, group, *heads[0].shape[-2:])
    if len(head_masks) == 1:
        return per_mask[head_masks[0]][..., None, None, :, :]
    shape = jnp.broadcast_shapes(*(x.shape for x in per_mask.values()))  # with B as soon as one head needs it
    visible = jnp.stack([jnp.broadcast_to(per_mask[m], shape) for m in head_masks], axis=-3)  # [(B,) H, Tq, Tk]
    return visible.reshape(*visible.shape[:-3], kv_heads, group, *visible.shape[-2:])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tiles"], meta_fields=["block"])
@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """The runtime block mask: the key tiles each query tile sees, chosen from the data (top-k block selection,
    hierarchical pruning), intersected with a static mask's predicate.

    tiles: [B, Hkv, nq, S] int32 over tiles of ``block`` tokens (nq = ceil(T / block); a row's query heads share
    their key/value head's tiles): queries in tile i see the keys of tiles tiles[b, h, i, :] only. Build it with
    ``BlockIndex.of``, which sorts each row and marks repeated and out-of-range entries unused (they are then the
    sentinel nk, which holds no key). A pytree: ``tiles`` is traced, ``block`` static.
    """

    tiles: Array
    block: int

    @classmethod
    def of(cls, tiles: Array, block: int, num_tiles: int) -> "BlockIndex":
        """tiles [B, Hkv, nq, S] int (any order; repeats, negative and >= num_tiles entries unused) of ``block``
        tokens among num_tiles key tiles."""
        _check_positive("BlockIndex", "block", block)
        if jnp.ndim(tiles) != 4 or not jnp.issubdtype(jnp.result_type(tiles), jnp.integer):
            raise ValueError(f"BlockIndex.tiles must be integers [batch, kv_heads, query_tiles, selected], got "
                             f"{jnp.result_type(tiles)} {jnp.shape(tiles)}")
        tiles = jnp.asarray(tiles, jnp.int32)
        tiles = jnp.sort(jnp.where((tiles >= 0) & (tiles < num_tiles), tiles, num_tiles), axis=-1)
        repeat = jnp.concatenate([jnp.zeros_like(tiles[..., :1], bool), tiles[..., 1:] == tiles[..., :-1]], -1)
        return cls(jnp.where(repeat, num_tiles, tiles), block)

    @property
    def width(self) -> int:
        """S, the key tiles each query tile reads."""
        return self.tiles.shape[-1]

    def check(self, batch: int, kv_heads: int, length: int) -> None:
        """ValueError, naming block_index, unless tiles is [batch, kv_heads, ceil(length / block), S]."""
        rows = -(-length // self.block)
        if self.tiles.shape[:3] != (batch, kv_heads, rows):
            raise ValueError(f"block_index: tiles must be [{batch}, {kv_heads}, {rows}, S] (batch, kv heads, query "
                             f"tiles of {self.block} for T={length}), got {self.tiles.shape}")

    def visible(self, q_pos: Array, k_pos: Array, first_row: Array | int = 0) -> Array:
        """[B, Hkv, Tq, Tk] bool: whether key k_pos [Tk] lies in a tile that query q_pos [Tq]'s row selects; the
        rows of ``tiles`` are query tiles first_row, first_row + 1, ... (a decode step holds only its own)."""
        rows = jnp.clip(q_pos // self.block - first_row, 0, self.tiles.shape[2] - 1)
        selected = self.tiles[:, :, rows]  # [B, Hkv, Tq, S]
        return jnp.any(selected[..., None, :] == (k_pos // self.block)[:, None], axis=-1)


def visit_lists(mask: Mask, length: int, block_q: int, block_k: int, *,
                by_key: bool = False) -> tuple[tuple[int, ...], ...]:
    """Per query tile, the ascending key tiles it visits (the rows of ``mask.tile_map``); with ``by_key``, per key
    tile the query tiles that visit it."""
    tiles = mask.tile_map(length, block_q, block_k)
    return tuple(tuple(np.flatnonzero(row).tolist()) for row in (tiles.T if by_key else tiles))


def is_span(visits: Sequence[int]) -> bool:
    """Whether ascending tile indices are one contiguous run (an empty list is one)."""
    return not visits or visits[-1] - visits[0] + 1 == len(visits)
