"""Keras layers that replace the stock ones by changing one import."""

from tf_fastattn.layers.layer_normalization import LayerNormalization
from tf_fastattn.layers.multi_head_attention import MultiHeadAttention

__all__ = ["LayerNormalization", "MultiHeadAttention"]
