"""Collective traffic of a compiled program, read from its optimized HLO text.

``collective_bytes(jax.jit(f).lower(*args).compile().as_text())`` sums, per collective kind, the bytes of each
collective's result (per device): a tuple result counts all its parts; an asynchronous pair counts once, at its
``-done`` half (whose result is the collective's output); a collective inside a ``while`` body counts once per
iteration when XLA knows the trip count (``known_trip_count``, else once); of a ``conditional``'s branches, the
largest counts. This is how the sequence-parallel paths (LASP-2, "LASP-2: Rethinking Sequence Parallelism for
Linear Attention and Its Hybrid"; ring attention, "Ring Attention with Blockwise Transformers for Near-Infinite
Context") are checked not to move more data as T grows.
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_COLLECTIVE = re.compile(r"=\s+(?P<shape>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<phase>-start|-done)?\(")
_SHAPE = re.compile(r"\b(?P<dtype>[a-z]\w*)\[(?P<dims>[^\]]*)\]")
_BODY = re.compile(r"\bbody=%?(?P<name>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}|\b(?:true|false)_computation=%?(?P<name>[\w.\-]+)")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes moved by each collective kind (``KINDS``) in one run of the entry computation, per device."""
    computations, entry = _computations(hlo_text)
    totals: dict[str, dict[str, int]] = {}
    return {kind: _total(entry, computations, totals).get(kind, 0) for kind in KINDS}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[8,128]{1,0}`` or a (nested) tuple of them; tokens count 0."""
    total = 0
    for match in _SHAPE.finditer(shape):
        dims = [int(d.lstrip("<=")) for d in match["dims"].split(",") if d.strip()]
        total += _DTYPE_BYTES.get(match["dtype"], 0) * math.prod(dims)
    return total


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The instruction lines of every computation by name, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header["name"], [])
            entry = header["name"] if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    if not entry:
        raise ValueError("hlo_text must be an HLO module with an ENTRY computation")
    return computations, entry


def _total(name: str, computations: dict[str, list[str]], totals: dict[str, dict[str, int]]) -> dict[str, int]:
    """Collective bytes of one run of computation ``name``, including what it calls (memoised in ``totals``)."""
    if name not in totals:
        count: collections.Counter[str] = collections.Counter()
        for line in computations.get(name, []):
            count.update(_own_bytes(line))
            for callee, times in _callees(line):
                count.update({kind: times * n for kind, n in _total(callee, computations, totals).items()})
            count.update(_largest([_total(branch, computations, totals) for branch in _branches(line)]))
        totals[name] = dict(count)
    return totals[name]


def _largest(branches: list[dict[str, int]]) -> dict[str, int]:
    """Per kind, the most bytes any one of a conditional's branches moves."""
    return {kind: max(branch.get(kind, 0) for branch in branches) for kind in KINDS} if branches else {}


def _own_bytes(line: str) -> dict[str, int]:
    """The collective an instruction line is, with its result bytes (the ``-start`` half of a pair counts 0)."""
    match = _COLLECTIVE.search(line)
    if match is None or match["phase"] == "-start":
        return {}
    return {match["kind"]: shape_bytes(match["shape"])}


def _callees(line: str) -> list[tuple[str, int]]:
    """(computation, runs per run of this line): a while body runs its known trip count; a call or fusion once."""
    body = _BODY.search(line)
    if body:
        trips = _TRIP_COUNT.search(line)
        return [(body["name"], int(trips["n"]) if trips else 1)]
    return [(match["name"], 1) for match in _CALLS.finditer(line)]


def _branches(line: str) -> list[str]:
    """The branch computations of a conditional instruction line."""
    names: list[str] = []
    for match in _BRANCHES.finditer(line):
        if match["names"] is not None:
            names += [n.strip().lstrip("%") for n in match["names"].split(",")]
        else:
            names.append(match["name"])
    return names
