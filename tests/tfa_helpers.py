"""Shared test helpers: the accuracy criterion (README) and input makers.

A module of its own (not conftest.py): tests/gpu has a conftest too, and two
modules named conftest cannot both be imported by name."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import criterion  # noqa: E402
from tf_fastattn import _loader  # noqa: E402

DTYPES = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
}


def to64(t) -> np.ndarray:
    return np.asarray(tf.cast(t, tf.float64).numpy() if isinstance(t, tf.Tensor) else t, dtype=np.float64)


def assert_close_to_reference(fused, naive, ref, dtype, name="output", factor=2.0):
    """The accuracy criterion (criterion.py) on TensorFlow tensors: `ref` is a
    float64 computation of the same math, `naive` the reference implementation
    run in the same dtype as `fused`."""
    criterion.check_close(to64(fused), to64(naive), to64(ref), tf.as_dtype(dtype).name, name, factor)


def random_tensor(rng: np.random.Generator, shape, dtype, scale=1.0):
    return tf.cast(tf.constant(rng.standard_normal(shape) * scale), dtype)


requires_ops = pytest.mark.skipif(
    _loader.unavailable_reason() is not None,
    reason=f"op library not loaded: {_loader.unavailable_reason()}",
)
