"""Whole models with every layer sequence-sharded (shard_map over a "seq" axis) against the same model on one
device, forward and gradient; and a short training run on a (data, seq) mesh against the single-device run.
Runs in its own process with 8 host devices (tests/test_multidevice.py)."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from seqlab import config as config_lib, mixers
from seqlab.core.documents import Documents
from seqlab.models import DecoderLM
from seqlab.parallel.mesh import shard_sequence
from seqlab.train import train_and_evaluate
from seqlab.training import load_metrics, steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, T, VOCAB = 2, 64, 32
CHUNK = 8  # the linear ops' chunk: T / 4 devices = 16 tokens per device, two chunks each


MODEL_SET = ("layer_index", "num_layers")  # the model gives every layer its depth


def first_example(name: str) -> dict:
    """The first registered example of mixer `name` (less the depth, which the model sets), with the linear ops'
    chunk_size CHUNK where it runs one."""
    entry = mixers.info(name)
    chunk = {"chunk_size": CHUNK} if "chunk_size" in mixers.keyword_arguments(entry.cls) else {}
    example = next(iter(entry.examples.values()))
    return {**chunk, **{key: value for key, value in example.items() if key not in MODEL_SET}}


def build(mixer_pattern: tuple[str, ...]) -> DecoderLM:
    """A DecoderLM over the pattern, each mixer with its first registered example's arguments; a single-mixer model
    takes that example's num_heads, a hybrid 2 heads throughout."""
    mixer_args = {name: first_example(name) for name in mixer_pattern}
    heads = {args.pop("num_heads", 2) for args in mixer_args.values()}
    args = dict(
        vocab_size=VOCAB, d_model=32, num_layers=len(mixer_pattern), num_heads=heads.pop() if len(heads) == 1 else 2,
        mixers=mixer_pattern, mixer_args=mixer_args, mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm",
        position_embedding="learned", max_len=T, embed_dropout=0.0, rngs=nnx.Rngs(0),
    )  # fmt: skip
    return DecoderLM(**args)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sharded_loss(model, num_devices: int):
    """loss(params, tokens) with the model's sequence split over `num_devices` devices."""
    sharded = copy.deepcopy(model)
    shard_sequence(sharded, "seq")
    graphdef, params = nnx.split(sharded)
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("seq",))

    def local(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens)
        return jax.lax.psum(jnp.sum(jnp.sin(logits)), "seq")

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=P())


# The single-mixer models of these families run under `pytest -m slow` (all pass); CI keeps LoLCATs, whose band
# needs the previous device's tokens, and tests LightNet / Flowformer in tests/mixers/test_lightnet.py. GLA and
# DeltaNet run in CI in the 8-device mixed model below, Gated DeltaNet's op in test_sp_ops.py; their single-mixer
# 4-device models are slow-only too (47 s of the suite's CPU time).
SLOW_MIXERS = ("transnormer_norm", "transnormer_diag", "tnl", "lightnet", "flowformer", "dsf", "inline", "slab",
               "linfusion", "liger", "gla", "deltanet", "gated_deltanet",
               # softmax under a mask or score_mod: their sequence-parallel op is checked in test_sp_softmax.py
               "natten", "halonet", "s2", "clear", "selective", "softplus_attn", "kernelized_rpe",
               "soft")  # all-gathers its input like agent, which CI keeps
MODEL_CASES = [
    pytest.param((m,), 4, marks=pytest.mark.slow) if m in SLOW_MIXERS else ((m,), 4) for m in mixers.available()
] + [
    (("baseconv", "based", "sliding_window"), 2),
    (("deltanet", "softmax", "gla"), 8),
]


@pytest.mark.parametrize("pattern, num_devices", MODEL_CASES, ids=lambda c: "+".join(c) if isinstance(c, tuple) else str(c))
def test_sharded_model_equals_single_device(pattern, num_devices):
    """Every mixer (on 4 devices) and two hybrids (on 2 and 8): the whole model's loss and parameter gradients."""
    model = build(pattern)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
    graphdef, params = nnx.split(model)

    def loss(params, tokens):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(tokens)))

    fn = sharded_loss(model, num_devices)
    assert rel(jax.jit(fn)(params, tokens), jax.jit(loss)(params, tokens)) < 1e-5
    g_sp = jax.jit(jax.grad(fn))(params, tokens)
    g_ref = jax.jit(jax.grad(loss))(params, tokens)
    for got, want in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)):
        assert rel(got, want) < 1e-5


# documents of a packed row crossing one device border, one within a device, two and then three borders (4 devices
# of 16 tokens); row 1 is one document
PACKED_ROWS = ((5, 14, 1, 44), (64,))


# as above, the single-mixer models of SLOW_MIXERS, and of the mixers in the two hybrids, run under `pytest -m slow`
PACKED_HYBRIDS = [("baseconv", "deltanet", "softmax"), ("mamba2", "gla", "sliding_window")]
PACKED_CASES = [
    pytest.param((m,), marks=pytest.mark.slow) if m in SLOW_MIXERS or any(m in h for h in PACKED_HYBRIDS) else (m,)
    for m in mixers.available() if mixers.get(m).takes_documents
] + PACKED_HYBRIDS


@pytest.mark.parametrize("pattern", PACKED_CASES, ids="+".join)
def test_packed_sharded_model_equals_single_device(pattern):
    """Packed rows on 4 devices, loss and parameter gradients, every mixer that takes documents and two hybrids
    (covering the slow-only GLA and DeltaNet in CI):
    convolutions, states, attention masks and positions restart at documents that cross device borders exactly as
    on one device (which equals each document alone, test_packed_mixers)."""
    model = build(pattern)
    tokens = jax.random.randint(jax.random.key(3), (B, T), 0, VOCAB)
    ids = jnp.asarray(np.stack([np.repeat(np.arange(len(row)), row) for row in PACKED_ROWS]), jnp.int32)
    documents = Documents.of(ids)
    graphdef, params = nnx.split(model)
    expected = jnp.sum(jnp.sin(nnx.merge(graphdef, params)(tokens, documents=documents)))  # one device
    sharded = copy.deepcopy(model)
    shard_sequence(sharded, "seq")
    sharded_graphdef = nnx.split(sharded)[0]
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))

    def local(params, tokens, documents):
        logits = nnx.merge(sharded_graphdef, params)(tokens, documents=documents)
        return jax.lax.psum(jnp.sum(jnp.sin(logits)), "seq")

    def single(params, tokens, documents):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(tokens, documents=documents)))

    spec = P(None, "seq")
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, Documents(spec, spec)), out_specs=P())
    assert rel(jax.jit(fn)(params, tokens, documents), expected) < 1e-5
    g_sp = jax.jit(jax.grad(fn))(params, tokens, documents)
    g_ref = jax.jit(jax.grad(single))(params, tokens, documents)
    for got, want in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)):
        assert rel(got, want) < 1e-5
    unpacked = jnp.sum(jnp.sin(nnx.merge(graphdef, params)(tokens)))
    assert rel(unpacked, expected) > 1e-3  # the documents change the result


def test_ring_attention_model_equals_single_device():
    model = build(("softmax",))
    ring = build(("softmax",))
    for block in ring.backbone.blocks:
        block.mixer.sequence_parallel = "ring"
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, VOCAB)
    graphdef, params = nnx.split(model)
    expected = jnp.sum(jnp.sin(nnx.merge(graphdef, params)(tokens)))
    assert rel(jax.jit(sharded_loss(ring, 4))(nnx.state(ring), tokens), expected) < 1e-5


@pytest.mark.parametrize("name, kwargs", [
    ("routing", dict(local_heads=0, num_clusters=3, centroid_decay=0.5)),
    ("longvq", dict(num_codes=6, block_size=4, codebook_decay=0.5)),
])
def test_k_means_step_on_a_split_sequence_is_the_single_device_step(name, kwargs):
    """A training-path k-means update (Routing's centroids, LongVQ's codebook) sums over every device: the sharded
    step moves the BatchStats exactly as the step over the whole sequence."""
    mixer = mixers.create(name, d_model=32, num_heads=2, use_running_average=False, rngs=nnx.Rngs(0), **kwargs)
    x = jax.random.normal(jax.random.key(3), (B, T, 32))
    sharded = copy.deepcopy(mixer)
    shard_sequence(sharded, "seq")
    graphdef, state = nnx.split(sharded)

    def local(state, x):
        layer = nnx.merge(graphdef, state)
        layer(x)
        return nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))

    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=P()))(state, x)
    before = nnx.to_pure_dict(nnx.state(mixer, nnx.BatchStat))
    mixer(x)
    after = nnx.to_pure_dict(nnx.state(mixer, nnx.BatchStat))
    for g, a, b in zip(jax.tree.leaves(got), jax.tree.leaves(after), jax.tree.leaves(before)):
        assert rel(g, a) < 1e-6 and rel(g, b) > 1e-2


def test_aux_losses_through_the_launchers_sums_on_a_mesh_are_the_single_device_value():
    """A train-mode Routing model's commitment loss (module-level ``aux_losses``), from ``steps.mesh_sums`` on a
    (data=2, seq=4) mesh, where each device adds its own tokens' mean and the devices' values are averaged: the
    whole batch's value on one device, and the task's sums unchanged."""
    model = build(("routing",))
    model.train()  # use_running_average False: the commitment loss is added
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, VOCAB)
    batch = {"inputs": tokens, "labels": jnp.roll(tokens, -1, axis=1)}
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    want = jax.jit(steps.mesh_sums(graphdef, rest, "lm", None))((params, stats), batch, None)
    shard_sequence(model, "seq")
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
    got = jax.jit(steps.mesh_sums(graphdef, rest, "lm", mesh))((params, stats), batch, None)
    assert set(got) == set(want) and float(want["aux_loss"]) > 0
    assert all(rel(got[key], want[key]) < 1e-5 for key in want), {key: rel(got[key], want[key]) for key in want}


def run_losses(tmp_path, name: str, spec: str, **mesh) -> list[float]:
    config = config_lib.load_config(os.path.join(ROOT, spec))
    config.train.update(steps=6, log_every=1, eval_every=3, checkpoint_every=3)
    config.mesh.update(mesh)
    train_and_evaluate(config, str(tmp_path / name))
    return [r["loss"] for r in load_metrics(str(tmp_path / name), split="train")]


@pytest.mark.parametrize("spec", ["configs/mqar.py:gla,tiny",
                                  pytest.param("configs/listops.py:deltanet,tiny", marks=pytest.mark.slow)])
def test_training_on_a_mesh_follows_the_single_device_run(tmp_path, spec):
    """A (data=2, seq=4) mesh: both axes at once (the sequence-only mesh is its data=1 case)."""
    single = run_losses(tmp_path, "single", spec)
    both = run_losses(tmp_path, "data2_seq4", spec, data=2, seq=4)
    np.testing.assert_allclose(both, single, rtol=1e-4)
