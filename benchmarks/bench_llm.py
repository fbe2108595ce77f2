"""The decoder-LLM kernel features on the CPU, each against the same case
without the feature and against the reference math, interleaved in one
process (medians of alternating rounds):

- sliding window 512 at T = S = 8192, H 128, N 4, forward + backward,
  float32 and bfloat16: the fused op with the window vs the fused op with
  full causal attention (the band is about 1/7 of the causal tiles) vs the
  reference math with the dense window mask (what a Keras model computes);
- logit soft-capping (cap 50) at T = 2048, forward + backward: its overhead
  over the same call without a cap;
- the RMS norms with the residual add on [8192, 4096] float32 (layer_norm(
  rms_scaling=True), Keras' math, and rms_norm) vs Keras'
  LayerNormalization(rms_scaling=True)(x + r), forward and forward + backward.

Run:  pytest benchmarks/bench_llm.py --benchmark-json=llm.json
      pytest benchmarks/bench_llm.py -k window ...

The medians and ratios are in each benchmark's extra_info (and printed);
benchmarks/RESULTS.md has the measured figures.
"""

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
from interleaved import interleaved_medians  # noqa: E402
from tf_fastattn import reference  # noqa: E402

DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


def _fwd_bwd(forward, inputs, d_out):
    """A callable running the gradients of forward(*inputs) for d_out (a
    tf.function that returns one element of each gradient, so no large
    result is copied out)."""

    @tf.function
    def step(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = forward(*xs)
        return tf.stack([tf.cast(tf.reshape(g, [-1])[0], tf.float32)
                         for g in tape.gradient(y, xs, output_gradients=d_out)])

    return lambda: step(*inputs).numpy()


def _report(benchmark, medians, base):
    """Medians in ms, and each other implementation's time over `base`'s
    (> 1: base is faster by that factor)."""
    info = {f"{k}_ms": round(v * 1e3, 2) for k, v in medians.items()}
    info.update({f"{k}_over_{base}": round(medians[k] / medians[base], 3) for k in medians if k != base})
    benchmark.extra_info.update(info)
    print(info)


# ---- sliding window -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sliding_window_fwd_bwd(benchmark, dtype):
    B, T, N, H, W = 1, 8192, 4, 128, 512
    dt = DTYPES[dtype]
    q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H]), dt) for _ in range(4))

    def windowed(q, k, v):
        return tf_fastattn.dot_product_attention(q, k, v, is_causal=True, window=(W - 1, 0), implementation="fused")

    def causal(q, k, v):
        return tf_fastattn.dot_product_attention(q, k, v, is_causal=True, implementation="fused")

    def dense(q, k, v):  # the Keras models' math: dense T x S logits with the window mask
        return reference.attention(q, k, v, is_causal=True, window=(W - 1, 0))

    fns = {name: _fwd_bwd(f, (q, k, v), d_out) for name, f in
           (("window", windowed), ("causal", causal), ("reference_window", dense))}
    medians = interleaved_medians(benchmark, fns, rounds=3)
    _report(benchmark, medians, "window")


# ---- soft-capping ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H", [64, 256])
def test_soft_cap_overhead_fwd_bwd(benchmark, dtype, H):
    B, T, N = 1, 2048, 4
    dt = DTYPES[dtype]
    q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H]), dt) for _ in range(4))

    def capped(q, k, v):
        return tf_fastattn.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=50.0,
                                                 implementation="fused")

    def plain(q, k, v):
        return tf_fastattn.dot_product_attention(q, k, v, is_causal=True, implementation="fused")

    fns = {"capped": _fwd_bwd(capped, (q, k, v), d_out), "plain": _fwd_bwd(plain, (q, k, v), d_out)}
    medians = interleaved_medians(benchmark, fns, rounds=21 if H == 64 else 9)
    benchmark.extra_info["overhead_percent"] = round(100 * (medians["capped"] / medians["plain"] - 1), 1)
    _report(benchmark, medians, "plain")


# ---- rms_norm + residual -----------------------------------------------------------------

@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_rms_norm_residual(benchmark, direction):
    rows, cols = 8192, 4096
    x, r, dy = (tf.random.normal([rows, cols]) for _ in range(3))
    gamma = tf.Variable(tf.ones([cols]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling is deprecated in Keras
        keras_ln = keras.layers.LayerNormalization(rms_scaling=True, epsilon=1e-6)
        keras_ln.build((rows, cols))

    def fused(x, r):  # the same math as the Keras layer
        return tf_fastattn.layer_norm(x, gamma, residual=r, epsilon=1e-6, rms_scaling=True, implementation="fused")

    def rms(x, r):  # RMS norm proper (mean of squares)
        return tf_fastattn.rms_norm(x, gamma, residual=r, implementation="fused")

    def stock(x, r):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras_ln(x + r)

    impls = {"fused": fused, "fused_rms_norm": rms, "keras": stock}
    if direction == "fwd":
        fns = {}
        for name, f in impls.items():
            tf_f = tf.function(f)
            fns[name] = lambda tf_f=tf_f: tf_f(x, r)[0, 0].numpy()  # (the slice is taken in eager mode: y is computed whole)
    else:
        fns = {name: _fwd_bwd(f, (x, r), dy) for name, f in impls.items()}
    medians = interleaved_medians(benchmark, fns, rounds=11)
    _report(benchmark, medians, "fused")
