"""Datasets (seqlab.data): every generator's labels are checked against an answer the test computes itself from
the inputs (an independent ListOps evaluator, recall tables rebuilt from the context, ...); examples are pure
functions of (seed, split, index); the grain iterators batch, shuffle per epoch and resume from a JSON state;
bad options raise ValueErrors that name the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from seqlab import data
from seqlab.data.base import IGNORE_INDEX

SMALL = dict(num_train=64, num_eval=16)


def small_task(name: str, **options) -> data.Task:
    return data.make_task(name, **{**SMALL, **options})


def examples(task: data.Task, count: int, split: str = "train") -> list[dict[str, np.ndarray]]:
    return [task.example(split, i) for i in range(count)]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def differs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(not np.array_equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------------------------------------------------
# Every task: the contract
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", data.available_tasks())
def test_task_contract(name):
    cls = data.get_task_class(name)
    assert cls.kind in ("lm", "classification")
    for field in dataclasses.fields(cls):
        assert field.default is not dataclasses.MISSING, field.name
        assert type(field.default) in (int, float, bool, str), field.name
    task = small_task(name)
    for split in data.SPLITS:
        ex = task.example(split, task.num_examples(split) - 1)
        assert all(v.dtype == np.int32 for v in ex.values())
        assert ex["inputs"].shape == (task.seq_len,)
        assert 0 <= ex["inputs"].min() and ex["inputs"].max() < task.vocab_size
        if cls.kind == "lm":
            assert set(ex) == {"inputs", "labels"} and task.num_classes is None
            scored = ex["labels"][ex["labels"] != IGNORE_INDEX]
            assert scored.size > 0 and scored.min() >= 0 and scored.max() < task.vocab_size
        else:
            assert set(ex) == {"inputs", "length", "label"} and ex["length"].shape == ex["label"].shape == ()
            assert 0 <= ex["label"] < task.num_classes


@pytest.mark.parametrize("name", data.available_tasks())
def test_examples_are_pure_functions_of_seed_split_index(name):
    task, again = small_task(name, seed=3), small_task(name, seed=3)
    assert_same(task.example("train", 5), again.example("train", 5))
    assert_same(task.example("eval", 5), again.example("eval", 5))
    assert differs(task.example("train", 5), small_task(name, seed=4).example("train", 5))
    assert differs(task.example("train", 5), task.example("eval", 5))
    assert differs(task.example("train", 5), task.example("train", 6))


def test_example_rejects_bad_split_and_index():
    task = small_task("mqar")
    with pytest.raises(ValueError, match=r"split: must be one of \['train', 'eval'\]"):
        task.example("test", 0)
    with pytest.raises(ValueError, match=r"index: must be an integer in \[0, 16\)"):
        task.example("eval", 16)
    with pytest.raises(ValueError, match="index"):
        task.example("train", -1)


# ------------------------------------------------------------------------------------------------------------
# Registry and option checks
# ------------------------------------------------------------------------------------------------------------


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"data\.task: unknown task 'nope'; known tasks: .*listops.*mqar"):
        data.make_task("nope")


def test_unknown_option_lists_allowed_options():
    with pytest.raises(ValueError, match=r"data\.mqar\.bogus: .*allowed options: seed, .*num_kv_pairs"):
        data.make_task("mqar", bogus=1)


def test_option_types_are_checked():
    with pytest.raises(ValueError, match=r"data\.mqar\.seq_len: must be of type int"):
        data.make_task("mqar", seq_len=64.0)
    with pytest.raises(ValueError, match=r"data\.mqar\.random_non_queries: must be of type bool"):
        data.make_task("mqar", random_non_queries=1)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(seq_len=63, vocab_size=256), "seq_len"),  # L odd
        (dict(seq_len=64, vocab_size=64), "vocab_size"),  # V <= L
        (dict(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),  # 4 D > L
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
        (dict(num_train=0), "num_train"),
        (dict(seed=-1), "seed"),
    ],
)
def test_mqar_validation_names_the_field(options, field):
    with pytest.raises(ValueError, match=rf"^data\.mqar\.{field}: "):
        data.make_task("mqar", **options)


# ------------------------------------------------------------------------------------------------------------
# MQAR
# ------------------------------------------------------------------------------------------------------------


def test_mqar_invariants():
    task = small_task("mqar", vocab_size=128, seq_len=96, num_kv_pairs=8)
    v, d = task.vocab_size, task.num_kv_pairs
    for ex in examples(task, 32) + examples(task, 8, "eval"):
        inputs, labels = ex["inputs"], ex["labels"]
        keys, values = inputs[0 : 2 * d : 2], inputs[1 : 2 * d : 2]
        assert len(set(keys)) == d and len(set(values)) == d
        assert keys.min() >= 1 and keys.max() <= v // 2 - 1
        assert values.min() >= v // 2 and values.max() <= v - 1
        bound = dict(zip(keys, values))
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(scored) == d and scored.min() >= 2 * d and np.all((scored - 2 * d) % 2 == 0)
        assert sorted(inputs[scored]) == sorted(keys)  # each key queried once, at the scored position
        for position in scored:
            assert labels[position] == bound[inputs[position]]
        queries = np.zeros(task.seq_len - 2 * d, bool)
        queries[scored - 2 * d] = True
        assert np.all(inputs[2 * d :][~queries] == 0)


def test_mqar_random_non_queries_fills_the_zeros():
    plain = small_task("mqar")
    noisy = small_task("mqar", random_non_queries=True)
    filled = kept_zero = 0
    for i in range(16):
        a, b = plain.example("train", i), noisy.example("train", i)
        np.testing.assert_array_equal(a["labels"], b["labels"])
        zeros = a["inputs"] == 0
        np.testing.assert_array_equal(a["inputs"][~zeros], b["inputs"][~zeros])
        filled += zeros.sum()
        kept_zero += (b["inputs"][zeros] == 0).sum()
    # A uniform fill keeps a zero with probability 1/V = 1/256: about 3 of the ~900 filled positions.
    assert filled > 500 and kept_zero < 0.02 * filled


def test_mqar_gaps_follow_the_power_law():
    """Queries cluster at the start of the query region. With L=64, D=4 there are 28 gap slots; a uniform draw puts
    1/4 of the gaps in the first 7 slots (std about 0.01 over these 2,000 gaps), the power law p_i ∝ i^-0.99 about
    0.59. The threshold 0.45 sits over 15 standard deviations from both."""
    task = data.make_task("mqar", num_train=500)
    d, space = task.num_kv_pairs, (task.seq_len - 2 * task.num_kv_pairs) // 2
    gaps = np.concatenate([(np.flatnonzero(ex["labels"] != IGNORE_INDEX) - 2 * d) // 2 for ex in examples(task, 500)])
    assert gaps.min() >= 0 and gaps.max() < space
    assert np.mean(gaps < space // 4) > 0.45
    counts = np.bincount(gaps, minlength=space)
    assert counts[0] > counts[1] > counts[space // 2]


def test_mqar_accuracy_averages_per_example_first():
    labels = np.array([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    predictions = np.array([[0, 5, 0, 0], [7, 0, 0, 0]])
    assert data.mqar_accuracy(predictions, labels) == pytest.approx(0.75)  # (1/2 + 1) / 2, not 2/3
    assert data.mqar_accuracy(np.where(labels < 0, 0, labels), labels) == 1.0
    with pytest.raises(ValueError, match="predictions, labels"):
        data.mqar_accuracy(predictions[:, :2], labels)


# ------------------------------------------------------------------------------------------------------------
# MAD and H3 tasks
# ------------------------------------------------------------------------------------------------------------


def test_selective_copy_labels_are_the_scattered_tokens_in_order():
    task = small_task("selective_copy", seq_len=64, num_tokens_to_copy=8)
    n, blank, copy = 8, task.vocab_size - 2, task.vocab_size - 1
    for ex in examples(task, 16):
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs[-n - 1] == copy and np.all(inputs[-n:] == blank)
        content = inputs[: -n - 1][inputs[: -n - 1] != blank]
        assert len(content) == n and content.max() < blank
        np.testing.assert_array_equal(labels[-n:], content)
        assert np.all(labels[:-n] == IGNORE_INDEX)


@pytest.mark.parametrize("noise", [dict(), dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2)])
def test_in_context_recall_scores_values_of_keys_seen_before(noise):
    task = small_task("in_context_recall", **noise)
    kv_vocab = task.vocab_size - task.noise_vocab_size
    noise_pairs = scored_count = 0
    for ex in examples(task, 16):
        pairs, labels = ex["inputs"].reshape(-1, 2), ex["labels"].reshape(-1, 2)
        assert np.all(labels[:, 1] == IGNORE_INDEX)
        seen: dict[int, int] = {}
        for (key, value), (label, _) in zip(pairs, labels):
            if key >= kv_vocab:  # a noise pair
                assert value >= kv_vocab and label == IGNORE_INDEX
                noise_pairs += 1
                continue
            assert key < kv_vocab // 2 <= value < kv_vocab
            assert label == (seen[key] if key in seen else IGNORE_INDEX)
            assert seen.setdefault(key, value) == value  # one key -> value map per sequence
        assert labels[-1, 0] != IGNORE_INDEX  # the last pair is always a recall
        scored_count += np.sum(labels != IGNORE_INDEX)
    assert scored_count > 16 * 32
    if noise:  # about 0.2 x 62 noisy pairs per sequence
        assert 100 < noise_pairs < 300
    else:
        assert noise_pairs == 0


def test_associative_recall_final_label_is_the_bound_value():
    task = small_task("associative_recall")
    arrow = task.vocab_size - 1
    for ex in examples(task, 32):
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs[-2] == arrow and np.all(inputs[:-2] != arrow)
        pairs = inputs[:-2].reshape(-1, 2)
        bound = {int(k): int(v) for k, v in pairs}
        assert all(bound[int(k)] == v for k, v in pairs)
        assert labels[-1] == bound[int(inputs[-1])]
        assert np.all(labels[:-1] == IGNORE_INDEX)


def test_induction_head_final_label_follows_the_first_trigger():
    task = small_task("induction_head")
    trigger = task.vocab_size - 1
    for ex in examples(task, 32):
        inputs, labels = ex["inputs"], ex["labels"]
        positions = np.flatnonzero(inputs == trigger)
        assert len(positions) == 2 and positions[1] == task.seq_len - 1 and positions[0] < task.seq_len - 2
        assert labels[-1] == inputs[positions[0] + 1]
        assert np.all(labels[:-1] == IGNORE_INDEX)


# ------------------------------------------------------------------------------------------------------------
# ListOps
# ------------------------------------------------------------------------------------------------------------

LISTOPS_SYMBOLS = {**{1 + d: str(d) for d in range(10)}, 11: "MIN", 12: "MAX", 13: "MED", 14: "SM", 15: "]"}


def evaluate_listops(symbols: list[str]) -> tuple[int, int]:
    """Value and depth of a prefix expression like ['MAX', '2', 'MIN', '4', '7', ']', ']']."""
    stack: list[tuple[str, list[int]]] = []
    depth = 0
    for symbol in symbols:
        if symbol.isdigit():
            if not stack:
                return int(symbol), 1
            stack[-1][1].append(int(symbol))
        elif symbol == "]":
            op, args = stack.pop()
            assert len(args) >= 2
            ordered = sorted(args)
            value = {
                "MIN": ordered[0],
                "MAX": ordered[-1],
                "MED": (ordered[(len(args) - 1) // 2] + ordered[len(args) // 2]) // 2,
                "SM": sum(args) % 10,
            }[op]
            if not stack:
                return value, depth
            stack[-1][1].append(value)
        else:
            stack.append((symbol, []))
            depth = max(depth, len(stack) + 1)  # the deepest digit sits one below its operator
    raise AssertionError("unbalanced expression")


def test_listops_label_is_the_value_of_the_expression():
    task = small_task("listops", min_length=20, max_length=60, max_depth=4, max_args=5)
    labels = []
    for ex in examples(task, 48):
        length = int(ex["length"])
        tokens = ex["inputs"][:length]
        assert task.min_length < length - 1 < task.max_length
        assert tokens[-1] == task.vocab_size - 1  # CLS last
        assert np.all(ex["inputs"][length:] == data.PAD_ID)
        value, depth = evaluate_listops([LISTOPS_SYMBOLS[int(t)] for t in tokens[:-1]])
        assert ex["label"] == value and depth <= task.max_depth
        labels.append(value)
    assert len(set(labels)) >= 5


def test_listops_impossible_lengths_raise():
    task = small_task("listops", max_depth=2, max_args=3, min_length=10, max_length=40)
    with pytest.raises(ValueError, match=r"data\.listops\.min_length, data\.listops\.max_length: no tree"):
        task.example("train", 0)
    with pytest.raises(ValueError, match=r"^data\.listops\.max_length: must be >= min_length \+ 2"):
        data.make_task("listops", min_length=50, max_length=51)


# ------------------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------------------


def test_bytes_reads_the_stdlib_sources_by_default():
    task = small_task("bytes", seq_len=128)
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    assert task.paths() == paths
    corpus = b"".join(open(path, "rb").read() for path in paths)
    for ex in examples(task, 4) + examples(task, 4, "eval"):
        np.testing.assert_array_equal(ex["labels"][:-1], ex["inputs"][1:])
        assert bytes(ex["inputs"].astype(np.uint8)) + bytes([ex["labels"][-1]]) in corpus


def test_bytes_on_own_files_holds_out_the_tail(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(0, 100)))
    (tmp_path / "b.txt").write_bytes(bytes(range(100, 200)))
    (tmp_path / "skip.md").write_bytes(b"not matched")
    task = small_task("bytes", files=str(tmp_path / "*.txt"), seq_len=8, eval_fraction=0.25)
    for split, low, high in (("train", 0, 150), ("eval", 150, 200)):
        for ex in examples(task, 16, split):
            window = np.append(ex["inputs"], ex["labels"][-1])
            np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 9))  # contiguous bytes
            assert low <= window[0] and window[-1] < high


def test_bytes_empty_glob_raises(tmp_path):
    with pytest.raises(ValueError, match=r"^data\.bytes\.files: must match at least one file"):
        data.make_task("bytes", files=str(tmp_path / "*.nothing"))


# ------------------------------------------------------------------------------------------------------------
# Iterators
# ------------------------------------------------------------------------------------------------------------


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def test_iterator_batches_have_task_shapes():
    task = small_task("mqar")
    batch = next(data.make_iterator(task, "train", batch_size=8, seed=0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 64), np.int32),
        "labels": ((8, 64), np.int32),
    }
    listops = small_task("listops", min_length=10, max_length=40, max_depth=4)
    batch = next(data.make_iterator(listops, "train", batch_size=4, seed=0))
    assert {k: v.shape for k, v in batch.items()} == {"inputs": (4, 40), "length": (4,), "label": (4,)}


def test_iterator_is_deterministic_and_seeded():
    task = small_task("mqar")
    first = take(data.make_iterator(task, "train", batch_size=8, seed=1), 3)
    again = take(data.make_iterator(task, "train", batch_size=8, seed=1), 3)
    other = take(data.make_iterator(task, "train", batch_size=8, seed=2), 3)
    for a, b in zip(first, again):
        assert_same(a, b)
    assert any(differs(a, b) for a, b in zip(first, other))


def test_iterator_resumes_from_a_json_state():
    task = small_task("mqar", num_train=10)  # batches of 4 straddle the epoch boundaries
    uninterrupted = data.make_iterator(task, "train", batch_size=4, seed=5)
    take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = take(uninterrupted, 4)
    resumed = data.make_iterator(task, "train", batch_size=4, seed=5)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 4)):
        assert_same(a, b)


def test_epochs_are_reshuffled_permutations_of_the_split():
    task = small_task("mqar", num_train=16)
    epochs = take(data.make_iterator(task, "train", batch_size=16, seed=0), 2)
    every = np.stack([ex["inputs"] for ex in examples(task, 16)])

    def rows(batch):
        return sorted(map(bytes, batch["inputs"]))

    assert rows(epochs[0]) == rows(epochs[1]) == sorted(map(bytes, every))
    assert not np.array_equal(epochs[0]["inputs"], epochs[1]["inputs"])
    assert not np.array_equal(epochs[0]["inputs"], every)


def test_unshuffled_iterator_keeps_order_and_drops_remainder():
    task = small_task("mqar", num_eval=10)
    batches = list(data.make_iterator(task, "eval", batch_size=4, seed=0, shuffle=False, repeat=False))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["inputs"][0], task.example("eval", 4)["inputs"])


def test_eval_batches_cover_the_split_once_in_order():
    task = small_task("mqar", num_eval=10)
    batches = list(data.eval_batches(task, batch_size=4))
    assert [len(b["inputs"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in batches]), np.stack([ex["labels"] for ex in examples(task, 10, "eval")])
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, seed=0), "batch_size: must be a positive integer"),
        (dict(batch_size=4, seed=-1), r"seed: must be an integer in \[0, 2\*\*32\)"),
        (dict(batch_size=32, seed=0, repeat=False), "batch_size: 32 exceeds the 16 examples"),
    ],
)
def test_iterator_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.make_iterator(small_task("mqar"), "eval", **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Packed documents (bytes, pack=True)
# ------------------------------------------------------------------------------------------------------------

# file sizes: 1 byte (no label: no document), 2, odd, exactly one row (seq_len + 1), longer than a row, several rows
PACKED_FILE_SIZES = (1, 2, 7, 9, 13, 30)
PACKED_LEN = 8


def packed_files(tmp_path) -> str:
    rng = np.random.default_rng(0)
    for i, size in enumerate(PACKED_FILE_SIZES):
        (tmp_path / f"{i}.txt").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return str(tmp_path / "*.txt")


def row_documents(row: dict[str, np.ndarray]) -> list[tuple[bytes, bytes]]:
    """The (inputs, labels) of every document of a packed row, found by walking it with a counter of our own;
    checks the row's segment ids and positions against that counter and that padding is unscored."""
    found, segment, position = [], 0, 0
    for t in range(len(row["inputs"])):
        if row["segment_ids"][t] == 0:  # padding: only at the end of the row
            assert np.all(row["segment_ids"][t:] == 0) and np.all(row["labels"][t:] == IGNORE_INDEX)
            assert np.all(row["inputs"][t:] == data.PAD_ID)
            break
        if t == 0 or row["segment_ids"][t] != row["segment_ids"][t - 1]:
            segment, position = segment + 1, 0
            found.append(([], []))
        assert row["segment_ids"][t] == segment and row["positions"][t] == position
        found[-1][0].append(row["inputs"][t])
        found[-1][1].append(row["labels"][t])
        position += 1
    return [(bytes(np.uint8(i)), bytes(np.uint8(l))) for i, l in found]


def expected_documents(paths: list[str], low: int, high: int) -> list[tuple[bytes, bytes]]:
    """Every file's bytes inside [low, high) of the concatenation, as windows of PACKED_LEN + 1 bytes stepping by
    PACKED_LEN (inputs = all but the last byte, labels = all but the first)."""
    out, offset = [], 0
    for path in paths:
        content = open(path, "rb").read()
        part = content[max(low - offset, 0) : max(high - offset, 0)]
        offset += len(content)
        for start in range(0, len(part) - 1, PACKED_LEN):
            window = part[start : start + PACKED_LEN + 1]
            out.append((window[:-1], window[1:]))
    return out


def test_packing_keeps_every_document_once_with_its_segment_ids_and_positions(tmp_path):
    task = data.make_task("bytes", files=packed_files(tmp_path), seq_len=PACKED_LEN, eval_fraction=0.2)
    total = sum(PACKED_FILE_SIZES)
    cut = int(total * 0.8)
    for split, (low, high) in (("train", (0, cut)), ("eval", (cut, total))):
        batches = data.make_iterator(task, split, batch_size=3, seed=1, repeat=False, drop_remainder=False)
        packed = [doc for batch in batches for row in _rows(batch) for doc in row_documents(row)]
        assert sorted(packed) == sorted(expected_documents(task.paths(), low, high)), split
    labels = sum(len(labels) for _, labels in expected_documents(task.paths(), 0, cut))
    assert labels == cut - sum(1 for size in np.cumsum(PACKED_FILE_SIZES) - PACKED_FILE_SIZES if size < cut)


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{key: value[i] for key, value in batch.items()} for i in range(len(batch["inputs"]))]


def test_packed_rows_hold_several_documents_and_shuffle_per_seed(tmp_path):
    task = data.make_task("bytes", files=packed_files(tmp_path), seq_len=PACKED_LEN, eval_fraction=0.2)
    first = take(data.make_iterator(task, "train", batch_size=3, seed=1), 4)
    assert any(row["segment_ids"].max() > 1 for batch in first for row in _rows(batch))
    for a, b in zip(first, take(data.make_iterator(task, "train", batch_size=3, seed=1), 4)):
        assert_same(a, b)
    assert any(differs(a, b) for a, b in zip(first, take(data.make_iterator(task, "train", batch_size=3, seed=2), 4)))


def test_packed_iterator_resumes_mid_epoch(tmp_path):
    task = data.make_task("bytes", files=packed_files(tmp_path), seq_len=PACKED_LEN, eval_fraction=0.2)
    uninterrupted = data.make_iterator(task, "train", batch_size=2, seed=3)
    take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = take(uninterrupted, 6)  # crosses into the next epoch
    resumed = data.make_iterator(task, "train", batch_size=2, seed=3)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 6)):
        assert_same(a, b)


def test_unpacked_bytes_keep_their_windows(tmp_path):
    task = data.make_task("bytes", files=packed_files(tmp_path), seq_len=PACKED_LEN, pack=False, num_train=5)
    batch = next(data.make_iterator(task, "train", batch_size=5, seed=0))
    assert set(batch) == {"inputs", "labels"} and batch["inputs"].shape == (5, PACKED_LEN)
