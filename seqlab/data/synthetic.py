"""Small generated recall and copying tasks, one example at a time.

- `selective_copy`: selective copying from MAD (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid
  Architectures"; athms/mad-lab `generate_selective_copying_instance`).
- `in_context_recall`: in-context recall, and with noise tokens noisy in-context recall, from MAD (its multi-query
  scoring: every value whose key appeared before is scored).
- `fuzzy_recall`, `memorization` and `compression`: MAD's fuzzy in-context recall (keys and values are motifs of
  several tokens), memorization (one fixed key -> value map for the whole dataset) and compression (reconstruct the
  input from the compression token's state alone, through `models.LastStateDecoder`).
- `associative_recall` and `induction_head`: the associative recall and induction head tasks of H3 (Fu et al.,
  2023, "Hungry Hungry Hippos: Towards Language Modeling with State Space Models"); only the final token is scored.

All are language-modelling tasks: inputs [L] and labels [L], `labels[t]` the target at position t, -100 unscored.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from seqlab.data.base import IGNORE_INDEX, Task, lm_example


def _interleave(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """k1 v1 k2 v2 ...: keys [n], values [n] -> [2n]."""
    return np.stack([keys, values], axis=1).reshape(-1)


def _bind(rng: np.random.Generator, num_keys: int, value_vocab: np.ndarray) -> np.ndarray:
    """One random key -> value map per sequence: entry k [num_keys] is the value of key k (values may repeat)."""
    return rng.choice(value_vocab, size=num_keys)


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(Task):
    """MAD selective copying: `num_tokens_to_copy` tokens scattered among blanks, then a copy token and as many
    blanks; the model must emit the scattered tokens, in order, at those final blanks (the only scored positions).

    Tokens: content {0, ..., V-3}, blank V-2, copy V-1. The content positions are a uniform random subset of the
    first L - N - 1 positions (MAD inserts blanks at random indices instead; same task, slightly different law).
    """

    name: ClassVar[str] = "selective_copy"
    kind: ClassVar[str] = "lm"

    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def validate(self) -> None:
        super().validate()
        self._require(self.vocab_size >= 3, "vocab_size", "must be >= 3 (content, blank and copy tokens)")
        self._require(self.num_tokens_to_copy >= 1, "num_tokens_to_copy", "must be >= 1")
        self._require(
            self.seq_len > 2 * self.num_tokens_to_copy + 1,
            "seq_len",
            f"must exceed 2 x num_tokens_to_copy + 1 ({2 * self.num_tokens_to_copy + 1})",
        )

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        n, blank, copy = self.num_tokens_to_copy, self.vocab_size - 2, self.vocab_size - 1
        region = self.seq_len - n - 1
        tokens = rng.integers(0, blank, size=n)
        positions = np.sort(rng.choice(region, size=n, replace=False))
        inputs = np.full(self.seq_len, blank)
        inputs[positions] = tokens
        inputs[region] = copy
        labels = np.full(self.seq_len, IGNORE_INDEX)
        labels[region + 1 :] = tokens
        return lm_example(inputs, labels)


@dataclasses.dataclass(frozen=True)
class InContextRecall(Task):
    """MAD (noisy) in-context recall: L/2 pairs `k v` with keys drawn with replacement and one random key -> value
    map per sequence; the label at a key's position is its value when that key appeared in an earlier pair.

    Tokens: with K = vocab_size - noise_vocab_size, keys {0, ..., K/2-1}, values {K/2, ..., K-1}, noise
    {K, ..., vocab_size-1}. Each pair but the first and the last is, with probability frac_noise, two noise tokens
    instead (unscored). The last pair repeats a key shown before, so every example has a scored position.
    MAD's noisy variant: vocab_size=32, noise_vocab_size=16, frac_noise=0.2.
    """

    name: ClassVar[str] = "in_context_recall"
    kind: ClassVar[str] = "lm"

    vocab_size: int = 16
    seq_len: int = 128
    noise_vocab_size: int = 0
    frac_noise: float = 0.0

    def validate(self) -> None:
        super().validate()
        self._require(self.seq_len >= 4 and self.seq_len % 2 == 0, "seq_len", "must be even and >= 4")
        self._require(self.noise_vocab_size >= 0, "noise_vocab_size", "must be >= 0")
        self._require(
            self.vocab_size - self.noise_vocab_size >= 2,
            "vocab_size",
            f"must leave >= 2 key/value tokens besides noise_vocab_size ({self.noise_vocab_size})",
        )
        self._require(0 <= self.frac_noise < 1, "frac_noise", "must lie in [0, 1)")
        self._require(
            self.frac_noise == 0 or self.noise_vocab_size > 0, "noise_vocab_size", "must be > 0 when frac_noise > 0"
        )

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        num_pairs, kv_vocab = self.seq_len // 2, self.vocab_size - self.noise_vocab_size
        num_keys = kv_vocab // 2
        binding = _bind(rng, num_keys, np.arange(num_keys, kv_vocab))
        keys = rng.integers(0, num_keys, size=num_pairs)
        real = rng.random(num_pairs) >= self.frac_noise
        real[[0, -1]] = True
        keys[-1] = rng.choice(keys[:-1][real[:-1]])
        pairs = np.stack([keys, binding[keys]], axis=1)
        pairs[~real] = rng.integers(kv_vocab, self.vocab_size, size=(num_pairs - real.sum(), 2))
        labels = np.full((num_pairs, 2), IGNORE_INDEX)
        scored = real & _seen_before(keys, real, num_keys)
        labels[scored, 0] = binding[keys[scored]]
        return lm_example(pairs.reshape(-1), labels.reshape(-1))


def _seen_before(keys: np.ndarray, real: np.ndarray, num_keys: int) -> np.ndarray:
    """Whether keys[i] [n] occurs at an earlier position j < i with real[j] [n] set; bool [n]."""
    first = np.full(num_keys, len(keys))
    np.minimum.at(first, keys[real], np.flatnonzero(real))
    return np.arange(len(keys)) > first[keys]


@dataclasses.dataclass(frozen=True)
class _FinalTokenTask(Task):
    """H3's synthetic setting: vocabulary 20, length 40, and only the final position is scored."""

    kind: ClassVar[str] = "lm"

    vocab_size: int = 20
    seq_len: int = 40

    @staticmethod
    def _final_token_example(inputs: np.ndarray, target: int) -> dict[str, np.ndarray]:
        """An LM example whose only scored position is the last one: inputs [L], scalar target."""
        labels = np.full(len(inputs), IGNORE_INDEX)
        labels[-1] = target
        return lm_example(inputs, labels)


@dataclasses.dataclass(frozen=True)
class AssociativeRecall(_FinalTokenTask):
    """H3 associative recall: (L-2)/2 pairs `k v` (keys with replacement, one random key -> value map per
    sequence), then `=> k` for a key shown before; the label at that final k is its value (the only scored one).

    Tokens: keys {0, ..., (V-1)//2 - 1}, values {(V-1)//2, ..., V-2}, `=>` = V-1.
    """

    name: ClassVar[str] = "associative_recall"

    def validate(self) -> None:
        super().validate()
        self._require(self.vocab_size >= 3, "vocab_size", "must be >= 3 (a key, a value and the => token)")
        self._require(self.seq_len >= 4 and self.seq_len % 2 == 0, "seq_len", "must be even and >= 4")

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        arrow = self.vocab_size - 1
        num_keys = arrow // 2
        binding = _bind(rng, num_keys, np.arange(num_keys, arrow))
        keys = rng.integers(0, num_keys, size=(self.seq_len - 2) // 2)
        query = rng.choice(keys)
        inputs = np.concatenate([_interleave(keys, binding[keys]), [arrow, query]])
        return self._final_token_example(inputs, binding[query])


@dataclasses.dataclass(frozen=True)
class InductionHead(_FinalTokenTask):
    """H3 induction head: uniform tokens with one trigger token somewhere before the last two positions; the
    sequence ends with the trigger again, and the label there is the token that followed the first trigger.

    Tokens: content {0, ..., V-2}, trigger V-1 (so the trigger occurs exactly twice).
    """

    name: ClassVar[str] = "induction_head"

    def validate(self) -> None:
        super().validate()
        self._require(self.vocab_size >= 2, "vocab_size", "must be >= 2 (content and trigger tokens)")
        self._require(self.seq_len >= 3, "seq_len", "must be >= 3")

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        trigger = self.vocab_size - 1
        inputs = rng.integers(0, trigger, size=self.seq_len)
        position = rng.integers(0, self.seq_len - 2)
        inputs[[position, -1]] = trigger
        return self._final_token_example(inputs, inputs[position + 1])


@dataclasses.dataclass(frozen=True)
class FuzzyRecall(Task):
    """MAD fuzzy in-context recall: pairs of a key motif (1..k_motif_size key tokens) and a value motif
    (1..v_motif_size value tokens) with one random key-motif -> value-motif map per sequence; when a key motif
    reappears, the tokens of its value motif are scored, each at the position before it (next-token labels).

    Tokens: with K = (V-1)//2, keys {0, ..., K-1}, values {K, ..., V-2}, pad V-1. A motif is an ordered draw of
    distinct tokens (as MAD's permutations), its size uniform in 1..max; keys and values come from disjoint
    vocabularies, so motif boundaries are visible. Layout of the L+1-token stream s (inputs = s[:L],
    labels[t] = s[t+1] where s[t+1] is a scored value token, else -100): pad tokens, then pairs `key value` drawn
    while another pair of maximal size still fits before the last k_motif_size + v_motif_size slots, then a final
    pair repeating a key motif shown before (so every example has a scored token); the pads fill the front. A value
    motif is drawn on a key motif's first showing and reused on every repeat. MAD prompts its test split with keys
    of the maximal size only; here both splits share one law.
    """

    name: ClassVar[str] = "fuzzy_recall"
    kind: ClassVar[str] = "lm"

    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3
    v_motif_size: int = 3

    def validate(self) -> None:
        super().validate()
        self._require(self.k_motif_size >= 1, "k_motif_size", "must be >= 1")
        self._require(self.v_motif_size >= 1, "v_motif_size", "must be >= 1")
        keys = (self.vocab_size - 1) // 2
        self._require(
            keys >= self.k_motif_size and self.vocab_size - 1 - keys >= self.v_motif_size,
            "vocab_size",
            f"must give (vocab_size-1)//2 >= k_motif_size ({self.k_motif_size}) distinct key tokens and the rest "
            f"but the pad >= v_motif_size ({self.v_motif_size}) value tokens",
        )
        pair = self.k_motif_size + self.v_motif_size
        self._require(self.seq_len + 1 >= 2 * pair, "seq_len", f"must be >= 2 x (k_motif_size + v_motif_size) - 1 "
                      f"({2 * pair - 1})")

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        num_keys, pad = (self.vocab_size - 1) // 2, self.vocab_size - 1
        num_values = self.vocab_size - 1 - num_keys
        widest = self.k_motif_size + self.v_motif_size
        binding: dict[tuple[int, ...], tuple[int, ...]] = {}
        shown: list[tuple[int, ...]] = []
        stream: list[int] = []
        scored: list[bool] = []

        def add(key: tuple[int, ...], repeat: bool) -> None:
            stream.extend(key + binding[key])
            scored.extend([False] * len(key) + [repeat] * len(binding[key]))
            shown.append(key)

        while len(stream) + 2 * widest <= self.seq_len + 1:
            key = tuple(int(k) for k in rng.choice(num_keys, rng.integers(1, self.k_motif_size + 1), replace=False))
            repeat = key in binding
            if not repeat:
                size = rng.integers(1, self.v_motif_size + 1)
                binding[key] = tuple(num_keys + int(v) for v in rng.choice(num_values, size, replace=False))
            add(key, repeat)
        add(shown[rng.integers(len(shown))], True)
        front = self.seq_len + 1 - len(stream)
        tokens = np.concatenate([np.full(front, pad), stream])  # [L+1]
        targets = np.concatenate([np.zeros(front, bool), scored])  # [L+1]
        return lm_example(tokens[:-1], np.where(targets[1:], tokens[1:], IGNORE_INDEX))


@dataclasses.dataclass(frozen=True)
class Memorization(Task):
    """MAD memorization: L/2 keys, each followed by an insert token at whose position the key's value is the label;
    the key -> value map is one fixed map for the whole dataset (both splits), so it must be stored in the weights.

    Tokens: with K = (V-1)//2, keys {0, ..., K-1}, values {K, ..., V-2}, insert V-1. The map sends the keys to K
    distinct values, a permutation drawn from `numpy.random.default_rng(map_seed)` alone (MAD's kv_map_seed; it
    does not depend on `seed`, which only draws the keys of each sequence, uniformly with replacement).
    """

    name: ClassVar[str] = "memorization"
    kind: ClassVar[str] = "lm"

    vocab_size: int = 256
    seq_len: int = 32
    map_seed: int = 12345

    def validate(self) -> None:
        super().validate()
        self._require(self.vocab_size >= 3, "vocab_size", "must be >= 3 (a key, a value and the insert token)")
        self._require(self.seq_len >= 2 and self.seq_len % 2 == 0, "seq_len", "must be even and >= 2")
        self._require(self.map_seed >= 0, "map_seed", "must be >= 0")

    def key_value_map(self) -> np.ndarray:
        """int [K]: entry k is the value token of key k (the same for every example and split; drawn once)."""
        return _fixed_map(self.vocab_size, self.map_seed).copy()

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        num_keys, insert = (self.vocab_size - 1) // 2, self.vocab_size - 1
        keys = rng.integers(0, num_keys, size=self.seq_len // 2)
        inputs = _interleave(keys, np.full_like(keys, insert))
        labels = _interleave(np.full_like(keys, IGNORE_INDEX), _fixed_map(self.vocab_size, self.map_seed)[keys])
        return lm_example(inputs, labels)


@functools.lru_cache(maxsize=16)
def _fixed_map(vocab_size: int, map_seed: int) -> np.ndarray:
    """`Memorization.key_value_map`: a permutation of the value tokens from `map_seed` alone, cut to the K keys."""
    num_keys = (vocab_size - 1) // 2
    permuted = np.random.default_rng(map_seed).permutation(vocab_size - 1 - num_keys)
    return num_keys + permuted[:num_keys]


@dataclasses.dataclass(frozen=True)
class Compression(Task):
    """MAD compression: L-1 uniform random tokens, then a compression token; the model reconstructs every input
    token from its hidden state at the compression token alone (`lm_head = "from_last"`: `models.LastStateDecoder`
    decodes the logits at index t from the last position's output plus a learned embedding of t).

    Tokens: content {0, ..., V-2}, compression V-1 (at position L-1). labels[t] = inputs[t] for t < L-1 (the
    reconstruction of index t), -100 at the compression token (MAD scores it too; it is always the same token).
    """

    name: ClassVar[str] = "compression"
    kind: ClassVar[str] = "lm"
    lm_head: ClassVar[str] = "from_last"

    vocab_size: int = 16
    seq_len: int = 32

    def validate(self) -> None:
        super().validate()
        self._require(self.vocab_size >= 2, "vocab_size", "must be >= 2 (content and compression tokens)")
        self._require(self.seq_len >= 2, "seq_len", "must be >= 2")

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        compress = self.vocab_size - 1
        inputs = np.append(rng.integers(0, compress, size=self.seq_len - 1), compress)
        return lm_example(inputs, np.append(inputs[:-1], IGNORE_INDEX))
