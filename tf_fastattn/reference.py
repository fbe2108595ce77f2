"""Pure-TensorFlow reference math: the fallback, the test oracle and the
benchmark baseline. It follows Keras 3 exactly (float32 computation for
half-precision inputs, Keras' masking semantics), so the fused ops are tested
against what users get today."""

from __future__ import annotations

import tensorflow as tf


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """float64 stays float64; every other float computes in float32 (as Keras does)."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def layer_norm(x, gamma=None, beta=None, *, residual=None, epsilon=1e-3, rms_scaling=False):
    """Residual-add + layer norm over the last axis, as Keras' LayerNormalization
    applied to `x + residual`.

    Returns `(y, s)` with `s = x + residual` (added in x's dtype) and
    `y = (s - mean) * rsqrt(var + epsilon) * gamma + beta` computed in float32
    (float64 for float64 x) and cast back to x's dtype. `gamma`/`beta` None
    means no scale/center. `rms_scaling`: Keras' LayerNormalization(
    rms_scaling=True), `y = s * rsqrt(var + epsilon) * gamma` (s not centred,
    no beta).
    """
    x = tf.convert_to_tensor(x)
    s = x if residual is None else x + tf.cast(residual, x.dtype)
    ct = compute_dtype(x.dtype)
    sf = tf.cast(s, ct)
    mean, variance = tf.nn.moments(sf, axes=[-1], keepdims=True)
    # tf.constant, not tf.cast: casting a Python float goes through float32.
    eps = tf.constant(epsilon, ct) if isinstance(epsilon, (int, float)) else tf.cast(epsilon, ct)
    inv = tf.math.rsqrt(variance + eps)
    if rms_scaling:
        y = sf * inv
        if gamma is not None:
            y = y * tf.cast(gamma, ct)
        return tf.cast(y, x.dtype), s
    if gamma is not None:
        inv = inv * tf.cast(gamma, ct)
    res = -mean * inv
    if beta is not None:
        res = res + tf.cast(beta, ct)
    y = sf * inv + res
    return tf.cast(y, x.dtype), s


def rms_norm(x, gamma=None, *, residual=None, epsilon=1e-6):
    """Residual-add + RMS norm over the last axis, as keras-hub's LlamaLayerNorm
    (and Keras' RMSNormalization) applied to `x + residual`.

    Returns `(y, s)` with `s = x + residual` (added in x's dtype) and
    `y = s * rsqrt(mean(s^2) + epsilon) * gamma` computed in float32 (float64
    for float64 x) and cast back to x's dtype; `gamma` None means no scale.
    """
    x = tf.convert_to_tensor(x)
    s = x if residual is None else x + tf.cast(residual, x.dtype)
    ct = compute_dtype(x.dtype)
    sf = tf.cast(s, ct)
    eps = tf.constant(epsilon, ct) if isinstance(epsilon, (int, float)) else tf.cast(epsilon, ct)
    y = sf * tf.math.rsqrt(tf.reduce_mean(tf.square(sf), axis=-1, keepdims=True) + eps)
    if gamma is not None:
        y = y * tf.cast(gamma, ct)
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


def band_mask(T, S, *, is_causal=False, window=None, query_offset=None):
    """`[T, S]` bool: query t (at position `t + query_offset`) may see key s
    (`s <= pos` when causal; `pos - left <= s <= pos + right` for `window =
    (left, right)`, -1 = unbounded), or None when nothing restricts the keys.
    T, S and query_offset may be tensors."""
    left, right = window if window is not None else (-1, -1)
    if not is_causal and left < 0 and right < 0:
        return None
    pos = tf.range(T)[:, None]
    if query_offset is not None:
        pos = pos + tf.cast(query_offset, tf.int32)
    s = tf.range(S)[None, :]
    allowed = tf.ones([T, S], tf.bool)
    if is_causal:
        allowed = tf.logical_and(allowed, s <= pos)
    if left >= 0:
        allowed = tf.logical_and(allowed, s >= pos - left)
    if right >= 0:
        allowed = tf.logical_and(allowed, s <= pos + right)
    return allowed


def attention_probs(query, key, *, mask=None, scale=None, is_causal=False, logits_soft_cap=None, window=None,
                    query_offset=None, bias=None):
    """Attention probabilities `[B, N, T, S]` as Keras computes them.

    logits = scale * einsum(q, k) in the inputs' dtype, cast to float32
    (float64 stays float64), then `cap * tanh(logits / cap)` with
    `logits_soft_cap = cap` (after adding `bias`, broadcastable to
    `[B, N, T, S]`, when given); disallowed logits (mask False, or outside
    `band_mask`: s > t + query_offset when `is_causal`, top-left aligned by
    default, and the window) are filled with Keras' large negative number, so
    a row with no allowed key is uniform over all S keys; softmax in float32.
    Key heads are repeated over their query-head group (GQA/MQA).
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
    if bias is not None:
        logits = logits + tf.cast(bias, ct)
    if logits_soft_cap:
        cap = tf.constant(logits_soft_cap, ct)
        logits = tf.tanh(logits / cap) * cap
    shape = tf.shape(logits)
    band = band_mask(shape[2], shape[3], is_causal=is_causal, window=window, query_offset=query_offset)
    if mask is not None or band is not None:
        allowed = tf.ones_like(logits, dtype=tf.bool)
        if mask is not None:
            allowed = tf.logical_and(allowed, tf.cast(mask, tf.bool))
        if band is not None:
            allowed = tf.logical_and(allowed, band)
        logits = tf.where(allowed, logits, _large_negative(ct))
    return tf.nn.softmax(logits, axis=-1)


def attention(query, key, value, *, mask=None, scale=None, is_causal=False, dropout_rate=0.0, seed=None,
              keep_mask=None, logits_soft_cap=None, window=None, query_offset=None, bias=None):
    """Scaled-dot-product attention, `keras.ops.dot_product_attention`'s math.

    query `[B, T, N, H]`, key `[B, S, Nkv, H]`, value `[B, S, Nkv, Hv]`, N a
    multiple of Nkv; mask bool, broadcastable to `[B, N, T, S]` (True =
    attend); logits_soft_cap, window and query_offset as in
    `tf_fastattn.dot_product_attention` (computed densely here: T x S
    logits). Probabilities from `attention_probs`, cast to the inputs' dtype,
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
    probs = attention_probs(query, key, mask=mask, scale=scale, is_causal=is_causal, logits_soft_cap=logits_soft_cap,
                            window=window, query_offset=query_offset, bias=bias)
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
