"""Generation (seqlab.generate): greedy decoding through the caches equals the argmax of the full-sequence forward
at every step; sampling honours temperature, top_k and the rng; argument errors name the argument; decode caches
have constant size for linear mixers and windows; batched serving of prompts of different lengths gives each
prompt the argmax of its own full forward; `sample_text` and experiments/bench_decode.py run.

Models are tiny random-init float32 DecoderLMs (d_model 32, 2 layers); the prompt is P tokens and N new tokens
follow, so the sliding window (4 slots) wraps and every chunked prefill ends on a partial chunk.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import generate as gen
from seqlab.models import DecoderLM
from seqlab.training import checkpoints

VOCAB, B, P, N = 64, 2, 5, 11
WINDOW = 4
PATTERNS = {
    "softmax": (("softmax",), {}),
    "sliding_window": (("sliding_window",), {"sliding_window": {"window": WINDOW}}),
    "gla": (("gla",), {}),
    "deltanet": (("deltanet",), {}),
    "baseconv+based": (("baseconv", "based"), {"based": {"feature_dim": 4}}),
    "mamba2": (("mamba2",), {"mamba2": {"d_state": 8}}),
}
LINEAR = ("gla", "deltanet", "baseconv+based", "mamba2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(mixers: tuple[str, ...], mixer_args: dict, *, vocab_size: int = VOCAB, **overrides) -> DecoderLM:
    args = dict(
        vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=2, mixers=mixers, mixer_args=mixer_args,
        mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm", position_embedding="none", max_len=64, embed_dropout=0.0,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    return DecoderLM(**{**args, **overrides})


@functools.cache
def model(pattern: str) -> DecoderLM:
    return build(*PATTERNS[pattern])


@nnx.jit
def full_logits(m: DecoderLM, tokens: jax.Array) -> jax.Array:
    return m(tokens)


def prompt(seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, P), 0, VOCAB, jnp.int32)


def next_token_logits(m: DecoderLM, out: jax.Array) -> np.ndarray:
    """The full forward's logits [B, N, V] at positions P-1 .. P+N-2, which chose the N generated tokens."""
    return np.asarray(full_logits(m, out)[:, P - 1 : -1])


# --------------------------------------------------------------------------------------------------------------
# Greedy == full forward
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_greedy_generation_is_the_argmax_of_the_full_forward_at_every_step(pattern):
    m, x = model(pattern), prompt()
    out = gen.generate(m, x, N)
    assert out.shape == (B, P + N) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :P], x)
    np.testing.assert_array_equal(out[:, P:], np.argmax(next_token_logits(m, out), axis=-1))


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def test_top_k_1_sampling_is_greedy():
    m, x = model("softmax"), prompt()
    sampled = gen.generate(m, x, N, rng=jax.random.key(0), temperature=1.5, top_k=1)
    np.testing.assert_array_equal(sampled, gen.generate(m, x, N))


def test_sampling_is_deterministic_given_the_rng_and_depends_on_it():
    m, x = model("softmax"), prompt()
    sample = functools.partial(gen.generate, m, x, N, temperature=5.0)
    first, again, other = sample(rng=jax.random.key(3)), sample(rng=jax.random.key(3)), sample(rng=jax.random.key(4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_samples_stay_inside_the_top_k_of_the_full_forward():
    """At a high temperature the draws spread over the top 3 (not just the argmax) and never leave it."""
    m, x = model("softmax"), prompt()
    out = gen.generate(m, x, N, rng=jax.random.key(5), temperature=100.0, top_k=3)
    logits = next_token_logits(m, out)
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    generated = np.asarray(out[:, P:])
    assert np.all(np.any(top3 == generated[..., None], axis=-1))
    assert np.any(generated != top3[..., 0])


def test_sample_logits_on_known_logits():
    logits = jnp.tile(jnp.array([[0.0, 5.0, 4.0, -1.0, 4.5]]), (4096, 1))
    np.testing.assert_array_equal(gen.sample_logits(logits, None, 0.0), np.full(4096, 1))
    tokens = np.asarray(gen.sample_logits(logits, jax.random.key(0), 1.0, top_k=2))
    assert set(np.unique(tokens)) == {1, 4}
    assert 0.5 < np.mean(tokens == 1) < 0.7  # softmax([5, 4.5]) = [0.62, 0.38]
    hot = np.asarray(gen.sample_logits(logits, jax.random.key(0), 1e3))
    assert set(np.unique(hot)) == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, kwargs, arg",
    [
        (jnp.zeros((P,), jnp.int32), {}, "prompt"),
        (jnp.zeros((B, P), jnp.float32), {}, "prompt"),
        (jnp.zeros((B, 0), jnp.int32), {}, "prompt"),
        (jnp.full((B, P), VOCAB, jnp.int32), {}, "prompt"),
        (None, dict(max_new_tokens=0), "max_new_tokens"),
        (None, dict(max_new_tokens=2.0), "max_new_tokens"),
        (None, dict(temperature=-0.5, rng=jax.random.key(0)), "temperature"),
        (None, dict(temperature=float("nan"), rng=jax.random.key(0)), "temperature"),
        (None, dict(top_k=0), "top_k"),
        (None, dict(top_k=VOCAB + 1), "top_k"),
        (None, dict(temperature=1.0), "rng"),
    ],
)
def test_bad_arguments_name_the_argument(tokens, kwargs, arg):
    kwargs = {"max_new_tokens": N, **kwargs}
    with pytest.raises(ValueError, match=f"^{arg} "):
        gen.generate(model("softmax"), prompt() if tokens is None else tokens, **kwargs)


def test_learned_positions_bound_the_generated_length():
    m = build(("gla",), {}, position_embedding="learned", max_len=P + N - 1)
    with pytest.raises(ValueError, match=r"^max_new_tokens: prompt \+ new tokens \(16\) exceed the model's 15"):
        gen.generate(m, prompt(), N)


# --------------------------------------------------------------------------------------------------------------
# Cache sizes
# --------------------------------------------------------------------------------------------------------------


def cache_bytes(pattern: str, max_len: int) -> int:
    m = model(pattern)  # built outside eval_shape: the cached model must hold arrays, not tracers
    return gen.cache_nbytes(jax.eval_shape(lambda: m.init_cache(B, max_len)))


@pytest.mark.parametrize("pattern", LINEAR)
def test_linear_mixer_caches_do_not_grow_with_max_len(pattern):
    assert cache_bytes(pattern, 64) == cache_bytes(pattern, 16384) > 0


def test_softmax_cache_grows_with_max_len_and_the_window_caps_the_ring_buffer():
    assert cache_bytes("softmax", 16384) > 200 * cache_bytes("softmax", 64)
    assert cache_bytes("sliding_window", 64) == cache_bytes("sliding_window", 16384)
    swa = model("sliding_window")
    ring = jax.eval_shape(lambda: swa.init_cache(B, 16384))
    assert all(layer.k.shape[1] == WINDOW for layer in ring.layers)


# --------------------------------------------------------------------------------------------------------------
# sample_text and the benchmark
# --------------------------------------------------------------------------------------------------------------


def fake_run(monkeypatch, workdir, task: str) -> str:
    """A workdir whose config.json names `task`; restore_model returns a random bytes-vocabulary model."""
    m = build(("softmax",), {}, vocab_size=256)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"data": {"task": task}}, f)
    monkeypatch.setattr(checkpoints, "restore_model", lambda workdir: (m, None, None))
    return str(workdir)


def test_sample_text_continues_the_prompt(monkeypatch, tmp_path):
    run = fake_run(monkeypatch, tmp_path, "bytes")
    text = gen.sample_text(run, "héllo", max_new_tokens=8, temperature=1.0, top_k=None, seed=0)
    assert text.startswith("héllo") and len(text) > len("héllo")
    assert gen.sample_text(run, "héllo", max_new_tokens=8, temperature=1.0, top_k=None, seed=0) == text


@pytest.mark.parametrize("task", ["listops", "mqar"])  # mqar: a language model over 256 token ids, not bytes
def test_sample_text_needs_a_bytes_language_model(monkeypatch, tmp_path, task):
    run = fake_run(monkeypatch, tmp_path, task)
    with pytest.raises(ValueError, match=f"holds a model of task '{task}', whose tokens are not bytes of text"):
        gen.sample_text(run, "hi")


def test_sample_text_needs_a_prompt():
    with pytest.raises(ValueError, match="^prompt must be a non-empty string"):
        gen.sample_text("no-such-run", "")


def run_script(*command: str) -> subprocess.CompletedProcess:
    """A command in its own interpreter, as a user runs it."""
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sample_cli_requires_its_flags():
    result = run_script("-m", "seqlab.sample", "--prompt=hi")
    assert result.returncode != 0 and "--workdir" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Batched serving
# --------------------------------------------------------------------------------------------------------------

SERVED_LENGTHS = (5, 12, 1, 8, 5)  # the shortest is one token: everything after it is stepped in lockstep


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_served_prompts_of_different_lengths_are_each_the_argmax_of_their_own_full_forward(pattern):
    m = model(pattern)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n) for n in SERVED_LENGTHS]
    served = gen.serve(m, prompts, N)
    assert [t.shape for t in served] == [(N,)] * len(prompts)
    for p, new in zip(prompts, served):
        out = jnp.asarray(np.concatenate([p, new]))[None]
        want = np.asarray(full_logits(m, out))[0, len(p) - 1 : -1].argmax(-1)
        np.testing.assert_array_equal(new, want)


def test_served_sampling_is_deterministic_given_the_rng_and_stays_in_the_top_k():
    m = model("gla")
    prompts = [list(range(1, 4)), list(range(2, 9))]
    a = gen.serve(m, prompts, N, rng=jax.random.key(0), temperature=1.0, top_k=3)
    b = gen.serve(m, prompts, N, rng=jax.random.key(0), temperature=1.0, top_k=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for p, new in zip(prompts, a):
        logits = np.asarray(full_logits(m, jnp.asarray(np.concatenate([p, new]))[None]))[0, len(p) - 1 : -1]
        top = np.argsort(logits, axis=-1)[:, -3:]
        assert all(t in row for t, row in zip(new, top))


@pytest.mark.parametrize(
    "prompts, kwargs, arg",
    [
        ([], {}, "prompts"),
        ("abc", {}, "prompts"),
        ([[1, 2], []], {}, "prompts"),
        ([[1, VOCAB]], {}, "prompt tokens"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
        ([[1, 2]], dict(temperature=1.0), "rng"),
    ],
)
def test_serve_bad_arguments_name_the_argument(prompts, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        gen.serve(model("gla"), prompts, **{"max_new_tokens": N, **kwargs})


@pytest.mark.slow  # a benchmark script's smoke run
def test_bench_serving_smoke_run():
    result = run_script("experiments/bench_serving.py", "--prompts=3", "--min_len=4", "--max_len=9",
                        "--new_tokens=4", "--mixers=softmax,gla", "--repeats=1", "--d_model=64")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "served" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| softmax", "| gla"]


@pytest.mark.slow  # a benchmark script's smoke run
def test_bench_decode_smoke_run():
    result = run_script(
        "experiments/bench_decode.py", "--contexts=256", "--new_tokens=8", "--mixers=softmax,gla", "--repeats=1"
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "context" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [["| softmax", "256"], ["| gla", "256"]]
