"""MAD's fuzzy recall, memorization and compression tasks (seqlab.data.synthetic) and the last-state decoder that
compression trains (seqlab.models.LastStateDecoder): every generator's labels are re-derived here from the inputs by
a plain loop, the memorization map is checked to be one map across examples, splits and seeds, bad options fail in
one line naming the field, and the tiny config of each task trains."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import config as config_lib, data, models
from seqlab.data.base import IGNORE_INDEX
from seqlab.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_train=64, num_eval=16)
MAD_TASKS = ("fuzzy_recall", "memorization", "compression")


def small_task(name: str, **options) -> data.Task:
    return data.make_task(name, **{**SMALL, **options})


def examples(task: data.Task, count: int, split: str = "train") -> list[dict[str, np.ndarray]]:
    return [task.example(split, i) for i in range(count)]


# ------------------------------------------------------------------------------------------------------------
# Fuzzy in-context recall
# ------------------------------------------------------------------------------------------------------------


def runs(tokens: list[int], is_key) -> list[tuple[int, list[int]]]:
    """Maximal runs of key tokens and of value tokens: [(start, tokens), ...], in order."""
    out: list[tuple[int, list[int]]] = []
    for position, token in enumerate(tokens):
        if out and is_key(out[-1][1][0]) == is_key(token):
            out[-1][1].append(token)
        else:
            out.append((position, [token]))
    return out


def fuzzy_expected_labels(inputs: np.ndarray, last_label: int, task) -> tuple[np.ndarray, int]:
    """Labels re-derived from the stream (inputs plus the final value token, which only the last label holds): scan
    the key-motif value-motif pairs, bind each new key motif to its value motif, and score the value tokens of a
    repeated key motif, each at the position before it. Returns (labels [L], number of pairs)."""
    num_keys, pad = (task.vocab_size - 1) // 2, task.vocab_size - 1
    stream = [int(t) for t in inputs] + [int(last_label)]
    front = 0
    while stream[front] == pad:
        front += 1
    assert pad not in stream[front:], "pads only at the front"
    motifs = runs(stream[front:], lambda t: t < num_keys)
    assert len(motifs) % 2 == 0 and len(motifs) >= 4, "whole pairs, at least one before the final one"
    expected = np.full(task.seq_len, IGNORE_INDEX)
    bound: dict[tuple, tuple] = {}
    for (_, key), (start, value) in zip(motifs[0::2], motifs[1::2]):
        assert key[0] < num_keys and value[0] >= num_keys  # key motif first, then its value motif
        assert 1 <= len(key) <= task.k_motif_size and len(set(key)) == len(key)
        assert 1 <= len(value) <= task.v_motif_size and len(set(value)) == len(value)
        if tuple(key) in bound:
            assert bound[tuple(key)] == tuple(value), "one key motif -> value motif map per sequence"
            for offset, token in enumerate(value):
                expected[front + start + offset - 1] = token  # predicted at the position before it
        bound.setdefault(tuple(key), tuple(value))
    final_key = tuple(motifs[-2][1])
    assert final_key in {tuple(k) for _, k in motifs[0:-2:2]}, "the final pair repeats a key motif"
    return expected, len(motifs) // 2


@pytest.mark.parametrize("options", [dict(), dict(seq_len=40, k_motif_size=2, v_motif_size=1, vocab_size=9)])
def test_fuzzy_recall_scores_the_bound_value_of_repeated_key_motifs(options):
    task = small_task("fuzzy_recall", **options)
    scored = pairs = 0
    for ex in examples(task, 24) + examples(task, 8, "eval"):
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs.min() >= 0 and inputs.max() < task.vocab_size
        assert labels[-1] != IGNORE_INDEX  # the final pair's last value token is always scored
        expected, count = fuzzy_expected_labels(inputs, labels[-1], task)
        np.testing.assert_array_equal(labels, expected)
        scored += int(np.sum(labels != IGNORE_INDEX))
        pairs += count
    # The stream is packed: about seq_len / (mean pair size) pairs per sequence, never fewer than half that.
    mean_pair = (task.k_motif_size + 1) / 2 + (task.v_motif_size + 1) / 2
    assert pairs > 32 * 0.5 * task.seq_len / mean_pair
    assert scored >= 32


def test_fuzzy_recall_uses_every_motif_size():
    task = small_task("fuzzy_recall")
    num_keys = (task.vocab_size - 1) // 2
    key_sizes, value_sizes = set(), set()
    for ex in examples(task, 16):
        stream = [int(t) for t in ex["inputs"] if t != task.vocab_size - 1]
        for _, run in runs(stream, lambda t: t < num_keys):
            (key_sizes if run[0] < num_keys else value_sizes).add(len(run))
    assert key_sizes == {1, 2, 3} and value_sizes == {1, 2, 3}


# ------------------------------------------------------------------------------------------------------------
# Memorization
# ------------------------------------------------------------------------------------------------------------


def observed_map(task: data.Task, split: str, count: int) -> dict[int, int]:
    """key -> label over `count` examples of `split`, asserting the layout `k insert k insert ...` on the way."""
    num_keys, insert = (task.vocab_size - 1) // 2, task.vocab_size - 1
    seen: dict[int, int] = {}
    for ex in examples(task, count, split):
        inputs, labels = ex["inputs"], ex["labels"]
        for position in range(0, task.seq_len, 2):
            key, label = int(inputs[position]), int(labels[position + 1])
            assert 0 <= key < num_keys and inputs[position + 1] == insert
            assert labels[position] == IGNORE_INDEX
            assert num_keys <= label < insert
            assert seen.setdefault(key, label) == label, f"key {key} has two values"
    return seen


def test_memorization_map_is_one_fixed_map_across_examples_splits_and_seeds():
    task = small_task("memorization", vocab_size=64, num_train=256, num_eval=64)
    train = observed_map(task, "train", 256)
    held_out = observed_map(task, "eval", 64)
    other_seed = observed_map(small_task("memorization", vocab_size=64, num_train=256, seed=7), "train", 256)
    assert len(train) == (task.vocab_size - 1) // 2  # 31 keys, 4,096 draws: every key appears
    for other in (held_out, other_seed):
        assert all(train[k] == v for k, v in other.items())
    assert len(set(train.values())) == len(train)  # distinct values: a one-to-one map
    assert train == {k: int(v) for k, v in enumerate(task.key_value_map())}
    reseeded = small_task("memorization", vocab_size=64, map_seed=1).key_value_map()
    assert not np.array_equal(reseeded, task.key_value_map())


def test_memorization_keys_change_with_the_seed_but_the_map_does_not():
    a, b = small_task("memorization", seed=0), small_task("memorization", seed=1)
    assert not np.array_equal(a.example("train", 0)["inputs"], b.example("train", 0)["inputs"])
    np.testing.assert_array_equal(a.key_value_map(), b.key_value_map())


# ------------------------------------------------------------------------------------------------------------
# Compression and its decoder
# ------------------------------------------------------------------------------------------------------------


def test_compression_labels_are_the_inputs_before_the_compression_token():
    task = small_task("compression")
    for ex in examples(task, 16) + examples(task, 4, "eval"):
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs[-1] == task.vocab_size - 1 and inputs[:-1].max() < task.vocab_size - 1
        for t in range(task.seq_len - 1):
            assert labels[t] == inputs[t]
        assert labels[-1] == IGNORE_INDEX


def compression_model(mixer: str = "softmax"):
    config = config_lib.load_config(os.path.join(ROOT, "configs/synthetic.py:compression,tiny"))
    config.model.mixers = (mixer,)
    task = config_lib.validate(config)
    return models.build_model(config, task, nnx.Rngs(0)), task


def test_compression_builds_a_last_state_decoder_without_a_decode_form():
    model, task = compression_model()
    assert isinstance(model, models.LastStateDecoder) and not hasattr(model, "init_cache")
    tokens = jnp.asarray(np.stack([task.example("train", i)["inputs"] for i in range(3)]))
    logits = model(tokens)
    assert logits.shape == (3, task.seq_len, task.vocab_size) and logits.dtype == jnp.float32


def test_the_decoder_reads_only_the_last_position(monkeypatch):
    """Feed the decoder chosen backbone outputs h [B, T, D]: the logits' Jacobian with respect to every position but
    the last is zero, so the reconstruction cannot look back past the compression token."""
    model, task = compression_model()
    d = model.index_embed.shape[1]
    h = jax.random.normal(jax.random.key(1), (2, task.seq_len, d))

    def logits_of(hidden):
        monkeypatch.setattr(type(model.backbone), "__call__", lambda self, tokens, dropout_rng=None: hidden)
        return model(jnp.zeros((2, task.seq_len), jnp.int32))

    jacobian = jax.jit(jax.jacrev(lambda hidden: logits_of(hidden).sum()))(h)  # [B, T, D]
    assert float(jnp.abs(jacobian[:, :-1]).max()) == 0.0
    assert float(jnp.abs(jacobian[:, -1]).min(axis=-1).max()) > 0.0
    # Rows differ only through the index embedding: with a zero table every index decodes the same logits.
    model.index_embed[...] = jnp.zeros_like(model.index_embed[...])
    logits = logits_of(h)
    np.testing.assert_allclose(logits, jnp.broadcast_to(logits[:, :1], logits.shape), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Every MAD task: determinism, option checks, tiny training
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAD_TASKS)
def test_examples_are_deterministic_by_seed(name):
    a, b = small_task(name, seed=3), small_task(name, seed=3)
    for split in data.SPLITS:
        for i in (0, 5):
            for key in ("inputs", "labels"):
                np.testing.assert_array_equal(a.example(split, i)[key], b.example(split, i)[key])
    assert not np.array_equal(a.example("train", 5)["inputs"], small_task(name, seed=4).example("train", 5)["inputs"])
    assert not np.array_equal(a.example("train", 5)["inputs"], a.example("eval", 5)["inputs"])


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("fuzzy_recall", dict(k_motif_size=0), "k_motif_size"),
        ("fuzzy_recall", dict(v_motif_size=0), "v_motif_size"),
        ("fuzzy_recall", dict(vocab_size=6), "vocab_size"),  # 2 key tokens < k_motif_size 3
        ("fuzzy_recall", dict(vocab_size=7, v_motif_size=4), "vocab_size"),  # 3 value tokens < v_motif_size 4
        ("fuzzy_recall", dict(seq_len=10), "seq_len"),  # < 2 x (3 + 3) - 1
        ("fuzzy_recall", dict(k_motif_size=2.0), "k_motif_size"),
        ("memorization", dict(seq_len=31), "seq_len"),
        ("memorization", dict(vocab_size=2), "vocab_size"),
        ("memorization", dict(map_seed=-1), "map_seed"),
        ("compression", dict(seq_len=1), "seq_len"),
        ("compression", dict(vocab_size=1), "vocab_size"),
        ("compression", dict(num_eval=0), "num_eval"),
    ],
)
def test_bad_options_fail_in_one_line_naming_the_field(name, options, field):
    with pytest.raises(ValueError, match=rf"^data\.{name}\.{field}: ") as error:
        data.make_task(name, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("variant", [*MAD_TASKS, "noisy_in_context_recall"])
def test_tiny_config_of_each_mad_task_trains(variant, tmp_path):
    config = config_lib.load_config(os.path.join(ROOT, f"configs/synthetic.py:{variant},tiny"))
    config.train.update(steps=4, eval_every=2, checkpoint_every=2)
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and math.isfinite(result["eval_loss"]) and 0.0 <= result["eval_accuracy"] <= 1.0


def test_compression_refuses_sequence_parallelism_before_anything_compiles():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "synthetic.py:compression,tiny"))
    config.mesh.seq = 2
    with pytest.raises(ValueError, match="mesh.seq: data.task='compression' decodes every logit from the last"):
        config_lib.validate(config)
