"""The model summary (parameters per layer, decode-state bytes) against counts written out from the layer shapes,
and against a model really built."""

from __future__ import annotations

import os

import jax
from flax import nnx

from seqlab import config as config_lib, models
from seqlab.training.summary import human_bytes, model_summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def softmax_lm_config():
    """2 softmax layers, d 32, 2 heads, SwiGLU hidden 128, LayerNorm, vocabulary 256, 32 tokens."""
    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:softmax,tiny"))
    config.model.mixers = ("softmax",)
    return config


def test_parameter_counts_follow_the_layer_shapes():
    d, hidden, vocab = 32, 128, 256
    block = 4 * d * d + 3 * d * hidden + 2 * 2 * d  # q, k, v, o; SwiGLU gate, up, down; two LayerNorms
    other = vocab * d + 2 * d  # tied embedding; final LayerNorm
    summary = model_summary(softmax_lm_config())
    assert summary.layer_mixers == ("softmax", "softmax")
    assert summary.layer_params == (block, block)
    assert summary.other_params == other and summary.total_params == 2 * block + other


def test_decode_state_of_softmax_layers_is_their_kv_cache():
    seq_len, heads, head_dim = 32, 2, 16
    kv = 2 * seq_len * heads * head_dim * 4  # k and v, float32
    key_positions = seq_len * 4  # int32 per cached slot
    summary = model_summary(softmax_lm_config())
    assert summary.decode_state_bytes == 2 * (kv + key_positions)
    assert summary.recurrent_state_bytes == 2 * kv  # the papers' 2 d L floats per layer


def test_recurrent_state_of_deltanet_is_its_matrix_state_without_conv_buffers():
    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:deltanet,tiny"))
    heads, d_k = config.model.num_heads, config.model.d_model // config.model.num_heads
    summary = model_summary(config)
    assert summary.recurrent_state_bytes == heads * d_k * d_k * 4  # H d_k d_v floats; BaseConv holds no such state
    short_convs = 2 * config.model.d_model * 4 + 3 * 3 * config.model.d_model * 4  # BaseConv k=3; q|k|v conv k=4
    assert summary.decode_state_bytes == summary.recurrent_state_bytes + short_convs


def test_the_summary_matches_a_built_model_and_allocates_nothing():
    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:gla,tiny"))
    task = config_lib.validate(config)
    summary = model_summary(config, task)
    model = models.build_model(config, task, nnx.Rngs(0))
    built = [sum(x.size for x in jax.tree.leaves(nnx.state(block, nnx.Param))) for block in model.backbone.blocks]
    assert list(summary.layer_params) == built
    assert summary.total_params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    values = (*summary.layer_params, summary.other_params, summary.total_params, summary.decode_state_bytes)
    assert all(type(v) is int for v in values)


def test_a_classifier_has_no_decode_state_and_the_table_says_so():
    summary = model_summary(config_lib.load_config(os.path.join(ROOT, "configs/listops.py:gla,tiny")))
    assert summary.decode_state_bytes is None and summary.recurrent_state_bytes is None
    lines = summary.lines()
    assert len(lines) == len(summary.layer_mixers) + 3 and "no decode form" in lines[-1]
    assert f"{summary.total_params:,}" in lines[-2]


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 17_408, 1_234_567, 5 * 10**12)] == ["999 B", "17.4 kB", "1.2 MB",
                                                                               "5000.0 GB"]
