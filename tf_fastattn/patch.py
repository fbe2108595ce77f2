"""`tf_fastattn.patch_keras`: every Keras attention and layer norm built from
now on runs the fused ops, without touching the code that builds the model."""

from __future__ import annotations

import functools
import inspect
import threading

from tf_fastattn import _loader, keras_ops

_lock = threading.Lock()
_originals: dict = {}  # stock class -> its own __init__ before patching
_implementation = ["auto"]


def _patched_init(stock, original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from tf_fastattn.layers import _switch

        # A subclass's __init__ reaches here through super().__init__: the
        # instance already has its final class. Subclasses with math of their
        # own (unfused_reason) and the tf_fastattn layers stay as they are.
        if stock in _originals and not _switch.is_fused(self) and _switch.unfused_reason(type(self)) is None:
            _switch.switch_to_fused(self, _implementation[0])

    # Keras reads a layer's constructor arguments with both
    # inspect.signature (which follows __wrapped__) and getfullargspec (which
    # does not): both must see the original's parameters.
    __init__.__signature__ = inspect.signature(original)
    return __init__


class _KerasPatch:
    """What `patch_keras` returns: as a context manager, it restores on exit
    the state that was there before the call."""

    def __init__(self, previous):
        self._previous = previous  # (was patched, implementation)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        was_patched, implementation = self._previous
        if was_patched:
            _implementation[0] = implementation
        else:
            unpatch_keras()
        return False


def patch_keras(*, implementation: str = "auto"):
    """Makes Keras build fused attention and layer norms from now on.

    After the call, every `keras.layers.MultiHeadAttention`,
    `keras.layers.GroupQueryAttention`, `keras.layers.LayerNormalization`,
    `keras.layers.RMSNormalization` and keras-hub decoder attention and RMS
    norm (Llama, Mistral, Mixtral, Phi-3, Qwen, Qwen3, SmolLM3, GPT-NeoX,
    Gemma: `tf_fastattn.layers.hub`) constructed - directly, by a subclass
    (keras-hub's `CachedMultiHeadAttention`, a custom layer's sublayers), by
    `from_config`, `keras.saving.load_model` or a keras-hub `from_preset` -
    is the fused version of its class (see `convert_model`; the same rules
    decide which subclasses are left as they are), and
    `keras.ops.dot_product_attention` runs the fused op (with Keras'
    arguments: `tf_fastattn.keras_ops`). Nothing else changes: class names,
    configs, weights and saved files are those of the stock layers. Layers
    built before the call are not touched: use `convert_model` for those.

    Args:
      implementation: given to each fused layer ("auto", "fused", "reference").

    Returns:
      A context manager: `with tf_fastattn.patch_keras(): ...` patches inside
      the block only. Called plainly, the patch stays until `unpatch_keras()`.

    Example:
      >>> tf_fastattn.patch_keras()
      >>> model = keras_hub.models.BertTextClassifier(backbone, num_classes=2)
      >>> # or, for one block:
      >>> with tf_fastattn.patch_keras():
      ...     model = keras.saving.load_model("model.keras")
    """
    _loader.check_implementation(implementation)
    from tf_fastattn.layers import _switch

    with _lock:
        previous = (bool(_originals), _implementation[0])
        _implementation[0] = implementation
        for stock in _switch.all_mixins(import_hub=True):
            if stock not in _originals:
                original = stock.__dict__["__init__"]
                _originals[stock] = original
                stock.__init__ = _patched_init(stock, original)
        keras_ops.patch()
    return _KerasPatch(previous)


def unpatch_keras() -> None:
    """Undoes `patch_keras`: layers built afterwards are Keras' own again.
    Layers built while patched stay fused."""
    with _lock:
        for stock, original in _originals.items():
            stock.__init__ = original
        _originals.clear()
        _implementation[0] = "auto"
        keras_ops.unpatch()


def is_patched() -> bool:
    """Whether `patch_keras` is in effect."""
    return bool(_originals)
