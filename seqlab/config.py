"""The configuration schema of a run, and its validation.

`base_config()` holds every key a run reads, with defaults; the files in configs/ start from it and override
values. Every key of `data.<task>` and `model.mixer_args.<mixer>` is generated from the task dataclass fields and the
mixer constructors' keyword arguments, so each option can be set from the command line
(``--config.model.mixer_args.gla.expand_k=1.0``) and a mistyped key fails.

`config.imports` names modules to import before the config is validated — a project's own mixers (or tasks),
registered when their module is imported (``@seqlab.mixers.register``). It is recorded in config.json, so
`seqlab.training.restore_model`, `python -m seqlab.sample` and a resumed run import them again in a fresh process;
the launcher imports the modules of a ``--config.imports=...`` flag before it loads the config file, so the new
mixers' ``model.mixer_args.<name>`` keys can be set on the command line too.

`validate(config)` runs before anything compiles: it imports ``config.imports``, then rejects keys that do not
exist, unknown names (task, mixer, optimizer, schedule, ...) and dimensions that do not fit, with a ValueError
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections import config_dict

from seqlab import data, mixers
from seqlab.models.blocks import MLPS, NORMS
from seqlab.models.backbone import POSITION_EMBEDDINGS
from seqlab.models.classifier import POOLINGS

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Mixer constructor arguments the model sets itself (not configurable per mixer).
_MODEL_SET_ARGS = ("d_model", "num_heads", "rngs", "dtype", "param_dtype", "layer_index", "num_layers")
_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def base_config() -> ml_collections.ConfigDict:
    """Every configurable key with its default."""
    config = ml_collections.ConfigDict()
    config.imports = ()  # modules imported before validation (a project's own mixers), e.g. ("my_project.mixers",)
    config.seed = 0
    config.data = _data_config()
    config.model = _model_config()
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, warmup_steps=100, schedule="cosine", min_learning_rate_ratio=0.0,
        b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
    ))  # fmt: skip
    config.mesh = ml_collections.ConfigDict(dict(data=1, seq=1))
    config.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=32, eval_batch_size=128, eval_every=250, log_every=50, checkpoint_every=250,
        keep_checkpoints=3, compute_dtype="float32",
    ))  # fmt: skip
    return config


def _data_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"task": "mqar"})
    for name in data.available_tasks():
        fields = dataclasses.fields(data.get_task_class(name))
        cfg[name] = ml_collections.ConfigDict({f.name: f.default for f in fields})
    return cfg


def _model_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        d_model=128, num_layers=2, num_heads=2, mixers=("softmax",), mlp="swiglu", mlp_ratio=4.0, norm="layernorm",
        position_embedding="none", embed_dropout=0.0, pooling="mean",
    ))  # fmt: skip
    cfg.mixer_args = ml_collections.ConfigDict({name: _mixer_defaults(name) for name in mixers.available()})
    return cfg


def _mixer_defaults(name: str) -> ml_collections.ConfigDict:
    """The keyword arguments of mixer `name` with their defaults (None defaults become typed placeholders)."""
    params = mixers.keyword_arguments(mixers.get(name)).values()
    return ml_collections.ConfigDict({
        p.name: p.default if p.default is not None else _placeholder(p.annotation)
        for p in params if p.name not in _MODEL_SET_ARGS
    })


def _placeholder(annotation: Any) -> Any:
    """A typed empty field for an argument annotated like ``int | None``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [t for t in (part.strip() for part in text.split("|")) if t in _PLACEHOLDER_TYPES]
    return config_dict.placeholder(_PLACEHOLDER_TYPES[kinds[0]]) if kinds else None


def load_config_module(path: str) -> ModuleType:
    """Import a config file (configs/<name>.py) as a module."""
    if not os.path.isfile(path):
        raise ValueError(f"config: no config file at {path!r}")
    spec = importlib.util.spec_from_file_location(f"seqlab_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:variant]`` -> its get_config(variant), as ``--config=`` loads it."""
    path, _, arg = spec.partition(":")
    return load_config_module(path).get_config(arg or None)


def parse_variant(arg: str | None, variants: dict, default: str) -> tuple[str, bool]:
    """'gla,tiny' -> ('gla', True); None -> (default, False). Unknown names raise ValueError listing the variants."""
    parts = [p for p in (arg or "").split(",") if p]
    tiny = "tiny" in parts
    names = [p for p in parts if p != "tiny"]
    if len(names) > 1 or (names and names[0] not in variants):
        raise ValueError(f"config variant {arg!r}: expected one of {', '.join(variants)} (optionally with ',tiny')")
    return (names[0] if names else default), tiny


def shrink(config: ml_collections.ConfigDict) -> None:
    """The tests' tiny size: a few steps of a 2-layer d_model 32 model on small data."""
    task = config.data[config.data.task]
    task.update(num_train=256, num_eval=64)
    config.model.update(d_model=32, num_heads=2)
    config.optim.update(learning_rate=1e-2, warmup_steps=2)
    config.train.update(steps=20, batch_size=8, eval_batch_size=32, eval_every=10, log_every=5, checkpoint_every=10)


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> data.Task:
    """Import ``config.imports``, check the whole config and return the task it describes. Raises ValueError naming
    the offending key. Mixers registered by the imported modules get their ``model.mixer_args`` section here."""
    import_modules(config.get("imports", ()))
    _add_mixer_sections(config.model.mixer_args)
    check_known_keys(config, base_config())
    task = make_task(config)
    _check_model(config.model, task)
    _check_train(config.train)
    _check_optim(config.optim, config.train.steps)
    _check_mesh(config.mesh, config.train, task, config.model)
    return task


def import_modules(names: Sequence[str]) -> None:
    """Import each module of ``config.imports`` (a tuple of importable module names; already imported ones are not
    imported again)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"imports must be a tuple of module names, e.g. ('my_project.mixers',), got {names!r}")
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name and not name.startswith(f"{error.name}."):
                raise  # the module exists but one of its own imports is missing: the user's traceback matters
            raise ValueError(f"imports: no module named {name!r} (is its directory on PYTHONPATH?)") from None


def _add_mixer_sections(mixer_args: ml_collections.ConfigDict) -> None:
    """A ``model.mixer_args.<name>`` section, with the constructor's defaults, for every registered mixer that the
    config does not have yet (mixers registered by ``config.imports`` after the config was made)."""
    missing = [name for name in mixers.available() if name not in mixer_args]
    with mixer_args.unlocked():
        for name in missing:
            mixer_args[name] = _mixer_defaults(name)


def check_known_keys(config: Any, schema: Any, prefix: str = "") -> None:
    """Every key of `config` must exist in `schema` (recursively)."""
    if not isinstance(config, (ml_collections.ConfigDict, dict)):
        return
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            allowed = ", ".join(sorted(schema.keys()))
            raise ValueError(f"config key {path!r} does not exist; keys allowed under {prefix or 'the root'}: {allowed}")
        check_known_keys(config[key], schema[key], f"{path}.")


def make_task(config: ml_collections.ConfigDict) -> data.Task:
    """The task named by data.task, built from data.<task> (its options are validated by the task)."""
    name = config.data.task
    if name not in data.available_tasks():
        raise ValueError(f"data.task: unknown task {name!r}; known tasks: {', '.join(data.available_tasks())}")
    return data.make_task(name, **config.data[name].to_dict())


def _check_model(model: ml_collections.ConfigDict, task: data.Task) -> None:
    pattern = tuple(model.mixers) if isinstance(model.mixers, (tuple, list)) else (model.mixers,)
    for name in pattern:
        if name not in mixers.available():
            raise ValueError(f"model.mixers: unknown mixer {name!r}; known mixers: {', '.join(mixers.available())}")
    _check_positive_ints(model, ("d_model", "num_layers", "num_heads"), "model")
    if model.d_model % model.num_heads:
        raise ValueError(f"model.d_model ({model.d_model}) must be divisible by model.num_heads ({model.num_heads})")
    for key, allowed in (("mlp", MLPS), ("norm", NORMS), ("position_embedding", POSITION_EMBEDDINGS),
                         ("pooling", POOLINGS)):
        if model[key] not in allowed:
            raise ValueError(f"model.{key}: {model[key]!r} is not one of {', '.join(allowed)}")
    for name in set(pattern):
        causal = mixers.get(name).causal and model.mixer_args[name].get("causal", True) is not False
        if task.kind == "lm" and not causal:
            raise ValueError(
                f"model.mixers: {name!r} is non-causal here (each output sees the whole sequence), so it cannot be a "
                f"language model's mixer (data.task={task.name!r}); use a classification task, or set "
                f"model.mixer_args.{name}.causal=True where the mixer has a causal form"
            )
        window = model.mixer_args[name].get("window")
        if window is not None and window > task.seq_len:
            raise ValueError(
                f"model.mixer_args.{name}.window ({window}) is larger than the sequence length ({task.seq_len})"
            )


def _check_optim(optim: ml_collections.ConfigDict, steps: int) -> None:
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {optim.name!r}; known: {', '.join(OPTIMIZERS)}")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}; known: {', '.join(SCHEDULES)}")
    if not optim.learning_rate > 0:
        raise ValueError(f"optim.learning_rate must be positive, got {optim.learning_rate}")
    if not 0 <= optim.warmup_steps <= steps:
        raise ValueError(f"optim.warmup_steps ({optim.warmup_steps}) must lie in [0, train.steps={steps}]")
    if not 0.0 <= optim.min_learning_rate_ratio <= 1.0:
        raise ValueError(f"optim.min_learning_rate_ratio must lie in [0, 1], got {optim.min_learning_rate_ratio}")
    if optim.grad_clip_norm is not None and not optim.grad_clip_norm > 0:
        raise ValueError(f"optim.grad_clip_norm must be positive (or None), got {optim.grad_clip_norm}")


def _check_train(train: ml_collections.ConfigDict) -> None:
    _check_positive_ints(
        train, ("steps", "batch_size", "eval_batch_size", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints"), "train",
    )  # fmt: skip
    if train.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype: {train.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")


def _check_mesh(mesh: ml_collections.ConfigDict, train: ml_collections.ConfigDict, task: data.Task,
                model: ml_collections.ConfigDict) -> None:
    """The batch must split evenly over mesh.data and every sequence over mesh.seq."""
    _check_positive_ints(mesh, ("data", "seq"), "mesh")
    if model.norm == "prepbn" and mesh.data * mesh.seq > 1:
        raise ValueError("model.norm: 'prepbn' (BatchNorm statistics) runs on one device; set mesh.data = mesh.seq = 1 "
                         "or use layernorm / rmsnorm")
    for key, value in (("train.batch_size", train.batch_size), ("train.eval_batch_size", train.eval_batch_size),
                       (f"data.{task.name}.num_eval", task.num_eval)):
        if value % mesh.data:
            raise ValueError(f"{key} ({value}) must be divisible by mesh.data ({mesh.data})")
    if task.seq_len % mesh.seq:
        raise ValueError(f"the sequence length of data.{task.name} ({task.seq_len}) must be divisible by mesh.seq "
                         f"({mesh.seq})")


def _check_positive_ints(section: ml_collections.ConfigDict, keys: tuple[str, ...], prefix: str) -> None:
    for key in keys:
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")
