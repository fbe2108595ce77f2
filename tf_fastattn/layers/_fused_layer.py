"""What the fused Keras layers share: the `implementation` choice and whether
Keras may compile them with XLA (yes, when the ops' XLA kernels loaded).

The fused behaviour of each layer lives in a mixin (`FusedMultiHeadAttentionMixin`,
...) that overrides only the methods doing the math. The public layers
(`tf_fastattn.layers.MultiHeadAttention`, ...) put a mixin in front of the
Keras class and add `implementation` to the constructor and config;
`convert_model` and `patch_keras` put the same mixin in front of an existing
layer's own class (`tf_fastattn.layers.fused_class`), which keeps its config.
"""

from __future__ import annotations

from tf_fastattn import _loader


class FusedLayerMixin:
    """Mixed in before a Keras attention or layer-norm class."""

    # Class default, so a layer whose class was switched after construction
    # (no `__init__` of ours ran) reads "auto".
    implementation = "auto"

    def _init_implementation(self, implementation: str) -> None:
        _loader.check_implementation(implementation)
        self.implementation = implementation
        # Keras turns on XLA for jit_compile="auto" when a GPU is present (and
        # honours jit_compile=True only if every layer supports it). Under XLA
        # the fused ops run as custom calls when their XLA kernels loaded;
        # otherwise the layer opts out of XLA while the op can run.
        self.supports_jit = (implementation == "reference" or _loader.unavailable_reason() is not None
                             or _loader.xla_reason() is None)


class SerializedImplementation:
    """The public layers' `implementation` constructor argument, kept in the config."""

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}
