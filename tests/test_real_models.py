"""convert_model and patch_keras on real models (tests/real_models.py): the
keras.io text classifier and English-to-Spanish Transformer, keras-hub
BertTextClassifier, GPT2CausalLM and TransformerEncoder/Decoder.

Each model is built with random weights, trained for an epoch (so that its
optimizer has state), converted, and then must: hold no stock attention or
layer norm, name every layer it converted, keep its class, inputs and
variables, predict as the original, and train as the original for a few
more steps (same weights, optimizer state and dropout seeds). Saved files of
converted models reload in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import keras
import numpy as np
import pytest
import real_models
from tfa_helpers import requires_ops

import tf_fastattn
from tf_fastattn.layers import is_fused

pytestmark = requires_ops
keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is in requirements.txt")

STOCK = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention, keras.layers.LayerNormalization)
NAMES = list(real_models.MODELS)


def _all_layers(model):
    return model._flatten_layers(include_self=True, recursive=True)


def _stock_left(model):
    return [layer.path for layer in _all_layers(model) if isinstance(layer, STOCK) and not is_fused(layer)]


def _trained(name, seed=0):
    """The model, trained one epoch, and a fresh batch of data."""
    build, data = real_models.MODELS[name]
    keras.utils.set_random_seed(seed)
    model = build()
    x, y = data(np.random.default_rng(seed))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return model, data(np.random.default_rng(seed + 1))


def _weights(model):
    return {v.path: np.array(v) for v in model.weights}


@pytest.mark.parametrize("name", NAMES)
def test_converts_fully_and_trains_as_the_original(name):
    model, (x, y) = _trained(name)
    # implementation="fused": a layer that could not run the fused op would raise.
    converted, report = tf_fastattn.convert_model(model, implementation="fused", return_report=True)

    # Every attention and layer norm found and fused, none left stock.
    assert report.copy == "copy" and report.skipped == []
    assert Counter(kind for _, kind in report.replaced) == real_models.EXPECTED_FUSED[name]
    assert _stock_left(converted) == []
    assert len(report.replaced) == sum(isinstance(layer, STOCK) for layer in _all_layers(model))
    # The original is untouched.
    assert not any(is_fused(layer) for layer in _all_layers(model))
    # Same class, inputs, variables (names, order, count) and values.
    assert type(converted) is type(model)
    assert keras.tree.map_structure(lambda t: t.name, converted._inputs_struct) == keras.tree.map_structure(
        lambda t: t.name, model._inputs_struct
    )
    assert [v.path for v in converted.trainable_variables] == [v.path for v in model.trainable_variables]
    assert [v.path for v in converted.optimizer.variables] == [v.path for v in model.optimizer.variables]
    for a, b in zip(converted.weights + converted.optimizer.variables, model.weights + model.optimizer.variables):
        assert a is not b
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=a.path)

    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=2e-6)

    # A few more steps, with the dropout layers on: the same losses and weights.
    h_converted = converted.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    h_model = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    np.testing.assert_allclose(h_converted, h_model, rtol=1e-5)
    # atol: attention's key bias has a zero gradient in exact arithmetic (it
    # shifts every logit of a row equally); Adam turns its rounding noise into
    # steps of ~1e-6, different for any two summation orders.
    expected = _weights(model)
    for path, value in _weights(converted).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_gpt2_keeps_its_task_tied_embedding_and_cached_generation():
    model, (x, _) = _trained("keras_hub_gpt2_causal_lm")
    converted = tf_fastattn.convert_model(model, implementation="fused")
    assert isinstance(converted, keras_hub.models.GPT2CausalLM)
    assert len(converted.trainable_variables) == len(model.trainable_variables)
    # The LM head is the token embedding, reversed: one variable, trained once.
    embeddings = [v for v in converted.trainable_variables if "token_embedding" in v.path]
    assert len(embeddings) == 1
    # Cached greedy generation runs through CachedMultiHeadAttention's cache
    # path, fused, and produces the original's tokens.
    attention = converted.backbone.transformer_layers[0]._self_attention_layer
    assert is_fused(attention) and type(attention).__name__ == "CachedMultiHeadAttention"
    prompt = {"token_ids": x["token_ids"][:4].copy(), "padding_mask": np.zeros_like(x["padding_mask"][:4])}
    prompt["padding_mask"][:, :3] = True
    prompt["token_ids"][:, 3:] = 0
    out_converted = converted.generate(prompt, stop_token_ids=None)
    out_model = model.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(out_converted["token_ids"], out_model["token_ids"])
    np.testing.assert_array_equal(out_converted["padding_mask"], out_model["padding_mask"])
    # A converted backbone goes back into a task.
    task = keras_hub.models.GPT2CausalLM(backbone=converted.backbone, preprocessor=None)
    np.testing.assert_allclose(task.predict(x, verbose=0), converted.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_inplace_conversion_of_a_model_that_ran_retraces_fused(monkeypatch):
    """fit/predict/generate functions traced before the conversion used the
    stock layers: after an in-place conversion they are traced again."""
    from tf_fastattn.layers import multi_head_attention

    model, (x, y) = _trained("keras_hub_gpt2_causal_lm")
    prompt = {"token_ids": x["token_ids"][:2], "padding_mask": x["padding_mask"][:2]}
    model.predict(x, verbose=0)
    model.generate(prompt, stop_token_ids=None)
    calls = []
    original = multi_head_attention.fused_layer_attention
    monkeypatch.setattr(multi_head_attention, "fused_layer_attention",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    assert tf_fastattn.convert_model(model, inplace=True) is model
    for run in (lambda: model.fit(x, y, epochs=1, verbose=0), lambda: model.predict(x, verbose=0),
                lambda: model.generate(prompt, stop_token_ids=None)):
        calls.clear()
        run()
        assert calls, "a function traced before the conversion ran the stock layers"


def test_dropout_training_is_reproducible_across_conversion():
    """Attention dropout on: the fused op draws its own masks (not Keras'),
    from the layer's seed generator, which the copy carries over."""
    build, data = real_models.MODELS["keras_hub_bert_classifier"]
    x, y = data(np.random.default_rng(0))
    keras.utils.set_random_seed(0)
    model = real_models.bert_classifier(dropout=0.1)
    a = tf_fastattn.convert_model(model)
    b = tf_fastattn.convert_model(model)
    h_a = a.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    h_b = b.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    assert h_a == h_b


def test_patch_keras_builds_keras_hub_models_fused(tmp_path):
    keras.utils.set_random_seed(0)
    stock = real_models.bert_classifier()
    stock.backbone.save_to_preset(str(tmp_path / "bert"))
    x, _ = real_models.bert_data(np.random.default_rng(1))
    with tf_fastattn.patch_keras():
        built = real_models.bert_classifier()
        backbone = keras_hub.models.BertBackbone.from_preset(str(tmp_path / "bert"))
        lm = real_models.gpt2_causal_lm()
    for model in (built, backbone, lm):
        assert _stock_left(model) == []
        assert sum(is_fused(layer) for layer in _all_layers(model)) == 7
    assert _stock_left(real_models.bert_classifier())  # unpatched again
    np.testing.assert_allclose(backbone.predict(x, verbose=0)["sequence_output"],
                               stock.backbone.predict(x, verbose=0)["sequence_output"], rtol=1e-5, atol=2e-6)


_RELOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tf_fastattn  # registers the package's layers and ops: nothing else is imported from it
sys.path.insert(0, sys.argv[2])
import keras
import real_models  # the keras.io examples' custom layers
cases = json.loads(open(sys.argv[1]).read())
for case in cases:
    data = np.load(case["data"], allow_pickle=True)
    x = data["x"].item() if data["x"].dtype == object else data["x"]
    expected = data["expected"]
    model = keras.saving.load_model(case["keras"])
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=2e-6, err_msg=case["keras"])
    with tf_fastattn.patch_keras():
        fused = keras.saving.load_model(case["keras"])
    stock = (keras.layers.MultiHeadAttention, keras.layers.LayerNormalization)
    assert all(not isinstance(l, stock) or tf_fastattn.layers.is_fused(l)
               for l in fused._flatten_layers(include_self=True, recursive=True)), case["keras"]
    np.testing.assert_allclose(fused.predict(x, verbose=0), expected, rtol=1e-5, atol=2e-6, err_msg=case["keras"])
    served = tf.saved_model.load(case["saved_model"])
    args = {k: tf.constant(v) for k, v in x.items()} if isinstance(x, dict) else tf.constant(x)
    got = served.serve(args)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=2e-6, err_msg=case["saved_model"])
    print("reloaded", case["keras"], flush=True)
"""


@pytest.mark.slow
def test_saved_files_of_converted_models_reload_in_a_fresh_process(tmp_path):
    from test_convert import classifier
    from test_multi_head_attention import classification_data

    cases = []
    models = {name: _trained(name) for name in NAMES}
    keras.utils.set_random_seed(0)
    # A plain functional model whose residual adds become fused layer norms:
    # its file holds tf_fastattn>LayerNormalization.
    models["residual_fused_classifier"] = (classifier(), classification_data(8))
    for name, (model, (x, _)) in models.items():
        converted = tf_fastattn.convert_model(model)
        # In the inputs' own dtypes, as a serving signature wants them.
        x = keras.tree.map_structure(lambda t, v: np.asarray(v).astype(t.dtype), converted._inputs_struct, x)
        case = {"keras": str(tmp_path / f"{name}.keras"), "data": str(tmp_path / f"{name}.npz")}
        converted.save(case["keras"])
        case["saved_model"] = str(tmp_path / f"{name}_saved_model")
        converted.export(case["saved_model"], verbose=False)
        graph = (tmp_path / f"{name}_saved_model" / "saved_model.pb").read_bytes()
        assert b"TfFastattn>Attention" in graph and b"TfFastattn>LayerNorm" in graph, name
        np.savez(case["data"], x=np.array(x, dtype=object) if isinstance(x, dict) else x,
                 expected=converted.predict(x, verbose=0))
        cases.append(case)
    assert "tf_fastattn>LayerNormalization" in _config_text(cases[-1]["keras"])
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "cases.json"), tests_dir],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("reloaded") == len(cases)


def _config_text(path):
    import zipfile

    with zipfile.ZipFile(path) as f:
        return f.read("config.json").decode()
