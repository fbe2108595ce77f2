"""Fused residual-add + layer normalization and RMS normalization:
`tf_fastattn.layer_norm`, `tf_fastattn.rms_norm`."""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

from tf_fastattn import _loader, reference
from tf_fastattn.attention import dense_tensor

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def _shape_str(t) -> str:
    return str(t.shape.as_list()) if t.shape.rank is not None else "<unknown rank>"


def check_epsilon(epsilon, op: str) -> None:
    """The fused norms' epsilon: a TypeError for a non-number, a ValueError for
    a number that is not finite and > 0 (both naming `op` and epsilon)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"{op}: epsilon must be a number > 0, got {type(epsilon).__name__} {epsilon!r}")
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"{op}: epsilon must be a finite number > 0, got {epsilon}")


def _validate(x, gamma, beta, residual, epsilon, center, scale, op="layer_norm"):
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype.name}")
    if x.shape.rank == 0:
        raise ValueError(f"{op}: x must have rank >= 1, got a scalar (shape [])")
    check_epsilon(epsilon, op)
    cols = x.shape[-1] if x.shape.rank else None
    for name, p, used in (("gamma", gamma, scale), ("beta", beta, center)):
        if not used:
            continue
        if p is None:
            raise ValueError(f"{op}: {name} is required when {'scale' if name == 'gamma' else 'center'}=True")
        if p.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating dtype, got {p.dtype.name}")
        if p.shape.rank is not None and (p.shape.rank != 1 or (cols is not None and p.shape[0] not in (None, cols))):
            raise ValueError(f"{op}: {name} must have shape [{cols}] (the last axis of x), got {_shape_str(p)}")
    if residual is not None:
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual must have the dtype of x ({x.dtype.name}), got {residual.dtype.name}")
        if not x.shape.is_compatible_with(residual.shape):
            raise ValueError(f"{op}: residual must have the shape of x {_shape_str(x)}, got {_shape_str(residual)}")


def layer_norm(
    x,
    gamma=None,
    beta=None,
    *,
    residual=None,
    epsilon: float = 1e-3,
    center: bool = True,
    scale: bool = True,
    return_residual: bool = False,
    implementation: str = "auto",
    rms_scaling: bool = False,
):
    """Layer normalization over the last axis, with an optional fused residual add.

    With `s = x + residual` (or `s = x`):

        y = (s - mean(s)) / sqrt(var(s) + epsilon) * gamma + beta

    computed in one pass over memory, statistics in float32 (float64 for
    float64 inputs), exactly as `keras.layers.LayerNormalization()(x + residual)`.

    Args:
      x: `[..., C]` float16, bfloat16, float32 or float64 tensor.
      gamma: `[C]` scale (float32 or x's dtype); required when `scale`.
      beta: `[C]` offset (float32 or x's dtype); required when `center`.
      residual: optional tensor of x's shape and dtype, added before normalizing.
      epsilon: added to the variance, > 0. Keras' default is 1e-3.
      center, scale: whether beta / gamma are applied.
      return_residual: also return `s` (what a pre-norm residual stream carries on).
      implementation: "auto" (fused op when available, else the reference with
        a one-time warning), "fused" (raise ValueError if the op cannot run) or
        "reference" (pure TensorFlow).
      rms_scaling: Keras' deprecated `LayerNormalization(rms_scaling=True)`:
        `y = s / sqrt(var(s) + epsilon) * gamma`, s not centred and no beta
        (beta and `center` are ignored, as Keras does). For RMS norm proper
        (mean of squares) use `tf_fastattn.rms_norm`.

    Returns:
      `y` of x's shape and dtype, or `(y, s)` when `return_residual`.

    Example:
      >>> y, s = tf_fastattn.layer_norm(x, gamma, beta, residual=h, return_residual=True)
    """
    _loader.check_implementation(implementation)
    if rms_scaling:
        center = False
    x = dense_tensor(x, "x", "layer_norm")
    residual = None if residual is None else dense_tensor(residual, "residual", "layer_norm")
    gamma = None if gamma is None or not scale else tf.convert_to_tensor(gamma)
    beta = None if beta is None or not center else tf.convert_to_tensor(beta)
    _validate(x, gamma, beta, residual, epsilon, center, scale)

    if _loader.use_fused("layer_norm", implementation, gpu_variant=("layer_norm", x.dtype.name, None)):
        y, s = _fused(x, gamma, beta, residual, epsilon, center, scale, "rms_scaling" if rms_scaling else "layer")
    else:
        y, s = reference.layer_norm(x, gamma, beta, residual=residual, epsilon=epsilon, rms_scaling=rms_scaling)
    return (y, s) if return_residual else y


def rms_norm(
    x,
    gamma=None,
    *,
    residual=None,
    epsilon: float = 1e-6,
    scale: bool = True,
    return_residual: bool = False,
    implementation: str = "auto",
):
    """RMS normalization over the last axis, with an optional fused residual add.

    With `s = x + residual` (or `s = x`):

        y = s / sqrt(mean(s^2) + epsilon) * gamma

    in one pass over memory, statistics in float32 (float64 for float64
    inputs); gradients reach x, residual, gamma and whatever reaches `s`.
    The layers it serves, exactly (same formula, epsilon inside the root):
    keras-hub's `LlamaLayerNorm` (Llama, Mistral, Mixtral, Phi-3, Qwen) and
    Keras' `RMSNormalization`: `rms_norm(x, scale)`; Gemma's
    `RMSNormalization`, which scales by `1 + scale`: `rms_norm(x, 1 + scale)`
    (the sum formed in float32, as Gemma does). Keras'
    `LayerNormalization(rms_scaling=True)` divides by the variance instead:
    `layer_norm(..., rms_scaling=True)`.

    Args:
      x: `[..., C]` float16, bfloat16, float32 or float64 tensor.
      gamma: `[C]` scale (float32 or x's dtype); required when `scale`.
      residual: optional tensor of x's shape and dtype, added before normalizing.
      epsilon: added to the mean of squares, > 0 (keras-hub's default 1e-6).
      scale: whether gamma is applied.
      return_residual: also return `s`.
      implementation: "auto", "fused" or "reference", as `layer_norm`.

    Returns:
      `y` of x's shape and dtype, or `(y, s)` when `return_residual`.

    Example:
      >>> y, h = tf_fastattn.rms_norm(attn_out, gamma, residual=h, return_residual=True)
    """
    _loader.check_implementation(implementation)
    x = dense_tensor(x, "x", "rms_norm")
    residual = None if residual is None else dense_tensor(residual, "residual", "rms_norm")
    gamma = None if gamma is None or not scale else tf.convert_to_tensor(gamma)
    _validate(x, gamma, None, residual, epsilon, False, scale, op="rms_norm")

    if _loader.use_fused("rms_norm", implementation, gpu_variant=("layer_norm", x.dtype.name, None)):
        y, s = _fused(x, gamma, None, residual, epsilon, False, scale, "rms")
    else:
        y, s = reference.rms_norm(x, gamma, residual=residual, epsilon=epsilon)
    return (y, s) if return_residual else y


def _param_dtype(x, gamma, beta):
    # The op takes float32 parameters or parameters in x's dtype; anything else
    # (float16 gamma with float32 x, say) is cast to float32.
    p = gamma if gamma is not None else beta
    if p is None:
        return tf.float32
    return p.dtype if p.dtype in (tf.float32, x.dtype) else tf.float32


def _fused(x, gamma, beta, residual, epsilon, center, scale, norm="layer"):
    u = _param_dtype(x, gamma, beta)
    empty = tf.zeros([0], dtype=u)
    g = tf.cast(gamma, u) if scale else empty
    b = tf.cast(beta, u) if center else empty
    y, s, _, _ = _loader.ops().tf_fastattn_layer_norm(
        x=x,
        residual=[] if residual is None else [residual],
        gamma=g,
        beta=b,
        S=reference.compute_dtype(x.dtype),
        epsilon=float(epsilon),
        epsilon_bits=_loader.float64_bits(epsilon),
        center=center,
        scale=scale,
        norm=norm,
    )
    return y, s


@tf.RegisterGradient("TfFastattn>LayerNorm")
def _layer_norm_grad(op, dy, dsum, _dmean, _drstd):
    # mean and rstd are saved statistics, not differentiable outputs.
    num_residual = op.get_attr("num_residual")
    center, scale = op.get_attr("center"), op.get_attr("scale")
    y, s, mean, rstd = op.outputs
    gamma = op.inputs[1 + num_residual]
    if dy is None:
        dy = tf.zeros_like(y)
    dx, dgamma, dbeta = _loader.ops().tf_fastattn_layer_norm_grad(
        dy=dy,
        sum=s,
        mean=mean,
        rstd=rstd,
        gamma=gamma,
        dsum=[] if dsum is None else [dsum],
        center=center,
        scale=scale,
        norm=op.get_attr("norm"),
    )
    return [dx] + [dx] * num_residual + [dgamma if scale else None, dbeta if center else None]
