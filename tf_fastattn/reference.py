"""Pure-TensorFlow reference math: the fallback, the test oracle and the
benchmark baseline. It follows Keras 3 exactly (float32 computation for
half-precision inputs, Keras' masking semantics), so the fused ops are tested
against what users get today."""

from __future__ import annotations

import tensorflow as tf


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """float64 stays float64; every other float computes in float32 (as Keras does)."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def layer_norm(x, gamma=None, beta=None, *, residual=None, epsilon=1e-3):
    """Residual-add + layer norm over the last axis, as Keras' LayerNormalization
    applied to `x + residual`.

    Returns `(y, s)` with `s = x + residual` (added in x's dtype) and
    `y = (s - mean) * rsqrt(var + epsilon) * gamma + beta` computed in float32
    (float64 for float64 x) and cast back to x's dtype. `gamma`/`beta` None
    means no scale/center.
    """
    x = tf.convert_to_tensor(x)
    s = x if residual is None else x + tf.cast(residual, x.dtype)
    ct = compute_dtype(x.dtype)
    sf = tf.cast(s, ct)
    mean, variance = tf.nn.moments(sf, axes=[-1], keepdims=True)
    inv = tf.math.rsqrt(variance + tf.cast(epsilon, ct))
    if gamma is not None:
        inv = inv * tf.cast(gamma, ct)
    res = -mean * inv
    if beta is not None:
        res = res + tf.cast(beta, ct)
    y = sf * inv + res
    return tf.cast(y, x.dtype), s
