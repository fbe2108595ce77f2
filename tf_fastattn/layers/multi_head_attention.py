"""Drop-in `keras.layers.MultiHeadAttention` backed by the fused attention op."""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_fastattn import _loader
from tf_fastattn.layers._fused_layer import FusedLayerMixin, SerializedImplementation
from tf_fastattn.attention import fused_attention, seed_tensor


class _AttentionMask:
    """What `_compute_attention_mask` hands to `_compute_attention`: the dense
    mask of every source except causality, and whether attention is causal.

    Keras' `call` passes the mask straight from one method to the other; keeping
    the causal part as a flag lets the op skip masked tiles instead of reading
    a dense [T, S] mask.
    """

    __slots__ = ("mask", "is_causal")

    def __init__(self, mask, is_causal):
        self.mask = mask
        self.is_causal = is_causal


class FusedMultiHeadAttentionMixin(FusedLayerMixin):
    """The fused attention path of `MultiHeadAttention` and its subclasses.

    Overrides only `_compute_attention_mask` and `_compute_attention`, so a
    subclass with its own `call` (keras-hub's `CachedMultiHeadAttention`, whose
    cached decoding calls `_compute_attention` with a dense mask) keeps it.
    """

    def _compute_attention_mask(
        self,
        query,
        value,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
    ):
        # Overriding `_compute_attention` disables Keras' causal-only shortcut
        # in `call` (it would hand us a dense [1, T, S] causal mask). Build
        # every other part of the mask as Keras does, and carry causality as a
        # flag instead.
        mask = super()._compute_attention_mask(
            query,
            value,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=False,
        )
        return _AttentionMask(mask, bool(use_causal_mask))

    def _fused_axes_reason(self, projected_rank=4):
        """The configuration rule, shared with convert_model: only attention
        over the sequence axis of [B, T, N, H] projections is fused."""
        axes = self._attention_axes
        if axes is None:  # Keras' default: every axis between batch and heads
            axes = tuple(range(1, projected_rank - 2))
        if projected_rank != 4 or tuple(a % projected_rank for a in axes) != (1,):
            return f"attention_axes={self._attention_axes} (only attention over the sequence axis is fused)"
        return None

    def _unfused_reason(self, query, return_attention_scores):
        if return_attention_scores:
            return "return_attention_scores=True needs the attention scores, which the fused op never forms"
        return self._fused_axes_reason(len(query.shape))

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if isinstance(attention_mask, _AttentionMask):
            mask, is_causal = attention_mask.mask, attention_mask.is_causal or use_causal_mask
        else:
            mask, is_causal = attention_mask, use_causal_mask
        unsupported = self._unfused_reason(query, return_attention_scores)
        variant = ("attention", query.dtype.name, max(query.shape[-1] or 0, value.shape[-1] or 0))
        if _loader.use_fused("MultiHeadAttention", self.implementation, unsupported=unsupported, gpu_variant=variant):
            return self._fused_attention(query, key, value, mask, is_causal, training), None
        return super()._compute_attention(
            query,
            key,
            value,
            attention_mask=mask,
            training=training,
            return_attention_scores=return_attention_scores,
            use_causal_mask=is_causal,
        )

    def _fused_attention(self, query, key, value, mask, is_causal, training):
        # Keras creates the dropout layer (and its seed generator) only for dropout > 0.
        seed_generator = self._dropout_layer.seed_generator if self._dropout > 0 else None
        return fused_layer_attention(
            query, key, value, mask, is_causal, dropout=self._dropout, seed_generator=seed_generator, training=training
        )


@keras.saving.register_keras_serializable(package="tf_fastattn")
class MultiHeadAttention(FusedMultiHeadAttentionMixin, SerializedImplementation, keras.layers.MultiHeadAttention):
    """Multi-head attention with the fused attention op; same weights and config as Keras'.

    A subclass of `keras.layers.MultiHeadAttention` that keeps its class name,
    constructor, call signature, weights (`query`, `key`, `value`,
    `attention_output` EinsumDense kernels and biases) and config, so that
    changing `from keras.layers import MultiHeadAttention` to
    `from tf_fastattn.layers import MultiHeadAttention` is the only edit a model
    needs, and `.weights.h5` files written with the stock layer load. With the
    projections `q = x W_q`, `k = y W_k`, `v = y W_v` (shapes `[B, T, N, H]`,
    `[B, S, N, H]`, `[B, S, N, Hv]`):

        o = softmax(q k^T / sqrt(H) + mask) v          (fused, no T x S tensor)
        output = o W_o

    What reaches the op:
      - `use_causal_mask=True` becomes the op's `is_causal` (top-left aligned,
        as Keras), never a dense mask;
      - the query/key/value Keras masks and `attention_mask` are merged as
        Keras does into one boolean `[B, T, S]` mask;
      - attention dropout (`dropout > 0`, `training=True`) is fused, drawn
        from the layer's seed generator (a new mask every step, reproducible
        with `seed=`). The keep mask is not the one Keras' `Dropout` would draw.

    Masked rows: a query row with no allowed key averages value uniformly over
    all keys, as Keras' `dot_product_attention` path does. Keras takes another
    path when `dropout > 0` (masked softmax), where such rows are zeros; this
    layer matches that too, so outputs equal the stock layer's in both cases.

    `return_attention_scores=True` and non-default `attention_axes` run Keras'
    own computation (the op never forms the scores). Under XLA
    (`jit_compile=True`, and Keras' `"auto"` with a GPU) the op runs as an XLA
    custom call and the layer reports `supports_jit = True`; where the ops'
    XLA kernels cannot load, the layer sets `supports_jit = False` while the
    op can run (Keras then leaves XLA off) and forced XLA gets Keras' math.

    Args:
      (every argument of `keras.layers.MultiHeadAttention`), plus
      implementation: "auto" (fused op when available, else Keras' math with a
        one-time warning), "fused" (raise ValueError if the op cannot run) or
        "reference" (always Keras' math). Serialized in the config.

    Call arguments: those of `keras.layers.MultiHeadAttention`.

    Example:
      >>> from tf_fastattn.layers import MultiHeadAttention
      >>> mha = MultiHeadAttention(num_heads=8, key_dim=64, dropout=0.1)
      >>> y = mha(x, x, use_causal_mask=True)      # x: [B, T, 512] -> [B, T, 512]
    """

    def __init__(self, *args, implementation: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_implementation(implementation)

    def build(self, query_shape, value_shape, key_shape=None):
        axes = self._attention_axes
        rank = len(query_shape) + 1  # the projections' [B, ..., N, H]
        if axes is not None:
            bad = [a for a in axes if not -rank <= a < rank]  # Keras' own error here is an IndexError
            if bad:
                raise ValueError(
                    f"MultiHeadAttention: attention_axes={tuple(axes)} is out of range for a query of rank "
                    f"{len(query_shape)} (shape {tuple(query_shape)}): expected axes of the query's "
                    f"[batch, ..., heads, head_dim] projections, in [{-rank}, {rank - 1}]; the sequence axes are "
                    f"[1, {len(query_shape) - 2}]")
        super().build(query_shape, value_shape, key_shape)


def fused_layer_attention(query, key, value, mask, is_causal, *, dropout, seed_generator, training):
    """The fused op as Keras' attention layers use it (MultiHeadAttention, GroupedQueryAttention).

    query `[B, T, N, H]`, key `[B, S, Nkv, H]`, value `[B, S, Nkv, Hv]`; `mask`
    a Keras attention mask (`[B, T, S]`, `[T, S]`, or already rank 4) without
    causality, which comes as `is_causal`. Attention dropout at rate `dropout`
    applies when `training`, seeded from `seed_generator`. Rows with no
    allowed key are zeros when `dropout > 0`, as Keras' masked-softmax path
    gives, else the uniform average (Keras' dot_product_attention path).
    """
    if mask is not None:
        mask = tf.cast(mask, tf.bool)
        # Keras' masks are [B, T, S] (or [T, S]): the head axis goes in
        # front of T, as in Keras' own expansion.
        while mask.shape.rank < 4:
            mask = tf.expand_dims(mask, axis=-3)
    dropout_rate = float(dropout) if (training and dropout > 0) else 0.0
    if dropout_rate >= 1.0:
        # Keras' Dropout(1.0) drops every probability: the attention output
        # is zeros (the layer returns its output bias) and the gradients to
        # query, key and value are zeros, not None. The op takes rates < 1.
        shape = tf.concat([tf.shape(query)[:3], tf.shape(value)[-1:]], axis=0)
        tie = tf.reduce_sum(query) + tf.reduce_sum(key) + tf.reduce_sum(value)
        return tf.zeros(shape, query.dtype) + tf.math.multiply_no_nan(tie, tf.zeros([], tie.dtype))
    seed = seed_tensor(seed_generator) if dropout_rate > 0 else None
    out, lse = fused_attention(
        query,
        key,
        value,
        mask=mask,
        scale=None,  # key_dim is H: the op's default 1/sqrt(H), exact in float64
        is_causal=is_causal,
        dropout_rate=dropout_rate,
        seed=seed,
    )
    if mask is not None and dropout > 0:
        # With dropout configured, Keras computes a masked softmax that
        # zeroes rows with no allowed key (instead of averaging them). The op
        # marks those rows with lse = +inf: no [T, S] tensor is needed.
        any_allowed = tf.transpose(tf.not_equal(lse, float("inf")), [0, 2, 1])[..., None]  # [B, T, N, 1]
        out = tf.where(any_allowed, out, tf.zeros([], out.dtype))
    return out
