"""Whole-model training steps on the CPU: keras-hub models as built (stock)
and after `tf_fastattn.convert_model` (fused), same weights, same batch.

- BERT-base-shaped `BertTextClassifier` fine-tuning: hidden 768, 12 heads,
  intermediate 3072, vocabulary 30522, 2 layers (of BERT-base's 12, to keep
  the run short; each layer has BERT-base's shape), T in {128, 512}.
- GPT2-small-shaped `GPT2CausalLM`: hidden 768, 12 heads, intermediate 3072,
  vocabulary 50257 (the LM head is the tied embedding), 2 layers, T = 512.

Each with attention dropout 0.1 (keras-hub's default) and 0. And the keras.io
"Timeseries classification with a Transformer model" at the example's sizes
(T = 500, head_size 256, 4 heads, 4 blocks, batch 64), attention dropout 0.25
(the example's) and 0. One timed round is one `train_on_batch` (forward,
backward, Adam update). `test_timeseries_interleaved` times the timeseries
model's stock and fused steps alternating in one process and reports their
medians and ratio in extra_info (`--benchmark-columns` do not show it; read
the JSON).

Run:  pytest benchmarks/bench_models.py --benchmark-json=models.json \
          --benchmark-columns=median,min --benchmark-sort=name
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_fastattn  # noqa: E402
from interleaved import interleaved_medians  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import real_models  # noqa: E402

keras_hub = pytest.importorskip("keras_hub")

SHAPE = dict(num_heads=12, hidden_dim=768, intermediate_dim=3072, num_layers=2)
CASES = {
    # name: (builder, vocabulary, batch, T)
    "bert_base_T128": ("bert", 30522, 16, 128),
    "bert_base_T512": ("bert", 30522, 4, 512),
    "gpt2_small_T512": ("gpt2", 50257, 4, 512),
    "keras_io_timeseries_T500": ("timeseries", None, 64, 500),
}
TIMESERIES = dict(head_size=256, num_heads=4, ff_dim=4, num_transformer_blocks=4, mlp_units=[128], mlp_dropout=0.4)


def _model(kind, vocabulary, T, dropout):
    if kind == "timeseries":
        return real_models.timeseries_classifier(input_shape=(T, 1), dropout=dropout, **TIMESERIES)
    if kind == "bert":
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=vocabulary, max_sequence_length=T, dropout=dropout, **SHAPE
        )
        model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    else:
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=vocabulary, max_sequence_length=T, dropout=dropout, **SHAPE
        )
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _batch(kind, vocabulary, batch, T):
    rng = np.random.default_rng(0)
    if kind == "timeseries":
        return real_models.timeseries_data(rng, batch, T)
    lengths = rng.integers(T // 2, T + 1, (batch,))
    padding = np.arange(T)[None, :] < lengths[:, None]
    tokens = np.where(padding, rng.integers(1, vocabulary, (batch, T)), 0).astype("int32")
    if kind == "bert":
        x = {"token_ids": tokens, "segment_ids": np.zeros_like(tokens), "padding_mask": padding}
        return x, rng.integers(0, 2, (batch,))
    return {"token_ids": tokens, "padding_mask": padding}, np.roll(tokens, -1, axis=1)


def _rate(kind, dropout):
    return (0.25 if kind == "timeseries" else 0.1) if dropout == "default" else dropout


def _built(kind, vocabulary, T, dropout, impl):
    keras.utils.set_random_seed(0)
    model = _model(kind, vocabulary, T, dropout)
    if impl == "fused":
        model, report = tf_fastattn.convert_model(model, inplace=True, implementation="fused", return_report=True)
        layers = TIMESERIES["num_transformer_blocks"] * 3 if kind == "timeseries" else 3 * SHAPE["num_layers"] + 1
        assert len(report.replaced) == layers and not report.skipped
    return model


@pytest.mark.parametrize("impl", ["fused", "stock"])
@pytest.mark.parametrize("dropout", ["default", 0.0])
@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, case, dropout, impl):
    kind, vocabulary, batch, T = CASES[case]
    dropout = _rate(kind, dropout)
    model = _built(kind, vocabulary, T, dropout, impl)
    x, y = _batch(kind, vocabulary, batch, T)
    model.train_on_batch(x, y)  # trace and build the optimizer
    benchmark.group = f"{case} dropout={dropout}"
    benchmark.extra_info["tokens"] = batch * T
    rounds = 3 if kind == "timeseries" else 5
    benchmark.pedantic(lambda: model.train_on_batch(x, y), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dropout", ["default", 0.0])
def test_timeseries_interleaved(benchmark, dropout):
    """The keras.io timeseries Transformer, stock and fused steps alternating
    (interleaved.py). Timed: one pair of steps; extra_info: each model's
    median step and their ratio."""
    kind, vocabulary, batch, T = CASES["keras_io_timeseries_T500"]
    dropout = _rate(kind, dropout)
    models = {impl: _built(kind, vocabulary, T, dropout, impl) for impl in ("stock", "fused")}
    x, y = _batch(kind, vocabulary, batch, T)
    for model in models.values():
        model.train_on_batch(x, y)
    benchmark.group = f"keras_io_timeseries_T500 dropout={dropout} interleaved"
    med = interleaved_medians(benchmark, {impl: lambda m=m: m.train_on_batch(x, y) for impl, m in models.items()},
                              rounds=6)
    benchmark.extra_info.update(stock_step_s=med["stock"], fused_step_s=med["fused"],
                                speedup=med["stock"] / med["fused"])
