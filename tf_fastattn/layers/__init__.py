"""Keras layers that replace the stock ones by changing one import."""

from tf_fastattn.layers.layer_normalization import LayerNormalization

__all__ = ["LayerNormalization"]
