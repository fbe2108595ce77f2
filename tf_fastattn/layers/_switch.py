"""Turning an existing Keras attention or layer-norm instance into a fused one.

`convert_model` and `patch_keras` do not clone layers: they switch the class
of each instance to `fused_class(type(layer))`, a subclass of the layer's own
class with the fused mixin in front. Weights, variables (tied or shared),
seed generators, config, name and every attribute stay the same objects, and
a subclass (keras-hub's `CachedMultiHeadAttention`) keeps its own methods.

A fused class serialises exactly as the class it was made from (same module,
class name and registered name), so a `.keras` file or config written from a
converted model is the one the original model would write, and loads with or
without tf_fastattn.
"""

from __future__ import annotations

import threading

import keras

from tf_fastattn.layers._fused_layer import FusedLayerMixin
from tf_fastattn.layers.grouped_query_attention import FusedGroupedQueryAttentionMixin
from tf_fastattn.layers.layer_normalization import FusedLayerNormalizationMixin, FusedRMSNormalizationMixin
from tf_fastattn.layers.multi_head_attention import FusedMultiHeadAttentionMixin

# The Keras classes with a fused twin, and the mixin that makes it.
MIXINS = {
    keras.layers.MultiHeadAttention: FusedMultiHeadAttentionMixin,
    keras.layers.GroupQueryAttention: FusedGroupedQueryAttentionMixin,
    keras.layers.LayerNormalization: FusedLayerNormalizationMixin,
    keras.layers.RMSNormalization: FusedRMSNormalizationMixin,
}

_lock = threading.Lock()
_fused_classes: dict = {}  # original class -> its fused class


def all_mixins(import_hub: bool = False) -> dict:
    """`MIXINS` and the keras-hub decoder layers' (`tf_fastattn.layers.hub`):
    those when keras-hub is imported, or with `import_hub`."""
    from tf_fastattn.layers import hub

    return {**MIXINS, **hub.mixins(import_hub)}


def stock_class(cls):
    """The class among `all_mixins()` that `cls` derives from (the nearest), or None."""
    table = all_mixins()
    for klass in cls.__mro__:
        if klass in table:
            return klass
    return None


def is_fused(layer) -> bool:
    """Whether `layer` runs the fused ops (a tf_fastattn layer or a converted one)."""
    return isinstance(layer, FusedLayerMixin)


def _mixin_attributes(mixin):
    """Names the mixin defines (its methods and class defaults), which it would shadow."""
    names = set()
    for klass in mixin.__mro__:
        if klass is object:
            continue
        names.update(name for name in vars(klass) if not name.startswith("__"))
    return names


def unfused_reason(cls) -> str | None:
    """Why instances of `cls` cannot be switched to a fused class, or None.

    A subclass that overrides a method the fused path replaces (its own
    `_compute_attention`, its own `LayerNormalization.call`) has math of its
    own: it is left as it is.
    """
    stock = stock_class(cls)
    if stock is None:
        return f"{cls.__name__} has no fused counterpart"
    if issubclass(cls, FusedLayerMixin):
        return None
    for name in sorted(_mixin_attributes(all_mixins()[stock])):
        if getattr(cls, name, None) is not getattr(stock, name, None):
            return f"{cls.__name__} overrides {stock.__name__}.{name}; its own computation is kept"
    return None


def fused_class(cls):
    """The fused subclass of `cls` (a Keras attention or layer-norm class or a subclass).

    Made once per class: `class <same name>(Fused<Kind>Mixin, cls)`, serialised
    as `cls`. Raises ValueError when `unfused_reason(cls)` says it cannot be.
    """
    if issubclass(cls, FusedLayerMixin):
        return cls
    reason = unfused_reason(cls)
    if reason is not None:
        raise ValueError(f"tf_fastattn: no fused version of {cls.__module__}.{cls.__qualname__}: {reason}")
    with _lock:
        fused = _fused_classes.get(cls)
        if fused is None:
            mixin = all_mixins()[stock_class(cls)]
            fused = type(
                cls.__name__,
                (mixin, cls),
                {
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__,
                    "_tfa_original_class": cls,
                },
            )
            _serialize_as(fused, cls)
            _fused_classes[cls] = fused
    return fused


def original_class(cls):
    """The class a fused class was made from (the class itself otherwise)."""
    return getattr(cls, "_tfa_original_class", cls)


def _serialize_as(fused, cls):
    # Keras names an object in configs by its exported API name (built-in
    # classes) or its registered name (keras-hub and custom classes), looked
    # up by class. Giving the fused class the original's entries keeps saved
    # files identical to the original model's.
    from keras.src import api_export
    from keras.src.saving import object_registration

    api_name = api_export.get_name_from_symbol(cls)
    if api_name is not None:
        api_export.REGISTERED_OBJS_TO_NAMES[fused] = api_name
    registered = object_registration.GLOBAL_CUSTOM_NAMES.get(cls)
    if registered is not None:
        object_registration.GLOBAL_CUSTOM_NAMES[fused] = registered


def switch_to_fused(layer, implementation: str = "auto") -> None:
    """Makes `layer` (an instance) run the fused ops, in place."""
    layer.__class__ = fused_class(type(layer))
    layer._init_implementation(implementation)
