"""Fused attention vs Keras on the CPU: the op vs keras.ops.dot_product_attention,
and tf_fastattn.layers.MultiHeadAttention vs keras.layers.MultiHeadAttention
(same weights), forward and forward + backward.

Run:  pytest benchmarks/bench_attention.py --benchmark-json=attention.json
      TFA_BENCH_LARGE=1 pytest benchmarks/bench_attention.py ...   # adds T = 4096, 8192
      pytest benchmarks/bench_attention.py -k memory ...             # peak RSS, one process each

GFLOP/s by FlashAttention's count (forward 4*B*N*T*S*H, halved when causal;
backward 2.5x the forward) is in extra_info; compare the fused and Keras rows of
one group as a ratio (absolute CPU times depend on the machine's load).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
import tf_fastattn.layers  # noqa: E402
from tf_fastattn._timing import attention_flops  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import numpy_reference  # noqa: E402
from test_attention import peak_rss_growth  # noqa: E402

LARGE = os.environ.get("TFA_BENCH_LARGE", "") not in ("", "0")
LENGTHS = [256, 1024, 2048] + ([4096, 8192] if LARGE else [])
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}
B, N, H = 1, 8, 64


def op_fns(impl, T, dtype, causal, *, jit_compile=False):
    """Forward and forward + backward of the fused op ("fused") or
    keras.ops.dot_product_attention ("keras"), each a tf.function (XLA with
    jit_compile), on B x T x N x H inputs."""
    q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H]), dtype) for _ in range(4))
    if impl == "fused":

        def forward(q, k, v):
            return tf_fastattn.dot_product_attention(q, k, v, is_causal=causal, implementation="fused")

    else:

        def forward(q, k, v):
            return keras.ops.dot_product_attention(q, k, v, is_causal=causal)

    fwd = tf.function(forward, jit_compile=jit_compile)
    fwd_bwd = attention_fwd_bwd(forward, d_out, jit_compile=jit_compile)
    return (lambda: fwd(q, k, v)[0, 0, 0, 0].numpy()), (lambda: fwd_bwd(q, k, v)[0][0, 0, 0, 0].numpy())


def attention_fwd_bwd(forward, d_out, jit_compile=False):
    """A tf.function giving the gradients of `forward(q, k, v)` w.r.t. q, k, v
    for the output gradient `d_out`."""

    def fwd_bwd(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = forward(q, k, v)
        return tape.gradient(out, [q, k, v], output_gradients=d_out)

    return tf.function(fwd_bwd, jit_compile=jit_compile)


def layer_fns(impl, T, dtype, causal=False, *, batch=B, heads=N, head_dim=H, dropout=0.0):
    """Forward and forward + backward of MultiHeadAttention(x, x), fused or
    stock ("keras"), with the same weights and inputs for both; with dropout
    the calls are in training mode."""
    policy = None if dtype == tf.float32 else f"mixed_{dtype.name}"
    layer_cls = tf_fastattn.layers.MultiHeadAttention if impl == "fused" else keras.layers.MultiHeadAttention
    width = heads * head_dim
    layer = layer_cls(num_heads=heads, key_dim=head_dim, dropout=dropout, dtype=policy)
    layer.build((None, None, width), (None, None, width))
    keras.utils.set_random_seed(0)  # the same weights and inputs for the fused and Keras rows
    reference = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=head_dim)
    reference.build((None, None, width), (None, None, width))
    layer.set_weights(reference.get_weights())
    x = tf.random.normal([batch, T, width])
    dy = tf.cast(tf.random.normal([batch, T, width]), layer.compute_dtype)
    training = True if dropout > 0 else None

    fwd = tf.function(lambda x: layer(x, x, use_causal_mask=causal, training=training))

    @tf.function
    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, x, use_causal_mask=causal, training=training)
        return tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

    return (lambda: fwd(x)[0, 0, 0].numpy()), (lambda: fwd_bwd(x)[0][0, 0, 0].numpy())


def _run(benchmark, fns, what, T, dtype, causal, direction):
    fwd, fwd_bwd = fns
    fn = fwd if direction == "fwd" else fwd_bwd
    fn()  # trace
    rounds = 5 if T <= 2048 else 3
    benchmark.group = f"{what} {direction} {dtype} T={T} {'causal' if causal else 'full'}"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    flops = attention_flops(B, N, T, T, H, causal, backward=direction == "fwd_bwd")
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["flops"] = flops


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES.keys())
def test_benchmarked_op_meets_the_criterion(dtype, causal):
    """What is timed is right: the fused op at the benchmarks' B, N, H (T =
    256), forward and gradients, against the float64 NumPy reference by the
    accuracy criterion every test tier uses."""
    T = 256
    q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H], seed=i), DTYPES[dtype]) for i in range(4))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        o = tf_fastattn.dot_product_attention(q, k, v, is_causal=causal, implementation="fused")
    grads = tape.gradient(o, [q, k, v], output_gradients=d_out)
    as_np = [t.numpy().astype("float32") for t in (q, k, v, d_out, o)]
    # (lse stays inside the op: not checked here.)
    numpy_reference.check_attention(dtype, *as_np, None, *(g.numpy().astype("float32") for g in grads),
                                    is_causal=causal)


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "keras"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("T", LENGTHS)
def test_attention_op(benchmark, T, dtype, causal, impl, direction):
    _run(benchmark, op_fns(impl, T, DTYPES[dtype], causal), "op", T, dtype, causal, direction)


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "keras"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("T", LENGTHS)
def test_multi_head_attention_layer(benchmark, T, dtype, causal, impl, direction):
    _run(benchmark, layer_fns(impl, T, DTYPES[dtype], causal), "layer", T, dtype, causal, direction)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("T", [1024, 4096] + ([16384] if LARGE else []))
def test_attention_peak_memory(benchmark, T, impl):
    """Peak RSS growth of one forward + backward (float32, B=1, N=8, H=64), each
    in a fresh process; "reference" is Keras' math (dense T x S scores)."""
    benchmark.group = f"memory fwd_bwd float32 T={T}"
    growth = benchmark.pedantic(lambda: peak_rss_growth(impl, B, N, T, H), rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_growth_MiB"] = growth / 2**20
