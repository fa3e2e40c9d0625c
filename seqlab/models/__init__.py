"""Models built from a config: a decoder LM for language-modelling tasks (a `LastStateDecoder` for those whose
`lm_head` is "from_last": MAD's compression), a sequence classifier for classification tasks, a patch classifier
for image tasks (`seqlab.models.vision`). All share the residual blocks with a repeating mixer pattern
(`make_blocks`); the first three share `Backbone` (embedding, blocks, final norm).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqlab.data import Task
from seqlab.data.images import ImageTask
from seqlab.models.backbone import Backbone, DecodeCache, layer_mixers, make_blocks
from seqlab.models.blocks import Block, SwiGLU
from seqlab.models.classifier import SequenceClassifier
from seqlab.models.last_state import LastStateDecoder
from seqlab.models.lm import DecoderLM
from seqlab.models.vision import PatchClassifier

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


Model = DecoderLM | LastStateDecoder | SequenceClassifier | PatchClassifier


def build_model(config: ml_collections.ConfigDict, task: Task, rngs: nnx.Rngs) -> Model:
    """The model config.model describes, sized for `task` (its vocabulary, length and classes).

    Parameters are float32; train.compute_dtype sets the activations' dtype.
    """
    m = config.model
    pattern = tuple(m.mixers) if isinstance(m.mixers, (tuple, list)) else (m.mixers,)
    args: dict[str, Any] = dict(
        vocab_size=task.vocab_size, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
        mixers=pattern, mixer_args=_mixer_args(m.mixer_args, pattern), mlp=m.mlp, mlp_ratio=m.mlp_ratio,
        norm=m.norm, position_embedding=m.position_embedding, max_len=task.seq_len, embed_dropout=m.embed_dropout,
        rngs=rngs, dtype=_DTYPES[config.train.compute_dtype], param_dtype=jnp.float32,
    )  # fmt: skip
    if isinstance(task, ImageTask):
        vision = {key: args[key] for key in ("d_model", "num_layers", "num_heads", "mixers", "mixer_args", "mlp",
                                             "mlp_ratio", "norm", "rngs", "dtype", "param_dtype")}
        model = PatchClassifier(num_classes=task.num_classes, image_shape=task.image_shape, levels=task.levels,
                                patch_size=m.patch_size, **vision)
    elif task.kind == "classification":
        model = SequenceClassifier(num_classes=task.num_classes, pooling=m.pooling, **args)
    elif task.lm_head == "from_last":
        model = LastStateDecoder(num_targets=task.seq_len, **args)
    else:
        model = DecoderLM(**args)
    if m.learn_initial_state:
        _learn_initial_states(model)
    return model


def _learn_initial_states(model: nnx.Module) -> None:
    """Initial-state tuning: every layer whose mixer has a recurrent state starts from a learnt one. ValueError if
    none has."""
    refusals = [block.mixer.initial_state_refusal() for block in model.backbone.blocks]
    if all(refusals):
        raise ValueError(f"model.learn_initial_state: no layer's mixer has a recurrent state ({refusals[0]})")
    for block, refusal in zip(model.backbone.blocks, refusals):
        if not refusal:
            block.mixer.learn_initial_state()


def _mixer_args(mixer_args: ml_collections.ConfigDict, pattern: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Constructor arguments of each mixer in the pattern; unset (None) options keep the mixer's own default."""
    return {name: {k: v for k, v in mixer_args[name].to_dict().items() if v is not None} for name in pattern}


__all__ = [
    "Backbone",
    "Block",
    "DecodeCache",
    "DecoderLM",
    "LastStateDecoder",
    "PatchClassifier",
    "SequenceClassifier",
    "SwiGLU",
    "build_model",
    "layer_mixers",
    "make_blocks",
]
