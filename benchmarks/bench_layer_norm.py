"""Fused residual layer norm vs Keras' LayerNormalization(x + r), on the CPU.

Run: pytest benchmarks/bench_layer_norm.py --benchmark-json=ln.json
GB/s (bytes that must move / time) is recorded in extra_info.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
from tf_fastattn._timing import layer_norm_bytes  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import numpy_reference  # noqa: E402

SHAPES = [(1024, 768), (8192, 1024), (16384, 4096)]
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


def make_fns(impl, rows, cols, dtype):
    x = tf.cast(tf.random.normal([rows, cols]), dtype)
    r = tf.cast(tf.random.normal([rows, cols]), dtype)
    dy = tf.cast(tf.random.normal([rows, cols]), dtype)
    gamma = tf.Variable(tf.random.normal([cols]) + 1.0)
    beta = tf.Variable(tf.random.normal([cols]))
    if impl == "keras":
        layer = keras.layers.LayerNormalization(dtype=keras.DTypePolicy(f"mixed_{dtype.name}") if dtype != tf.float32 else None)
        layer.build((None, cols))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

        def forward(x, r):
            return layer(x + r)

        params = layer.trainable_variables
    else:

        def forward(x, r):
            return tf_fastattn.layer_norm(x, gamma, beta, residual=r, implementation="fused")

        params = [gamma, beta]

    fwd = tf.function(forward)

    @tf.function
    def fwd_bwd(x, r):
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y = forward(x, r)
        return tape.gradient(y, [x, r] + params, output_gradients=dy)

    return (lambda: fwd(x, r)[0, 0].numpy()), (lambda: fwd_bwd(x, r)[0][0, 0].numpy())


@pytest.mark.parametrize("dtype", DTYPES.keys())
def test_benchmarked_op_meets_the_criterion(dtype):
    """What is timed is right: the fused residual layer norm (1024 x 768),
    forward and gradients, against the float64 NumPy reference by the accuracy
    criterion every test tier uses."""
    rows, cols, eps = 1024, 768, 1e-3
    x, r, dy = (tf.cast(tf.random.normal([rows, cols], seed=i), DTYPES[dtype]) for i in range(3))
    gamma, beta = tf.random.normal([cols], seed=3) + 1.0, tf.random.normal([cols], seed=4)
    with tf.GradientTape() as tape:
        tape.watch([x, r, gamma, beta])
        y, s = tf_fastattn.layer_norm(x, gamma, beta, residual=r, epsilon=eps, return_residual=True,
                                      implementation="fused")
    dx, dr, dgamma, dbeta = tape.gradient(y, [x, r, gamma, beta], output_gradients=dy)
    assert (dx.numpy() == dr.numpy()).all()
    f32 = lambda t: t.numpy().astype("float32")  # noqa: E731
    # (mean and rstd stay inside the op: not checked here.)
    numpy_reference.check_layer_norm(dtype, "float32", f32(x), f32(r), f32(gamma), f32(beta), eps, f32(y), f32(s),
                                     None, None, f32(dy), None, f32(dx), f32(dgamma), f32(dbeta))


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "keras"])
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm(benchmark, shape, dtype, impl, direction):
    rows, cols = shape
    fwd, fwd_bwd = make_fns(impl, rows, cols, DTYPES[dtype])
    fn = fwd if direction == "fwd" else fwd_bwd
    fn()  # trace
    benchmark.group = f"layer_norm {direction} {dtype} {rows}x{cols}"
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=2)
    nbytes = layer_norm_bytes(rows, cols, DTYPES[dtype].size, backward=direction == "fwd_bwd")
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["bytes"] = nbytes
