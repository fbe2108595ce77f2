"""keras-hub's decoder LLMs on the fused ops (tests/hub_decoders.py builds
tiny random ones from the real classes): every family's attention layers and
RMS norms are switched by convert_model and built fused under patch_keras;
the traced forward and backward graphs hold one fused attention op per layer
and one norm op per norm; outputs and gradients meet the accuracy criterion
against the stock model (float32, the float64 model as reference); training
steps give the stock losses; greedy generate() gives the stock tokens with
the fused op in its decoding graph; .keras files round-trip; mixed_bfloat16
runs fused. keras.ops.dot_product_attention runs fused under patch_keras with
each of Keras' arguments.

The quick suite runs a representative set of families (GQA and MQA,
sliding windows in the mask and in the layer, soft-caps, attention dropout,
mixture of experts); the others are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

import hub_decoders as hd
import tf_fastattn
from tfa_helpers import assert_close_to_reference, requires_ops

pytestmark = requires_ops
keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is in requirements.txt")

QUICK = ["llama", "mistral", "gemma2", "qwen_window", "gpt_neox_dropout"]
FAMILY_PARAMS = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in hd.FAMILIES]
OPS = ("TfFastattn>Attention", "TfFastattn>AttentionGrad", "TfFastattn>LayerNorm", "TfFastattn>LayerNormGrad")


def op_counts(fn, *args):
    """Op types in the traced graph of `fn(*args)`, nested functions included."""
    graph_def = tf.function(fn).get_concrete_function(*args).graph.as_graph_def()
    counts = Counter(n.op for n in graph_def.node)
    for f in graph_def.library.function:
        counts.update(n.op for n in f.node_def)
    return counts


def loss_and_grads(model, x):
    with tf.GradientTape() as tape:
        y = model(x, training=False)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    # (embedding gradients are IndexedSlices; unused weights have none)
    return y, [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
               for v, g in zip(model.trainable_variables, grads)]


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_convert_matches_the_stock_model(name):
    lm = hd.causal_lm(name)
    stock = lm.backbone
    x = hd.batch()
    converted, report = tf_fastattn.convert_model(stock, implementation="fused", return_report=True)
    attention, norms = hd.EXPECTED[name]
    assert report.skipped == [], report
    assert len(report.replaced) == hd.fused_layer_count(name), report
    counts = op_counts(lambda x: loss_and_grads(converted, x), x)
    assert [counts[op] for op in OPS] == [attention, attention, norms, norms], counts
    if name in hd.STRUCTURED_MASK:
        # The blocks' masks reach the op as structure: causal at the cache
        # index, the key padding [B, 1, 1, S]; no [B, T, S] mask.
        graph = tf.function(lambda x: converted(x)).get_concrete_function(x).graph
        for op in (o for o in graph.get_operations() if o.type == "TfFastattn>Attention"):
            assert op.get_attr("is_causal") and op.get_attr("num_offset") == 1
            assert op.inputs[3].shape.as_list() == [2, 1, 1, 12], op.inputs[3].shape

    # Outputs and every gradient: the accuracy criterion, with the stock model
    # in float32 as the naive baseline and the model in float64 as the
    # reference. (Converted, so that its attention and norms are float64 too:
    # the stock norms cast to float32 whatever the model's dtype, which would
    # give the reference the naive model's rounding.)
    keras.mixed_precision.set_global_policy("float64")
    try:
        reference = hd.causal_lm(name).backbone
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference.set_weights(stock.get_weights())
    reference = tf_fastattn.convert_model(reference, implementation="fused")
    y, grads = loss_and_grads(converted, x)
    y_naive, grads_naive = loss_and_grads(stock, x)
    y_ref, grads_ref = loss_and_grads(reference, x)
    assert_close_to_reference(y, y_naive, y_ref, tf.float32, f"{name} output")
    for v, g, n, r in zip(converted.trainable_variables, grads, grads_naive, grads_ref):
        assert_close_to_reference(g, n, r, tf.float32, f"{name} d{v.path}")


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_patch_keras_builds_fused_layers(name):
    with tf_fastattn.patch_keras(implementation="fused"):
        lm = hd.causal_lm(name)
    attention, norms = hd.EXPECTED[name]
    counts = op_counts(lambda x: loss_and_grads(lm.backbone, x), hd.batch())
    assert [counts[op] for op in OPS] == [attention, attention, norms, norms], counts
    fused = [layer for layer in lm._flatten_layers(include_self=True, recursive=True)
             if tf_fastattn.layers.is_fused(layer)]
    assert len(fused) == hd.fused_layer_count(name)
    # Unpatched: the stock classes again.
    assert not any(tf_fastattn.layers.is_fused(layer) for layer in
                   hd.causal_lm(name).backbone._flatten_layers(include_self=True, recursive=True))


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("llama", "gemma2") else pytest.mark.slow)
                                  for n in ("llama", "mistral", "gemma2", "qwen", "gpt_neox_dropout", "mixtral")])
def test_training_steps_give_the_stock_losses(name):
    x = hd.batch(n=4)
    y = np.roll(x["token_ids"], -1, axis=1)
    losses = []
    for convert in (False, True):
        lm = hd.causal_lm(name, seed=3)
        if convert:
            lm = tf_fastattn.convert_model(lm, implementation="fused")
        lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(True))
        keras.utils.set_random_seed(5)  # the same dropout seeds on both sides
        history = lm.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
        losses.append(history.history["loss"])
    if name == "gpt_neox_dropout":
        # Attention dropout draws other masks inside the op (same rate): the
        # losses agree to the noise that makes, not to rounding.
        np.testing.assert_allclose(losses[1], losses[0], rtol=0.05)
    else:
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def _generate_graph_ops(lm):
    spec = {"token_ids": tf.TensorSpec([None, None], tf.int32), "padding_mask": tf.TensorSpec([None, None], tf.bool)}
    fn = lm.generate_function
    return op_counts(lambda x: fn(x, None), spec) if hasattr(fn, "get_concrete_function") else Counter()


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("llama", "gemma2") else pytest.mark.slow)
                                  for n in ("llama", "mistral", "gemma2", "qwen", "qwen_window", "phi3")])
def test_generate_gives_the_stock_tokens(name):
    x = hd.batch(length=16, pad=0)
    x["padding_mask"][:, 5:] = False
    x["padding_mask"][1, 5:8] = True
    x["token_ids"][~x["padding_mask"]] = 0
    stock = hd.causal_lm(name)
    # keras-hub's Qwen with a sliding window cannot generate under tf.function
    # on TensorFlow (it tests the cache index as a Python bool): the stock
    # tokens come from an eager run.
    stock.compile(sampler="greedy", run_eagerly=name == "qwen_window")
    want = stock.generate(x, stop_token_ids=None)["token_ids"]
    converted = tf_fastattn.convert_model(stock, implementation="fused")
    converted.compile(sampler="greedy")
    got = converted.generate(x, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(got, want)
    assert _generate_graph_ops(converted)["TfFastattn>Attention"] >= 2  # the prefill's and the step's


def test_keras_file_round_trip(tmp_path):
    """A converted model saves the stock classes' file: it loads (stock)
    with or without tf_fastattn, and fused again under patch_keras."""
    lm = hd.causal_lm("gemma2")
    x = hd.batch()
    converted = tf_fastattn.convert_model(lm)
    want = converted.predict(x, verbose=0)
    path = str(tmp_path / "lm.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert not any(tf_fastattn.layers.is_fused(layer) for layer in loaded._flatten_layers(recursive=True))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, rtol=1e-4, atol=2e-5)
    with tf_fastattn.patch_keras():
        fused = keras.saving.load_model(path)
    assert sum(tf_fastattn.layers.is_fused(layer) for layer in fused._flatten_layers(recursive=True)) == \
        hd.fused_layer_count("gemma2")
    np.testing.assert_allclose(fused.predict(x, verbose=0), want, rtol=1e-5, atol=2e-6)
    np.save(str(tmp_path / "x.npy"), x["token_ids"])
    np.save(str(tmp_path / "m.npy"), x["padding_mask"])
    np.save(str(tmp_path / "want.npy"), want)
    code = (
        "import sys, numpy as np, keras, keras_hub\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "x = {'token_ids': np.load(sys.argv[2]), 'padding_mask': np.load(sys.argv[3])}\n"
        "np.testing.assert_allclose(m.predict(x, verbose=0), np.load(sys.argv[4]), rtol=1e-4, atol=2e-5)\n"
        "assert 'tf_fastattn' not in sys.modules\n"
        "print('loaded without tf_fastattn')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.npy"), str(tmp_path / "m.npy"),
                             str(tmp_path / "want.npy")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0 and "loaded without tf_fastattn" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_mixed_bfloat16(name):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        lm = hd.causal_lm(name)
        x = hd.batch()
        want = lm.backbone(x)
        converted = tf_fastattn.convert_model(lm.backbone, implementation="fused")
        got = converted(x)
        counts = op_counts(lambda x: loss_and_grads(converted, x), x)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert got.dtype == want.dtype == tf.bfloat16
    assert counts["TfFastattn>Attention"] == 2 and counts["TfFastattn>AttentionGrad"] == 2
    err = float(tf.reduce_max(tf.abs(tf.cast(got, tf.float32) - tf.cast(want, tf.float32))))
    assert err <= 0.05 * float(tf.reduce_max(tf.abs(tf.cast(want, tf.float32)))), err


# ---- keras.ops.dot_product_attention under patch_keras ------------------------------------

class CustomAttention(keras.layers.Layer):
    """A user's layer calling keras.ops.dot_product_attention with its arguments."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def call(self, q, k, v, mask=None):
        return keras.ops.dot_product_attention(q, k, v, mask=mask, **self.kw)


@pytest.mark.parametrize("kw", [
    dict(), dict(is_causal=True), dict(scale=0.3), dict(attn_logits_soft_cap=5.0), dict(flash_attention=True),
    dict(is_causal=True, attn_logits_soft_cap=20.0, flash_attention=True), dict(mask="keys"), dict(bias=True),
], ids=lambda kw: "-".join(kw) or "plain")
def test_keras_ops_dot_product_attention_runs_fused(kw):
    rng = np.random.default_rng(0)
    q = tf.constant(rng.standard_normal((2, 9, 4, 16)) * 3, tf.float32)
    k = tf.constant(rng.standard_normal((2, 11, 2, 16)), tf.float32)  # GQA
    v = tf.constant(rng.standard_normal((2, 11, 2, 16)), tf.float32)
    kw = dict(kw)
    mask = tf.constant(rng.random((2, 1, 1, 11)) < 0.7) if kw.pop("mask", None) else None
    if kw.pop("bias", None):
        kw["bias"] = tf.constant(rng.standard_normal((1, 4, 9, 11)), tf.float32)
    ref = tf_fastattn.reference.attention(q, k, v, mask=mask, scale=kw.get("scale"),
                                          is_causal=kw.get("is_causal", False),
                                          logits_soft_cap=kw.get("attn_logits_soft_cap"), bias=kw.get("bias"))
    layer = CustomAttention(**kw)
    with tf_fastattn.patch_keras():
        eager = layer(q, k, v, mask)
        inputs = [keras.Input((9, 4, 16)), keras.Input((11, 2, 16)), keras.Input((11, 2, 16))]
        functional = keras.Model(inputs, CustomAttention(**kw)(*inputs, mask))
        traced = functional([q, k, v])
        counts = op_counts(lambda q, k, v: layer(q, k, v, mask), q, k, v)
    for got in (eager, traced):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=2e-6)
    assert counts["TfFastattn>Attention"] == (0 if "bias" in kw else 1), counts
    if kw.get("flash_attention") or kw.get("attn_logits_soft_cap"):
        # Keras' own function again: it refuses both.
        with pytest.raises(ValueError):
            keras.ops.dot_product_attention(q, k, v, **kw)


def test_keras_ops_flash_attention_with_a_bias_says_why():
    q = tf.ones((1, 4, 2, 8))
    with tf_fastattn.patch_keras():
        with pytest.raises(ValueError, match="flash_attention=True is not possible with a bias"):
            keras.ops.dot_product_attention(q, q, q, bias=tf.zeros((1, 2, 4, 4)), flash_attention=True)
        with pytest.raises(ValueError, match="flash_attention=True needs a constant scale"):
            keras.ops.dot_product_attention(q, q, q, flash_attention=True, scale=tf.Variable(0.5))


def test_report_names_what_is_not_fused():
    falcon = keras_hub.models.FalconBackbone(vocabulary_size=97, num_layers=1, num_attention_heads=2, hidden_dim=16,
                                             intermediate_dim=32)
    _, report = tf_fastattn.convert_model(falcon, return_report=True)
    reasons = dict(report.skipped)
    assert any("ALiBi" in r for r in reasons.values()), report
