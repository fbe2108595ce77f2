"""tf_fastattn.convert_model: layer swaps, Add + LayerNormalization fusion,
weights carried over, outputs equal, original untouched, report."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tfa_helpers import requires_ops
from test_multi_head_attention import SEQ, VOCAB, classification_data, classifier

import tf_fastattn
from tf_fastattn.layers import GroupedQueryAttention, LayerNormalization, MultiHeadAttention

pytestmark = requires_ops


def _types(model):
    return [type(layer) for layer in model.layers]


def _weights_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def test_post_norm_classifier():
    keras.utils.set_random_seed(0)
    model = classifier()
    original_weights = model.get_weights()
    converted, report = tf_fastattn.convert_model(model, return_report=True)

    assert MultiHeadAttention in _types(converted) and LayerNormalization in _types(converted)
    stock = (keras.layers.MultiHeadAttention, keras.layers.LayerNormalization)
    assert not any(type(layer) in stock for layer in converted.layers)
    # Both post-norm residual adds became fused layer norms: no Add is left.
    assert not any(isinstance(layer, keras.layers.Add) for layer in converted.layers)
    assert len(report.fused_residual) == 2 and ("multi_head_attention" in report.replaced[0][0])
    assert report.skipped == []

    x, _ = classification_data(64)
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # The original is untouched and shares no weights with the copy.
    assert all(type(layer).__module__.startswith("keras") for layer in model.layers)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), original_weights))
    converted.layers[-1].kernel.assign(converted.layers[-1].kernel * 0)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), original_weights))


def test_converted_classifier_trains():
    x, y = classification_data()
    keras.utils.set_random_seed(0)
    converted = tf_fastattn.convert_model(classifier())
    converted.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = converted.fit(x, y, batch_size=32, epochs=6, verbose=0).history
    assert history["loss"][-1] < 0.6 * history["loss"][0]


def decoder(num_blocks=2):
    """Pre-norm causal decoder blocks (the sum feeds both the norm and the next
    residual), a post-norm GroupQueryAttention block and a norm over the sequence axis."""
    tokens = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 32)(tokens)
    for _ in range(num_blocks):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(a, a, use_causal_mask=True)
        h = keras.layers.Add()([h, a])
    gqa = keras.layers.GroupQueryAttention(head_dim=8, num_query_heads=4, num_key_value_heads=2)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([h, gqa(h, h, use_causal_mask=True)]))
    h = keras.layers.LayerNormalization(axis=1)(h)  # over the sequence: not fused
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(h))


def test_causal_decoder_with_gqa_and_pre_norm():
    keras.utils.set_random_seed(1)
    model = decoder()
    converted, report = tf_fastattn.convert_model(model, return_report=True)
    x, _ = classification_data(16)
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    kinds = [kind for _, kind in report.replaced]
    assert kinds.count("MultiHeadAttention") == 2
    assert kinds.count("GroupedQueryAttention") == 1
    assert any(isinstance(layer, GroupedQueryAttention) for layer in converted.layers)
    skipped = dict(report.skipped)
    assert any("axis=[1] is not the last axis" in reason for reason in skipped.values())
    # The block-1 sum feeds block 2's norm and block 2's residual: fused with
    # return_residual; the GQA block's add is post-norm: fused plainly.
    fused_norms = [layer for layer in converted.layers if isinstance(layer, LayerNormalization)]
    assert sum(layer.return_residual for layer in fused_norms) == 1
    assert len(report.fused_residual) == 2
    assert "fused add" in str(report) and "skipped" in str(report)


def test_sequential_model():
    model = keras.Sequential(
        [keras.Input((7, 12)), keras.layers.Dense(16), keras.layers.LayerNormalization(), keras.layers.Dense(3)]
    )
    converted = tf_fastattn.convert_model(model)
    assert isinstance(converted, keras.Sequential)
    assert type(converted.layers[1]) is LayerNormalization
    assert all(_weights_equal(a, b) for a, b in zip(model.layers, converted.layers))
    x = np.random.default_rng(0).standard_normal((5, 7, 12)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_unsupported_models_raise():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="built"):
        tf_fastattn.convert_model(Sub())
    with pytest.raises(ValueError, match="implementation"):
        tf_fastattn.convert_model(classifier(), implementation="fast")


def test_fuse_residual_off_keeps_adds():
    converted = tf_fastattn.convert_model(classifier(), fuse_residual=False)
    assert sum(isinstance(layer, keras.layers.Add) for layer in converted.layers) == 2
