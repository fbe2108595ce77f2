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
    # tf.constant, not tf.cast: casting a Python float goes through float32.
    eps = tf.constant(epsilon, ct) if isinstance(epsilon, (int, float)) else tf.cast(epsilon, ct)
    inv = tf.math.rsqrt(variance + eps)
    if gamma is not None:
        inv = inv * tf.cast(gamma, ct)
    res = -mean * inv
    if beta is not None:
        res = res + tf.cast(beta, ct)
    y = sf * inv + res
    return tf.cast(y, x.dtype), s


# ---------------------------------------------------------------------------
# Attention


def _large_negative(dtype: tf.DType):
    # Keras' fill for masked logits (keras.src.backend.tensorflow.nn): large
    # enough that exp() underflows to 0 next to any allowed logit, finite so
    # that a row with no allowed key softmaxes to the uniform distribution.
    value = 65500.0 if dtype == tf.float16 else 3.38953e38
    return tf.constant(value * -0.7, dtype=dtype)


def _repeat_kv(kv, query):
    # Each kv head serves N / Nkv consecutive query heads (GQA/MQA).
    num_heads, num_heads_kv = query.shape[2], kv.shape[2]
    if num_heads is None or num_heads_kv is None:
        return tf.repeat(kv, tf.shape(query)[2] // tf.shape(kv)[2], axis=2)
    return kv if num_heads == num_heads_kv else tf.repeat(kv, num_heads // num_heads_kv, axis=2)


def attention_probs(query, key, *, mask=None, scale=None, is_causal=False):
    """Attention probabilities `[B, N, T, S]` as Keras computes them.

    logits = scale * einsum(q, k) in the inputs' dtype, cast to float32
    (float64 stays float64); disallowed logits (mask False, or s > t when
    `is_causal`, top-left aligned) are filled with Keras' large negative
    number, so a row with no allowed key is uniform over all S keys; softmax in
    float32. Key heads are repeated over their query-head group (GQA/MQA).
    """
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key)
    key = _repeat_kv(key, query)
    if scale is None:
        scale = 1.0 / float(query.shape[-1]) ** 0.5
    ct = compute_dtype(query.dtype)
    # tf.constant, not tf.cast: casting a Python float goes through float32.
    scale = tf.constant(scale, ct) if isinstance(scale, (int, float)) else tf.cast(scale, ct)
    logits = tf.cast(tf.einsum("btnh,bsnh->bnts", query, key), ct) * scale
    if mask is not None or is_causal:
        allowed = tf.ones_like(logits, dtype=tf.bool)
        if mask is not None:
            allowed = tf.logical_and(allowed, tf.cast(mask, tf.bool))
        if is_causal:
            shape = tf.shape(logits)
            causal = tf.linalg.band_part(tf.ones(shape[2:], tf.bool), -1, 0)
            allowed = tf.logical_and(allowed, causal)
        logits = tf.where(allowed, logits, _large_negative(ct))
    return tf.nn.softmax(logits, axis=-1)


def attention(query, key, value, *, mask=None, scale=None, is_causal=False, dropout_rate=0.0, seed=None,
              keep_mask=None):
    """Scaled-dot-product attention, `keras.ops.dot_product_attention`'s math.

    query `[B, T, N, H]`, key `[B, S, Nkv, H]`, value `[B, S, Nkv, Hv]`, N a
    multiple of Nkv; mask bool, broadcastable to `[B, N, T, S]` (True =
    attend). Probabilities from `attention_probs`, cast to the inputs' dtype,
    then `einsum(p, v)` in that dtype, as Keras does.

    Dropout (absent from Keras' op; Keras' layer applies `Dropout` to p):
    `keep_mask` (bool, broadcastable to `[B, N, T, S]`) gives the kept
    entries explicitly; otherwise, with `dropout_rate > 0`, they are drawn with
    `tf.random.stateless_uniform` from `seed` (an int or int64 scalar; a random
    draw when None). Kept probabilities are scaled by `1 / (1 - dropout_rate)`.
    This is not the fused op's Philox stream: same distribution, other draws.
    Returns `[B, T, N, Hv]` in the inputs' dtype.
    """
    query = tf.convert_to_tensor(query)
    value = tf.convert_to_tensor(value)
    probs = attention_probs(query, key, mask=mask, scale=scale, is_causal=is_causal)
    if keep_mask is None and dropout_rate > 0:
        if seed is None:
            seed = tf.random.uniform([], minval=0, maxval=2**62, dtype=tf.int64)
        seed = tf.cast(seed, tf.int64)
        uniform = tf.random.stateless_uniform(tf.shape(probs), seed=tf.stack([seed, tf.zeros_like(seed)]))
        keep_mask = uniform >= dropout_rate
    if keep_mask is not None:
        keep = tf.cast(keep_mask, probs.dtype) / tf.constant(1.0 - dropout_rate, probs.dtype)
        probs = probs * keep
    value = _repeat_kv(value, query)
    return tf.einsum("bnts,bsnh->btnh", tf.cast(probs, value.dtype), value)
