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

`model.mixers` is the layer pattern: it repeats over the ``model.num_layers`` layers (layer i uses
``mixers[i % len(mixers)]``), and ``num_layers`` need not be a multiple of its length — the last repetition may be
partial (``("baseconv", "based", "sliding_window")`` over 4 layers: baseconv, based, sliding_window, baseconv). A
pattern longer than ``num_layers`` is refused (its extra mixers would never be built).

`optim.warmup_steps` is a number of steps (a whole number >= 1) or, below 1, a fraction of ``train.steps``
(0.1: the first 10% of the run); `seqlab.training.optim.warmup_steps` resolves it (and clamps a number of steps
larger than the run, with a warning).

`validate(config)` runs before anything compiles: it imports ``config.imports``, then rejects keys that do not
exist, a bare string where the schema has a tuple, unknown names (task, mixer, optimizer, schedule, ...) and
dimensions that do not fit, with a one-line ValueError naming the key, what is allowed and the close matches
(`did_you_mean`). `explain_override_error` turns the launcher's flag-parsing errors (``--config.key=value``
overrides) into the same kind of message.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

import ml_collections
from flax import nnx
from ml_collections import config_dict

from seqlab import data, mixers, models
from seqlab.data.images import ImageTask
from seqlab.models.backbone import POSITION_EMBEDDINGS
from seqlab.models.blocks import MLPS, NORMS
from seqlab.models.classifier import POOLINGS
from seqlab.models.vision import patch_grid

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Mixer constructor arguments the model sets itself (not configurable per mixer).
_MODEL_SET_ARGS = ("d_model", "num_heads", "rngs", "dtype", "param_dtype", "layer_index", "num_layers")
_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# What the items of a tuple-typed key are (for its error message).
_TUPLE_ITEMS = {"imports": "module names", "model.mixers": "mixer names"}
# How a message names what a field of each type takes.
_TYPE_PHRASES = {"int": "an integer", "float": "a number", "bool": "true or false", "tuple": "a tuple",
                 "str": "a string"}


def base_config() -> ml_collections.ConfigDict:
    """Every configurable key with its default."""
    config = ml_collections.ConfigDict()
    config.imports = ()  # modules imported before validation (a project's own mixers), e.g. ("my_project.mixers",)
    config.seed = 0
    config.data = _data_config()
    config.model = _model_config()
    # warmup_steps is a float field, so that a fraction of train.steps (0.1) can be set as well as steps (300).
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, warmup_steps=100.0, schedule="cosine", min_learning_rate_ratio=0.0,
        b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0, trainable="",
    ))  # fmt: skip
    config.mesh = ml_collections.ConfigDict(dict(data=1, seq=1))
    config.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=32, eval_batch_size=128, eval_every=250, log_every=50, checkpoint_every=250,
        keep_checkpoints=3, compute_dtype="float32", init_from="",
    ))  # fmt: skip
    return config


def default_dict() -> dict[str, Any]:
    """`base_config()` as the plain dict a run's config.json holds (with the sections of every mixer registered now)."""
    return json.loads(base_config().to_json_best_effort())


def _data_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"task": "mqar"})
    for name in data.available_tasks():
        fields = dataclasses.fields(data.get_task_class(name))
        cfg[name] = ml_collections.ConfigDict({f.name: f.default for f in fields})
    return cfg


def _model_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        d_model=128, num_layers=2, num_heads=2, mixers=("softmax",), mlp="swiglu", mlp_ratio=4.0, norm="layernorm",
        position_embedding="none", embed_dropout=0.0, pooling="mean", learn_initial_state=False, patch_size=1,
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
    allowed = f"expected one of {', '.join(variants)}, optionally with ',tiny'"
    if len(names) > 1:
        raise ValueError(f"config variant '{arg}' names {len(names)} variants ({allowed})")
    if names and names[0] not in variants:
        head = f"config variant '{names[0]}' does not exist"
        raise ValueError(_with_close_matches(head, names[0], variants, allowed))
    return (names[0] if names else default), tiny


def did_you_mean(name: Any, choices: Iterable[str], prefix: str = "") -> str:
    """The clause ``; did you mean 'x'?`` (or ``'x' or 'y'``) naming the choices close to `name`, each shown after
    `prefix` (e.g. the section of a key); "" when none is close. Every "unknown name" message of the config uses it."""
    matches = [f"'{prefix}{m}'" for m in difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)]
    if not matches:
        return ""
    listed = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f"; did you mean {listed}?"


def _with_close_matches(head: str, name: Any, choices: Iterable[str], listing: str, prefix: str = "") -> str:
    """`head`, the close matches of `name` (if any) and `listing` (what is allowed), on one line."""
    hint = did_you_mean(name, choices, prefix)
    return f"{head}{hint} ({listing})" if hint else f"{head}; {listing}"


def _unknown_name(key: str, kind: str, name: Any, choices: Sequence[str]) -> ValueError:
    listing = f"known {kind}s: {', '.join(choices)}"
    return ValueError(_with_close_matches(f"{key}: unknown {kind} '{name}'", name, choices, listing))


def _check_choice(section: ml_collections.ConfigDict, key: str, choices: Sequence[str], prefix: str) -> None:
    if section[key] not in choices:
        raise _unknown_name(f"{prefix}.{key}", key.replace("_", " "), section[key], choices)


def _unknown_key(path: str, section_keys: Iterable[str]) -> str:
    """The message for a key `path` that its section (with keys `section_keys`) does not have."""
    section, _, leaf = path.rpartition(".")
    keys = sorted(section_keys)
    listing = f"{f'keys under {section}' if section else 'top-level keys'}: {', '.join(keys)}"
    return _with_close_matches(f"config key '{path}' does not exist", leaf, keys, listing,
                               f"{section}." if section else "")


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
    schema = base_config()
    check_known_keys(config, schema)
    check_tuple_keys(config, schema)
    task = make_task(config)
    _check_model(config.model, task)
    _check_train(config.train)
    _check_optim(config.optim)
    _check_mesh(config.mesh, config.train, task, config.model)
    if config.model.learn_initial_state or isinstance(task, ImageTask):
        # which layers can learn a state, and whether every mixer takes the patch grid, is known once they are built
        nnx.eval_shape(lambda: models.build_model(config, task, nnx.Rngs(0)))
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
            raise ValueError(_unknown_key(path, schema.keys()))
        check_known_keys(config[key], schema[key], f"{path}.")


def check_tuple_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every key whose default in `schema` is a tuple must hold a tuple (or a list, as config.json stores it) in
    `config` (recursively; `config` has only keys of `schema`). A bare string is the usual slip."""
    for key in config.keys():
        path, value, default = f"{prefix}{key}", config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
            check_tuple_keys(value, default, f"{path}.")
        elif isinstance(default, tuple) and not isinstance(value, (tuple, list)):
            items = f" of {_TUPLE_ITEMS[path]}" if path in _TUPLE_ITEMS else ""
            if isinstance(value, str):
                raise ValueError(f"{path} must be a tuple{items}, e.g. --config.{path}=\"{(value,)!r}\" ; got the "
                                 f"string '{value}'")
            raise ValueError(f"{path} must be a tuple{items}, got {value!r}")


def make_task(config: ml_collections.ConfigDict) -> data.Task:
    """The task named by data.task, built from data.<task> (its options are validated by the task)."""
    name = config.data.task
    if name not in data.available_tasks():
        raise _unknown_name("data.task", "task", name, data.available_tasks())
    return data.make_task(name, **config.data[name].to_dict())


def _check_model(model: ml_collections.ConfigDict, task: data.Task) -> None:
    pattern = tuple(model.mixers)
    for name in pattern:
        if name not in mixers.available():
            raise _unknown_name("model.mixers", "mixer", name, mixers.available())
    _check_positive_ints(model, ("d_model", "num_layers", "num_heads"), "model")
    _check_pattern_length(pattern, model.num_layers)
    if model.d_model % model.num_heads:
        raise ValueError(f"model.d_model ({model.d_model}) must be divisible by model.num_heads ({model.num_heads})")
    for key, allowed in (("mlp", MLPS), ("norm", NORMS), ("position_embedding", POSITION_EMBEDDINGS),
                         ("pooling", POOLINGS)):
        _check_choice(model, key, allowed, "model")
    if isinstance(task, ImageTask):
        patch_grid(task.image_shape, model.patch_size)
    elif model.patch_size != 1:
        raise ValueError(f"model.patch_size applies to image tasks (digits, shapes); leave it 1 for "
                         f"data.task={task.name!r} (got {model.patch_size})")
    for name in set(pattern):
        causal = mixers.get(name).causal and model.mixer_args[name].get("causal", True) is not False
        if task.kind == "lm" and not causal:
            raise ValueError(
                f"model.mixers: {name!r} is non-causal here (each output sees the whole sequence), so it cannot be a "
                f"language model's mixer (data.task={task.name!r}); use a classification task, or set "
                f"model.mixer_args.{name}.causal=True where the mixer has a causal form"
            )
        if task.packs_documents() and not mixers.get(name).takes_documents:
            taking = sorted(n for n in mixers.available() if mixers.get(n).takes_documents)
            raise ValueError(
                f"model.mixers: {name!r} does not take packed documents, which data.{task.name}.pack=True trains on; "
                f"set data.{task.name}.pack=False or use one of {taking}"
            )
        if model.learn_initial_state and task.packs_documents():
            raise ValueError(f"model.learn_initial_state: packed documents would each need to start from the learnt "
                             f"state; set data.{task.name}.pack=False")
        window = model.mixer_args[name].get("window")
        if window is not None and window > task.seq_len:
            raise ValueError(
                f"model.mixer_args.{name}.window ({window}) is larger than the sequence length ({task.seq_len})"
            )


def _check_pattern_length(pattern: tuple[str, ...], num_layers: int) -> None:
    """The pattern repeats over the layers (the last repetition may be partial); one longer than the model is
    refused, since its extra mixers would never be built."""
    if not pattern:
        raise ValueError("model.mixers must name at least one mixer")
    if len(pattern) > num_layers:
        dropped = ", ".join(f"'{name}'" for name in pattern[num_layers:])
        raise ValueError(f"model.mixers names {len(pattern)} mixers but model.num_layers is {num_layers}, so {dropped} "
                         f"would never be built; shorten the pattern or raise model.num_layers (the pattern repeats "
                         f"over the layers, so it may be shorter)")


def _check_optim(optim: ml_collections.ConfigDict) -> None:
    if optim.name not in OPTIMIZERS:
        raise _unknown_name("optim.name", "optimizer", optim.name, OPTIMIZERS)
    if optim.schedule not in SCHEDULES:
        raise _unknown_name("optim.schedule", "schedule", optim.schedule, SCHEDULES)
    if not optim.learning_rate > 0:
        raise ValueError(f"optim.learning_rate must be positive, got {optim.learning_rate}")
    _check_warmup(optim.warmup_steps)
    if not 0.0 <= optim.min_learning_rate_ratio <= 1.0:
        raise ValueError(f"optim.min_learning_rate_ratio must lie in [0, 1], got {optim.min_learning_rate_ratio}")
    if optim.grad_clip_norm is not None and not optim.grad_clip_norm > 0:
        raise ValueError(f"optim.grad_clip_norm must be positive (or None), got {optim.grad_clip_norm}")
    try:
        re.compile(optim.trainable)
    except re.error as error:
        raise ValueError(f"optim.trainable must be a regular expression over parameter paths, got "
                         f"{optim.trainable!r} ({error})") from None


def _check_warmup(value: Any) -> None:
    """A number of steps (a whole number >= 1, clamped to the run by `optim.warmup_steps`) or a fraction in [0, 1)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not value >= 0 or (value >= 1 and not float(value).is_integer()):
        raise ValueError(f"optim.warmup_steps must be a number of steps (a whole number) or a fraction of train.steps "
                         f"in [0, 1), got {value!r}")


def _check_train(train: ml_collections.ConfigDict) -> None:
    _check_positive_ints(
        train, ("steps", "batch_size", "eval_batch_size", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints"), "train",
    )  # fmt: skip
    _check_choice(train, "compute_dtype", COMPUTE_DTYPES, "train")
    if train.init_from and not os.path.isfile(os.path.join(train.init_from, "config.json")):
        raise ValueError(f"train.init_from: {train.init_from!r} holds no config.json; it must be the workdir of an "
                         "earlier seqlab run")


def _check_mesh(mesh: ml_collections.ConfigDict, train: ml_collections.ConfigDict, task: data.Task,
                model: ml_collections.ConfigDict) -> None:
    """The batch must split evenly over mesh.data and every sequence over mesh.seq."""
    _check_positive_ints(mesh, ("data", "seq"), "mesh")
    if model.norm == "prepbn" and mesh.data * mesh.seq > 1:
        raise ValueError("model.norm: 'prepbn' (BatchNorm statistics) runs on one device; set mesh.data = mesh.seq = 1 "
                         "or use layernorm / rmsnorm")
    stateful = [name for name in dict.fromkeys(model.mixers) if mixers.get(name).single_device_state]
    if stateful and mesh.data * mesh.seq > 1:
        name = stateful[0]
        raise ValueError(f"model.mixers: {name!r} carries {mixers.get(name).single_device_state} as training state, "
                         f"which the launcher updates on one device; set mesh.data = mesh.seq = 1")
    for key, value in (("train.batch_size", train.batch_size), ("train.eval_batch_size", train.eval_batch_size),
                       (f"data.{task.name}.num_eval", task.num_eval)):
        if value % mesh.data:
            raise ValueError(f"{key} ({value}) must be divisible by mesh.data ({mesh.data})")
    if model.learn_initial_state and mesh.seq > 1:
        raise ValueError("model.learn_initial_state: every sequence starts from the learnt state, which needs it "
                         "whole on one device; set mesh.seq = 1")
    if isinstance(task, ImageTask) and mesh.seq > 1:
        raise ValueError(f"mesh.seq: the vision model mixes whole images (data.task={task.name!r}); set mesh.seq = 1 "
                         f"(got {mesh.seq})")
    if task.lm_head == "from_last" and mesh.seq > 1:
        raise ValueError(f"mesh.seq: data.task={task.name!r} decodes every logit from the last position, so it runs "
                         f"on one device per sequence; set mesh.seq = 1 (got {mesh.seq})")
    if task.seq_len % mesh.seq:
        raise ValueError(f"the sequence length of data.{task.name} ({task.seq_len}) must be divisible by mesh.seq "
                         f"({mesh.seq})")


def _check_positive_ints(section: ml_collections.ConfigDict, keys: tuple[str, ...], prefix: str) -> None:
    for key in keys:
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------------------------------
# Flag-parsing errors of ``--config.key=value`` overrides
# ------------------------------------------------------------------------------------------------------------------

# What absl / ml_collections raise while parsing the flags: the formats explain_override_error knows.
_MISSING_KEY = re.compile(r"'(?P<key>[^'\n]+)'(?:\nDid you mean \"(?P<close>[^\"\n]+)\" instead of \"[^\"\n]+\"\?)?")
_CONFIG_FILE = re.compile(
    r"flag --config=(?P<spec>\S+): Error whilst parsing config file:.*\n[\w.]+: (?P<error>[^\n]*)", re.DOTALL
)
_BAD_VALUE = re.compile(r"flag --config\.(?P<key>[\w.]+)=(?P<value>.*?): (?P<reason>.*)", re.DOTALL)
_CAST = re.compile(r"(?:Could not override field '(?P<key>[^']+)'(?: \(reference\))?\. )?(?P<value>.*) is of original "
                   r"type <class '(?P<got>[\w.]+)'> and cannot be casted to type <class '(?P<want>[\w.]+)'>")
_UNSUPPORTED = re.compile(r"Type <class '(?P<type>[\w.]+)'> of field config\.(?P<key>[\w.]+) is not supported for "
                          r"overriding\..*", re.DOTALL)


def explain_override_error(message: str, config: ml_collections.ConfigDict | None) -> str:
    """A short message (at most 3 lines) for an error that parsing the launcher's flags raised, `message` being
    its ``str()``: the full key and its close matches, or the type the key takes. `config` is what ``--config=``
    loads, without the overrides (None if it does not load). Known: a key that does not exist (ml_collections'
    KeyError / AttributeError), a bad literal for a typed field and a field absl cannot parse (flags.Error), a
    type mismatch (ml_collections' TypeError) and a config file that raised; anything else comes back as it is,
    cut to its first and last lines."""
    text = _unquoted(message.strip())
    for pattern, explain in _EXPLAINERS:
        match = pattern.fullmatch(text)
        if match:
            return explain(match, config)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines if len(lines) <= 3 else [lines[0], "...", lines[-1]])


def _unquoted(text: str) -> str:
    """The string that `text` spells as a Python string literal (how a KeyError shows its message), else `text`."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def _sections(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, ml_collections.ConfigDict]]:
    """(prefix, section) for the config itself ("") and every section in it ("model.", "model.mixer_args.", ...)."""
    yield prefix, config
    for key in config.keys():
        if isinstance(config[key], ml_collections.ConfigDict):
            yield from _sections(config[key], f"{prefix}{key}.")


def _explain_missing_key(match: re.Match, config: ml_collections.ConfigDict | None) -> str:
    """ml_collections names only the last part of the key, and the close match it found in the same section: the
    sections that hold that match and not the key say where the key was meant to go."""
    leaf, close = match["key"], match["close"]
    found = _sections(config) if close and config is not None else ()
    sections = [(prefix, section) for prefix, section in found if close in section and leaf not in section]
    if len(sections) == 1:
        prefix, section = sections[0]
        return _unknown_key(f"{prefix}{leaf}", section.keys())
    names = [prefix[:-1] or "the top level" for prefix, _ in sections]
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    where = f" (a key under {', '.join(names[:4])}{more})" if names else ""
    hint = did_you_mean(leaf, [close] if close else [])
    return f"config key '{leaf}' of a --config override does not exist{hint}{where}"


def _explain_config_file(match: re.Match, config: ml_collections.ConfigDict | None) -> str:
    """The last line of the config file's traceback (its exception), explained against the schema."""
    explained = explain_override_error(match["error"], base_config() if config is None else config)
    return f"--config={match['spec']}: {explained}"


def _explain_bad_value(match: re.Match, config: ml_collections.ConfigDict | None) -> str:
    key, flag = match["key"], f"--config.{match['key']}={match['value']}"
    field = _field(config, key)
    phrase = _TYPE_PHRASES.get(field[0].__name__) if field else None
    if phrase is None:
        return f"{flag}: {match['reason'].splitlines()[0]}"
    default = field[1]
    example = "" if default is None else f", e.g. --config.{key}={_flag_text(default)}"
    return f"{flag}: {key} takes {phrase}{example}"


def _explain_cast(match: re.Match, config: ml_collections.ConfigDict | None) -> str:
    leaf = match["key"]
    found = _sections(config) if leaf and config is not None else ()
    prefixes = [prefix for prefix, section in found if leaf in section]
    key = f"{prefixes[0]}{leaf}" if len(prefixes) == 1 else leaf
    head = f"{key}: " if key else ""
    return f"{head}expected {_TYPE_PHRASES.get(match['want'], match['want'])}, got {match['value']} (a {match['got']})"


def _explain_unsupported(match: re.Match, config: ml_collections.ConfigDict | None) -> str:
    return (f"--config.{match['key']} cannot be set on the command line (ml_collections parses no value for a field "
            f"of type {match['type']}); set it in a config file")


_EXPLAINERS: tuple[tuple[re.Pattern, Callable[[re.Match, ml_collections.ConfigDict | None], str]], ...] = (
    (_MISSING_KEY, _explain_missing_key),
    (_CONFIG_FILE, _explain_config_file),
    (_BAD_VALUE, _explain_bad_value),
    (_CAST, _explain_cast),
    (_UNSUPPORTED, _explain_unsupported),
)


def _field(config: ml_collections.ConfigDict | None, key: str) -> tuple[type, Any] | None:
    """(declared type, value) of the dotted `key` in `config`; None if there is no such field."""
    *path, leaf = key.split(".")
    section = config
    for name in path:
        section = section.get(name) if isinstance(section, ml_collections.ConfigDict) else None
    if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
        return None
    return section.get_type(leaf), section[leaf]


def _flag_text(value: Any) -> str:
    """`value` as a --config.key= flag spells it."""
    if isinstance(value, tuple):
        return f'"{value!r}"'
    return str(value).lower() if isinstance(value, bool) else str(value)
