"""Config mistakes fail in one line before anything compiles: close matches for mistyped keys and names, a bare
string for a tuple, a mixer pattern longer than the model, warmup against short runs, and the launcher's
flag-parsing errors explained. Validation only: nothing here builds a model."""

from __future__ import annotations

import os
import re
from unittest import mock

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from seqlab import config as config_lib, mixers
from seqlab.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MQAR = os.path.join(ROOT, "configs", "mqar.py")


def load_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    return config_lib.load_config(f"{MQAR}:{variant}")


def parse_flags(*overrides: str, variant: str = "tiny") -> ml_collections.ConfigDict:
    """What the launcher's ``--config`` flag (config_flags, lock_config=True) makes of `overrides`."""
    argv = ["seqlab.train", f"--config={MQAR}:{variant}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def override_error(*overrides: str, variant: str = "tiny") -> str:
    """The raw text of the error that parsing `overrides` raises (absl or ml_collections)."""
    with pytest.raises(Exception) as error:
        parse_flags(*overrides, variant=variant)
    return str(error.value)


def validation_error(config: ml_collections.ConfigDict) -> str:
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)
    return str(error.value)


def test_did_you_mean_quotes_the_close_matches():
    assert config_lib.did_you_mean("glaa", ["gla", "softmax"]) == "; did you mean 'gla'?"
    assert config_lib.did_you_mean("stepz", ["steps", "seed"], prefix="train.") == "; did you mean 'train.steps'?"
    assert config_lib.did_you_mean("zzz", ["gla", "softmax"]) == ""


def test_a_mistyped_key_names_the_close_match_and_the_section():
    config = load_config()
    config.unlock()
    config.train.stepz = 3
    message = validation_error(config)
    assert message.startswith(
        "config key 'train.stepz' does not exist; did you mean 'train.steps'? (keys under train: batch_size, "
    )
    assert "\n" not in message and "\\" not in message


@pytest.mark.parametrize(
    "key, value, suggestion",
    [
        ("data.task", "mqr", "mqar"),
        ("model.mixers", ("baseconv", "glaa"), "gla"),
        ("optim.name", "adamm", "adamw"),
        ("optim.schedule", "cosne", "cosine"),
        ("model.mlp", "swigl", "swiglu"),
        ("model.norm", "rmsnrm", "rmsnorm"),
        ("model.position_embedding", "learnd", "learned"),
        ("model.pooling", "maen", "mean"),
        ("train.compute_dtype", "bfloat", "bfloat16"),
    ],
)
def test_an_unknown_name_names_the_close_match(key, value, suggestion):
    config = load_config()
    section, _, name = key.rpartition(".")
    config[section][name] = value
    wrong = value[-1] if isinstance(value, tuple) else value
    assert re.match(rf"{re.escape(key)}: unknown [a-z ]+ '{wrong}'; did you mean '{suggestion}'[^?]*\? \(known ",
                    validation_error(config))


def test_an_unknown_variant_names_the_close_one():
    with pytest.raises(ValueError, match=r"^config variant 'glaa' does not exist; did you mean 'gla'\? \(expected "):
        load_config("glaa")


def test_a_bare_string_for_the_mixer_pattern_is_rejected():
    tree = load_config().to_dict()
    tree["model"]["mixers"] = "gla"  # as a config built from a dict (or config.json) can hold it
    assert validation_error(ml_collections.ConfigDict(tree)) == (
        "model.mixers must be a tuple of mixer names, e.g. --config.model.mixers=\"('gla',)\" ; got the string 'gla'"
    )


def test_every_tuple_key_of_the_schema_refuses_a_string():
    schema = ml_collections.ConfigDict({"section": {"shape": (2, 2), "name": "x"}})
    config_lib.check_tuple_keys(ml_collections.ConfigDict({"section": {"shape": [2, 2], "name": "y"}}), schema)
    with pytest.raises(ValueError, match=r"^section\.shape must be a tuple, e.g. .*; got the string '22'$"):
        config_lib.check_tuple_keys(ml_collections.ConfigDict({"section": {"shape": "22", "name": "y"}}), schema)


def test_a_pattern_longer_than_the_model_is_refused_and_a_shorter_one_repeats():
    config = load_config()
    config.model.update(num_layers=2, mixers=("baseconv", "gla", "softmax"))
    assert validation_error(config).startswith(
        "model.mixers names 3 mixers but model.num_layers is 2, so 'softmax' would never be built"
    )
    config.model.num_layers = 4  # baseconv, gla, softmax, baseconv: the last repetition is partial
    config_lib.validate(config)


def test_warmup_parses_as_a_fraction_or_steps_through_the_launchers_flags():
    fraction = parse_flags("--config.optim.warmup_steps=0.1")
    steps = parse_flags("--config.optim.warmup_steps=300", "--config.train.steps=1000")
    assert fraction.optim.warmup_steps == 0.1 and steps.optim.warmup_steps == 300
    config_lib.validate(fraction)
    config_lib.validate(steps)
    assert optim.warmup_steps(fraction.optim, 50) == 5 and optim.warmup_steps(steps.optim, 1000) == 300


def test_a_short_run_keeps_the_configs_warmup_steps_and_clamps_them_with_one_warning():
    config = parse_flags("--config.train.steps=53", variant="gla")  # the config's warmup_steps: 200
    config_lib.validate(config)
    with mock.patch.object(optim.logging, "warning") as warning:
        schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
        optim.learning_rate_schedule(config.optim, config.train.steps)
    assert warning.call_count == 1
    text = warning.call_args.args[0] % warning.call_args.args[1:]
    assert "\n" not in text
    assert text.startswith("optim.warmup_steps 200 exceeds train.steps 53; warming up over 5 steps (10%) instead")
    assert float(schedule(5)) == pytest.approx(config.optim.learning_rate)


def test_a_fractional_warmup_sets_the_schedule():
    config = config_lib.base_config().optim
    config.update(learning_rate=2.0, warmup_steps=0.5, schedule="constant")
    schedule = optim.learning_rate_schedule(config, 20)
    assert float(schedule(5)) == pytest.approx(1.0) and float(schedule(10)) == pytest.approx(2.0)


@pytest.mark.parametrize("value", [-1, 1.5])
def test_a_negative_or_fractional_warmup_above_one_is_rejected(value):
    config = load_config()
    config.optim.warmup_steps = value
    assert validation_error(config).startswith(
        "optim.warmup_steps must be a number of steps (a whole number) or a fraction of train.steps in [0, 1), got "
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("--config.train.stepz=3",),
         "config key 'train.stepz' does not exist; did you mean 'train.steps'? (keys under train: batch_size, "),
        (("--config.model.mixer_args.glaa.expand_k=1",),
         "config key 'model.mixer_args.glaa' does not exist; did you mean 'model.mixer_args.gla'? "),
        (("--config.train.steps=abc",), "--config.train.steps=abc: train.steps takes an integer, e.g. "
                                        "--config.train.steps=20"),
        (("--config.optim.learning_rate=fast",), "--config.optim.learning_rate=fast: optim.learning_rate takes a "
                                                 "number, e.g. --config.optim.learning_rate=0.01"),
        (("--config.train.steps=1.5",), "--config.train.steps=1.5: train.steps takes an integer"),
        (("--config.model.mixer_args.flowformer.causal=maybe",),
         "--config.model.mixer_args.flowformer.causal=maybe: model.mixer_args.flowformer.causal takes true or false"),
    ],
)
def test_override_errors_are_explained_with_the_full_key(overrides, expected):
    explained = config_lib.explain_override_error(override_error(*overrides), load_config())
    assert explained.startswith(expected) and "\n" not in explained


def test_a_config_file_error_is_explained_by_its_own_message():
    explained = config_lib.explain_override_error(override_error(variant="glaa"), None)
    assert explained == (
        f"--config={MQAR}:glaa: config variant 'glaa' does not exist; did you mean 'gla'? (expected one of softmax, "
        "sliding_window, linear, based, gla, deltanet, gated_deltanet, retnet, mamba2, optionally with ',tiny')"
    )


def test_a_type_mismatch_names_the_full_key_and_the_type():
    config = load_config()
    with pytest.raises(TypeError) as error:
        config.optim.warmup_steps = "fast"
    explained = config_lib.explain_override_error(str(error.value), config)
    assert explained == "optim.warmup_steps: expected a number, got fast (a str)"


def test_packed_bytes_refuse_a_mixer_without_documents_and_pack_false_allows_it(monkeypatch):
    monkeypatch.setattr(mixers.get("flowformer"), "takes_documents", False)  # as a mixer of one's own may be
    config = config_lib.load_config(os.path.join(ROOT, "configs", "bytes.py") + ":tiny")
    config.model.mixers = ("baseconv", "flowformer")
    message = validation_error(config)
    assert message.startswith(
        "model.mixers: 'flowformer' does not take packed documents, which data.bytes.pack=True trains on; set "
        "data.bytes.pack=False or use one of ["
    )
    assert "'baseconv'" in message and "'flowformer'" not in message.split("one of")[1]
    config.data.bytes.pack = False
    config_lib.validate(config)
