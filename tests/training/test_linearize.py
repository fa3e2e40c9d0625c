"""Linearization (seqlab.linearize): the swap copies the teacher's weights and replaces only full softmax layers;
attention transfer trains only the new parameters and lowers its loss; LoRA starts as the identity and trains only
the adapters; the experiment script runs end to end at a tiny size."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import linearize, mixers
from seqlab.layers.heads import repeat_kv_columns
from seqlab.models import DecoderLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, T, VOCAB, D = 2, 24, 16, 32


def teacher(pattern=("softmax", "sliding_window")) -> DecoderLM:
    args = {"softmax": {"num_kv_heads": 2}, "sliding_window": {"window": 8}}
    return DecoderLM(
        vocab_size=VOCAB, d_model=D, num_layers=len(pattern), num_heads=4, mixers=pattern,
        mixer_args={name: args[name] for name in pattern}, mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm",
        position_embedding="none", max_len=T, embed_dropout=0.0, rngs=nnx.Rngs(0),
    )  # fmt: skip


def batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(0, VOCAB, size=(B, T + 1))
        yield {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}


def flat(model, wrt=nnx.Param) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, wrt))}


def test_repeat_kv_columns_repeats_each_head_for_its_group():
    kernel = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 8)  # D=3, 2 kv heads of dim 4
    out = np.asarray(repeat_kv_columns(kernel, head_dim=4, groups=3))
    expected = np.concatenate([np.asarray(kernel[:, :4])] * 3 + [np.asarray(kernel[:, 4:])] * 3, axis=1)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("target", linearize.TARGETS)
def test_swap_replaces_only_full_softmax_layers_and_keeps_the_rest(target):
    model = teacher()
    before = flat(model)
    layers = linearize.swap_attention(model, target, rngs=nnx.Rngs(1), **({} if target == "hedgehog" else {"window": 4}))
    assert layers == [0]
    assert model.backbone.blocks[0].mixer_name == target and type(model.backbone.blocks[1].mixer) is mixers.SlidingWindowAttention
    after = flat(model)
    for key, value in before.items():
        if "['blocks'][0]['mixer']" not in key:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    tokens = jnp.asarray(next(batches())["inputs"])
    assert bool(jnp.all(jnp.isfinite(model(tokens))))


def test_hedgehog_swap_copies_the_projections_with_gqa_heads_repeated():
    model = teacher(("softmax",))
    softmax = model.backbone.blocks[0].mixer
    linear = linearize.hedgehog_from_softmax(softmax, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    k_teacher = softmax._heads(softmax.k_proj(x), softmax.head_dim)  # [B, T, 2, d] (no RoPE)
    k_student = linear._heads(linear.k_proj(x), linear.feature_dim)  # [B, T, 4, d]
    np.testing.assert_allclose(k_student, jnp.repeat(k_teacher, 2, axis=2), rtol=1e-6)
    np.testing.assert_array_equal(linear.q_proj.kernel[...], softmax.q_proj.kernel[...])
    np.testing.assert_array_equal(linear.o_proj.kernel[...], softmax.o_proj.kernel[...])


def test_swap_errors_name_the_argument():
    with pytest.raises(ValueError, match="^target must be one of"):
        linearize.swap_attention(teacher(), "performer", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^model: has no full softmax attention layer"):
        linearize.swap_attention(teacher(("sliding_window",)), "lolcats", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^student: has no 'lolcats' layer"):
        linearize.attention_transfer(teacher(), teacher(), batches(), target="lolcats", steps=1)


@pytest.mark.parametrize("target", linearize.TRANSFER_TARGETS)
def test_attention_transfer_trains_only_the_new_parameters_and_lowers_its_loss(target):
    reference = teacher()
    student = nnx.clone(reference)
    kwargs = {"num_features": 8} if target == "hedgehog" else {"window": 4, "num_features": 8}
    linearize.swap_attention(student, target, rngs=nnx.Rngs(1), **kwargs)
    before = flat(student)
    fixed = itertools.repeat(next(batches()))
    losses = linearize.attention_transfer(student, reference, fixed, target=target, steps=25, learning_rate=1e-2)
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses  # the hedgehog loss is bounded below by
    # the teacher's attention entropy (about 2 nats here), so the test asks for an absolute decrease
    after = flat(student)
    trained = set(flat(student, linearize.transfer_parameters(target)))
    assert trained and all(("q_map" in k or "k_map" in k or "window_factor" in k) for k in trained)
    for key, value in before.items():
        changed = not np.array_equal(after[key], value)
        assert changed == (key in trained), key


def test_lora_starts_as_the_identity_and_trains_only_the_adapters():
    model = teacher()
    layers = linearize.swap_attention(model, "liger", rngs=nnx.Rngs(1), window=4)
    tokens = jnp.asarray(next(batches())["inputs"])
    logits_before = model(tokens)
    assert linearize.add_lora(model, layers, rngs=nnx.Rngs(2), rank=4, alpha=8.0) == 4
    np.testing.assert_allclose(model(tokens), logits_before, rtol=1e-6, atol=1e-6)
    frozen_before = flat(model, nnx.Not(nnx.LoRAParam))
    fixed = {k: jnp.asarray(v) for k, v in next(batches(2)).items()}
    loss_before = float(linearize.lm_loss(model, fixed))
    losses = linearize.finetune_lora(model, itertools.repeat(fixed), steps=20, learning_rate=1e-2)
    assert losses[-1] < losses[0] and float(linearize.lm_loss(model, fixed)) < loss_before
    for key, value in frozen_before.items():
        np.testing.assert_array_equal(flat(model, nnx.Not(nnx.LoRAParam))[key], value, err_msg=key)
    assert any(np.any(v != 0) for k, v in flat(model, nnx.LoRAParam).items() if "lora_b" in k)


def test_lora_linear_formula():
    base = nnx.Linear(6, 5, use_bias=True, rngs=nnx.Rngs(0))
    lora = linearize.LoRALinear(base, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
    lora.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 5))
    x = jax.random.normal(jax.random.key(3), (4, 6))
    a, b = np.asarray(lora.lora_a[...]), np.asarray(lora.lora_b[...])
    expected = np.asarray(x) @ np.asarray(base.kernel[...]) + np.asarray(base.bias[...]) + 1.5 * np.asarray(x) @ a @ b
    np.testing.assert_allclose(lora(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the script end to end (27 s of CI time); its stages are tested above
def test_linearize_bytes_script_runs_end_to_end(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "linearize_bytes.py"), "--tiny",
           f"--workdir={tmp_path / 'teacher'}", "--targets=lolcats"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| lolcats")]
    assert len(rows) == 1
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        teacher_loss, swapped, final = float(cells[1]), float(cells[2]), float(cells[4])
        assert all(np.isfinite([teacher_loss, swapped, final]))
