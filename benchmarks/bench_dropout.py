"""Attention dropout on the CPU, forward + backward: the fused op and
tf_fastattn.layers.MultiHeadAttention against Keras in the same run.

- op: `tf_fastattn.dot_product_attention(..., dropout_rate=p)` vs Keras'
  attention math with dropout (what keras.layers.MultiHeadAttention computes
  between its projections: einsum, softmax, `keras.random.dropout`, einsum).
- layer: `MultiHeadAttention(num_heads=N, key_dim=H, dropout=p)`, fused vs
  stock, same weights, training=True.

dropout in {0, 0.1, 0.25}, T = S in {512, 2048}, H in {64, 256}, float32 and
bfloat16; B = 1, N = 4. `test_dropout_interleaved`: the H = 64 cells with
dropout 0 and 0.1, fused and Keras rounds alternating in one process (medians
and ratio in the JSON's extra_info).

Run:  pytest benchmarks/bench_dropout.py --benchmark-json=dropout.json
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
from bench_attention import attention_fwd_bwd, layer_fns  # noqa: E402
from interleaved import interleaved_medians  # noqa: E402

B, N = 1, 4
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


def _keras_attention(q, k, v, rate, seed_generator):
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    scores = tf.einsum("btnh,bsnh->bnts", q * tf.cast(scale, q.dtype), k)
    p = keras.ops.softmax(scores, axis=-1)
    if rate > 0:
        p = keras.random.dropout(p, rate, seed=seed_generator)
    return tf.einsum("bnts,bsnh->btnh", p, v)


def _op_fn(impl, T, H, dtype, rate):
    q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H]), dtype) for _ in range(4))
    seed_generator = keras.random.SeedGenerator(1)
    if impl == "fused":

        def forward(q, k, v):
            return tf_fastattn.dot_product_attention(q, k, v, dropout_rate=rate, seed=seed_generator,
                                                     implementation="fused")

    else:

        def forward(q, k, v):
            return _keras_attention(q, k, v, rate, seed_generator)

    fwd_bwd = attention_fwd_bwd(forward, d_out)
    return lambda: fwd_bwd(q, k, v)[0][0, 0, 0, 0].numpy()


def _layer_fn(impl, T, H, dtype, rate):
    return layer_fns(impl, T, dtype, batch=B, heads=N, head_dim=H, dropout=rate)[1]


@pytest.mark.parametrize("impl", ["fused", "keras"])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.25])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [64, 256])
@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.parametrize("what", ["op", "layer"])
def test_dropout_fwd_bwd(benchmark, what, T, H, dtype, dropout, impl):
    fn = (_op_fn if what == "op" else _layer_fn)(impl, T, H, DTYPES[dtype], dropout)
    fn()  # trace
    benchmark.group = f"{what} fwd_bwd {dtype} T={T} H={H} dropout={dropout}"
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.parametrize("what", ["op", "layer"])
def test_dropout_interleaved(benchmark, what, T, dtype, dropout):
    """H = 64, fused and Keras rounds alternating (interleaved.py; single cells
    at T = 512 take 3-15 ms). Timed: one pair; extra_info: each side's median
    and their ratio."""
    make = _op_fn if what == "op" else _layer_fn
    fns = {impl: make(impl, T, 64, DTYPES[dtype], dropout) for impl in ("fused", "keras")}
    for fn in fns.values():
        fn()  # trace
    benchmark.group = f"{what} fwd_bwd {dtype} T={T} H=64 dropout={dropout} interleaved"
    med = interleaved_medians(benchmark, fns, rounds=15 if T == 512 else 7)
    benchmark.extra_info.update(fused_ms=1e3 * med["fused"], keras_ms=1e3 * med["keras"],
                                speedup=med["keras"] / med["fused"])
