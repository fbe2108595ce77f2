"""Shared test helpers: the accuracy criterion (README) and input makers.

A module of its own (not conftest.py): tests/gpu has a conftest too, and two
modules named conftest cannot both be imported by name."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_fastattn import _loader  # noqa: E402

DTYPES = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
}

# Smallest absolute error allowed, per dtype, on top of the relative criterion:
# covers results that are exact in the naive implementation but need one
# rounding step in the fused one.
ATOL_FLOOR = {tf.float16: 1e-3, tf.bfloat16: 8e-3, tf.float32: 1e-6, tf.float64: 1e-12}


def to64(t) -> np.ndarray:
    return np.asarray(tf.cast(t, tf.float64).numpy() if isinstance(t, tf.Tensor) else t, dtype=np.float64)


def assert_close_to_reference(fused, naive, ref, dtype, name="output", factor=2.0):
    """FlashAttention's criterion: max|fused - ref| <= factor * max|naive - ref| + floor.

    `ref` is a float64 computation of the same math, `naive` the reference
    implementation run in the same dtype as `fused`.
    """
    fused, naive, ref = to64(fused), to64(naive), to64(ref)
    assert fused.shape == ref.shape, f"{name}: shape {fused.shape} != {ref.shape}"
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(fused), finite, err_msg=f"{name}: non-finite pattern differs")
    err = np.abs(fused - ref)[finite]
    naive_err = np.abs(naive - ref)[finite]
    max_err = float(err.max()) if err.size else 0.0
    bound = factor * (float(naive_err.max()) if naive_err.size else 0.0) + ATOL_FLOOR[dtype]
    assert max_err <= bound, (
        f"{name}: max error {max_err:.3g} (mean {float(err.mean()) if err.size else 0:.3g}) exceeds "
        f"{factor} x naive {float(naive_err.max()) if naive_err.size else 0:.3g} + floor {ATOL_FLOOR[dtype]:.1g}"
    )


def random_tensor(rng: np.random.Generator, shape, dtype, scale=1.0):
    return tf.cast(tf.constant(rng.standard_normal(shape) * scale), dtype)


requires_ops = pytest.mark.skipif(
    _loader.unavailable_reason() is not None,
    reason=f"op library not loaded: {_loader.unavailable_reason()}",
)
