"""Fused scaled-dot-product attention: `tf_fastattn.dot_product_attention`."""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

from tf_fastattn import _C, _loader, reference

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
MAX_HEAD_DIM = _C.MAX_HEAD_DIM  # kMaxHeadDim of csrc/include/tf_fastattn/attention.h


def _shape_str(t) -> str:
    return str(t.shape.as_list()) if t.shape.rank is not None else "<unknown rank>"


def _known_mismatch(a, b) -> bool:
    return a is not None and b is not None and a != b


def _check_soft_cap(logits_soft_cap):
    """None or 0 (off), or a finite number > 0; returns the float (0.0 = off)."""
    if logits_soft_cap is None:
        return 0.0
    if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, numbers.Real):
        static = None
        if not isinstance(logits_soft_cap, (bool, str, bytes)):
            static = tf.get_static_value(logits_soft_cap)
        if static is None or getattr(static, "size", 1) != 1 or not np.issubdtype(np.asarray(static).dtype, np.number):
            raise ValueError(
                "dot_product_attention: logits_soft_cap must be None or a number >= 0 (a constant), "
                f"got {logits_soft_cap!r}"
            )
        logits_soft_cap = float(static)
    cap = float(logits_soft_cap)
    if not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"dot_product_attention: logits_soft_cap must be a finite number >= 0 (0 or None = off), "
                         f"got {logits_soft_cap!r}")
    return cap


def _check_window(window):
    """None, or (left, right) with each side an int >= 0 or -1 (unbounded);
    returns (left, right)."""
    if window is None:
        return (-1, -1)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(
            f"dot_product_attention: window must be None or a pair (left, right) of ints >= -1, got {window!r}"
        ) from None
    sides = []
    for name, side in (("left", left), ("right", right)):
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < -1:
            raise ValueError(
                f"dot_product_attention: window {name} side must be an int >= 0, or -1 for no bound, "
                f"got {side!r} (window {window!r})"
            )
        sides.append(int(side))
    return tuple(sides)


def _check_query_offset(query_offset, query, key):
    """None or 0 (top-left), an int in [0, S - T], or a scalar integer tensor
    (checked by the op at run time); returns None (no offset) or an int32
    scalar tensor."""
    if query_offset is None:
        return None
    T, S = query.shape[1], key.shape[1]
    if isinstance(query_offset, numbers.Integral) and not isinstance(query_offset, bool):
        if query_offset == 0:
            return None
        if query_offset < 0 or (T is not None and S is not None and query_offset + T > S):
            bound = f"[0, S - T] = [0, {S - T}]" if T is not None and S is not None else "[0, S - T]"
            raise ValueError(
                f"dot_product_attention: query_offset must be in {bound} (query rows at positions "
                f"query_offset .. query_offset + T - 1 of the S keys), got {query_offset} with T = {T}, S = {S}"
            )
        return tf.constant(int(query_offset), tf.int32)
    if isinstance(query_offset, (bool, float)):
        raise ValueError(f"dot_product_attention: query_offset must be an int or a scalar integer tensor, "
                         f"got {query_offset!r}")
    offset = tf.convert_to_tensor(query_offset)
    if not offset.dtype.is_integer:
        raise ValueError(
            f"dot_product_attention: query_offset must be an integer scalar, got dtype {offset.dtype.name}"
        )
    if offset.shape.rank is not None and offset.shape.num_elements() not in (None, 1):
        raise ValueError(f"dot_product_attention: query_offset must be a scalar, got shape {_shape_str(offset)}")
    return tf.reshape(tf.cast(offset, tf.int32), [])


def _validate(query, key, value, mask, scale, dropout_rate):
    """Static checks; errors name the argument, the expected and the actual value."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"dot_product_attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype.name}"
            )
    layouts = (("query", query, "[B, T, N, H]"), ("key", key, "[B, S, Nkv, H]"), ("value", value, "[B, S, Nkv, Hv]"))
    for name, t, layout in layouts:
        if t.shape.rank != 4:
            raise ValueError(f"dot_product_attention: {name} must have rank 4 {layout}, got shape {_shape_str(t)}")
    qs, ks, vs = query.shape, key.shape, value.shape
    shapes = f"query {_shape_str(query)}, key {_shape_str(key)}, value {_shape_str(value)}"
    if _known_mismatch(qs[0], ks[0]) or _known_mismatch(qs[0], vs[0]) or _known_mismatch(ks[0], vs[0]):
        raise ValueError(f"dot_product_attention: query, key and value must have the same batch size B, got {shapes}")
    if _known_mismatch(ks[1], vs[1]) or _known_mismatch(ks[2], vs[2]):
        raise ValueError(f"dot_product_attention: value must match key in S and Nkv, got {shapes}")
    if _known_mismatch(qs[3], ks[3]):
        raise ValueError(
            f"dot_product_attention: key must have the head dim H of query ({qs[3]}), got key {_shape_str(key)}"
        )
    if qs[2] is not None and ks[2] is not None and (ks[2] == 0 or qs[2] % ks[2] != 0):
        raise ValueError(
            "dot_product_attention: the query heads N must be a multiple of the key/value heads Nkv, "
            f"got N = {qs[2]} (query {_shape_str(query)}), Nkv = {ks[2]} (key {_shape_str(key)})"
        )
    for name, dim in (("H (head dim of query and key)", qs[3]), ("Hv (head dim of value)", vs[3])):
        if dim is not None and not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"dot_product_attention: {name} must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if mask is not None:
        full = [qs[0], qs[2], qs[1], ks[1]]
        expected = f"broadcastable to [B, N, T, S] = {full}"
        if mask.shape.rank is not None:
            if mask.shape.rank > 4:
                raise ValueError(f"dot_product_attention: mask must be {expected}, got shape {_shape_str(mask)}")
            for m, f in zip(mask.shape.as_list()[::-1], full[::-1]):
                if m is not None and f is not None and m not in (1, f):
                    raise ValueError(f"dot_product_attention: mask must be {expected}, got shape {_shape_str(mask)}")
    if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"dot_product_attention: scale must be a finite number or None, got {scale!r}")
    if not (isinstance(dropout_rate, numbers.Real) and 0.0 <= dropout_rate < 1.0):
        raise ValueError(f"dot_product_attention: dropout_rate must be in [0, 1), got {dropout_rate!r}")


def dense_tensor(t, name: str, op: str):
    """`t` as a dense tensor; a RaggedTensor or SparseTensor (which the fused
    kernels cannot read) is a TypeError naming the argument and what to pass."""
    if isinstance(t, tf.RaggedTensor):
        hint = ", with a mask marking the padding keys" if op == "dot_product_attention" else ""
        raise TypeError(f"{op}: {name} is a tf.RaggedTensor; pass a dense tensor: {name}.to_tensor(){hint}")
    if isinstance(t, (tf.SparseTensor, tf.compat.v1.SparseTensorValue)):
        raise TypeError(f"{op}: {name} is a tf.SparseTensor; pass a dense tensor: tf.sparse.to_dense({name})")
    return tf.convert_to_tensor(t)


def seed_tensor(seed):
    """The 64-bit Philox key for attention dropout, as an int64 scalar tensor.

    `seed` may be None (a fresh random draw each time the op runs), a Python
    int, an integer scalar tensor, or a `keras.random.SeedGenerator` (its
    next state: a training loop draws a new mask every step, reproducibly).
    """
    if seed is None:
        return tf.random.uniform([], minval=0, maxval=2**62, dtype=tf.int64)
    if hasattr(seed, "next") and hasattr(seed, "state"):  # keras.random.SeedGenerator
        state = tf.cast(tf.convert_to_tensor(seed.next()), tf.int64)
        # Keras' state is [seed, counter]: both halves reach the Philox key.
        return tf.bitwise.bitwise_or(
            tf.bitwise.left_shift(state[0], tf.constant(32, tf.int64)),
            tf.bitwise.bitwise_and(state[1], tf.constant(0xFFFFFFFF, tf.int64)),
        )
    if isinstance(seed, int):
        seed %= 2**64  # any Python int: the key is 64 bits
        return tf.constant(seed - 2**64 if seed >= 2**63 else seed, tf.int64)
    try:
        seed = tf.convert_to_tensor(seed)
    except (TypeError, ValueError):
        raise TypeError("dot_product_attention: seed must be None, an int, an integer scalar tensor or a "
                        f"keras.random.SeedGenerator, got {type(seed).__name__} {seed!r}") from None
    if not seed.dtype.is_integer:
        raise ValueError(f"dot_product_attention: seed must be an integer, got dtype {seed.dtype.name}")
    if seed.shape.rank is not None and seed.shape.num_elements() not in (None, 1):
        raise ValueError(f"dot_product_attention: seed must be a scalar, got shape {_shape_str(seed)}")
    return tf.reshape(tf.cast(seed, tf.int64), [])


def dot_product_attention(
    query,
    key,
    value,
    mask=None,
    scale=None,
    is_causal=False,
    dropout_rate=0.0,
    seed=None,
    implementation="auto",
    *,
    logits_soft_cap=None,
    window=None,
    query_offset=None,
):
    """Scaled-dot-product attention, fused: `keras.ops.dot_product_attention`
    plus dropout, sliding windows, soft-capping and cached decoding.

    With `g = N / Nkv` query heads per key/value head and `pos(t) = t + query_offset`:

        x[b, n, t, s] = scale * sum_h query[b, t, n, h] * key[b, s, n // g, h]
        logits = x, or cap * tanh(x / cap) with logits_soft_cap = cap
        allowed[b, n, t, s] = mask[b, n, t, s]
                              and (not is_causal or s <= pos(t))
                              and pos(t) - left <= s <= pos(t) + right   (window = (left, right))
        p = softmax over s of logits where allowed (disallowed entries get 0)
        out[b, t, n, :] = sum_s dropout(p)[b, n, t, s] * value[b, s, n // g, :]

    computed in one pass over key blocks (FlashAttention-2): nothing of size
    T x S is stored, forward or backward; accumulation and softmax in float32
    (float64 for float64 inputs). The gradient recomputes p from the saved
    log-sum-exp and is deterministic (bitwise equal across runs).

    Semantics follow Keras on TensorFlow: the causal mask is top-left aligned
    (query t sees keys s <= t, also when T != S); a row with no allowed key
    gets the uniform average of value over all S keys (what Keras' large
    negative fill produces), not zeros, and no gradient to query and key.
    Key blocks outside the window (and past the causal diagonal) are never
    computed, forward or backward: a sliding window of w keys costs
    O(T x w), not O(T x S).

    Dropout, which Keras' op lacks, zeroes each probability with probability
    `dropout_rate` and scales the rest by `1 / (1 - dropout_rate)`; the mask is
    drawn from Philox keyed by (seed, b, n, t, s), so the backward regenerates
    it and CPU and GPU draw the same mask.

    Args:
      query: `[B, T, N, H]` float16, bfloat16, float32 or float64.
      key: `[B, S, Nkv, H]`, N a multiple of Nkv (multi-head, grouped-query,
        multi-query attention). H <= 256.
      value: `[B, S, Nkv, Hv]`, Hv <= 256 (may differ from H). Inputs of mixed
        dtypes are cast to their common dtype, as Keras does.
      mask: optional boolean tensor broadcastable to `[B, N, T, S]` (True =
        attend); non-boolean masks mean "nonzero = attend".
      scale: logit scale, default `1 / sqrt(H)`: a number or a constant
        scalar tensor. An explicit scale reaches the fused op as a float32
        attribute (the default is exact, also in float64).
      is_causal: whether query t attends only to keys s <= t.
      dropout_rate: in [0, 1); applied to the probabilities. It reaches the
        fused op as a float32 attribute: kept entries are scaled by
        `1 / (1 - float32(dropout_rate))`.
      seed: dropout seed: None (a fresh draw each run), an int, an integer
        scalar tensor or a `keras.random.SeedGenerator`.
      implementation: "auto" (fused op when available, else the reference
        with a one-time warning), "fused" (raise ValueError when the op cannot
        run) or "reference" (pure TensorFlow, `tf_fastattn.reference.attention`).
        Code traced for XLA (`jit_compile=True`) runs the op as an XLA custom
        call when its XLA kernels loaded (`build_info()["xla"]`), bitwise as
        without XLA; otherwise it gets the reference math.
      logits_soft_cap: None or 0 (off), or cap > 0: logits become
        `cap * tanh(logits / cap)` before masking and softmax (Gemma 2's
        `attn_logit_softcapping`, Keras' `attn_logits_soft_cap`,
        FlashAttention's `softcap`); the gradient goes through the tanh.
      window: None, or `(left, right)`: query t attends keys
        `pos(t) - left <= s <= pos(t) + right`, -1 = unbounded on that side,
        combined with `is_causal` and `mask`. A model's sliding window of w
        keys is `window=(w - 1, 0)` with `is_causal=True`: keras-hub's Gemma
        2/3 and Qwen (`sliding_window_size=w`: a band of w - 1 on each side
        of the query's position, intersected with the causal mask) and
        Mistral/Mixtral (`sliding_window=w`: keys `pos(t) - w < s <= pos(t)`)
        all give that set.
      query_offset: None or 0 (top-left), an int, or a scalar integer tensor
        (changing it does not retrace): query row t sits at position
        `t + query_offset` among the S keys, for causal and windowed attention
        of a few new queries against a key/value cache (`cache_update_index`
        in keras-hub) without a dense mask. Must lie in [0, S - T].

    Returns:
      `[B, T, N, Hv]` in the inputs' dtype.

    Raises:
      ValueError: for ranks other than 4, mismatched B, S, Nkv or H, N not a
        multiple of Nkv, head dims outside [1, 256], a mask that does not
        broadcast, non-floating inputs, a non-finite scale or a dropout rate
        outside [0, 1), a negative or NaN logits_soft_cap, window sides below
        -1, a non-integer query_offset or one outside [0, S - T] (shapes
        known statically; the op raises InvalidArgumentError for the same
        problems at run time).

    Example:
      >>> q = tf.random.normal([2, 128, 8, 64])
      >>> kv = tf.random.normal([2, 128, 2, 64])      # GQA: 4 query heads per kv head
      >>> out = tf_fastattn.dot_product_attention(q, kv, kv, is_causal=True)
      >>> out.shape
      TensorShape([2, 128, 8, 64])
    """
    _loader.check_implementation(implementation)
    query, key, value = (dense_tensor(t, n, "dot_product_attention") for t, n in
                         ((query, "query"), (key, "key"), (value, "value")))
    if scale is not None and not isinstance(scale, numbers.Real):
        # A scale tensor must be known when the graph is built: it becomes an attribute.
        static = tf.get_static_value(scale) if isinstance(scale, (tf.Tensor, tf.Variable, np.ndarray)) else None
        if static is None or static.size != 1 or not np.issubdtype(static.dtype, np.number):
            raise ValueError(f"dot_product_attention: scale must be a number or a constant scalar, got {scale!r}")
        scale = float(static)
    if mask is not None:
        mask = dense_tensor(mask, "mask", "dot_product_attention")
        if mask.dtype != tf.bool:
            if not (mask.dtype.is_integer or mask.dtype.is_floating):
                raise TypeError("dot_product_attention: mask must be boolean (True = attend) or numeric (nonzero "
                                f"= attend, as Keras casts it), got dtype {mask.dtype.name}")
            mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    # The static checks, once (the op repeats the shape checks at run time,
    # with the same messages as every front end: csrc/core/attention_checks.cc).
    _validate(query, key, value, mask, scale, dropout_rate)
    cap = _check_soft_cap(logits_soft_cap)
    window = _check_window(window)
    offset = _check_query_offset(query_offset, query, key)
    if not (query.dtype == key.dtype == value.dtype):
        import keras

        common = keras.backend.result_type(query.dtype.name, key.dtype.name, value.dtype.name)
        query, key, value = (tf.cast(t, common) for t in (query, key, value))
    dropout_rate = float(dropout_rate)

    variant = ("attention", query.dtype.name, max(query.shape[-1] or 0, value.shape[-1] or 0))
    if _loader.use_fused("dot_product_attention", implementation, gpu_variant=variant):
        seed_t = seed_tensor(seed) if dropout_rate > 0 else None
        out, _ = fused_attention(query, key, value, mask, scale, is_causal, dropout_rate, seed_t,
                                 logits_soft_cap=cap, window=window, query_offset=offset)
        return out
    return reference.attention(
        query,
        key,
        value,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        dropout_rate=dropout_rate,
        seed=None if dropout_rate == 0 else seed_tensor(seed),
        logits_soft_cap=cap or None,
        window=window,
        query_offset=offset,
    )


def fused_attention(query, key, value, mask=None, scale=None, is_causal=False, dropout_rate=0.0, seed=None, *,
                    logits_soft_cap=0.0, window=(-1, -1), query_offset=None):
    """The `TfFastattn>Attention` op: returns `(out [B, T, N, Hv], lse [B, N, T])`.

    No validation or fallback (see `dot_product_attention`); `seed` is an int64
    scalar tensor, required when `dropout_rate > 0`; `query_offset` an int32
    scalar tensor or None. `lse` is float32 (float64 for float64 inputs); a
    row with no allowed key has lse = +inf.
    """
    cap = float(logits_soft_cap or 0.0)
    return _loader.ops().tf_fastattn_attention(
        query=query,
        key=key,
        value=value,
        mask=[] if mask is None else [mask],
        seed=[] if seed is None else [seed],
        query_offset=[] if query_offset is None else [query_offset],
        S=reference.compute_dtype(query.dtype),
        is_causal=bool(is_causal),
        window_left=int(window[0]),
        window_right=int(window[1]),
        scale=float("nan") if scale is None else float(scale),
        dropout_rate=float(dropout_rate),
        logits_soft_cap=cap,
        scale_bits=_loader.float64_bits(scale),
        dropout_rate_bits=_loader.float64_bits(dropout_rate),
        logits_soft_cap_bits=_loader.float64_bits(cap),
    )


@tf.RegisterGradient("TfFastattn>Attention")
def _attention_grad(op, d_out, _d_lse):
    # lse is a saved statistic, not a differentiable output.
    num_mask, num_seed, num_offset = op.get_attr("num_mask"), op.get_attr("num_seed"), op.get_attr("num_offset")
    query, key, value = op.inputs[:3]
    masks = list(op.inputs[3 : 3 + num_mask])
    seeds = list(op.inputs[3 + num_mask : 3 + num_mask + num_seed])
    offsets = list(op.inputs[3 + num_mask + num_seed : 3 + num_mask + num_seed + num_offset])
    out, lse = op.outputs
    if d_out is None:
        d_out = tf.zeros_like(out)
    dq, dk, dv = _loader.ops().tf_fastattn_attention_grad(
        query=query,
        key=key,
        value=value,
        mask=masks,
        seed=seeds,
        query_offset=offsets,
        out=out,
        lse=lse,
        d_out=d_out,
        is_causal=op.get_attr("is_causal"),
        window_left=op.get_attr("window_left"),
        window_right=op.get_attr("window_right"),
        scale=op.get_attr("scale"),
        dropout_rate=op.get_attr("dropout_rate"),
        logits_soft_cap=op.get_attr("logits_soft_cap"),
        scale_bits=op.get_attr("scale_bits"),
        dropout_rate_bits=op.get_attr("dropout_rate_bits"),
        logits_soft_cap_bits=op.get_attr("logits_soft_cap_bits"),
    )
    return [dq, dk, dv] + [None] * (num_mask + num_seed + num_offset)
