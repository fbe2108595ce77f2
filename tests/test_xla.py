"""The fused ops under XLA (jit_compile=True): XLA custom calls into the same
kernels, bitwise equal to the ops without XLA; Keras models that keep XLA on;
both orders of loading the library and compiling with XLA; SavedModel; the
fallback when the XLA kernels are not loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
from tf_fastattn import _loader, attention, layers
import real_models
from tfa_helpers import DTYPES, random_tensor, requires_ops

pytestmark = [
    requires_ops,
    pytest.mark.skipif(_loader.xla_reason() is not None, reason=f"XLA kernels not loaded: {_loader.xla_reason()}"),
]


def hlo(fn, *args) -> str:
    return fn.experimental_get_compiler_ir(*args)(stage="hlo")


def assert_bitwise(a, b, name):
    a, b = np.asarray(tf.cast(a, tf.float64)), np.asarray(tf.cast(b, tf.float64))
    assert a.shape == b.shape, name
    assert np.array_equal(a, b, equal_nan=True), f"{name}: max |diff| {np.nanmax(np.abs(a - b))}"


def run_python(code, env=None):
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=full_env)


# ---- attention -----------------------------------------------------------------

ATTENTION_CASES = {
    # name: (B, T, S, N, Nkv, H, Hv, causal, mask shape or None, dropout)
    "plain": (2, 19, 23, 4, 4, 16, 16, False, None, 0.0),
    "causal_gqa": (2, 33, 33, 4, 2, 32, 32, True, None, 0.0),
    "mask_bnts": (2, 17, 29, 2, 1, 16, 8, False, (2, 1, 17, 29), 0.0),
    "mask_ts_causal": (1, 40, 40, 2, 2, 64, 64, True, (40, 40), 0.0),
    "dropout": (2, 24, 31, 2, 2, 16, 16, True, (2, 1, 1, 31), 0.25),
}


def attention_inputs(rng, case, dtype):
    b, t, s, n, nkv, h, hv, causal, mask_shape, rate = ATTENTION_CASES[case]
    q = random_tensor(rng, (b, t, n, h), dtype)
    k = random_tensor(rng, (b, s, nkv, h), dtype)
    v = random_tensor(rng, (b, s, nkv, hv), dtype)
    mask = None
    if mask_shape is not None:
        m = rng.random(mask_shape) < 0.8
        m[..., 0] = True
        if len(mask_shape) == 4 and mask_shape[2] > 3:
            m[0, 0, 3, :] = False  # a row with no allowed key
        mask = tf.constant(m)
    d_o = random_tensor(rng, (b, t, n, hv), dtype)
    return q, k, v, mask, causal, rate, d_o


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_bitwise_under_xla(case, dtype, rng):
    q, k, v, mask, causal, rate, d_o = attention_inputs(rng, case, DTYPES[dtype])
    seed = tf.constant(123456789, tf.int64) if rate else None

    def f(q, k, v, d_o):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, lse = attention.fused_attention(q, k, v, mask, None, causal, rate, seed)
        return (out, lse, *tape.gradient(out, [q, k, v], output_gradients=d_o))

    eager = f(q, k, v, d_o)
    jit = tf.function(f, jit_compile=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), eager, jit(q, k, v, d_o)):
        assert_bitwise(a, b, name)
    text = hlo(jit, q, k, v, d_o)
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in text
    assert 'custom_call_target="tf_fastattn_attention_bwd"' in text


def test_public_function_and_dropout_seed_tensor_under_xla(rng):
    q, k, v, mask, causal, _, _ = attention_inputs(rng, "mask_bnts", tf.float32)

    @tf.function(jit_compile=True)
    def f(q, k, v, seed):
        return tf_fastattn.dot_product_attention(q, k, v, mask=mask, dropout_rate=0.1, seed=seed)

    # The seed is an XLA operand: a new value needs no recompilation and gives
    # the mask the op draws without XLA.
    for s in (7, 8):
        seed = tf.constant(s, tf.int64)
        want = tf_fastattn.dot_product_attention(q, k, v, mask=mask, dropout_rate=0.1, seed=seed)
        assert_bitwise(f(q, k, v, seed), want, f"seed {s}")
    assert f.experimental_get_tracing_count() == 1


# ---- layer norm ----------------------------------------------------------------

LAYER_NORM_CASES = {
    # name: (shape, residual, center, scale, param dtype: "x" or "float32", use the sum output)
    "plain": ((6, 71), False, True, True, "x", False),
    "residual_sum": ((2, 5, 96), True, True, True, "float32", True),
    "no_center": ((9, 33), True, False, True, "x", False),
    "no_scale_no_center": ((4, 3, 64), False, False, False, "x", False),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(LAYER_NORM_CASES))
def test_layer_norm_bitwise_under_xla(case, dtype, rng):
    shape, with_residual, center, scale, pdtype, use_sum = LAYER_NORM_CASES[case]
    dt = DTYPES[dtype]
    u = dt if pdtype == "x" else tf.float32
    x, r, dy, ds = (random_tensor(rng, shape, dt) for _ in range(4))
    g = random_tensor(rng, shape[-1:], u) + 1
    b = random_tensor(rng, shape[-1:], u)

    def f(x, r, g, b):
        with tf.GradientTape() as tape:
            tape.watch([x, r, g, b])
            y, s = tf_fastattn.layer_norm(x, g, b, residual=r if with_residual else None, center=center,
                                          scale=scale, return_residual=True, epsilon=1e-5, implementation="fused")
            loss = tf.reduce_sum(tf.cast(y * dy, tf.float64))
            if use_sum:
                loss += tf.reduce_sum(tf.cast(s * ds, tf.float64))
        grads = tape.gradient(loss, [x, r, g, b], unconnected_gradients="zero")
        return (y, s, *grads)

    eager = f(x, r, g, b)
    jit = tf.function(f, jit_compile=True)
    for name, a, c in zip(("y", "sum", "dx", "dresidual", "dgamma", "dbeta"), eager, jit(x, r, g, b)):
        assert_bitwise(a, c, name)
    text = hlo(jit, x, r, g, b)
    assert 'custom_call_target="tf_fastattn_layer_norm_fwd"' in text
    assert 'custom_call_target="tf_fastattn_layer_norm_bwd"' in text


def test_bad_shapes_under_xla_name_the_argument(rng):
    # The raw op (no Python checks): the XLA kernel's own shape checks.
    q = random_tensor(rng, (2, 5, 4, 8), tf.float32)
    bad_mask = tf.ones([2, 1, 5, 6], tf.bool)
    f = tf.function(lambda q: attention.fused_attention(q, q, q, bad_mask)[0], jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"mask of shape \[2, 1, 5, 6\] is not broadcastable"):
        f(q)
    g = tf.function(lambda x: _loader.ops().tf_fastattn_layer_norm(
        x=x, residual=[], gamma=tf.ones([7]), beta=tf.zeros([8]), epsilon=1e-3)[0], jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma"):
        g(random_tensor(rng, (3, 8), tf.float32))


# ---- Keras models with XLA on -------------------------------------------------------


def encoder(layer_mod, seed=0, d_model=32, heads=4, seq=16, blocks=2, dropout=0.0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((seq, d_model))
    x = inputs
    for _ in range(blocks):
        h = layer_mod.MultiHeadAttention(num_heads=heads, key_dim=d_model // heads, dropout=dropout)(
            x, x, use_causal_mask=True)
        x = layer_mod.LayerNormalization(epsilon=1e-5)(x + h)
        h = keras.layers.Dense(2 * d_model, activation="gelu")(x)
        x = layer_mod.LayerNormalization(epsilon=1e-5)(x + keras.layers.Dense(d_model)(h))
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


def test_fused_layers_keep_xla_on():
    assert layers.MultiHeadAttention(num_heads=2, key_dim=4).supports_jit is True
    assert layers.LayerNormalization().supports_jit is True
    model = encoder(layers)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    assert model.jit_compile is True


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_keras_model_trains_with_jit_compile(dropout, rng):
    x = rng.standard_normal((16, 16, 32)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    losses = {}
    for jit in (False, True):
        model = encoder(layers, seed=3, dropout=dropout)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit)
        assert model.jit_compile is jit
        keras.utils.set_random_seed(11)
        losses[jit] = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert losses[True][-1] < losses[True][0], losses
    # The rest of the model differs by XLA's fusions only (float32 rounding).
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)

    # The XLA program of a training step holds the custom calls.
    model = encoder(layers, seed=3, dropout=dropout)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_weights)

    text = hlo(step, tf.constant(x))
    for target in ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd"):
        assert f'custom_call_target="tf_fastattn_{target}"' in text, target


def test_converted_model_under_xla_matches_stock(rng):
    stock = encoder(keras.layers, seed=5)
    fused = tf_fastattn.convert_model(stock)
    x = tf.constant(rng.standard_normal((4, 16, 32)).astype("float32"))
    jit = tf.function(lambda x: fused(x), jit_compile=True)
    np.testing.assert_allclose(jit(x), stock(x), rtol=1e-4, atol=1e-5)
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in hlo(jit, x)


# ---- load orders, SavedModel, fallback -------------------------------------------------

LOAD_ORDER_SCRIPT = """
    import numpy as np, tensorflow as tf
    if {xla_first}:
        # XLA compiles (and turns its registrations into kernels) before the
        # fused ops' XLA kernels are loaded.
        assert float(tf.function(lambda x: x * 2.0, jit_compile=True)(tf.constant(1.0))) == 2.0
    import tf_fastattn
    from tf_fastattn import _loader, attention
    assert _loader.xla_reason() is None, _loader.xla_reason()
    q = tf.random.stateless_normal([2, 9, 4, 16], seed=[1, 2])
    f = tf.function(lambda q: attention.fused_attention(q, q, q, None, None, True)[0], jit_compile=True)
    assert np.array_equal(f(q).numpy(), attention.fused_attention(q, q, q, None, None, True)[0].numpy())
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in f.experimental_get_compiler_ir(q)(stage="hlo")
    print("OK")
"""


@pytest.mark.parametrize("xla_first", [False, True], ids=["library_first", "xla_first"])
def test_both_load_orders(xla_first):
    res = run_python(LOAD_ORDER_SCRIPT.format(xla_first=xla_first))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_saved_model_with_xla(tmp_path, rng):
    class Block(tf.Module):
        def __init__(self):
            self.gamma = tf.Variable(tf.ones([16]))
            self.beta = tf.Variable(tf.zeros([16]))

        @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([2, 9, 16], tf.float32)])
        def __call__(self, x):
            h = tf.reshape(x, [2, 9, 2, 8])
            a = tf.reshape(tf_fastattn.dot_product_attention(h, h, h, is_causal=True), [2, 9, 16])
            return tf_fastattn.layer_norm(x, self.gamma, self.beta, residual=a)

    block = Block()
    x = random_tensor(rng, (2, 9, 16), tf.float32)
    want = block(x).numpy()
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in hlo(block.__call__, x)
    tf.saved_model.save(block, str(tmp_path / "sm"))
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "want.npy", want)
    res = run_python(f"""
        import numpy as np, tensorflow as tf
        import tf_fastattn  # loads the ops and their XLA kernels
        m = tf.saved_model.load({str(tmp_path / "sm")!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        got = m(tf.constant(x)).numpy()
        assert np.array_equal(got, np.load({str(tmp_path / "want.npy")!r}))
        print("OK")
    """)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_fallback_without_xla_kernels():
    res = run_python("""
        import warnings
        import numpy as np, tensorflow as tf, tf_fastattn
        from tf_fastattn import layers, reference
        info = tf_fastattn.build_info()
        assert info["ops_loaded"] and not info["xla"]["available"], info["xla"]
        print("REASON:", info["xla"]["reason"])
        # The layers opt out of XLA while the op can run; forced XLA gets the reference math.
        assert layers.MultiHeadAttention(num_heads=2, key_dim=4).supports_jit is False
        assert layers.LayerNormalization().supports_jit is False
        q = tf.random.stateless_normal([2, 9, 4, 16], seed=[1, 2])
        f = tf.function(lambda q: tf_fastattn.dot_product_attention(q, q, q, is_causal=True), jit_compile=True)
        ops = {op.type for op in f.get_concrete_function(q).graph.get_operations()}
        assert not any(t.startswith("TfFastattn") for t in ops), ops
        np.testing.assert_allclose(f(q), tf_fastattn.dot_product_attention(q, q, q, is_causal=True),
                                   rtol=1e-5, atol=1e-6)
        g = tf.function(lambda q: tf_fastattn.dot_product_attention(q, q, q, implementation="fused"),
                        jit_compile=True)
        try:
            g(q)
        except ValueError as e:
            print("FUSED:", e)
        print("OK")
    """, env={"TF_FASTATTN_DISABLE_XLA": "1"})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert "REASON: disabled by TF_FASTATTN_DISABLE_XLA" in res.stdout
    assert "FUSED: dot_product_attention: implementation='fused' cannot run inside XLA" in res.stdout


def test_build_info_reports_xla():
    info = tf_fastattn.build_info()
    assert info["xla"]["available"] is True and info["xla"]["reason"] is None
    assert info["xla"]["library"].endswith("_tf_fastattn_xla.so")
    assert "TfFastattn>Attention" in info["kernels"]["XLA_CPU_JIT"]


# ---- real models -------------------------------------------------------------------


# keras-hub BERT (padding mask, dict inputs) in the quick suite; the keras.io
# translator (encoder-decoder, dict inputs, causal) and keras-hub GPT-2 (its
# cached attention class, causal + padding) in the slow one: 15-20 s each,
# mostly XLA compilation. (tests/test_real_models.py runs every model without XLA.)
XLA_MODELS = {"keras_hub_bert_classifier": [], "keras_io_translator": [pytest.mark.slow],
              "keras_hub_gpt2_causal_lm": [pytest.mark.slow]}


@pytest.mark.parametrize("name", [pytest.param(n, marks=m) for n, m in XLA_MODELS.items()])
def test_real_models_train_under_xla_as_the_original(name):
    """keras.io and keras-hub models (tests/real_models.py), converted, trained
    with jit_compile=True next to the stock model under XLA: Keras keeps XLA on,
    the XLA program holds the custom calls, and the losses match."""
    build, data = real_models.MODELS[name]
    keras.utils.set_random_seed(0)
    model = build()
    x, y = data(np.random.default_rng(0))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # optimizer state
    converted = tf_fastattn.convert_model(model, implementation="fused")
    for m in (model, converted):
        m.jit_compile = True
        assert m.jit_compile is True
        m.make_train_function(force=True)
        m.make_predict_function(force=True)
    x, y = data(np.random.default_rng(1))
    text = hlo(tf.function(lambda x: converted(x, training=True), jit_compile=True), x)
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in text
    assert 'custom_call_target="tf_fastattn_layer_norm_fwd"' in text
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=2e-6)
    h_converted = converted.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    h_model = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    np.testing.assert_allclose(h_converted, h_model, rtol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_grouped_query_attention_and_mixed_precision_under_xla(policy, rng):
    keras.utils.set_random_seed(2)
    gqa = layers.GroupedQueryAttention(head_dim=8, num_query_heads=4, num_key_value_heads=2, dtype=policy)
    norm = layers.LayerNormalization(dtype=policy)
    q = tf.constant(rng.standard_normal((2, 12, 16)).astype("float32"))
    v = tf.constant(rng.standard_normal((2, 10, 16)).astype("float32"))
    mask = tf.constant(rng.random((2, 12, 10)) < 0.7)

    def f(q, v):
        with tf.GradientTape() as tape:
            tape.watch([q, v])
            y = norm(tf.cast(q, gqa.compute_dtype) + gqa(q, v, attention_mask=mask))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return y, tape.gradient(loss, [q, v] + gqa.trainable_weights + norm.trainable_weights)

    eager = f(q, v)
    jit = tf.function(f, jit_compile=True)
    got = jit(q, v)
    rtol = 1e-5 if policy == "float32" else 1e-2
    for a, b in zip(keras.tree.flatten(eager), keras.tree.flatten(got)):
        np.testing.assert_allclose(np.asarray(tf.cast(b, tf.float32)), np.asarray(tf.cast(a, tf.float32)),
                                   rtol=rtol, atol=rtol)
    text = hlo(jit, q, v)
    assert 'custom_call_target="tf_fastattn_attention_bwd"' in text
    assert 'custom_call_target="tf_fastattn_layer_norm_bwd"' in text
