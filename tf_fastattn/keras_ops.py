"""`keras.ops.dot_product_attention` on the fused op (TensorFlow backend).

`patch_keras()` puts `dot_product_attention` below in place of Keras' own,
at the ops level (`keras.ops.dot_product_attention` and its aliases) and in
the TensorFlow backend (which the symbolic op of functional models calls),
so code that calls the Keras function - custom layers, keras-hub layers on
their fused path - runs the fused op. `unpatch_keras()` restores Keras'.
"""

from __future__ import annotations

import numbers
import sys

import tensorflow as tf

from tf_fastattn import _loader, reference
from tf_fastattn.attention import dot_product_attention as _fused

_originals: dict = {}  # (module, attribute) -> the original function


def dot_product_attention(query, key, value, bias=None, mask=None, scale=None, is_causal=False,
                          flash_attention=None, attn_logits_soft_cap=None):
    """Keras' `dot_product_attention` with every argument in Keras' meaning,
    computed by the fused op (`tf_fastattn.dot_product_attention`).

    - `mask` (True = attend, broadcastable to `[B, N, T, S]`), `scale`
      (default `1 / sqrt(H)`), `is_causal` (top-left aligned) and grouped-
      or multi-query heads as Keras; a row with no allowed key averages the
      values uniformly, as Keras' large-negative fill does.
    - `attn_logits_soft_cap=cap`: logits become `cap * tanh(logits / cap)`
      (what Keras' TPU kernels compute and Gemma 2 trains with; Keras' own
      TensorFlow backend refuses the argument).
    - `flash_attention=True` is accepted when the fused op can run; otherwise
      `ValueError` says why. `None`/`False` run the fused op when it can, and
      Keras' math otherwise.
    - `bias` (added to the scaled logits) runs the reference math, which takes
      it (before the soft-cap); with `flash_attention=True` it is an error.
    """
    implementation = "fused" if flash_attention else "auto"
    cap = attn_logits_soft_cap
    if bias is not None:
        if flash_attention:
            raise ValueError("dot_product_attention: flash_attention=True is not possible with a bias: the fused "
                             "op takes no additive bias (pass a boolean mask, or flash_attention=None)")
        query, key, value = (tf.convert_to_tensor(t) for t in (query, key, value))
        return reference.attention(query, key, value, mask=mask, scale=_static_scale(scale), is_causal=is_causal,
                                   logits_soft_cap=cap, bias=bias)
    if scale is not None and not isinstance(scale, numbers.Real) and tf.get_static_value(scale) is None:
        if flash_attention:
            raise ValueError("dot_product_attention: flash_attention=True needs a constant scale (the fused op "
                             f"takes it as an attribute), got {scale!r}")
        return _original("backend")(query, key, value, mask=mask, scale=scale, is_causal=is_causal,
                                    attn_logits_soft_cap=cap)
    return _fused(query, key, value, mask=mask, scale=scale, is_causal=is_causal, logits_soft_cap=cap,
                  implementation=implementation)


def _static_scale(scale):
    if scale is None or isinstance(scale, numbers.Real):
        return scale
    static = tf.get_static_value(scale)
    return float(static) if static is not None else scale


def _ops_dot_product_attention(query, key, value, bias=None, mask=None, scale=None, is_causal=False,
                               flash_attention=None, attn_logits_soft_cap=None):
    """The ops-level function: Keras' symbolic op for KerasTensors (it calls
    the patched backend function when the model runs), the fused call
    otherwise. Keras' own checks of `attn_logits_soft_cap` (JAX on TPU
    only) are not applied: the fused op supports it."""
    from keras.src.backend import any_symbolic_tensors
    from keras.src.ops.nn import DotProductAttention

    if any_symbolic_tensors((query, key, value)):
        return DotProductAttention(is_causal=is_causal, flash_attention=flash_attention,
                                   attn_logits_soft_cap=attn_logits_soft_cap).symbolic_call(
            query, key, value, bias=bias, mask=mask, scale=scale)
    return dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                 flash_attention=flash_attention, attn_logits_soft_cap=attn_logits_soft_cap)


def _original(kind):
    for (module, _), fn in _originals.items():
        if (kind == "backend") == module.__name__.startswith("keras.src.backend"):
            return fn
    raise RuntimeError("keras.ops.dot_product_attention is not patched")


def patch() -> None:
    """Replaces Keras' dot_product_attention (TensorFlow backend only)."""
    import keras
    from keras.src.backend.tensorflow import nn as tf_nn
    from keras.src.ops import nn as ops_nn

    if _originals or keras.backend.backend() != "tensorflow":
        return
    ops_fn, backend_fn = ops_nn.dot_product_attention, tf_nn.dot_product_attention
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "keras" or name.startswith("keras.")):
            continue
        if getattr(module, "dot_product_attention", None) is ops_fn:
            _originals[(module, "dot_product_attention")] = ops_fn
            module.dot_product_attention = _ops_dot_product_attention
    _originals[(tf_nn, "dot_product_attention")] = backend_fn
    tf_nn.dot_product_attention = dot_product_attention


def unpatch() -> None:
    for (module, attribute), fn in _originals.items():
        setattr(module, attribute, fn)
    _originals.clear()


def is_patched() -> bool:
    return bool(_originals)


__all__ = ["dot_product_attention", "patch", "unpatch"]
_ = _loader  # (the fused call decides fused or not through tf_fastattn.attention)
