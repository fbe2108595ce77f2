"""tf_fastattn.layers.GroupedQueryAttention as a drop-in for Keras' GroupQueryAttention."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfa_helpers import assert_close_to_reference, requires_ops
from tf_fastattn import layers

pytestmark = requires_ops

CASES = {
    "plain": dict(),
    "causal": dict(use_causal_mask=True),
    "mask": dict(mask=True),
    "causal+mask": dict(use_causal_mask=True, mask=True),
}


def make_pair(dtype="float32", **kw):
    keras.utils.set_random_seed(0)
    cfg = dict(head_dim=16, num_query_heads=6, num_key_value_heads=2, dtype=dtype, **kw)
    stock = keras.layers.GroupQueryAttention(**cfg)
    fused = layers.GroupedQueryAttention(**cfg)
    return stock, fused


def inputs(rng, with_mask, dtype=tf.float32):
    x = tf.cast(rng.standard_normal((2, 9, 24)), dtype)
    y = tf.cast(rng.standard_normal((2, 13, 24)), dtype)
    mask = None
    if with_mask:
        m = rng.random((2, 9, 13)) > 0.4
        m[:, 3] = False  # a fully masked query row
        mask = tf.constant(m)
    return x, y, mask


def run(layer, x, y, mask, use_causal_mask, training=False):
    with tf.GradientTape() as tape:
        tape.watch([x, y])
        out = layer(x, y, attention_mask=mask, use_causal_mask=use_causal_mask, training=training)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
    return [out] + tape.gradient(loss, [x, y] + layer.trainable_weights)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_stock_layer_with_gradients(rng, case):
    stock, fused = make_pair()
    x, y, mask = inputs(rng, case.get("mask", False))
    causal = case.get("use_causal_mask", False)
    stock(x, y)
    fused(x, y)
    fused.set_weights(stock.get_weights())
    got = run(fused, x, y, mask, causal)
    want = run(stock, x, y, mask, causal)
    stock64, fused64 = make_pair("float64")
    stock64(x, y)
    stock64.set_weights([w.astype(np.float64) for w in stock.get_weights()])
    ref = run(stock64, tf.cast(x, tf.float64), tf.cast(y, tf.float64), mask, causal)
    names = ["output", "dx", "dy"] + [w.path for w in fused.trainable_weights]
    for name, g, w, r in zip(names, got, want, ref):
        assert_close_to_reference(g, w, r, tf.float32, name=name)


def test_keys_and_values_are_not_repeated(rng):
    # The op receives the kv heads unrepeated: the graph holds no Repeat/Tile of them.
    _, fused = make_pair()
    x, y, _ = inputs(rng, False)
    fused(x, y)
    graph = tf.function(lambda x, y: fused(x, y)).get_concrete_function(x, y).graph
    types = {op.type for op in graph.get_operations()}
    assert "TfFastattn>Attention" in types
    assert not types & {"Tile", "Repeat"}, types


def test_dropout_is_fused_and_reproducible(rng):
    _, fused = make_pair(dropout=0.5, seed=3)
    x, y, _ = inputs(rng, False)
    a = fused(x, y, training=True)
    b = fused(x, y, training=True)
    assert not np.allclose(a.numpy(), b.numpy()), "a new dropout mask every call"
    inference = fused(x, y, training=False)
    _, again = make_pair(dropout=0.5, seed=3)
    again(x, y)
    again.set_weights(fused.get_weights())
    np.testing.assert_allclose(again(x, y, training=False).numpy(), inference.numpy(), atol=1e-6)


def test_config_weights_and_keras_file(tmp_path, rng):
    stock, fused = make_pair()
    x, y, _ = inputs(rng, False)
    stock(x, y)
    assert type(fused).__name__ == "GroupedQueryAttention"
    inp_q, inp_v = keras.Input((9, 24)), keras.Input((13, 24))
    model = keras.Model([inp_q, inp_v], stock(inp_q, inp_v))
    model.save_weights(str(tmp_path / "w.weights.h5"))
    inp_q2, inp_v2 = keras.Input((9, 24)), keras.Input((13, 24))
    fmodel = keras.Model([inp_q2, inp_v2], fused(inp_q2, inp_v2))
    fmodel.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_allclose(fmodel([x, y]).numpy(), model([x, y]).numpy(), atol=1e-5)
    fmodel.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert any(isinstance(l, layers.GroupedQueryAttention) for l in loaded.layers)
    np.testing.assert_allclose(loaded([x, y]).numpy(), fmodel([x, y]).numpy(), atol=1e-6)
    assert fused.get_config()["implementation"] == "auto"


def test_return_attention_scores_uses_keras_path(rng):
    stock, fused = make_pair()
    x, y, _ = inputs(rng, False)
    stock(x, y)
    fused(x, y)
    fused.set_weights(stock.get_weights())
    out, scores = fused(x, y, return_attention_scores=True)
    want, want_scores = stock(x, y, return_attention_scores=True)
    np.testing.assert_allclose(scores.numpy(), want_scores.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="return_attention_scores=True"):
        layers.GroupedQueryAttention(head_dim=16, num_query_heads=6, num_key_value_heads=2,
                                     implementation="fused")(x, y, return_attention_scores=True)
