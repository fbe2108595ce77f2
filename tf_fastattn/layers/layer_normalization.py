"""Drop-in `keras.layers.LayerNormalization` backed by the fused op."""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_fastattn import _loader
from tf_fastattn.layer_norm import check_epsilon, layer_norm, rms_norm
from tf_fastattn.layers._fused_layer import FusedLayerMixin, SerializedImplementation


def _check_axes(layer, axis, input_shape, argument="axis"):
    """A clear error for axes outside a rank-len(input_shape) input (Keras'
    own is an IndexError from deep inside `build`)."""
    rank = len(input_shape)
    axes = [axis] if isinstance(axis, int) else list(axis)
    bad = [a for a in axes if isinstance(a, int) and not -rank <= a < rank]
    if bad:
        raise ValueError(f"{type(layer).__name__}: {argument}={axis} is out of range for an input of rank {rank} "
                         f"(shape {tuple(input_shape)}): expected axes in [{-rank}, {rank - 1}]")


def _epsilon_reason(layer):
    """Why the fused op cannot take the layer's epsilon (it takes finite
    numbers > 0; Keras' math takes any number), or None; TypeError for a
    non-number."""
    if layer.epsilon is None:
        return None
    try:
        check_epsilon(layer.epsilon, type(layer).__name__)
    except ValueError as e:
        return str(e)
    return None


def _last_axis_reason(axis, rank):
    """Why normalising over `axis` (an int or a list) of a rank-`rank` input
    is not fused (only the last axis is), or None."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    if rank is None or [a % rank for a in axes] != [rank - 1]:
        return f"axis={axis} is not the last axis of a rank-{rank} input"
    return None


class FusedLayerNormalizationMixin(FusedLayerMixin):
    """The fused path of `LayerNormalization` and its subclasses: overrides `call`.

    `call` also takes `[x, residual]` (the fused residual add) and returns
    `(y, x + residual)` when `return_residual` is set; only the public layer
    (and `convert_model`'s residual fusion) calls it so.
    """

    return_residual = False  # class default for layers switched after construction

    def _fused_axis_reason(self, rank):
        return _last_axis_reason(self.axis, rank) or _epsilon_reason(self)

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 2:
                raise ValueError(f"LayerNormalization expects x or [x, residual], got {len(inputs)} inputs")
            x, residual = inputs
        else:
            x, residual = inputs, None
        x = tf.convert_to_tensor(x)
        if residual is not None:
            residual = tf.cast(residual, x.dtype)
        rank = x.shape.rank
        unsupported = self._fused_axis_reason(rank)
        if _loader.use_fused("LayerNormalization", self.implementation, unsupported=unsupported,
                             gpu_variant=("layer_norm", x.dtype.name, None)):
            # rms_scaling (Keras' deprecated option): s / sqrt(var(s) + eps) *
            # gamma, no centring and no beta, as Keras computes it.
            y, s = layer_norm(
                x,
                self.gamma,
                None if self.rms_scaling else self.beta,
                residual=residual,
                epsilon=self.epsilon,
                center=self.center and not self.rms_scaling,
                scale=self.scale,
                return_residual=True,
                implementation="fused",
                rms_scaling=self.rms_scaling,
            )
        else:  # Keras' own math on the sum
            s = x if residual is None else x + residual
            y = super().call(s)
        y = tf.cast(y, self.compute_dtype)
        return (y, s) if self.return_residual else y


@keras.saving.register_keras_serializable(package="tf_fastattn")
class LayerNormalization(FusedLayerNormalizationMixin, SerializedImplementation, keras.layers.LayerNormalization):
    """Layer normalization with a fused residual add, same weights and config as Keras'.

    A subclass of `keras.layers.LayerNormalization` that keeps its class name,
    constructor, weights (`gamma`, `beta`) and config, so models and
    `.weights.h5` files written with the stock layer load unchanged. Over the
    last axis it runs the fused `TfFastattn>LayerNorm` op:

        s = x + residual            (when called on [x, residual])
        y = (s - mean(s)) / sqrt(var(s) + epsilon) * gamma + beta

    in one pass over memory with float32 statistics (`rms_scaling=True`:
    `y = s / sqrt(var(s) + epsilon) * gamma`, as Keras computes it). Other
    axes use Keras' own computation.

    Args:
      (every argument of `keras.layers.LayerNormalization`), plus
      return_residual: when True, `call` returns `(y, s)`: the normalized
        output and the sum, for pre-norm residual streams.
      implementation: "auto" (fused op when available, else the reference with
        a one-time warning), "fused" (raise if the op cannot run) or
        "reference".

    Call arguments:
      inputs: `x`, or `[x, residual]` with the same shape.

    Example:
      >>> from tf_fastattn.layers import LayerNormalization
      >>> ln = LayerNormalization(epsilon=1e-6)
      >>> y = ln([attention_output, x])   # LN(x + attention_output), fused
    """

    def __init__(self, *args, return_residual: bool = False, implementation: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_implementation(implementation)
        self.return_residual = return_residual

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        _check_axes(self, self.axis, input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        shape = super().compute_output_shape(input_shape)
        return (shape, shape) if self.return_residual else shape

    def compute_mask(self, inputs, mask=None):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        return (mask, mask) if self.return_residual else mask

    def get_config(self):
        config = super().get_config()
        config["return_residual"] = self.return_residual
        return config


class FusedRMSNormalizationMixin(FusedLayerMixin):
    """The fused path of `keras.layers.RMSNormalization` (over the last axis):
    `y = x / sqrt(mean(x^2) + epsilon) * scale` through `rms_norm`, in x's
    dtype with float32 statistics, as `keras.ops.rms_normalization`."""

    def _fused_axis_reason(self, rank):
        return _last_axis_reason(self.axis, rank) or _epsilon_reason(self)

    def call(self, x):
        x = tf.convert_to_tensor(x)
        unsupported = self._fused_axis_reason(x.shape.rank)
        if not _loader.use_fused("RMSNormalization", self.implementation, unsupported=unsupported,
                                 gpu_variant=("layer_norm", x.dtype.name, None)):
            return super().call(x)
        epsilon = self.epsilon if self.epsilon is not None else keras.config.epsilon()
        return rms_norm(x, self.scale, epsilon=epsilon, implementation="fused")
