"""Image classification that ships offline: scikit-learn's 8 × 8 handwritten digits and generated shapes.

An image of H × W pixels with intensities quantised to `levels` values is a classification example whose tokens are
its pixels in raster order: ``inputs[r·W + c] = 1 + level(r, c)`` (0 is never a pixel, PAD_ID), ``length = H·W``
(no CLS token: the vision model pools every patch), ``label``. `image_shape` and `levels` let the model read the
tokens back into an image (`seqlab.models.vision.PatchClassifier`: intensity = level / (levels − 1)).

    digits  scikit-learn's `load_digits` (1,797 images of 8 × 8 pixels, intensities 0–16, 10 classes), split once
            by a fixed permutation into num_train (default 1,437) and num_eval (360) images; training images are
            shifted by up to `shift` pixels (zero fill), a draw of the example's seed
    shapes  generated: a disk, square, ring, plus, triangle or X (6 classes) of random size, centre and
            brightness on an image_size² canvas, each pixel replaced by a random level with probability `noise`
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from seqlab.data.base import Task

DIGITS_SPLIT_SEED = 20240607  # the fixed permutation that splits load_digits into train and eval
SHAPES = ("disk", "square", "ring", "plus", "triangle", "x")


@dataclasses.dataclass(frozen=True)
class ImageTask(Task):
    """A classification task over images (module docstring); subclasses give `image_shape` and `levels`."""

    kind: ClassVar[str] = "classification"

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) pixels."""
        raise NotImplementedError

    @property
    def levels(self) -> int:
        """Number of intensity levels; tokens are 1 + level."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.levels + 1

    @property
    def seq_len(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def _example_of(self, image: np.ndarray, label: int) -> dict[str, np.ndarray]:
        """The example of an image [H, W] of integer levels."""
        return {"inputs": (1 + image.reshape(-1)).astype(np.int32), "length": np.int32(image.size),
                "label": np.int32(label)}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] int levels 0-16, labels [1797]) in the fixed split order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ValueError("data.task='digits' reads scikit-learn's bundled digits; install scikit-learn") from error
    digits = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
    return digits.images[order].astype(np.int64), digits.target[order].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Digits(ImageTask):
    """scikit-learn's 8 × 8 handwritten digits, 10 classes; training images shifted by up to `shift` pixels."""

    name: ClassVar[str] = "digits"
    NUM_IMAGES: ClassVar[int] = 1797

    num_train: int = 1437
    num_eval: int = 360
    shift: int = 1

    @property
    def image_shape(self) -> tuple[int, int]:
        return (8, 8)

    @property
    def levels(self) -> int:
        return 17

    @property
    def num_classes(self) -> int:
        return 10

    def validate(self) -> None:
        super().validate()
        self._require(self.num_train + self.num_eval <= self.NUM_IMAGES, "num_train",
                      f"num_train + num_eval must be at most the {self.NUM_IMAGES} images (num_eval={self.num_eval})")
        self._require(0 <= self.shift < 4, "shift", "must be in [0, 4)")

    def _example_at(self, rng: np.random.Generator, split: str, index: int) -> dict[str, np.ndarray]:
        images, labels = _digits()
        at = index if split == "train" else self.NUM_IMAGES - self.num_eval + index
        image = images[at]
        if split == "train" and self.shift:
            image = _translated(image, *rng.integers(-self.shift, self.shift + 1, size=2))
        return self._example_of(image, int(labels[at]))


def _translated(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image [H, W] moved dy rows down and dx columns right, zeros where nothing moved in."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


@dataclasses.dataclass(frozen=True)
class Shapes(ImageTask):
    """Generated images of six shapes (image_size² pixels, num_levels intensities, pixel noise `noise`)."""

    name: ClassVar[str] = "shapes"

    image_size: int = 16
    num_levels: int = 8
    noise: float = 0.05

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def levels(self) -> int:
        return self.num_levels

    @property
    def num_classes(self) -> int:
        return len(SHAPES)

    def validate(self) -> None:
        super().validate()
        self._require(8 <= self.image_size <= 64, "image_size", "must be in [8, 64]")
        self._require(4 <= self.num_levels <= 256, "num_levels", "must be in [4, 256]")
        self._require(0.0 <= self.noise < 0.5, "noise", "must be in [0, 0.5)")

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        label = int(rng.integers(len(SHAPES)))
        n = self.image_size
        radius = rng.uniform(n / 5, n / 3)
        cy, cx = rng.uniform(radius, n - 1 - radius, size=2)
        rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
        mask = _shape_mask(SHAPES[label], rows - cy, cols - cx, radius)
        image = np.where(mask, rng.integers(self.levels // 2, self.levels), 0)
        noisy = rng.random((n, n)) < self.noise
        image = np.where(noisy, rng.integers(0, self.levels, size=(n, n)), image)
        return self._example_of(image, label)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """[n, n] bool: the pixels of `shape` of radius r at offsets (dy, dx) from its centre."""
    distance = np.hypot(dy, dx)
    half_width = max(r / 4, 0.75)
    if shape == "disk":
        return distance <= r
    if shape == "square":
        return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
    if shape == "ring":
        return (distance <= r) & (distance >= r - max(r / 3, 1.0))
    if shape == "plus":
        return ((np.abs(dy) <= half_width) & (np.abs(dx) <= r)) | ((np.abs(dx) <= half_width) & (np.abs(dy) <= r))
    if shape == "triangle":  # apex up: rows from -r to r, half-width growing from 0 to r
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    return (np.abs(np.abs(dy) - np.abs(dx)) <= half_width) & (distance <= r)  # x
