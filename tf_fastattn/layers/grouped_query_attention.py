"""Drop-in `keras.layers.GroupQueryAttention` backed by the fused attention op."""

from __future__ import annotations

import keras
from keras import ops

from tf_fastattn import _loader
from tf_fastattn.layers._fused_layer import FusedLayerMixin, SerializedImplementation
from tf_fastattn.layers.multi_head_attention import fused_layer_attention


class FusedGroupedQueryAttentionMixin(FusedLayerMixin):
    """The fused path of `GroupQueryAttention` and its subclasses: overrides `call`."""

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        kwargs = dict(
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            return_attention_scores=return_attention_scores,
            training=training,
            use_causal_mask=use_causal_mask,
        )
        unsupported = (
            "return_attention_scores=True needs the attention scores, which the fused op never forms"
            if return_attention_scores
            else None
        )
        variant = ("attention", self.compute_dtype, self.head_dim)
        if not _loader.use_fused("GroupedQueryAttention", self.implementation, unsupported=unsupported,
                                 gpu_variant=variant):
            return super().call(query, value, key=key, **kwargs)

        self._return_attention_scores = False
        if key is None:
            key = value
        # Every mask source but causality, exactly as Keras merges them;
        # causality stays a flag so the op skips the tiles above the diagonal.
        mask = self._compute_attention_mask(
            query,
            value,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=False,
        )
        gate = self._gate_dense(query) if self.use_gate else None
        q = self._query_dense(query)  # [B, T, N, H]
        k = self._key_dense(key)  # [B, S, Nkv, H]
        v = self._value_dense(value)  # [B, S, Nkv, H]
        # Keras' Dropout has a seed generator only for a rate > 0.
        seed_generator = self._dropout_layer.seed_generator if self.dropout > 0 else None
        out = fused_layer_attention(
            q, k, v, mask, bool(use_causal_mask), dropout=self.dropout, seed_generator=seed_generator, training=training
        )
        return self._output_dense(ops.multiply(out, gate) if gate is not None else out)


@keras.saving.register_keras_serializable(package="tf_fastattn")
class GroupedQueryAttention(
    FusedGroupedQueryAttentionMixin, SerializedImplementation, keras.layers.GroupQueryAttention
):
    """Grouped-query attention with the fused op; same weights and config as Keras'.

    A subclass of `keras.layers.GroupQueryAttention` (class name
    `GroupedQueryAttention`, as Keras') that keeps its constructor, call
    signature, weights and config. Keras repeats every key/value head
    `num_query_heads / num_key_value_heads` times before attending; this layer
    hands the unrepeated `[B, S, Nkv, H]` keys and values to the op, which
    reads each kv head once per group:

        o = softmax(q k^T / sqrt(head_dim) + mask) v     (no T x S tensor, no repeat)

    `use_causal_mask=True` reaches the op as `is_causal`; query/value/key masks,
    `attention_mask` and `sliding_window` are merged into one boolean mask as
    Keras does; dropout is fused and seeded from the layer's seed generator.
    Rows with no allowed key follow Keras: the uniform average of the values
    without dropout, zeros with dropout. `return_attention_scores=True` uses
    Keras' own computation. Under XLA the op runs as an XLA custom call (see
    `tf_fastattn.layers.MultiHeadAttention`).

    Args:
      (every argument of `keras.layers.GroupQueryAttention`), plus
      implementation: "auto", "fused" or "reference" (serialised in the config).

    Example:
      >>> from tf_fastattn.layers import GroupedQueryAttention
      >>> gqa = GroupedQueryAttention(head_dim=64, num_query_heads=8, num_key_value_heads=2)
      >>> y = gqa(x, x, use_causal_mask=True)
    """

    def __init__(self, *args, implementation: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_implementation(implementation)
