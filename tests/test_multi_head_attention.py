"""tf_fastattn.layers.MultiHeadAttention: a drop-in for keras.layers.MultiHeadAttention.

Parity with the stock layer (same weights) by the float64-reference criterion,
masks, dropout, config/weights/.keras/SavedModel round trips, mixed precision,
XLA, and a small Transformer classifier that trains as with the stock layers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tfa_helpers import DTYPES, assert_close_to_reference, random_tensor, requires_ops

from tf_fastattn import _loader
from tf_fastattn.layers import MultiHeadAttention

pytestmark = requires_ops


def make_pair(dtype="float32", **kwargs):
    """A stock and a fused layer with identical weights, built for [B, T, 32] x [B, S, 24]."""
    stock = keras.layers.MultiHeadAttention(dtype=dtype, **kwargs)
    fused = MultiHeadAttention(dtype=dtype, **kwargs)
    for layer in (stock, fused):
        layer.build((None, None, 32), (None, None, 24))
    fused.set_weights(stock.get_weights())
    return stock, fused


def run_layer(layer, query, value, d_out=None, **call_kwargs):
    """Output and gradients w.r.t. query, value and every weight."""
    with tf.GradientTape() as tape:
        tape.watch([query, value])
        out = layer(query, value, **call_kwargs)
    if d_out is None:
        return out, []
    grads = tape.gradient(out, [query, value] + layer.trainable_weights, output_gradients=d_out)
    return out, grads


def check_layer_parity(rng, dtype, call_kwargs=None, layer_kwargs=None, T=13, S=17, query_mask=None):
    """Fused (dtype) vs stock (dtype) vs stock (float64), same weights."""
    call_kwargs = call_kwargs or {}
    layer_kwargs = {"num_heads": 4, "key_dim": 16, "value_dim": 8, **(layer_kwargs or {})}
    keras.utils.set_random_seed(0)  # reproducible weights, whatever ran before
    stock, fused = make_pair(dtype, **layer_kwargs)
    stock64 = keras.layers.MultiHeadAttention(dtype="float64", **layer_kwargs)
    stock64.build((None, None, 32), (None, None, 24))
    stock64.set_weights([w.astype(np.float64) for w in stock.get_weights()])
    tf_dtype = DTYPES[dtype]
    q = random_tensor(rng, (2, T, 32), tf_dtype)
    v = random_tensor(rng, (2, S, 24), tf_dtype)
    d_out = random_tensor(rng, (2, T, layer_kwargs.get("output_shape", 32)), tf_dtype)

    def call(layer, dt):
        qq, vv = tf.cast(q, dt), tf.cast(v, dt)
        if query_mask is not None:
            keras.src.backend.set_keras_mask(qq, tf.constant(query_mask))
        return run_layer(layer, qq, vv, tf.cast(d_out, dt), **call_kwargs)

    out_f, grads_f = call(fused, tf_dtype)
    out_n, grads_n = call(stock, tf_dtype)
    out_r, grads_r = call(stock64, tf.float64)
    assert out_f.dtype == tf_dtype
    assert_close_to_reference(out_f, out_n, out_r, tf_dtype, "output")
    names = ["d_query", "d_value"] + [w.path for w in stock.trainable_weights]
    for name, f, n, r in zip(names, grads_f, grads_n, grads_r):
        assert_close_to_reference(f, n, r, tf_dtype, name)
    return fused


def _padding(B, L, rng):
    lengths = rng.integers(1, L, size=B)
    return np.arange(L)[None, :] < lengths[:, None]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "attention_mask", "attention_mask_causal", "value_mask", "query_mask_causal", "T_eq_S"],
)
def test_parity_with_stock_layer(case, dtype, rng):
    T, S = (13, 13) if case in ("T_eq_S", "query_mask_causal") else (13, 17)
    call_kwargs, query_mask = {}, None
    if case in ("causal", "attention_mask_causal", "query_mask_causal"):
        call_kwargs["use_causal_mask"] = True
    if case.startswith("attention_mask"):
        m = rng.random((2, T, S)) < 0.7
        m[0, 3] = False  # a query row that sees nothing
        call_kwargs["attention_mask"] = tf.constant(m)
    if case == "value_mask":
        call_kwargs["value_mask"] = tf.constant(_padding(2, S, rng))
    if case == "query_mask_causal":
        query_mask = _padding(2, T, rng)
    check_layer_parity(rng, dtype, call_kwargs, T=T, S=S, query_mask=query_mask)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_parity_with_dropout_configured_in_inference(dtype, rng):
    # dropout > 0 sends the stock layer down its masked-softmax path, where a
    # fully masked row gives zeros; the fused layer matches.
    m = rng.random((2, 13, 17)) < 0.7
    m[1, 5] = False
    check_layer_parity(
        rng, dtype, {"attention_mask": tf.constant(m), "training": False}, layer_kwargs={"dropout": 0.3}
    )


@pytest.mark.parametrize("layer_kwargs", [{"use_bias": False, "output_shape": 20}, {"use_gate": True}])
def test_parity_other_options(layer_kwargs, rng):
    check_layer_parity(rng, "float32", {"use_causal_mask": True}, layer_kwargs=layer_kwargs)


def _attention_ops(layer, *inputs, **call_kwargs):
    @tf.function
    def f(*args):
        return layer(*args, **call_kwargs)

    graph = f.get_concrete_function(*inputs).graph
    return [op for op in graph.get_operations() if op.type == "TfFastattn>Attention"]


def test_causal_only_reaches_op_as_is_causal(rng):
    _, fused = make_pair(num_heads=2, key_dim=8)
    q, v = random_tensor(rng, (2, 5, 32), tf.float32), random_tensor(rng, (2, 7, 24), tf.float32)
    (op,) = _attention_ops(fused, q, v, use_causal_mask=True)
    assert op.get_attr("is_causal") and op.get_attr("num_mask") == 0
    (op,) = _attention_ops(fused, q, v, use_causal_mask=True, attention_mask=tf.ones((2, 5, 7), tf.bool))
    assert op.get_attr("is_causal") and op.get_attr("num_mask") == 1
    (op,) = _attention_ops(fused, q, v)
    assert not op.get_attr("is_causal") and op.get_attr("num_mask") == 0


def test_dropout_is_fused_and_seeded(rng):
    q = random_tensor(rng, (2, 9, 32), tf.float32)
    v = random_tensor(rng, (2, 11, 24), tf.float32)
    a, b = (make_pair(num_heads=2, key_dim=8, dropout=0.5, seed=7)[1] for _ in range(2))
    b.set_weights(a.get_weights())
    (op,) = _attention_ops(a, q, v, training=True)
    assert op.get_attr("dropout_rate") == pytest.approx(0.5) and op.get_attr("num_seed") == 1
    first = a(q, v, training=True)
    np.testing.assert_array_equal(first, b(q, v, training=True))  # same seed, same mask
    assert not np.array_equal(first, a(q, v, training=True))  # the seed generator advances
    np.testing.assert_array_equal(a(q, v, training=False), a(q, v))  # no dropout in inference
    stock = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.5)
    stock.build((None, None, 32), (None, None, 24))
    stock.set_weights(a.get_weights())
    np.testing.assert_allclose(a(q, v, training=False), stock(q, v, training=False), rtol=1e-5, atol=1e-6)


def test_dropout_one_drops_everything_as_stock(rng):
    """Keras accepts dropout=1.0: in training every probability is dropped and
    the layer returns its output bias; the fused layer's gradients are
    zeros where stock Keras' are None (no "gradients do not exist" warning)."""
    stock, fused = make_pair(num_heads=2, key_dim=8, dropout=1.0, seed=3)
    q = random_tensor(rng, (2, 9, 32), tf.float32)
    v = random_tensor(rng, (2, 11, 24), tf.float32)
    for layer in (stock, fused):
        layer(q, v)
    fused.set_weights(stock.get_weights())
    fused._output_dense.bias.assign(tf.range(32, dtype=tf.float32) * 0.1)
    stock._output_dense.bias.assign(tf.range(32, dtype=tf.float32) * 0.1)
    results = []
    for layer in (stock, fused):
        with tf.GradientTape() as tape:
            out = layer(q, v, training=True)
            loss = tf.reduce_sum(out * out)
        grads = tape.gradient(loss, layer.trainable_weights)
        results.append((out.numpy(), grads))
    (s_out, s_grads), (f_out, f_grads) = results
    np.testing.assert_array_equal(f_out, s_out)
    np.testing.assert_array_equal(f_out, np.broadcast_to(np.arange(32, dtype=np.float32) * 0.1, f_out.shape))
    for w, gs, gf in zip(fused.trainable_weights, s_grads, f_grads):
        assert gf is not None, w.name
        # Stock Keras' gradient is None where nothing reaches a weight (the
        # query, key and value projections); the fused layer's is zeros there.
        want = np.zeros(w.shape, np.float32) if gs is None else np.asarray(gs)
        np.testing.assert_allclose(np.asarray(gf), want, atol=1e-6, err_msg=w.name)
    assert any(g is None for g in s_grads) and all(g is not None for g in f_grads)
    np.testing.assert_allclose(fused(q, v, training=False), stock(q, v, training=False), rtol=1e-5, atol=1e-6)


def test_dropout_in_training_keeps_expectation(rng):
    # E[dropout(p)] = p: the mean over many seeds approaches the inference output.
    _, fused = make_pair(num_heads=2, key_dim=8, dropout=0.3, seed=1)
    q = random_tensor(rng, (1, 4, 32), tf.float32)
    v = random_tensor(rng, (1, 6, 24), tf.float32)
    mean = np.mean([fused(q, v, training=True).numpy() for _ in range(400)], axis=0)
    expected = fused(q, v).numpy()
    spread = np.std([fused(q, v, training=True).numpy() for _ in range(50)], axis=0)
    assert np.all(np.abs(mean - expected) <= 5 * spread / np.sqrt(400) + 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_return_attention_scores_uses_keras_math(dtype, rng):
    stock, fused = make_pair(dtype, num_heads=2, key_dim=8)
    q = random_tensor(rng, (2, 5, 32), DTYPES[dtype])
    v = random_tensor(rng, (2, 7, 24), DTYPES[dtype])
    out_f, scores_f = fused(q, v, return_attention_scores=True, use_causal_mask=True)
    out_s, scores_s = stock(q, v, return_attention_scores=True, use_causal_mask=True)
    np.testing.assert_array_equal(out_f, out_s)
    np.testing.assert_array_equal(scores_f, scores_s)


def test_non_default_attention_axes_use_keras_math(rng):
    kwargs = dict(num_heads=2, key_dim=4, attention_axes=(1, 2))
    stock = keras.layers.MultiHeadAttention(**kwargs)
    fused = MultiHeadAttention(**kwargs)
    q = random_tensor(rng, (2, 3, 4, 8), tf.float32)
    stock(q, q)
    fused(q, q)
    fused.set_weights(stock.get_weights())
    np.testing.assert_array_equal(fused(q, q), stock(q, q))
    with pytest.raises(ValueError, match="attention_axes"):
        f = MultiHeadAttention(implementation="fused", **kwargs)
        f(q, q)


def test_config_and_class_name():
    layer = MultiHeadAttention(num_heads=3, key_dim=8, dropout=0.1, seed=4, implementation="reference")
    assert type(layer).__name__ == "MultiHeadAttention"
    config = layer.get_config()
    stock_keys = set(keras.layers.MultiHeadAttention(num_heads=3, key_dim=8).get_config())
    assert set(config) == stock_keys | {"implementation"}
    clone = MultiHeadAttention.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(MultiHeadAttention) == "tf_fastattn>MultiHeadAttention"
    with pytest.raises(ValueError, match="implementation"):
        MultiHeadAttention(num_heads=1, key_dim=2, implementation="fast")


def test_supports_jit_and_xla(rng):
    _, fused = make_pair(num_heads=2, key_dim=8)
    assert fused.supports_jit is (_loader.xla_reason() is None)
    assert MultiHeadAttention(num_heads=2, key_dim=8, implementation="reference").supports_jit is True
    q, v = random_tensor(rng, (2, 5, 32), tf.float32), random_tensor(rng, (2, 7, 24), tf.float32)
    xla = tf.function(lambda q, v: fused(q, v, use_causal_mask=True), jit_compile=True)
    np.testing.assert_allclose(xla(q, v), fused(q, v, use_causal_mask=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, rng):
    stock, fused = make_pair(policy, num_heads=4, key_dim=16)
    q = random_tensor(rng, (2, 13, 32), tf.float32)
    v = random_tensor(rng, (2, 17, 24), tf.float32)
    out_f = fused(q, v, use_causal_mask=True)
    out_s = stock(q, v, use_causal_mask=True)
    assert out_f.dtype == out_s.dtype == DTYPES[policy.split("_")[1]]
    assert all(w.dtype == "float32" for w in fused.weights)
    stock64 = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16, dtype="float64")
    stock64.build((None, None, 32), (None, None, 24))
    stock64.set_weights([w.astype(np.float64) for w in stock.get_weights()])
    ref = stock64(tf.cast(q, tf.float64), tf.cast(v, tf.float64), use_causal_mask=True)
    assert_close_to_reference(out_f, out_s, ref, out_f.dtype, "output")


# ---------------------------------------------------------------------------
# A small Transformer text classifier, stock and fused.

VOCAB, SEQ, CLASSES, DIM = 40, 16, 3, 32


def classifier(mha_cls=keras.layers.MultiHeadAttention, ln_cls=keras.layers.LayerNormalization, dropout=0.0):
    """Embedding, one post-norm encoder block (MHA + LN, FFN + LN), pooling, softmax head."""
    tokens = keras.Input((SEQ,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, mask_zero=True)(tokens)
    attn = mha_cls(num_heads=4, key_dim=8, dropout=dropout, seed=1)(x, x)
    x = ln_cls(epsilon=1e-6)(keras.layers.Add()([x, attn]))
    ffn = keras.layers.Dense(DIM)(keras.layers.Dense(64, activation="relu")(x))
    x = ln_cls(epsilon=1e-6)(keras.layers.Add()([x, ffn]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(CLASSES)(x))


def classification_data(n=256, seed=0):
    """Label: which of three marker tokens appears most often; zeros pad the tail."""
    rng = np.random.default_rng(seed)
    x = rng.integers(4, VOCAB, size=(n, SEQ))
    lengths = rng.integers(6, SEQ + 1, size=n)
    for i, length in enumerate(lengths):
        markers = rng.integers(1, 4, size=length // 2)
        x[i, : length // 2] = markers
        x[i, length:] = 0
        rng.shuffle(x[i, :length])
    counts = np.stack([(x == c).sum(1) for c in (1, 2, 3)], axis=1)
    return x.astype("int32"), counts.argmax(1).astype("int32")


def _fit(model, x, y, epochs):
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False).history


def test_transformer_classifier_trains_like_stock():
    from tf_fastattn.layers import LayerNormalization

    x, y = classification_data()
    keras.utils.set_random_seed(0)
    stock = classifier()
    fused = classifier(MultiHeadAttention, LayerNormalization)
    fused.set_weights(stock.get_weights())
    h_stock = _fit(stock, x, y, epochs=6)
    h_fused = _fit(fused, x, y, epochs=6)
    # Same weights, same data order, no dropout: the trajectories agree to
    # float32 round-off amplified over training.
    np.testing.assert_allclose(h_fused["loss"], h_stock["loss"], rtol=2e-3)
    assert h_fused["loss"][-1] < 0.6 * h_fused["loss"][0]
    assert h_fused["accuracy"][-1] > 0.7
    np.testing.assert_allclose(fused.predict(x[:64], verbose=0), stock.predict(x[:64], verbose=0), atol=2e-3)


def test_transformer_classifier_trains_with_dropout():
    from tf_fastattn.layers import LayerNormalization

    x, y = classification_data()
    keras.utils.set_random_seed(0)
    model = classifier(MultiHeadAttention, LayerNormalization, dropout=0.1)
    history = _fit(model, x, y, epochs=6)
    assert history["loss"][-1] < 0.6 * history["loss"][0]


def test_stock_weights_h5_load_into_fused_model(tmp_path):
    stock = classifier()
    path = str(tmp_path / "stock.weights.h5")
    stock.save_weights(path)
    fused = classifier(MultiHeadAttention)
    fused.load_weights(path)
    x, _ = classification_data(32)
    np.testing.assert_allclose(fused.predict(x, verbose=0), stock.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_keras_file_round_trip(tmp_path):
    model = classifier(MultiHeadAttention)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = next(layer for layer in loaded.layers if "attention" in layer.name)
    assert type(layer) is MultiHeadAttention
    x, _ = classification_data(32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.slow
def test_saved_model_reloads_in_fresh_process(tmp_path):
    model = classifier(MultiHeadAttention)
    x, _ = classification_data(8)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "saved")
    model.export(path, verbose=False)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        import tf_fastattn  # registers the ops before the SavedModel is read
        loaded = tf.saved_model.load({path!r})
        ops = {{op.type for f in loaded.serve.concrete_functions for op in f.graph.get_operations()}}
        ops |= {{n.op for f in loaded.serve.concrete_functions for d in f.graph.as_graph_def().library.function
                 for n in d.node_def}}
        assert "TfFastattn>Attention" in ops, sorted(ops)
        out = loaded.serve(tf.constant(np.load({str(tmp_path / 'x.npy')!r})))
        np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), rtol=1e-5, atol=1e-6)
        print("OK")
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
