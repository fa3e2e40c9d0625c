"""A model's size without building it: parameters per layer and the bytes of its decode state.

`model_summary(config)` traces the model the config describes with ``nnx.eval_shape`` (shapes only: nothing is
allocated or compiled) and counts the ``nnx.Param`` entries of each residual block (its mixer, MLP and norms),
of the rest (embeddings, final norm, classifier head) and in total. The decode-state bytes are those of every array
of the model's decode cache for ONE sequence of the task's length (recurrent states, KV caches of softmax layers,
ring buffers of sliding windows, short-convolution buffers), scalar position counters excluded. The recurrent-
state bytes count only what the Zoology / Based papers call the state: KV caches and recurrent state matrices
over all layers (attention 2 d L floats, a sliding window 2 d w, DeltaNet H d_k d_v, ...), without short-conv
buffers and the KV cache's slot positions. A classifier has no decode form: None for both.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from seqlab import data, models


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """layer_mixers[i] / layer_params[i]: the mixer and the parameter count of block i; other_params: embeddings,
    final norm and head; decode_state_bytes and recurrent_state_bytes: per sequence of the task's length (None
    without a decode form; the module docstring says what each counts)."""

    layer_mixers: tuple[str, ...]
    layer_params: tuple[int, ...]
    other_params: int
    total_params: int
    decode_state_bytes: int | None
    recurrent_state_bytes: int | None

    def lines(self) -> list[str]:
        """A small table: one row per layer, then the rest, the total and the decode state."""
        width = max(len(name) for name in self.layer_mixers)
        label = max(width + 12, 24)
        rows = [f"{f'layer {i:>2}  {name}':<{label}}{params:>12,} params"
                for i, (name, params) in enumerate(zip(self.layer_mixers, self.layer_params))]
        rows.append(f"{'embeddings, norm, head':<{label}}{self.other_params:>12,} params")
        rows.append(f"{'total':<{label}}{self.total_params:>12,} params")
        state = "none (no decode form)" if self.decode_state_bytes is None else (
            f"{human_bytes(self.decode_state_bytes)} ({self.decode_state_bytes:,} bytes) per sequence")
        rows.append(f"decode state: {state}")
        return rows


def model_summary(config: ml_collections.ConfigDict, task: data.Task | None = None) -> ModelSummary:
    """The `ModelSummary` of the model `config` describes (`task` defaults to the one ``config.validate`` makes)."""
    if task is None:
        from seqlab import config as config_lib

        task = config_lib.validate(config)
    model = nnx.eval_shape(lambda: models.build_model(config, task, nnx.Rngs(0)))
    blocks = model.backbone.blocks
    layer_params = tuple(_param_count(block) for block in blocks)
    total = _param_count(model)
    return ModelSummary(
        layer_mixers=tuple(block.mixer_name for block in blocks), layer_params=layer_params,
        other_params=total - sum(layer_params), total_params=total, **_state_bytes(model, task),
    )  # fmt: skip


def _param_count(module: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# cache fields that are bookkeeping, not the state the papers count
_NOT_RECURRENT_STATE = ("conv", "key_positions", "pos")


def _state_bytes(model: nnx.Module, task: data.Task) -> dict[str, int | None]:
    """{"decode_state_bytes", "recurrent_state_bytes"} of one sequence of the task's length."""
    if not hasattr(model, "init_cache"):
        return {"decode_state_bytes": None, "recurrent_state_bytes": None}
    cache = nnx.eval_shape(lambda m: m.init_cache(1, task.seq_len), model)
    leaves = [(path[-1], x) for path, x in jax.tree_util.tree_flatten_with_path(cache)[0] if x.ndim > 0]
    recurrent = [x for key, x in leaves if getattr(key, "name", None) not in _NOT_RECURRENT_STATE]
    return {"decode_state_bytes": sum(int(x.size) * x.dtype.itemsize for _, x in leaves),
            "recurrent_state_bytes": sum(int(x.size) * x.dtype.itemsize for x in recurrent)}


def human_bytes(count: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, up to GB)."""
    units = ("B", "kB", "MB", "GB")
    value, unit = float(count), 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"
