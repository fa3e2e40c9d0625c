"""Image tasks (seqlab.data.images) and the patch backbone (seqlab.models.vision): the digits are scikit-learn's
images, each exactly once across the splits, training shifts move them by at most `shift`; generated shapes are
deterministic, balanced and drawn where their class says; patches are the p × p blocks of the image (a loop here);
mixers that take a grid get the patch grid; bad settings name their key; a tiny digits run learns."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab import config as config_lib, data, models
from seqlab.data.images import SHAPES
from seqlab.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digits_image(example) -> np.ndarray:
    return example["inputs"].reshape(8, 8) - 1


def test_digits_are_sklearns_images_each_once_across_the_splits():
    from sklearn.datasets import load_digits

    reference = load_digits()
    task = data.make_task("digits", shift=0)
    seen = [(digits_image(task.example(s, i)), int(task.example(s, i)["label"]))
            for s in ("train", "eval") for i in range(task.num_examples(s))]
    assert len(seen) == len(reference.target) == 1797
    keys = sorted((image.astype(np.int64).tobytes(), label) for image, label in seen)
    want = sorted((image.astype(np.int64).tobytes(), int(label)) for image, label in zip(reference.images,
                                                                                         reference.target))
    assert keys == want
    example = task.example("eval", 3)
    assert example["inputs"].dtype == np.int32 and example["inputs"].min() >= 1 and int(example["length"]) == 64
    assert task.vocab_size == 18 and task.seq_len == 64 and task.num_classes == 10


def test_digits_training_shifts_move_the_image_by_at_most_shift():
    plain, shifted = data.make_task("digits", shift=0), data.make_task("digits", shift=1)
    moved = 0
    for i in range(40):
        a, b = digits_image(plain.example("train", i)), digits_image(shifted.example("train", i))
        padded = np.pad(a, 1)
        options = [padded[1 + dy:9 + dy, 1 + dx:9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(np.array_equal(b, o) for o in options)
        moved += not np.array_equal(a, b)
    assert moved > 10
    np.testing.assert_array_equal(digits_image(plain.example("eval", 0)), digits_image(shifted.example("eval", 0)))


def test_shapes_are_deterministic_balanced_and_drawn_where_their_class_says():
    task = data.make_task("shapes", noise=0.0, num_train=600)
    labels = []
    for i in range(600):
        example = task.example("train", i)
        np.testing.assert_array_equal(example["inputs"], task.example("train", i)["inputs"])
        image = example["inputs"].reshape(16, 16) - 1
        assert image.max() >= task.levels // 2 and image.min() == 0
        labels.append(int(example["label"]))
    counts = np.bincount(labels, minlength=len(SHAPES))
    assert counts.min() > 60, counts  # 100 expected per class
    disks = [task.example("train", i) for i in range(600) if labels[i] == SHAPES.index("disk")]
    rings = [task.example("train", i) for i in range(600) if labels[i] == SHAPES.index("ring")]
    filled = lambda e: float(np.mean(e["inputs"] > 1))  # noqa: E731
    assert np.mean([filled(e) for e in disks]) > 1.5 * np.mean([filled(e) for e in rings])


def test_patches_are_the_blocks_of_the_image():
    config = config_lib.load_config(os.path.join(ROOT, "configs/vision.py") + ":gla,tiny")
    task = config_lib.validate(config)
    model = models.build_model(config, task, nnx.Rngs(0))
    tokens = jnp.asarray(np.stack([task.example("train", i)["inputs"] for i in range(3)]))
    patches = np.asarray(model.backbone.patches(tokens))
    pixels = (np.asarray(tokens).reshape(3, 8, 8) - 1) / 16.0
    for b in range(3):
        for r in range(4):
            for c in range(4):
                np.testing.assert_allclose(patches[b, r * 4 + c], pixels[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2].ravel())
    logits = model(tokens, jnp.full((3,), 64))
    assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("variant, grid", [("vig", (4, 4)), ("shapes_lamamba", (8, 8)), ("gla", None)])
def test_mixers_that_take_a_grid_get_the_patch_grid(variant, grid):
    config = config_lib.load_config(os.path.join(ROOT, "configs/vision.py") + f":{variant}")
    task = config_lib.validate(config)
    model = nnx.eval_shape(lambda: models.build_model(config, task, nnx.Rngs(0)))
    assert all(getattr(block.mixer, "grid", None) == grid for block in model.backbone.blocks)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.model.update(patch_size=3), "model.patch_size"),
        (lambda c: c.model.mixer_args.vig.update(grid=(2, 8)), "model.mixer_args.vig.grid"),
        (lambda c: c.mesh.update(seq=2), "mesh.seq"),
        (lambda c: c.data.digits.update(num_train=1500), "data.digits.num_train"),
        (lambda c: c.data.digits.update(shift=5), "data.digits.shift"),
        (lambda c: (c.data.update(task="mqar"), c.model.update(mixers=("softmax",))), "model.patch_size"),
    ],
)
def test_bad_vision_settings_name_their_key(change, match):
    config = config_lib.load_config(os.path.join(ROOT, "configs/vision.py") + ":vig")
    change(config)
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config)


def test_shapes_options_are_checked():
    for options, key in ((dict(image_size=6), "image_size"), (dict(noise=0.6), "noise"), (dict(num_levels=2),
                                                                                          "num_levels")):
        with pytest.raises(ValueError, match=f"data.shapes.{key}"):
            data.make_task("shapes", **options)


def test_a_tiny_digits_run_learns(tmp_path):
    config = config_lib.load_config(os.path.join(ROOT, "configs/vision.py") + ":vig,tiny")
    config.data.digits.update(num_train=1437, num_eval=360)
    config.train.update(steps=100, batch_size=32, eval_batch_size=360, eval_every=100, checkpoint_every=100)
    result = train_and_evaluate(config, str(tmp_path))
    assert result["eval_accuracy"] > 0.5, result  # chance is 0.1
