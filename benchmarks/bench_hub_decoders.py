"""keras-hub decoder LLMs, stock against converted (tf_fastattn.convert_model),
on the CPU: train steps and greedy generate(), the two models' steps
alternating in one process (interleaved.py; medians of the timed rounds).

- Llama-shaped (d_model 512, 8 query heads, 2 KV heads, 4 layers, head dim
  64, FFN 1376, vocabulary 1024), B 1, T 2048: a train step, float32 and
  mixed_bfloat16;
- Mistral-shaped, the same with a sliding window of 256, T 4096;
- Gemma-shaped (head dim 256, 4 query and 2 KV heads, d_model 512, soft-cap
  50, sliding window 512, post-norms), T 2048;
- generate(): 256 new tokens after a 512-token prompt, batch 1 and 8 (the
  Llama shape).

Run:  pytest benchmarks/bench_hub_decoders.py --benchmark-json=hub.json
      pytest benchmarks/bench_hub_decoders.py -k "train and llama" ...

Ratios (stock time / fused time) are printed and kept in extra_info.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_fastattn  # noqa: E402
from interleaved import interleaved_medians  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import hub_decoders  # noqa: E402

keras_hub = pytest.importorskip("keras_hub")

LLAMA = dict(vocabulary_size=1024, num_layers=4, hidden_dim=512, intermediate_dim=1376, num_query_heads=8,
             num_key_value_heads=2)
SHAPES = {
    "llama": ("llama", LLAMA, 2048),
    "mistral_window256": ("mistral", dict(LLAMA, sliding_window=256), 4096),
    "gemma_softcap_window512": ("gemma2", dict(vocabulary_size=1024, num_layers=4, hidden_dim=512,
                                               intermediate_dim=1024, num_query_heads=4, num_key_value_heads=2,
                                               head_dim=256, sliding_window_size=512,
                                               attention_logit_soft_cap=50.0), 2048),
}


def _pair(family, overrides, seed=0):
    """The stock causal LM and its converted copy (same weights)."""
    stock = hub_decoders.causal_lm(family, seed=seed, **overrides)
    fused = tf_fastattn.convert_model(stock, implementation="fused")
    return stock, fused


def _report(benchmark, medians, unit="s"):
    info = {f"{k}_{unit}": round(v, 4) for k, v in medians.items()}
    info["stock_over_fused"] = round(medians["stock"] / medians["fused"], 3)
    benchmark.extra_info.update(info)
    print(info)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step(benchmark, shape, policy):
    family, overrides, T = SHAPES[shape]
    keras.mixed_precision.set_global_policy(policy)
    try:
        stock, fused = _pair(family, overrides)
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, overrides["vocabulary_size"], (1, T + 1)).astype("int32")
        x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((1, T), bool)}
        y = tokens[:, 1:]
        fns = {}
        for name, model in (("stock", stock), ("fused", fused)):
            model.compile(optimizer=keras.optimizers.SGD(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.train_on_batch(x, y)  # traces
            fns[name] = lambda model=model: model.train_on_batch(x, y)
        medians = interleaved_medians(benchmark, fns, rounds=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _report(benchmark, medians)


@pytest.mark.parametrize("batch", [1, 8])
def test_generate(benchmark, batch):
    prompt, new = 512, 256
    stock, fused = _pair("llama", LLAMA)
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, prompt + new), "int32")
    tokens[:, :prompt] = rng.integers(1, LLAMA["vocabulary_size"], (batch, prompt))
    mask = np.zeros((batch, prompt + new), bool)
    mask[:, :prompt] = True
    inputs = {"token_ids": tokens, "padding_mask": mask}
    fns = {}
    for name, model in (("stock", stock), ("fused", fused)):
        model.compile(sampler="greedy")
        model.generate(inputs, stop_token_ids=None)  # compiles
        fns[name] = lambda model=model: model.generate(inputs, stop_token_ids=None)
    medians = interleaved_medians(benchmark, fns, rounds=3)
    tokens_per_s = {k: batch * new / v for k, v in medians.items()}
    benchmark.extra_info.update({f"{k}_tokens_per_s": round(v, 1) for k, v in tokens_per_s.items()})
    _report(benchmark, medians)
    print({f"{k}_tokens_per_s": round(v, 1) for k, v in tokens_per_s.items()})
    _ = time  # (medians are wall-clock seconds per generate() call)
