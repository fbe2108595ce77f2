"""The fused ops under XLA (jit_compile=True, where they run as XLA custom
calls) against stock Keras with XLA off and on, in one run.

- A 4-block Transformer encoder train step (d_model 256, 4 heads, T = 512,
  batch 8, feed-forward 1024, post-norm residual blocks, Adam), same weights:
  stock Keras layers with jit_compile False and True, the fused layers
  (tf_fastattn.layers) with jit_compile True, and False for reference. One
  timed round is one `train_on_batch`.
- Attention forward + backward, T = S = 2048, B 1, N 8, H 64, float32 and
  bfloat16, causal and not: the fused op under XLA vs
  `keras.ops.dot_product_attention` under XLA (and both without XLA).

Run:  pytest benchmarks/bench_xla.py --benchmark-json=xla.json \
          --benchmark-columns=median,min --benchmark-sort=name
Compare rows of one group as ratios (absolute CPU times depend on load).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
import tf_fastattn.layers  # noqa: E402
from tf_fastattn import _loader  # noqa: E402
from bench_attention import op_fns  # noqa: E402

pytestmark = pytest.mark.skipif(_loader.xla_reason() is not None,
                                reason=f"the ops' XLA kernels are not loaded: {_loader.xla_reason()}")

D_MODEL, HEADS, T, BATCH, BLOCKS, FF = 256, 4, 512, 8, 4, 1024


def encoder(layer_mod, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((T, D_MODEL))
    x = inputs
    for _ in range(BLOCKS):
        h = layer_mod.MultiHeadAttention(num_heads=HEADS, key_dim=D_MODEL // HEADS)(x, x)
        x = layer_mod.LayerNormalization(epsilon=1e-6)(x + h)
        h = keras.layers.Dense(FF, activation="relu")(x)
        x = layer_mod.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dense(D_MODEL)(h))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


ENCODER_IMPLS = {
    # name: (layers, jit_compile)
    "stock": (keras.layers, False),
    "stock_xla": (keras.layers, True),
    "fused_xla": (tf_fastattn.layers, True),
    "fused": (tf_fastattn.layers, False),
}


@pytest.mark.parametrize("impl", list(ENCODER_IMPLS))
def test_encoder_train_step(benchmark, impl):
    layer_mod, jit = ENCODER_IMPLS[impl]
    weights = encoder(keras.layers, seed=0).get_weights()  # the same weights for every row
    model = encoder(layer_mod, seed=0)
    model.set_weights(weights)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    assert model.jit_compile is jit  # Keras kept XLA on (every layer supports it)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, T, D_MODEL)).astype("float32")
    y = rng.integers(0, 10, (BATCH,))
    model.train_on_batch(x, y)  # trace and compile
    benchmark.group = f"encoder train step d_model={D_MODEL} heads={HEADS} T={T} batch={BATCH} blocks={BLOCKS}"
    benchmark.pedantic(lambda: model.train_on_batch(x, y), rounds=5, iterations=1, warmup_rounds=1)


ATTENTION_IMPLS = {
    # name: (op, jit_compile)
    "fused_xla": ("fused", True),
    "keras_xla": ("keras", True),
    "fused": ("fused", False),
    "keras": ("keras", False),
}


@pytest.mark.parametrize("impl", list(ATTENTION_IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_fwd_bwd_2048(benchmark, dtype, causal, impl):
    op, jit = ATTENTION_IMPLS[impl]
    _, fwd_bwd = op_fns(op, 2048, tf.as_dtype(dtype), causal, jit_compile=jit)
    fwd_bwd()  # trace and compile
    benchmark.group = f"attention fwd_bwd {dtype} T=S=2048 {'causal' if causal else 'full'}"
    benchmark.pedantic(fwd_bwd, rounds=5, iterations=1, warmup_rounds=1)


def test_timed_xla_programs_hold_the_custom_calls():
    """What is timed as fused_xla is the fused op inside XLA."""
    q = tf.random.normal([1, 64, 8, 64])

    @tf.function(jit_compile=True)
    def f(q):
        with tf.GradientTape() as tape:
            tape.watch(q)
            out = tf_fastattn.dot_product_attention(q, q, q, implementation="fused")
        return tape.gradient(out, q)

    text = f.experimental_get_compiler_ir(q)(stage="hlo")
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in text
    assert 'custom_call_target="tf_fastattn_attention_bwd"' in text
