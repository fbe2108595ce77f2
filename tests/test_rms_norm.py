"""RMS normalization with the fused residual add (`tf_fastattn.rms_norm`) and
Keras' `LayerNormalization(rms_scaling=True)` math (`layer_norm(...,
rms_scaling=True)`), against the layers whose math they replace: keras-hub's
LlamaLayerNorm and Gemma's RMSNormalization (which scales by 1 + scale),
Keras' RMSNormalization and LayerNormalization(rms_scaling=True). The layer
run in the input's dtype is the criterion's naive baseline; the float64
reference is tests/numpy_reference.py's, and the layer in float32 agrees with
it to float32 rounding (the same formula, epsilon inside the root). Outputs
and the gradients of x, residual and the scale, in all four dtypes, C = 1,
71 and 4096; under XLA bitwise as without.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
from numpy_reference import layer_norm_bwd, layer_norm_fwd
from tf_fastattn import _loader
from tfa_helpers import DTYPES, assert_close_to_reference, random_tensor, requires_ops

pytestmark = [requires_ops, pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")]


def _llama(eps):
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm

    return LlamaLayerNorm(epsilon=eps)


def _gemma(eps):
    from keras_hub.src.models.gemma.rms_normalization import RMSNormalization

    return RMSNormalization(epsilon=eps)


def _keras_rms(eps):
    return keras.layers.RMSNormalization(epsilon=eps)


def _keras_rms_scaling(eps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that rms_scaling is deprecated
        return keras.layers.LayerNormalization(epsilon=eps, rms_scaling=True)


# name: (layer factory, the fused call, the numpy reference's norm, gamma from
# the layer's weight w).
LAYERS = {
    "llama": (_llama, "rms", lambda w: w),
    "gemma": (_gemma, "rms", lambda w: 1.0 + w),
    "keras_rms": (_keras_rms, "rms", lambda w: w),
    "keras_rms_scaling": (_keras_rms_scaling, "rms_scaling", lambda w: w),
}


def _fused(norm, x, gamma, residual, eps):
    if norm == "rms":
        return tf_fastattn.rms_norm(x, gamma, residual=residual, epsilon=eps, implementation="fused",
                                    return_residual=True)
    return tf_fastattn.layer_norm(x, gamma, residual=residual, epsilon=eps, rms_scaling=True, implementation="fused",
                                  return_residual=True)


def _weight(layer):
    return layer.scale if hasattr(layer, "scale") and isinstance(layer.scale, keras.Variable) else layer.gamma


@pytest.mark.parametrize("cols", [1, 71, 4096])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_the_layer(name, dtype, cols):
    factory, norm, gamma_of = LAYERS[name]
    dt = DTYPES[dtype]
    eps = 1e-6
    rng = np.random.default_rng(cols)
    shape = (3, 5, cols)
    x, r, dy, ds = (random_tensor(rng, shape, dt) for _ in range(4))
    x = x * 2 + tf.cast(0.5, dt)
    layer = factory(eps)
    layer.build(shape)
    w = _weight(layer)
    w.assign(tf.constant(rng.random(cols) * 0.5 + 0.5, w.dtype))  # not ones (or zeros for Gemma)

    # Fused: y and s = x + r, gradients through both (s is a result too).
    with tf.GradientTape() as tape:
        tape.watch([x, r, w.value])
        y, s = _fused(norm, x, gamma_of(w.value), r, eps)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(dy, tf.float64)) + tf.reduce_sum(
            tf.cast(s, tf.float64) * tf.cast(ds, tf.float64))
    fused = [y, *tape.gradient(loss, [x, r, w.value])]

    # The layer in the input dtype (what the model runs: the naive baseline).
    layer_dt = factory(eps)
    layer_dt.build(shape)
    _weight(layer_dt).assign(w.value)
    with tf.GradientTape() as tape:
        tape.watch([x, r, _weight(layer_dt).value])
        s_dt = x + r
        y_dt = tf.cast(layer_dt(s_dt), dt)
        loss = tf.reduce_sum(tf.cast(y_dt, tf.float64) * tf.cast(dy, tf.float64)) + tf.reduce_sum(
            tf.cast(s_dt, tf.float64) * tf.cast(ds, tf.float64))
    naive = [y_dt, *tape.gradient(loss, [x, r, _weight(layer_dt).value])]

    # Float64 reference (the same formula).
    f64 = lambda t: np.asarray(tf.cast(t, tf.float64))  # noqa: E731
    g64 = f64(gamma_of(w.value))
    s64 = f64(tf.cast(f64(x) + f64(r), dt))  # the sum is rounded to x's dtype, as in every implementation
    ref_y = layer_norm_fwd(s64, np.zeros_like(s64), g64, 0.0, eps, norm)[0]
    ref_dx, ref_dg, _ = layer_norm_bwd(s64, f64(dy), f64(ds), g64, eps, norm)
    ref = [ref_y, ref_dx, ref_dx, ref_dg]
    # dgamma of Gemma's scale is dgamma of 1 + scale.
    param_dt = w.dtype
    for label, f, n, rr, d in zip(("y", "dx", "dresidual", "dscale"), fused, naive, ref, (dt, dt, dt, param_dt)):
        assert_close_to_reference(f, n, rr, d, f"{name} {dtype} C={cols} {label}")
    if dtype == "float32":
        # The layer computes the reference's formula: in float32 it is within
        # float32 rounding of it.
        err = np.abs(f64(naive[0]) - ref_y).max() / max(1.0, np.abs(ref_y).max())
        assert err < 2e-6, f"{name}: the layer's formula differs from the reference's ({err:.2g})"


def test_rms_norm_without_residual_and_without_scale():
    rng = np.random.default_rng(0)
    x = random_tensor(rng, (4, 33), tf.float32)
    g = random_tensor(rng, (33,), tf.float32)
    for kw in (dict(), dict(scale=False)):
        gamma = None if kw else g
        fused = tf_fastattn.rms_norm(x, gamma, implementation="fused", **kw)
        ref = tf_fastattn.rms_norm(x, gamma, implementation="reference", **kw)
        np.testing.assert_allclose(fused.numpy(), ref.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(epsilon=0.0), "rms_norm: epsilon must be a finite number > 0"),
    (dict(gamma=tf.ones([5])), r"rms_norm: gamma must have shape \[4\]"),
    (dict(residual=tf.ones([3, 4], tf.float16)), "rms_norm: residual must have the dtype of x"),
    (dict(gamma=None), "rms_norm: gamma is required when scale=True"),
])
def test_bad_arguments_name_them(kw, match):
    args = dict(gamma=tf.ones([4]))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        tf_fastattn.rms_norm(tf.ones([3, 4]), **args)


def test_op_refuses_beta_with_an_rms_kind():
    with pytest.raises(tf.errors.InvalidArgumentError, match="takes no beta: center must be false"):
        _loader.ops().tf_fastattn_layer_norm(x=tf.ones([2, 4]), residual=[], gamma=tf.ones([4]), beta=tf.zeros([4]),
                                             center=True, norm="rms")


@pytest.mark.skipif(_loader.xla_reason() is not None, reason=f"XLA kernels not loaded: {_loader.xla_reason()}")
@pytest.mark.parametrize("norm", ["rms", "rms_scaling"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_bitwise_under_xla(dtype, norm):
    rng = np.random.default_rng(1)
    dt = DTYPES[dtype]
    x, r, dy = (random_tensor(rng, (6, 96), dt) for _ in range(3))
    g = random_tensor(rng, (96,), tf.float32) + 1

    def f(x, r, g):
        with tf.GradientTape() as tape:
            tape.watch([x, r, g])
            y, s = _fused(norm, x, g, r, 1e-6)
            loss = tf.reduce_sum(tf.cast(y * dy, tf.float64)) + tf.reduce_sum(tf.cast(s, tf.float64))
        return (y, s, *tape.gradient(loss, [x, r, g]))

    eager = f(x, r, g)
    jit = tf.function(f, jit_compile=True)
    for label, a, b in zip(("y", "s", "dx", "dr", "dg"), eager, jit(x, r, g)):
        assert np.array_equal(np.asarray(tf.cast(a, tf.float64)), np.asarray(tf.cast(b, tf.float64))), label
    assert 'custom_call_target="tf_fastattn_layer_norm_fwd"' in jit.experimental_get_compiler_ir(x, r, g)(stage="hlo")
