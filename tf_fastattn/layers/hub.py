"""keras-hub's decoder LLM layers on the fused ops.

keras-hub's Llama, Mistral, Mixtral, Qwen, Qwen-MoE, Qwen3, Qwen3-MoE, Phi-3,
SmolLM3, GPT-NeoX and Gemma (1, 2, 3) families have attention layers of their
own (not `keras.layers.MultiHeadAttention`) whose `_compute_attention` takes
the projected `[B, T, N, H]` query, key and value and a dense `[B, T, S]`
mask (causal, padding and, for Mistral, the window, offset by
`cache_update_index` in cached decoding). On the TensorFlow backend they
compute it unfused (einsum, masked softmax, einsum). The mixins below
replace `_compute_attention` with the fused op, keeping each layer's own
non-fused semantics:

- the mask as given (key tiles it disallows entirely, such as those past the
  causal diagonal, are skipped by the kernels);
- the layer's scale (`_inv_norm_factor`; Gemma's query normalisation);
- Gemma 2's logit soft-cap (`logit_soft_cap`) as the op's `logits_soft_cap`;
- the sliding windows these layers add themselves (Gemma 2/3, Qwen, Qwen3:
  `sliding_window_size` w, a band of w - 1 keys each side of the query's
  position `t + cache_update_index`) as the op's `window` and `query_offset`,
  so the band is never formed densely and tiles outside it are skipped;
- attention-probability dropout where the layer has it (GPT-NeoX, Gemma),
  fused and drawn from the layer's own dropout seed generator;
- rows with no allowed key give zeros, as Keras' masked `Softmax` does.

The RMS norms of these families (`LlamaLayerNorm` and its copies, Gemma's
`RMSNormalization`, which scales by `1 + scale`, T5's) run `rms_norm`.

Layers whose attention is not plain scaled-dot-product attention are listed
by `convert_model` with the reason (`UNSUPPORTED`): Falcon and Bloom add ALiBi
biases, T5 a relative position bias, GPT-OSS attention sinks.
"""

from __future__ import annotations

import functools
import importlib
import math
import threading

import tensorflow as tf

from tf_fastattn import _loader
from tf_fastattn.attention import fused_attention, seed_tensor
from tf_fastattn.layer_norm import rms_norm
from tf_fastattn.layers._fused_layer import FusedLayerMixin


def _zero_rows_without_keys(out, lse):
    """Rows whose lse is +inf (no allowed key) as zeros: Keras' masked Softmax
    gives them probability 0 everywhere (the op averages them uniformly)."""
    any_allowed = tf.transpose(tf.not_equal(lse, float("inf")), [0, 2, 1])[..., None]  # [B, T, N, 1]
    return tf.where(any_allowed, out, tf.zeros([], out.dtype))


class StructuredMask:
    """The self-attention mask of a keras-hub decoder block, as its parts
    instead of the dense `[B, T, S]` tensor the block would build:

        allowed(t, s) = keys[b, t or 0, s] and s <= t + query_offset
                        and s >= t + query_offset - window_left   (window_left >= 0)

    `keys` is what `merge_padding_and_attention_mask` gives (the padding mask
    `[B, 1, S]`, a custom attention mask, both, or None); `dense()` builds
    the block's own dense mask, for a path that needs it (the layer's own
    math). The fused attention layers take it as the op's mask, `is_causal`,
    `query_offset` and `window`: no T x S mask is formed."""

    __slots__ = ("keys", "query_offset", "window_left", "dense")

    def __init__(self, keys, query_offset, window_left, dense):
        self.keys = keys
        self.query_offset = query_offset
        self.window_left = window_left
        self.dense = dense


def _intersect(a, b):
    """Two windows' band intersected (-1 = unbounded side)."""
    if a is None:
        return b
    if b is None:
        return a
    side = lambda x, y: y if x < 0 else x if y < 0 else min(x, y)  # noqa: E731
    return (side(a[0], b[0]), side(a[1], b[1]))


def _as_bool_mask(mask):
    """A keras-hub attention mask ([B, T, S], any dtype, nonzero = attend) as
    the op's [B, 1, T, S] boolean mask."""
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    while mask.shape.rank < 4:
        mask = tf.expand_dims(mask, axis=-3)
    return mask


class FusedHubAttentionMixin(FusedLayerMixin):
    """What the keras-hub attention mixins share: the fused call and its
    options. A family's mixin overrides `_compute_attention` (its signature)
    and the small hooks that say how the layer scales, windows, caps and
    drops."""

    def _tfa_scale(self):
        return self._inv_norm_factor

    def _tfa_soft_cap(self):
        return None

    def _tfa_window(self, attention_mask):
        """(left, right) of the window this layer applies itself, or None."""
        return None

    def _tfa_dropout(self):
        """(rate, seed generator) of the layer's attention-probability dropout."""
        return 0.0, None

    def _tfa_fused(self, query, key, value, attention_mask, *, training=None, cache_update_index=None):
        """The fused op with the layer's semantics, or None when the layer's
        own math must run (implementation="reference", the op unavailable).
        `attention_mask` may be a `StructuredMask` (from a fused decoder
        block)."""
        query, key, value = (tf.convert_to_tensor(t) for t in (query, key, value))
        unsupported = None
        if query.shape.rank != 4 or key.shape.rank != 4 or value.shape.rank != 4:
            unsupported = "the fused op takes [B, T, N, H] projections"
        variant = ("attention", query.dtype.name, max(query.shape[-1] or 0, value.shape[-1] or 0))
        if not _loader.use_fused(type(self).__name__, self.implementation, unsupported=unsupported,
                                 gpu_variant=variant):
            return None
        dtype = query.dtype
        key, value = tf.cast(key, dtype), tf.cast(value, dtype)
        structured = isinstance(attention_mask, StructuredMask)
        window = self._tfa_window(attention_mask)
        offset, is_causal = None, False
        if structured:
            # Causal at the cache index, the block's window, its key mask.
            is_causal = True
            cache_update_index = attention_mask.query_offset
            if attention_mask.window_left is not None:
                window = _intersect(window, (attention_mask.window_left, -1))
            attention_mask = attention_mask.keys
        if (window is not None or is_causal) and cache_update_index is not None:
            offset = tf.reshape(tf.cast(cache_update_index, tf.int32), [])
        rate, seed_generator = self._tfa_dropout()
        rate = float(rate) if (training and rate > 0) else 0.0
        out, lse = fused_attention(
            query,
            key,
            value,
            mask=_as_bool_mask(attention_mask),
            scale=float(self._tfa_scale()),
            is_causal=is_causal,
            dropout_rate=rate,
            seed=seed_tensor(seed_generator) if rate > 0 else None,
            logits_soft_cap=float(self._tfa_soft_cap() or 0.0),
            window=window or (-1, -1),
            query_offset=offset,
        )
        return _zero_rows_without_keys(out, lse)


def _sliding_window(size):
    """keras-hub's `_mask_sliding_window` band (w - 1 keys each side of the
    query's position) as the op's window."""
    return (int(size) - 1, int(size) - 1)


class FusedLlamaAttentionMixin(FusedHubAttentionMixin):
    """Llama, Llama 3, Mistral, Mixtral, Phi-3, SmolLM3, Qwen, Qwen-MoE, Qwen3
    and Qwen3-MoE attention: `_compute_attention(query, key, value,
    attention_mask[, cache_update_index])`, scale `_inv_norm_factor`, no
    attention-probability dropout (their dropout acts on the output). Qwen's
    `use_sliding_window_attention` and Qwen3's `sliding_window_size` windows
    become the op's window at `cache_update_index`."""

    def _tfa_window(self, attention_mask):
        size = getattr(self, "sliding_window_size", None)
        if hasattr(self, "use_sliding_window_attention"):  # Qwen, Qwen-MoE: a switch and a size
            return _sliding_window(size) if self.use_sliding_window_attention else None
        return _sliding_window(size) if size else None  # Qwen3, Qwen3-MoE: the size alone

    def _compute_attention(self, query, key, value, attention_mask=None, *args, **kwargs):
        cache_update_index = kwargs.get("cache_update_index", args[0] if args else None)
        out = self._tfa_fused(query, key, value, attention_mask, cache_update_index=cache_update_index)
        if out is None:
            return super()._compute_attention(query, key, value, _dense(attention_mask), *args, **kwargs)
        return out


class FusedGPTNeoXAttentionMixin(FusedHubAttentionMixin):
    """GPT-NeoX: `_compute_attention(query, key, value, attention_mask,
    training)`, attention-probability dropout at the layer's `dropout` rate."""

    def _tfa_dropout(self):
        return self.dropout, self._attn_dropout_layer.seed_generator if self.dropout > 0 else None

    def _compute_attention(self, query, key, value, attention_mask=None, training=None):
        out = self._tfa_fused(query, key, value, attention_mask, training=training)
        if out is None:
            return super()._compute_attention(query, key, value, _dense(attention_mask), training=training)
        return out


class FusedGemmaAttentionMixin(FusedHubAttentionMixin):
    """Gemma, Gemma 2 and Gemma 3 (`CachedGemmaAttention`,
    `CachedGemma3Attention`): `_compute_attention(q, k, v, attention_mask,
    training, cache_update_index)`, the query normalisation as the scale,
    `logit_soft_cap`, the sliding window when the layer uses one and has a
    mask (Gemma 3's bidirectional one: w - 1 - w // 2 keys left, w // 2
    right), attention-probability dropout at the layer's `dropout` rate. Key
    and value keep their `num_key_value_heads` heads (grouped-query attention
    in the op)."""

    def _tfa_scale(self):
        if self.query_head_dim_normalize:
            return 1 / math.sqrt(self.head_dim)
        return 1 / math.sqrt(self.hidden_dim // self.num_query_heads)

    def _tfa_soft_cap(self):
        return self.logit_soft_cap

    def _tfa_window(self, attention_mask):
        if not self.use_sliding_window_attention or attention_mask is None:
            return None
        if getattr(self, "use_bidirectional_attention", False):
            right = int(self.sliding_window_size) // 2
            return (int(self.sliding_window_size) - right - 1, right)
        return _sliding_window(self.sliding_window_size)

    def _tfa_dropout(self):
        return self.dropout, self.dropout_layer.seed_generator if self.dropout else None

    def _compute_attention(self, q, k, v, attention_mask, training=False, cache_update_index=0):
        offset = None if getattr(self, "use_bidirectional_attention", False) else cache_update_index
        out = self._tfa_fused(q, k, v, attention_mask, training=training, cache_update_index=offset)
        if out is None:
            return super()._compute_attention(q, k, v, attention_mask, training=training,
                                              cache_update_index=cache_update_index)
        return out


def _dense(mask):
    return mask.dense() if isinstance(mask, StructuredMask) else mask


class FusedHubDecoderMixin(FusedLayerMixin):
    """The decoder blocks of Llama, Mistral, Mixtral, Phi-3, Qwen, Qwen-MoE,
    Qwen3, Qwen3-MoE, SmolLM3 and GPT-NeoX build their self-attention mask
    densely (`_compute_self_attention_mask`: padding and custom masks merged,
    then the causal mask at the cache index and, for Mistral and Mixtral, the
    sliding window, each `[B, T, S]`, every block, every step). When the
    block's attention is fused, it gets a `StructuredMask` instead: the same
    set of keys, with no T x S tensor built or read."""

    def _tfa_attention_fused(self):
        layers = self._flatten_layers(include_self=False, recursive=False)
        attention = [layer for layer in layers if isinstance(layer, FusedHubAttentionMixin)]
        stock = [layer for layer in layers if type(layer).__name__.endswith("Attention")
                 and not isinstance(layer, FusedHubAttentionMixin)]
        return bool(attention) and not stock and all(layer.implementation != "reference" for layer in attention)

    def _compute_self_attention_mask(self, *args, **kwargs):
        # (decoder_sequence, decoder_padding_mask, decoder_attention_mask,
        # cache, cache_update_index): Phi-3 names the last two attention_cache*.
        dense = functools.partial(super()._compute_self_attention_mask, *args, **kwargs)
        if self.implementation == "reference" or not self._tfa_attention_fused() or _loader.unavailable_reason():
            return dense()
        import inspect

        bound = inspect.signature(super()._compute_self_attention_mask).bind(*args, **kwargs)
        bound.apply_defaults()
        decoder_sequence, decoder_padding_mask, decoder_attention_mask, _, self_attention_cache_update_index = (
            bound.arguments.values())
        from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask

        keys = merge_padding_and_attention_mask(decoder_sequence, decoder_padding_mask, decoder_attention_mask)
        index = 0 if self_attention_cache_update_index is None else self_attention_cache_update_index
        window = getattr(self, "sliding_window", None)  # Mistral, Mixtral: keys t + i - w < s
        return StructuredMask(keys, index, None if window is None else int(window) - 1, dense)


class FusedHubRMSNormMixin(FusedLayerMixin):
    """keras-hub's RMS norms: `y = x / sqrt(mean(x^2) + epsilon) * w`
    computed in float32, through `rms_norm`. Class attributes: the weight's
    name, whether the layer scales by `1 + w` (Gemma), and whether the result
    has the input's dtype or the layer's compute dtype."""

    _tfa_weight = "scale"
    _tfa_one_plus = False
    _tfa_output = "compute"  # or "input"

    def call(self, x):
        x = tf.convert_to_tensor(x)
        out_dtype = x.dtype if self._tfa_output == "input" else tf.as_dtype(self.compute_dtype)
        variant = ("layer_norm", x.dtype.name, None)
        if not _loader.use_fused(type(self).__name__, self.implementation, gpu_variant=variant):
            return super().call(x)
        weight = getattr(self, self._tfa_weight)
        gamma = 1.0 + tf.cast(weight, tf.float32) if self._tfa_one_plus else weight
        # The op rounds once, to its input's dtype: run it in the result's
        # dtype, from float32 when the input is another one.
        x_op = x if x.dtype == out_dtype else tf.cast(x, tf.float32)
        y = rms_norm(x_op, gamma, epsilon=self.epsilon, implementation="fused")
        return tf.cast(y, out_dtype)


class FusedT5LayerNormMixin(FusedHubRMSNormMixin):
    """T5's layer norm (RMS, computed in the input's dtype, weight `weight`)."""

    _tfa_weight = "weight"
    _tfa_output = "input"


class FusedGemmaRMSNormMixin(FusedHubRMSNormMixin):
    """Gemma's RMSNormalization: scales by `1 + scale` (the sum in float32)."""

    _tfa_one_plus = True


class FusedInputDtypeRMSNormMixin(FusedHubRMSNormMixin):
    """Qwen3's RMS norms: the result in the input's dtype."""

    _tfa_output = "input"


# (module, class, mixin): the keras-hub layers with a fused twin.
_FUSED = [
    ("keras_hub.src.models.llama.llama_attention", "LlamaAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.mistral.mistral_attention", "CachedMistralAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.mixtral.mixtral_attention", "CachedMixtralAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.phi3.phi3_attention", "Phi3Attention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.qwen.qwen_attention", "QwenAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.qwen_moe.qwen_moe_attention", "QwenMoeAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.qwen3.qwen3_attention", "Qwen3Attention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_attention", "Qwen3MoeAttention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.smollm3.smollm3_layers", "SmolLM3Attention", FusedLlamaAttentionMixin),
    ("keras_hub.src.models.gpt_neo_x.gpt_neo_x_attention", "GPTNeoXAttention", FusedGPTNeoXAttentionMixin),
    ("keras_hub.src.models.gemma.gemma_attention", "CachedGemmaAttention", FusedGemmaAttentionMixin),
    ("keras_hub.src.models.gemma3.gemma3_attention", "CachedGemma3Attention", FusedGemmaAttentionMixin),
    ("keras_hub.src.models.llama.llama_decoder", "LlamaTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.mistral.mistral_transformer_decoder", "MistralTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.mixtral.mixtral_decoder", "MixtralTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.phi3.phi3_decoder", "Phi3Decoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.qwen.qwen_decoder", "QwenTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.qwen_moe.qwen_moe_decoder", "QwenMoeTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.qwen3.qwen3_decoder", "Qwen3TransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_decoder", "Qwen3MoeTransformerDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.smollm3.smollm3_layers", "SmolLM3DecoderLayer", FusedHubDecoderMixin),
    ("keras_hub.src.models.gpt_neo_x.gpt_neo_x_decoder", "GPTNeoXDecoder", FusedHubDecoderMixin),
    ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm", FusedHubRMSNormMixin),
    ("keras_hub.src.models.mistral.mistral_layer_norm", "MistralLayerNormalization", FusedHubRMSNormMixin),
    ("keras_hub.src.models.mixtral.mixtral_layer_norm", "MixtralLayerNormalization", FusedHubRMSNormMixin),
    ("keras_hub.src.models.phi3.phi3_layernorm", "Phi3LayerNorm", FusedHubRMSNormMixin),
    ("keras_hub.src.models.qwen.qwen_layernorm", "QwenLayerNorm", FusedHubRMSNormMixin),
    ("keras_hub.src.models.qwen_moe.qwen_moe_layernorm", "QwenMoeLayerNorm", FusedHubRMSNormMixin),
    ("keras_hub.src.models.qwen3.qwen3_layernorm", "Qwen3LayerNorm", FusedInputDtypeRMSNormMixin),
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_layernorm", "Qwen3MoeLayerNorm", FusedInputDtypeRMSNormMixin),
    ("keras_hub.src.models.gpt_oss.gpt_oss_layer_norm", "GptOssLayerNormalization", FusedHubRMSNormMixin),
    ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization", FusedGemmaRMSNormMixin),
    ("keras_hub.src.models.gemma3.gemma3_layers", "RMSNormalization", FusedGemmaRMSNormMixin),
    ("keras_hub.src.models.t5.t5_layer_norm", "T5LayerNorm", FusedT5LayerNormMixin),
]

# (module, class, reason): keras-hub attention layers left as they are.
UNSUPPORTED = [
    ("keras_hub.src.models.falcon.falcon_attention", "FalconAttention",
     "adds ALiBi position biases to the logits (the fused op takes no bias)"),
    ("keras_hub.src.models.bloom.bloom_attention", "BloomAttention",
     "adds ALiBi position biases to the logits (the fused op takes no bias)"),
    ("keras_hub.src.models.t5.t5_multi_head_attention", "T5MultiHeadAttention",
     "adds a learned relative position bias to the logits (the fused op takes no bias)"),
    ("keras_hub.src.models.gpt_oss.gpt_oss_attention", "GptOssAttention",
     "has attention sinks (a learned extra logit per head in the softmax's denominator)"),
]

_lock = threading.Lock()
_cache: dict = {}


def _classes(table, importer):
    out = {}
    for module, name, value in table:
        try:
            cls = getattr(importer(module), name)
        except (ImportError, AttributeError):
            continue  # another keras-hub version: that family is absent
        out[cls] = value
    return out


def mixins(import_hub: bool = False) -> dict:
    """{keras-hub class: its fused mixin}. keras-hub's modules are imported
    only when keras-hub already is (a model holding its layers was built), or
    with `import_hub` (patch_keras); empty without keras-hub."""
    return _tables(import_hub)[0]


def unsupported(import_hub: bool = False) -> dict:
    """{keras-hub attention class: why it is not fused}."""
    return _tables(import_hub)[1]


def _tables(import_hub):
    import sys

    if "keras_hub" not in sys.modules:
        if not import_hub:
            return {}, {}
        try:
            import keras_hub  # noqa: F401
        except ImportError:
            return {}, {}
    with _lock:
        if "tables" not in _cache:
            _cache["tables"] = (_classes(_FUSED, importlib.import_module),
                                _classes(UNSUPPORTED, importlib.import_module))
        return _cache["tables"]
