"""tf_fastattn.convert_model and patch_keras: instances switched to fused
subclasses of their own class (nested, subclassed, Sequential, functional and
subclassed models), in place or on a structural copy, Add + LayerNormalization
fusion on plain functional copies, the report, and the Keras patch."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from tfa_helpers import requires_ops
from test_multi_head_attention import SEQ, VOCAB, classification_data, classifier

import tf_fastattn
from tf_fastattn.layers import LayerNormalization, is_fused

pytestmark = requires_ops

STOCK = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention, keras.layers.LayerNormalization)


def _all_layers(model):
    return model._flatten_layers(include_self=True, recursive=True)


def _stock_left(model):
    return [layer.name for layer in _all_layers(model) if isinstance(layer, STOCK) and not is_fused(layer)]


def _weights_equal(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def test_post_norm_classifier():
    keras.utils.set_random_seed(0)
    model = classifier()
    original_weights = model.get_weights()
    converted, report = tf_fastattn.convert_model(model, return_report=True)

    assert report.copy == "copy" and converted is not model
    assert _stock_left(converted) == []
    assert sorted(kind for _, kind in report.replaced) == ["LayerNormalization"] * 2 + ["MultiHeadAttention"]
    # Both post-norm residual adds became fused layer norms: no Add is left.
    assert not any(isinstance(layer, keras.layers.Add) for layer in converted.layers)
    assert len(report.fused_residual) == 2
    assert report.skipped == []

    x, _ = classification_data(64)
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # The original is untouched and shares no weights with the copy.
    assert _stock_left(model) and not any(is_fused(layer) for layer in _all_layers(model))
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


def test_attention_over_other_axes_is_reported_not_converted():
    # The layer's own rule (attention over the sequence axis only) decides
    # for convert_model too; the stock layers left in place still compute.
    x3, x4 = keras.Input((5, 8)), keras.Input((3, 4, 8))
    seq = keras.layers.MultiHeadAttention(2, 8, name="seq")(x3, x3)
    img = keras.layers.MultiHeadAttention(2, 8, name="img")(x4, x4)  # default axes of a rank-4 input: (1, 2)
    axis2 = keras.layers.MultiHeadAttention(2, 8, attention_axes=(2,), name="axis2")(x4, x4)
    model = keras.Model([x3, x4], [seq, img, axis2])
    converted, report = tf_fastattn.convert_model(model, return_report=True)
    assert [kind for _, kind in report.replaced] == ["MultiHeadAttention"]
    assert dict(report.skipped) == {
        "img": "attention_axes=(1, 2) (only attention over the sequence axis is fused)",
        "axis2": "attention_axes=(2,) (only attention over the sequence axis is fused)",
    }
    inputs = [np.random.default_rng(0).standard_normal((2,) + s).astype("float32") for s in ((5, 8), (3, 4, 8))]
    for a, b in zip(converted.predict(inputs, verbose=0), model.predict(inputs, verbose=0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_causal_decoder_with_gqa_and_pre_norm():
    keras.utils.set_random_seed(1)
    model = decoder()
    converted, report = tf_fastattn.convert_model(model, return_report=True)
    x, _ = classification_data(16)
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    kinds = [kind for _, kind in report.replaced]
    assert kinds.count("MultiHeadAttention") == 2
    assert kinds.count("GroupedQueryAttention") == 1
    assert kinds.count("LayerNormalization") == 3
    skipped = dict(report.skipped)
    assert list(skipped.values()) == ["axis=[1] is not the last axis of a rank-3 input"]
    assert _stock_left(converted) == [layer.name for layer in converted.layers[-2:-1]]
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
    assert is_fused(converted.layers[1]) and isinstance(converted.layers[1], keras.layers.LayerNormalization)
    assert all(_weights_equal(a, b) for a, b in zip(model.layers, converted.layers))
    x = np.random.default_rng(0).standard_normal((5, 7, 12)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


class Block(keras.layers.Layer):
    """A custom layer without get_config, holding attention and a norm."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.0)
        self.norm = keras.layers.LayerNormalization()

    def call(self, x):
        return self.norm(x + self.att(x, x, use_causal_mask=True))


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(VOCAB, 8)
        self.blocks = [Block(), Block()]
        self.head = keras.layers.Dense(3)

    def call(self, inputs):
        h = self.embed(inputs["tokens"])
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_subclassed_model_with_nested_layers_converts_fully():
    keras.utils.set_random_seed(2)
    model = SubclassedModel()
    x = {"tokens": classification_data(8)[0]}
    expected = model(x)
    converted, report = tf_fastattn.convert_model(model, return_report=True)
    assert type(converted) is SubclassedModel and report.copy == "copy"
    assert len(report.replaced) == 4 and report.skipped == [] and _stock_left(converted) == []
    paths = [path for path, _ in report.replaced]
    assert any("att" in p for p in paths) and any("norm" in p for p in paths)
    np.testing.assert_allclose(converted(x), expected, rtol=1e-5, atol=1e-5)
    # Same variables, in the same order, as the original's (copied values).
    assert [v.path for v in converted.weights] == [v.path for v in model.weights]
    assert _weights_equal(converted, model)


def test_inplace_keeps_every_object():
    keras.utils.set_random_seed(3)
    model = SubclassedModel()
    x = {"tokens": classification_data(4)[0]}
    expected = model(x)
    att = model.blocks[0].att
    variables = list(model.weights)
    config = att.get_config()
    converted, report = tf_fastattn.convert_model(model, inplace=True, return_report=True)
    assert converted is model and report.copy == "in place"
    assert converted.blocks[0].att is att and is_fused(att)
    assert all(a is b for a, b in zip(converted.weights, variables))
    assert att.get_config() == config
    # A fused instance is still an instance of its own class, named as before.
    assert isinstance(att, keras.layers.MultiHeadAttention) and type(att).__name__ == "MultiHeadAttention"
    np.testing.assert_allclose(converted(x), expected, rtol=1e-5, atol=1e-5)
    # Converting again finds them fused already.
    _, again = tf_fastattn.convert_model(model, inplace=True, return_report=True)
    assert again.replaced == [] and all("already fused" in reason for _, reason in again.skipped)
    assert len(again.skipped) == 4


def test_subclass_with_its_own_math_is_left_with_a_reason():
    class TemperatureAttention(keras.layers.MultiHeadAttention):
        def _compute_attention(self, query, *args, **kwargs):
            return super()._compute_attention(query * 0.5, *args, **kwargs)

    class KeepsStockPath(keras.layers.LayerNormalization):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = 1  # no override of the computation: fused

    x_in = keras.Input((SEQ, 8))
    h = TemperatureAttention(num_heads=2, key_dim=4)(x_in, x_in)
    h = KeepsStockPath()(h)
    h = keras.layers.LayerNormalization(rms_scaling=True)(h)
    model = keras.Model(x_in, h)
    converted, report = tf_fastattn.convert_model(model, return_report=True)
    skipped = dict(report.skipped)
    assert any("overrides MultiHeadAttention._compute_attention" in r for r in skipped.values())
    # rms_scaling=True runs the fused RMS kind with Keras' formula.
    assert [kind for _, kind in report.replaced] == ["KeepsStockPath", "LayerNormalization"]
    x = np.random.default_rng(0).standard_normal((2, SEQ, 8)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_uncopyable_model_is_converted_in_place_with_a_warning():
    class Uncopyable(Block):
        def __deepcopy__(self, memo):
            raise RuntimeError("this layer holds a resource that cannot be copied")

    x_in = keras.Input((SEQ, 8))
    model = keras.Model(x_in, Uncopyable()(x_in))
    with pytest.warns(UserWarning, match="could not copy .*converting it in place"):
        converted, report = tf_fastattn.convert_model(model, return_report=True)
    assert converted is model and report.copy.startswith("in place: no copy could be made (RuntimeError")
    assert _stock_left(model) == [] and len(report.replaced) == 2


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="model must be a Keras model or layer, got ndarray"):
        tf_fastattn.convert_model(np.zeros(3))
    with pytest.raises(ValueError, match="implementation"):
        tf_fastattn.convert_model(classifier(), implementation="fast")


def test_fuse_residual_off_keeps_adds():
    converted = tf_fastattn.convert_model(classifier(), fuse_residual=False)
    assert sum(isinstance(layer, keras.layers.Add) for layer in converted.layers) == 2
    assert _stock_left(converted) == []


def test_inplace_functional_keeps_graph_and_says_why():
    model = classifier()
    converted, report = tf_fastattn.convert_model(model, inplace=True, return_report=True)
    assert converted is model and report.fused_residual == []
    reasons = [reason for _, reason in report.skipped]
    assert reasons == ["residual add not fused: in-place conversion keeps the graph"] * 2


def test_converted_config_and_saved_file_are_the_stock_ones(tmp_path):
    keras.utils.set_random_seed(4)
    model = classifier()
    converted = tf_fastattn.convert_model(model, fuse_residual=False)
    assert converted.get_config() == model.get_config()
    # The file loads as stock Keras layers, without the fused classes.
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not any(is_fused(layer) for layer in _all_layers(loaded))
    x, _ = classification_data(8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), converted.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


# --- patch_keras ---------------------------------------------------------------


def test_patch_keras_context_manager_fuses_layers_built_inside():
    assert not tf_fastattn.patch.is_patched()
    with tf_fastattn.patch_keras():
        assert tf_fastattn.patch.is_patched()
        model = SubclassedModel()
        functional = classifier()
    outside = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    assert not tf_fastattn.patch.is_patched() and not is_fused(outside)
    assert _stock_left(model) == [] and _stock_left(functional) == []
    # The classes Keras sees are unchanged: configs and names are the stock ones.
    att = model.blocks[0].att
    assert type(att).__name__ == "MultiHeadAttention" and "implementation" not in att.get_config()
    assert not is_fused(keras.layers.MultiHeadAttention.from_config(att.get_config()))
    x = {"tokens": classification_data(4)[0]}
    assert model(x).shape == (4, SEQ, 3)


def test_patch_keras_loads_saved_models_fused(tmp_path):
    keras.utils.set_random_seed(5)
    model = classifier()
    model.save(tmp_path / "m.keras")
    x, _ = classification_data(8)
    with tf_fastattn.patch_keras(implementation="fused"):
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert _stock_left(loaded) == []
    assert all(layer.implementation == "fused" for layer in _all_layers(loaded) if is_fused(layer))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_patch_and_unpatch_calls():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf_fastattn.patch_keras()
        try:
            tf_fastattn.patch_keras(implementation="reference")  # a second call changes the implementation
            layer = keras.layers.LayerNormalization()
            assert is_fused(layer) and layer.implementation == "reference"
        finally:
            tf_fastattn.unpatch_keras()
    assert not tf_fastattn.patch.is_patched()
    assert not is_fused(keras.layers.LayerNormalization())
    assert keras.layers.LayerNormalization.__init__.__module__.startswith("keras")
    with pytest.raises(ValueError, match="implementation"):
        tf_fastattn.patch_keras(implementation="fast")
    assert not tf_fastattn.patch.is_patched()
