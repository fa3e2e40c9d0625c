"""The training launcher: tiny configs train and the loss falls; interrupted-and-resumed runs repeat an
uninterrupted one exactly; SIGTERM saves; a non-finite loss stops the run and keeps the last good checkpoint;
configs are validated before anything compiles; what a run leaves in its workdir."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import config as config_lib, data, models
from seqlab.train import NonFiniteLossError, train_and_evaluate
from seqlab.training import checkpoints, load_metrics, restore_model, steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(spec: str):
    return config_lib.load_config(os.path.join(ROOT, spec))


def train_records(workdir: str) -> list[dict]:
    return [r for r in load_metrics(workdir) if r["split"] == "train"]


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in `directory`, read record by record (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(directory)):
        blob = open(os.path.join(directory, name), "rb").read()
        offset = 0
        while offset < len(blob):
            (length,) = struct.unpack("<Q", blob[offset : offset + 8])
            event = event_pb2.Event.FromString(blob[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tiny_mqar_trains_and_leaves_its_workdir(tmp_path):
    config = load_config("configs/mqar.py:softmax,tiny")
    config.train.update(steps=40, log_every=5)
    result = train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in train_records(str(tmp_path))]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses
    assert result["step"] == 40 and 0.0 <= result["eval_accuracy"] <= 1.0
    assert json.load(open(tmp_path / "config.json"))["model"]["mixers"] == ["baseconv", "softmax"]
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [(r["step"], pytest.approx(r["loss"]))
                                                                          for r in train_records(str(tmp_path))]
    record = train_records(str(tmp_path))[-1]
    assert {"step", "loss", "accuracy", "learning_rate", "tokens_per_s", "grad_norm"} <= set(record)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [20, 30, 40]


CONFIG_FILES = ("configs/mqar.py", "configs/bytes.py", "configs/listops.py", "configs/synthetic.py", "configs/vision.py")


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_variant_of_every_config_validates_and_builds(path):
    from flax import nnx

    from seqlab import models

    module = config_lib.load_config_module(os.path.join(ROOT, path))
    for variant in module.VARIANTS:
        for arg in (variant, f"{variant},tiny"):
            config = module.get_config(arg)
            task = config_lib.validate(config)
            model = nnx.eval_shape(lambda: models.build_model(config, task, nnx.Rngs(0)))
            assert len(model.backbone.blocks) == config.model.num_layers


def test_a_trained_bytes_model_samples_from_the_command_line(tmp_path):
    config = load_config("configs/bytes.py:based,tiny")
    config.train.update(steps=4, eval_every=2, checkpoint_every=2)
    train_and_evaluate(config, str(tmp_path))
    model, _, _ = restore_model(str(tmp_path))
    from seqlab.generate import generate, sample_text

    prompt = "def f("
    greedy = sample_text(str(tmp_path), prompt, max_new_tokens=6, temperature=0.0)
    tokens = generate(model, jnp.asarray([list(prompt.encode())], jnp.int32), 6)
    assert greedy == bytes(np.asarray(tokens[0]).tolist()).decode("utf-8", errors="replace")
    cmd = [sys.executable, "-m", "seqlab.sample", f"--workdir={tmp_path}", f"--prompt={prompt}",
           "--max_new_tokens=6", "--temperature=0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == greedy


@pytest.mark.parametrize("spec", ["configs/listops.py:gla,tiny",
                                  "configs/synthetic.py:selective_copy,tiny", "configs/synthetic.py:in_context_recall,tiny",
                                  "configs/synthetic.py:associative_recall,tiny", "configs/synthetic.py:induction_head,tiny"])
def test_tiny_variant_of_each_task_trains(spec, tmp_path):
    config = load_config(spec)
    config.train.update(steps=4, eval_every=2, checkpoint_every=2)
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and math.isfinite(result["eval_loss"]) and 0.0 <= result["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("spec, norm", [("configs/mqar.py:gla,tiny", "layernorm"),
                                        ("configs/listops.py:inline,tiny", "prepbn")])
def test_resume_after_sigterm_repeats_the_uninterrupted_run(tmp_path, monkeypatch, spec, norm):
    """Also with PRepBN, whose BatchNorm statistics travel in the train state and the checkpoints."""
    config = load_config(spec)
    config.model.norm = norm
    config.train.update(steps=16, log_every=1, eval_every=8, checkpoint_every=8)
    full = train_and_evaluate(config, str(tmp_path / "full"))

    make_iterator = data.make_iterator

    def interrupting_iterator(*args, **kwargs):
        iterator = make_iterator(*args, **kwargs)
        return _SigtermAfter(iterator, batches=5)

    monkeypatch.setattr(data, "make_iterator", interrupting_iterator)
    interrupted = train_and_evaluate(config, str(tmp_path / "resumed"))
    assert interrupted["step"] == 5 and "eval_loss" not in interrupted
    monkeypatch.setattr(data, "make_iterator", make_iterator)
    resumed = train_and_evaluate(config, str(tmp_path / "resumed"))

    expected = [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(str(tmp_path / "full"))]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(str(tmp_path / "resumed"))]
    assert got == expected
    assert resumed["eval_loss"] == full["eval_loss"]


class _SigtermAfter:
    """Wraps a data iterator; sends this process SIGTERM when the given number of batches has been drawn."""

    def __init__(self, iterator, batches: int):
        self.iterator, self.left = iterator, batches

    def __next__(self):
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = load_config("configs/mqar.py:deltanet,tiny")
    config.train.update(steps=20, checkpoint_every=4)
    make_train_step = steps.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step(state, batch):
            new_state, metrics = step_fn(state, batch)
            bad = new_state["step"] >= 7
            return new_state, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

        return step

    monkeypatch.setattr(steps, "make_train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        train_and_evaluate(config, str(tmp_path))
    assert checkpoints.Checkpoints(str(tmp_path), keep=3).latest_step() == 4
    model, restored_config, task = restore_model(str(tmp_path))
    assert restored_config.model.mixers == ["baseconv", "deltanet"] and task.name == "mqar"
    leaves = jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x), model))
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    config = load_config("configs/mqar.py:based,tiny")
    config.train.update(steps=6, compute_dtype="bfloat16")
    result = train_and_evaluate(config, str(tmp_path))
    assert math.isfinite(result["eval_loss"])
    model, _, _ = restore_model(str(tmp_path))
    from flax import nnx

    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.task", "nope", "data.task: unknown task 'nope'; known tasks: "),
        ("model.mixers", ("softmax", "nope"), "model.mixers: unknown mixer 'nope'; known mixers: "),
        ("optim.name", "sgdd", "optim.name: unknown optimizer 'sgdd'; known optimizers: adamw"),
        ("optim.schedule", "cosne", "optim.schedule: unknown schedule 'cosne'"),
        ("model.d_model", 33, r"model.d_model \(33\) must be divisible by model.num_heads \(2\)"),
        ("model.norm", "batchnorm", "model.norm: unknown norm 'batchnorm'; known norms: layernorm, rmsnorm"),
        ("train.compute_dtype", "float16", "train.compute_dtype"),
        ("train.steps", 0, "train.steps must be a positive integer"),
        ("optim.warmup_steps", -1, "optim.warmup_steps"),
    ],
)
def test_invalid_config_names_the_key(key, value, message):
    config = load_config("configs/mqar.py:tiny")
    section, _, name = key.rpartition(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_window_larger_than_the_sequence_is_rejected():
    config = load_config("configs/mqar.py:sliding_window,tiny")
    config.model.mixer_args.sliding_window.window = 1000
    with pytest.raises(ValueError, match=r"model.mixer_args.sliding_window.window \(1000\) is larger"):
        config_lib.validate(config)


def test_a_key_that_does_not_exist_is_rejected():
    config = load_config("configs/mqar.py:tiny")
    config.unlock()
    config.model.d_modle = 64
    with pytest.raises(ValueError, match="config key 'model.d_modle' does not exist"):
        config_lib.validate(config)


def test_unknown_variant_lists_the_variants():
    with pytest.raises(ValueError, match="expected one of softmax, sliding_window"):
        load_config("configs/mqar.py:transformer")


def test_mistyped_override_fails_in_the_launcher(tmp_path):
    cmd = [sys.executable, "-m", "seqlab.train", "--config=configs/mqar.py:tiny", f"--workdir={tmp_path}",
           "--config.model.d_modle=64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "d_modle" in proc.stderr
    assert not os.path.exists(tmp_path / "config.json")


def test_load_metrics_reads_many_workdirs(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n")
            f.write(json.dumps({"step": 1, "split": "eval", "loss": 3.0}) + "\n")
    rows = load_metrics(str(tmp_path / "*"), split="eval")
    assert [(os.path.basename(r["workdir"]), r["loss"]) for r in rows] == [("a", 3.0), ("b", 3.0)]
    with pytest.raises(ValueError, match="has no metrics.jsonl"):
        load_metrics(str(tmp_path / "missing"))


def test_transnormer_layouts_and_noncausal_mixers_in_configs():
    t1 = load_config("configs/bytes.py:transnormer_t1")
    assert tuple(t1.model.mixers) == ("transnormer_diag",) * 2 + ("transnormer_norm",) * 2
    assert t1.model.mixer_args.transnormer_norm.variant == "t1"
    assert load_config("configs/bytes.py:transnormer_t2").model.mixer_args.transnormer_diag.variant == "t2"
    config = load_config("configs/bytes.py:softmax,tiny")
    config.model.mixers = ("linfusion",)
    with pytest.raises(ValueError, match=r"^model.mixers: 'linfusion' is non-causal"):
        config_lib.validate(config)
    config.model.mixers = ("flowformer",)
    config.model.mixer_args.flowformer.causal = False
    with pytest.raises(ValueError, match=r"model.mixer_args.flowformer.causal=True"):
        config_lib.validate(config)
    config_lib.validate(load_config("configs/listops.py:flowformer,tiny"))  # classification: non-causal is fine


def test_prepbn_models_carry_batch_statistics_and_set_lambda_from_the_step(tmp_path):
    config = load_config("configs/listops.py:softmax,tiny")
    config.model.norm = "prepbn"
    train_and_evaluate(config, str(tmp_path))
    model, _, task = restore_model(str(tmp_path))
    norm = model.backbone.blocks[0].norm_mixer
    assert not norm.training  # restored for evaluation: running statistics
    assert float(jnp.max(jnp.abs(norm.repbn.bn.mean[...]))) > 0  # trained statistics were checkpointed
    model.train()
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    sums = steps.stateful_sums(graphdef, rest, task.kind, total_steps=10)
    batch = next(data.make_iterator(task, "train", batch_size=4, seed=0))
    first, _ = sums(params, stats, batch, None, jnp.asarray(0))  # λ = 1: LayerNorm
    last, _ = sums(params, stats, batch, None, jnp.asarray(10))  # λ = 0: RepBN
    assert float(first["loss_sum"]) != float(last["loss_sum"])
    config.mesh.seq = 2
    with pytest.raises(ValueError, match=r"^model.norm: 'prepbn'"):
        config_lib.validate(config)


@pytest.mark.parametrize("name, kwargs, stat, carries", [
    ("routing", dict(centroid_decay=0.9, window=8), "centroids", "its k-means centroids"),
    ("longvq", dict(codebook_decay=0.9, block_size=8, num_codes=8), "codebook_sums", "its codebook's moving averages"),
])
def test_k_means_state_trains_with_the_model_and_stays_on_one_device(tmp_path, name, kwargs, stat, carries):
    """A training-mode Routing layer's centroids (LongVQ's codebook) are carried from step to step and
    checkpointed, its commitment loss is logged with the training records (not the evaluation's); a mesh is
    refused."""
    config = load_config("configs/mqar.py:softmax,tiny")
    config.model.mixers = ("baseconv", name)
    config.model.mixer_args[name].update(use_running_average=False, **kwargs)
    config.train.update(steps=4, eval_every=4, checkpoint_every=4, log_every=2)
    train_and_evaluate(config, str(tmp_path))
    records = load_metrics(str(tmp_path))
    assert all(r["aux_loss"] > 0 if r["split"] == "train" else "aux_loss" not in r for r in records)
    model, _, task = restore_model(str(tmp_path))
    initial = getattr(models.build_model(config, task, nnx.Rngs(config.seed)).backbone.blocks[1].mixer, stat)[...]
    assert float(jnp.max(jnp.abs(getattr(model.backbone.blocks[1].mixer, stat)[...] - initial))) > 1e-3
    config.mesh.seq = 2
    with pytest.raises(ValueError, match=rf"^model.mixers: '{name}' carries {carries}"):
        config_lib.validate(config)


def flat_params(model) -> dict[str, jax.Array]:
    return {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_initial_state_tuning_of_a_trained_run(tmp_path):
    """Lina-Speech's workflow: a BaseConv + GLA model is trained; a second run starts from its parameters
    (train.init_from) with model.learn_initial_state and optim.trainable="learnt_initial_state". The GLA layer (the
    one with a recurrent state) gets a learnt state, which moves, and every other parameter stays exactly the first
    run's. Refused with one line: an unmatched pattern, an invalid one, mesh.seq > 1, a model with no recurrent
    state, a missing run and a run whose parameters do not fit."""
    config = load_config("configs/mqar.py:softmax,tiny")
    config.model.update(mixers=("baseconv", "gla"), num_layers=2)
    config.optim.update(learning_rate=1e-2, warmup_steps=1)
    config.train.update(steps=6, eval_every=6, checkpoint_every=6, log_every=1)
    train_and_evaluate(config, str(tmp_path / "base"))
    base, _, _ = restore_model(str(tmp_path / "base"))
    config.model.learn_initial_state = True
    config.optim.trainable = "learnt_initial_state"
    config.train.update(steps=3, eval_every=3, checkpoint_every=3, init_from=str(tmp_path / "base"))
    train_and_evaluate(config, str(tmp_path / "tuned"))
    first_tuned = train_records(str(tmp_path / "tuned"))[0]["loss"]
    base_losses = [r["loss"] for r in train_records(str(tmp_path / "base"))]
    assert first_tuned < base_losses[0] - 0.1, (first_tuned, base_losses)  # it starts where the base run ended
    tuned, _, _ = restore_model(str(tmp_path / "tuned"))
    before, after = flat_params(base), flat_params(tuned)
    assert set(after) - set(before) == {"backbone.blocks.1.mixer.learnt_initial_state"}
    assert float(jnp.max(jnp.abs(after["backbone.blocks.1.mixer.learnt_initial_state"]))) > 1e-4
    assert all(np.array_equal(before[path], after[path]) for path in before)

    config.optim.trainable = "no_such_parameter"
    with pytest.raises(ValueError, match="optim.trainable: 'no_such_parameter' matches no parameter path"):
        train_and_evaluate(config, str(tmp_path / "unmatched"))
    config.optim.trainable = "("
    with pytest.raises(ValueError, match="optim.trainable must be a regular expression"):
        config_lib.validate(config)
    config.optim.trainable, config.mesh.seq = "", 2
    with pytest.raises(ValueError, match="model.learn_initial_state: .* set mesh.seq = 1"):
        config_lib.validate(config)
    config.mesh.seq, config.model.mixers = 1, ("softmax",)
    with pytest.raises(ValueError, match=r"^model.learn_initial_state: no layer's mixer has a recurrent state "
                                         r"\(SoftmaxAttention's cache holds no recurrent state"):
        config_lib.validate(config)
    config.model.update(mixers=("baseconv", "gla"), learn_initial_state=False, d_model=2 * config.model.d_model)
    with pytest.raises(ValueError, match=r"train.init_from: backbone\.\S+ is \([\d, ]+\) in the run in .*, "
                                         r"\([\d, ]+\) in this model"):
        train_and_evaluate(config, str(tmp_path / "misfit"))
    config.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="train.init_from: .*nowhere' holds no config.json"):
        config_lib.validate(config)
