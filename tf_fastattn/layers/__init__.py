"""Keras layers that replace the stock ones by changing one import, and the
fused classes `convert_model` and `patch_keras` switch existing layers to."""

from tf_fastattn.layers._switch import fused_class, is_fused
from tf_fastattn.layers.grouped_query_attention import GroupedQueryAttention
from tf_fastattn.layers.layer_normalization import LayerNormalization
from tf_fastattn.layers.multi_head_attention import MultiHeadAttention

GroupQueryAttention = GroupedQueryAttention  # Keras exports the class under both names

__all__ = [
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "LayerNormalization",
    "MultiHeadAttention",
    "fused_class",
    "is_fused",
]
