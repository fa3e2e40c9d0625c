"""Autoregressive generation from a `DecoderLM` through its decode caches.

    tokens = generate(model, prompt, max_new_tokens, rng=key, temperature=0.8, top_k=40)

prompt [B, P] int32 -> tokens [B, P + N] (the prompt, then N = max_new_tokens new tokens). The prompt is prefilled
into every layer's cache with the training path (`DecoderLM.prefill`), then a jitted `lax.scan` decodes one token
per step (`DecoderLM.step`): linear families carry a recurrent state whose size does not depend on the length, softmax
layers a KV cache of P + N slots, sliding windows a ring buffer of `window` slots. Temperature 0 is greedy decoding;
otherwise each token is drawn from softmax(logits / temperature), restricted to the top_k largest logits when top_k
is set. Prefill and decoding compile once per (model structure, shapes, top_k, greedy or sampled).

`prefill` and `decode` are the two halves of `generate` (experiments/bench_decode.py times them separately);
`sample_text` samples text from a trained bytes model (the library side of `python -m seqlab.sample`).

Batched serving: `serve(model, prompts, max_new_tokens)` decodes prompts of different lengths together. The
shortest length P_min is prefilled for every row at once; then one lockstep scan steps every row through its
own remaining prompt tokens (teacher-forced) and on into its generated ones, so every row sits at the same
position at every step and the caches' single `pos` counter stays right for all of them — no padding enters any
cache and no mixer needs a mask for it. Row r's new tokens are the ones chosen from position L_r − 1 on; the scan
runs max(L) − P_min + max_new_tokens steps. Each row gets exactly what `generate` gives it alone (decode = forward).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqlab.checks import check_positive_int
from seqlab.models import DecodeCache, DecoderLM


def generate(
    model: DecoderLM,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> jax.Array:
    """prompt [B, P] int -> [B, P + max_new_tokens] int32: the prompt followed by the generated tokens."""
    prompt = _check_prompt(model, prompt)
    check_positive_int("max_new_tokens", max_new_tokens)
    _check_sampling(rng, temperature, top_k, _vocab_size(model))
    _check_positions(model, prompt.shape[1] + max_new_tokens, "max_new_tokens")
    logits, cache = prefill(model, prompt, prompt.shape[1] + max_new_tokens)
    tokens, _, _ = decode(model, logits, cache, max_new_tokens, rng=rng, temperature=temperature, top_k=top_k)
    return jnp.concatenate([prompt, tokens], axis=1)


def serve(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> list[np.ndarray]:
    """Prompts of different lengths (a list of token sequences) decoded together (module docstring) -> each
    prompt's max_new_tokens new tokens, int32 [max_new_tokens] per prompt."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token sequences, got {type(prompts).__name__}")
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() < 1:
        raise ValueError(f"prompts: prompt {int(np.argmin(lengths))} holds no token")
    padded = np.zeros((len(prompts), lengths.max()), np.int64)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    padded = _check_prompt(model, padded)
    check_positive_int("max_new_tokens", max_new_tokens)
    _check_sampling(rng, temperature, top_k, _vocab_size(model))
    max_len = int(lengths.max()) + max_new_tokens
    _check_positions(model, max_len, "max_new_tokens")
    shortest = int(lengths.min())
    num_steps = max_len - shortest
    keys = None if temperature == 0 else jax.random.split(rng, num_steps)
    graphdef, state = nnx.split(model)
    tokens = np.asarray(_serve(graphdef, state, padded, jnp.asarray(lengths, jnp.int32), keys,
                               jnp.float32(temperature), shortest=shortest, num_steps=num_steps, top_k=top_k))
    return [tokens[row, n - shortest: n - shortest + max_new_tokens] for row, n in enumerate(lengths)]


def prefill(model: DecoderLM, prompt: jax.Array, max_len: int) -> tuple[jax.Array, DecodeCache]:
    """prompt [B, P] int into fresh caches for max_len positions -> (logits [B, V] at the last prompt position,
    the caches after P tokens)."""
    prompt = _check_prompt(model, prompt)
    check_positive_int("max_len", max_len)
    if max_len < prompt.shape[1]:
        raise ValueError(f"max_len ({max_len}) must be at least the prompt length ({prompt.shape[1]})")
    _check_positions(model, max_len, "max_len")
    graphdef, state = nnx.split(model)
    return _prefill(graphdef, state, prompt, max_len)


def decode(
    model: DecoderLM,
    logits: jax.Array,
    cache: DecodeCache,
    num_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> tuple[jax.Array, jax.Array, DecodeCache]:
    """num_tokens tokens chosen from logits [B, V] and then from each step's logits ->
    (tokens [B, num_tokens] int32, the logits [B, V] after the last token, the caches holding every token)."""
    check_positive_int("num_tokens", num_tokens)
    _check_sampling(rng, temperature, top_k, _vocab_size(model))
    graphdef, state = nnx.split(model)
    keys = None if temperature == 0 else jax.random.split(rng, num_tokens)
    return _decode(graphdef, state, logits, cache, keys, jnp.float32(temperature), num_tokens=num_tokens, top_k=top_k)


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float, top_k: int | None = None) -> jax.Array:
    """logits [B, V] -> tokens [B] int32: the argmax when temperature is 0 (rng unused), else a draw from
    softmax(logits / temperature) over the top_k largest logits (all V when top_k is None)."""
    _check_sampling(rng, temperature, top_k, logits.shape[-1])
    return _choose(logits, None if temperature == 0 else rng, jnp.float32(temperature), top_k)


def cache_nbytes(cache: Any) -> int:
    """Total bytes of a cache pytree's arrays (arrays or jax.ShapeDtypeStruct leaves, e.g. from jax.eval_shape)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(cache))


def check_byte_level(workdir: str) -> None:
    """Raise ValueError (one line) unless the run in `workdir` is a language model over bytes of text (its task's
    `byte_level`), read from its config.json before any model is built."""
    from seqlab import config as config_lib, data as data_lib
    from seqlab.training.checkpoints import read_config

    config = read_config(workdir)
    config_lib.import_modules(config.get("imports", ()))
    name = config.data.task
    task_cls = data_lib.get_task_class(name)
    if not (task_cls.byte_level and task_cls.kind == "lm"):
        raise ValueError(
            f"workdir: {workdir!r} holds a model of task {name!r}, whose tokens are not bytes of text; sampling "
            f"text needs a byte-level language model (e.g. a configs/bytes.py run)"
        )


def sample_text(
    workdir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 40,
    seed: int = 0,
) -> str:  # fmt: skip
    """The prompt and max_new_tokens sampled bytes, decoded as UTF-8 (invalid bytes replaced), from the bytes
    language model trained in `workdir` (its latest checkpoint)."""
    from seqlab.training.checkpoints import restore_model

    data = prompt.encode("utf-8")
    if not data:
        raise ValueError("prompt must be a non-empty string")
    check_byte_level(workdir)
    model, _, _ = restore_model(workdir)
    tokens = generate(
        model, jnp.asarray([list(data)], jnp.int32), max_new_tokens, rng=jax.random.key(seed),
        temperature=temperature, top_k=top_k,
    )  # fmt: skip
    return bytes(np.asarray(tokens[0]).tolist()).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------------
# Compiled halves (the model travels as graphdef, static, and state, traced)
# --------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(
    graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, max_len: int
) -> tuple[jax.Array, DecodeCache]:
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompt, model.init_cache(prompt.shape[0], max_len))
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "top_k"))
def _decode(
    graphdef: nnx.GraphDef, state: nnx.State, logits: jax.Array, cache: DecodeCache, keys: jax.Array | None,
    temperature: jax.Array, *, num_tokens: int, top_k: int | None,
) -> tuple[jax.Array, jax.Array, DecodeCache]:  # fmt: skip
    """keys [num_tokens] (one per token; None = greedy) -> (tokens [B, num_tokens], logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)

    def body(carry, key):
        logits, cache = carry
        token = _choose(logits, key, temperature, top_k)
        logits, cache = model.step(token, cache)
        return (logits, cache), token

    (logits, cache), tokens = jax.lax.scan(body, (logits, cache), keys, length=num_tokens)
    return tokens.T, logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "shortest", "num_steps", "top_k"))
def _serve(
    graphdef: nnx.GraphDef, state: nnx.State, prompts: jax.Array, lengths: jax.Array, keys: jax.Array | None,
    temperature: jax.Array, *, shortest: int, num_steps: int, top_k: int | None,
) -> jax.Array:  # fmt: skip
    """prompts [B, P_max] (right-padded), lengths [B] -> the token at each position shortest .. shortest +
    num_steps - 1 of every row [B, num_steps]: its prompt token while t < L_r, the chosen one after."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompts[:, :shortest], model.init_cache(prompts.shape[0], shortest + num_steps))
    positions = jnp.arange(shortest, shortest + num_steps)

    def body(carry, step):
        logits, cache = carry
        t, key = step
        forced = jnp.take(prompts, jnp.minimum(t, prompts.shape[1] - 1), axis=1)
        token = jnp.where(t < lengths, forced, _choose(logits, key, temperature, top_k))
        logits, cache = model.step(token, cache)
        return (logits, cache), token

    _, tokens = jax.lax.scan(body, (logits[:, -1], cache), (positions, keys))
    return tokens.T


def _choose(logits: jax.Array, rng: jax.Array | None, temperature: jax.Array, top_k: int | None) -> jax.Array:
    """tokens [B] int32 from logits [B, V]: the argmax when rng is None, else a temperature / top-k draw."""
    if rng is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is None:
        return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)
    values, indices = jax.lax.top_k(logits, top_k)
    choice = jax.random.categorical(rng, values / temperature, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# --------------------------------------------------------------------------------------------------------------
# Argument checks (each ValueError names the argument)
# --------------------------------------------------------------------------------------------------------------


def _vocab_size(model: DecoderLM) -> int:
    """V, the rows of the (tied) token embedding."""
    return model.backbone.embed.num_embeddings


def _check_prompt(model: DecoderLM, prompt: Any) -> jax.Array:
    """prompt must be an integer array [B, P] with B, P >= 1 and tokens in [0, vocab_size); returned as int32."""
    shape, dtype = getattr(prompt, "shape", None), getattr(prompt, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"prompt must be an integer array [batch, length], got {type(prompt).__name__} {shape} {dtype}"
        )
    if 0 in shape:
        raise ValueError(f"prompt must hold at least one token per row, got shape {tuple(shape)}")
    vocab = _vocab_size(model)
    values = np.asarray(prompt)
    if values.min() < 0 or values.max() >= vocab:
        raise ValueError(f"prompt tokens must lie in [0, vocab_size={vocab}), got [{values.min()}, {values.max()}]")
    return jnp.asarray(prompt, jnp.int32)


def _check_positions(model: DecoderLM, max_len: int, name: str) -> None:
    """A model with learned position embeddings cannot go past its table; `name` is the argument to blame."""
    table = model.backbone.positions
    if table is not None and max_len > table.shape[0]:
        raise ValueError(
            f"{name}: prompt + new tokens ({max_len}) exceed the model's {table.shape[0]} learned positions"
        )


def _check_sampling(rng: Any, temperature: Any, top_k: Any, vocab_size: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, vocab_size={vocab_size}], got {top_k!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng must be a PRNG key when sampling (temperature > 0), got None")
