"""Fused residual layer norm vs Keras' LayerNormalization(x + r), on the CPU.

Run: pytest benchmarks/bench_layer_norm.py --benchmark-json=ln.json
GB/s (bytes that must move / time) is recorded in extra_info.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
from tf_fastattn._timing import layer_norm_bytes  # noqa: E402

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
