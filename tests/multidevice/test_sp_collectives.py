"""Collective bytes of sequence-parallel programs, read from the compiled HLO by ``seqlab.parallel.collective_bytes``:
LASP-2 (ops.simple_gla, ops.gla, ops.delta_rule with sequence_axis) moves the same bytes at T = 1024 and 4096,
forward and forward+backward; softmax "allgather" moves more as T grows; the sliding-window halo does not. Runs in
its own process with 8 host devices. The parser itself is checked on a hand-written HLO module first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqlab import ops
from seqlab.parallel import collective_bytes

DEVICES, H, D = 8, 2, 16
CHUNK = 16  # the delta rule compiles twice as fast as at the default 64; the bytes exchanged do not depend on it
LENGTHS = (1024, 4096)

HLO = """HloModule jit_f, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %cp-start = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %cp-done = f32[8,128]{1,0} collective-permute-done(%cp-start)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %cp-done)
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %ag-start = (f32[8,128]{1,0}, f32[64,128]{1,0}) all-gather-start(%x), dimensions={0}
  %ag-done = f32[64,128]{1,0} all-gather-done(%ag-start)
  %ar = (f32[8,128]{1,0}, bf16[4]{0}) all-reduce(%x, %y), to_apply=%add
  %t = (s32[], f32[8,128]{1,0}) tuple(%i, %x)
  %w = (s32[], f32[8,128]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %out = f32[8,128]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_parses_tuples_async_pairs_and_loops():
    assert collective_bytes(HLO) == {
        "all-gather": 64 * 128 * 4,  # counted once, at the -done half
        "all-reduce": 8 * 128 * 4 + 4 * 2,  # both parts of the tuple result
        "reduce-scatter": 0,
        "collective-permute": 7 * 8 * 128 * 4,  # once per iteration of the loop
        "all-to-all": 0,
    }


def test_collective_bytes_rejects_text_without_entry():
    with pytest.raises(ValueError, match="hlo_text"):
        collective_bytes("HloModule empty")


def linear(name: str):
    op = getattr(ops, name)
    return lambda q, k, v, gate: op(q, k, v, gate, chunk_size=CHUNK, sequence_axis="seq")[0]


LINEAR = {
    "simple_gla": (linear("simple_gla"), lambda x: -jax.nn.softplus(x[..., 0])),
    "gla": (linear("gla"), lambda x: -jax.nn.softplus(x)),
    "delta_rule": (linear("delta_rule"), lambda x: jax.nn.sigmoid(x[..., 0])),
}
SOFTMAX = {
    "allgather": functools.partial(ops.softmax_attn, sequence_axis="seq"),
    "halo": functools.partial(ops.softmax_attn, sequence_axis="seq", window=64),
}


def bytes_at(fn, num_args: int, length: int, backward: bool) -> dict[str, int]:
    """Collective bytes of fn (forward, or forward+backward by jax.grad) on [1, length, H, D] inputs sharded over
    the sequence on 8 devices."""
    seq = P(None, "seq")
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("seq",))
    forward = jax.shard_map(fn, mesh=mesh, in_specs=(seq,) * num_args, out_specs=seq)
    program = jax.grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=tuple(range(num_args))) if backward else forward
    args = [jax.ShapeDtypeStruct((1, length, H, D), jnp.float32)] * num_args
    return collective_bytes(jax.jit(program).lower(*args).compile().as_text())


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("name", list(LINEAR))
def test_lasp2_collectives_do_not_grow_with_length(name, backward):
    op, gate = LINEAR[name]
    fn = lambda q, k, v, x: op(q, k, v, gate(x))  # noqa: E731
    short, long = (bytes_at(fn, 4, length, backward) for length in LENGTHS)
    assert short == long and sum(short.values()) > 0, (short, long)
    # LASP-2: the forward all-gathers the summaries; autodiff's backward is one reduce-scatter of their
    # cotangents (each device keeps its own summary's share), no all-reduce of the gathered summaries.
    used = {kind for kind, size in short.items() if size}
    assert used == ({"all-gather", "reduce-scatter"} if backward else {"all-gather"}), short
    if backward:
        assert short["reduce-scatter"] * DEVICES == short["all-gather"], short


def test_softmax_allgather_collectives_grow_with_length():
    short, long = (bytes_at(SOFTMAX["allgather"], 3, length, True) for length in LENGTHS)
    assert long["all-gather"] == 4 * short["all-gather"] > 0, (short, long)


def test_softmax_halo_collectives_do_not_grow_with_length():
    short, long = (bytes_at(SOFTMAX["halo"], 3, length, True) for length in LENGTHS)
    assert short == long and short["collective-permute"] > 0, (short, long)
