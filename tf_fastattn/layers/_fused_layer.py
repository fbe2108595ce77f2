"""What the fused Keras layers share: the serialised `implementation` choice
and opting out of XLA while the fused op can run."""

from __future__ import annotations

from tf_fastattn import _loader


class FusedLayerMixin:
    """Mixed into each fused layer before its Keras base class."""

    def _init_implementation(self, implementation: str) -> None:
        _loader.check_implementation(implementation)
        self.implementation = implementation
        # Keras turns on XLA for jit_compile="auto" when a GPU is present (and
        # honours jit_compile=True only if every layer supports it); XLA cannot
        # run custom ops, so the layer opts out while the op can run.
        self.supports_jit = implementation == "reference" or _loader.unavailable_reason() is not None

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}
