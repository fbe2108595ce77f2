"""Tiny randomly initialised keras-hub decoder LLMs (no downloads), built from
the real classes with the settings that reach every fused path: GQA/MQA,
sliding windows, soft-caps, post-norms, query-key norms, mixtures of
experts, GPT-NeoX's attention dropout. Shared by tests/test_hub_decoders.py
and benchmarks/bench_hub_decoders.py."""

from __future__ import annotations

import keras
import numpy as np

VOCAB = 97


def _hub():
    import keras_hub

    return keras_hub


def backbone(name, dtype=None, **overrides):
    """The backbone of family `name` (FAMILIES), tiny unless overridden."""
    m = _hub().models
    kw = dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=32, intermediate_dim=64)
    if dtype is not None:
        kw["dtype"] = dtype
    if name == "llama":
        cls, kw = m.LlamaBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2)
    elif name == "llama3":
        cls, kw = m.Llama3Backbone, dict(kw, num_query_heads=4, num_key_value_heads=1)
    elif name == "mistral":
        cls, kw = m.MistralBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2, sliding_window=5)
    elif name == "mixtral":
        cls, kw = m.MixtralBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2, num_experts=4, top_k=2,
                                          sliding_window=6)
    elif name == "phi3":
        cls, kw = m.Phi3Backbone, dict(kw, num_query_heads=4, num_key_value_heads=4)
    elif name == "qwen":
        cls, kw = m.QwenBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2)
    elif name == "qwen_window":
        cls, kw = m.QwenBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2,
                                       use_sliding_window_attention=True, sliding_window_size=5)
    elif name == "qwen_moe":
        cls, kw = m.QwenMoeBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2, moe_intermediate_dim=16,
                                          shared_expert_intermediate_dim=32, num_experts=4, top_k=2)
    elif name == "qwen3":
        cls, kw = m.Qwen3Backbone, dict(kw, num_query_heads=4, num_key_value_heads=2, head_dim=8)
    elif name == "qwen3_moe":
        cls, kw = m.Qwen3MoeBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2, head_dim=8,
                                           moe_intermediate_dim=16, num_experts=4, top_k=2)
    elif name == "smollm3":
        kw.pop("dtype", None)
        cls, kw = m.SmolLM3Backbone, dict(kw, num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
                                          attention_dropout=0.0, rope_layer_enabled_list=[True, False],
                                          layer_types=["full_attention", "full_attention"], mlp_bias=False,
                                          layer_norm_epsilon=1e-6, max_position_embeddings=64, rope_theta=10000.0,
                                          partial_rotary_factor=1.0)
    elif name == "gpt_neox":
        cls, kw = m.GPTNeoXBackbone, dict(kw, num_heads=4)
    elif name == "gpt_neox_dropout":
        cls, kw = m.GPTNeoXBackbone, dict(kw, num_heads=4, dropout=0.1)
    elif name == "gemma":
        cls, kw = m.GemmaBackbone, dict(kw, num_query_heads=4, num_key_value_heads=1, head_dim=8)
    elif name == "gemma2":  # Gemma 2 settings: soft-caps, sliding window, post-norms
        cls, kw = m.GemmaBackbone, dict(kw, num_query_heads=4, num_key_value_heads=2, head_dim=8,
                                        query_head_dim_normalize=True, use_post_ffw_norm=True,
                                        use_post_attention_norm=True, final_logit_soft_cap=30.0,
                                        attention_logit_soft_cap=50.0, use_sliding_window_attention=True,
                                        sliding_window_size=5)
    elif name == "gemma3":
        cls, kw = m.Gemma3Backbone, dict(kw, image_size=16, num_query_heads=4, num_key_value_heads=2, head_dim=8,
                                         query_head_dim_normalize=True, use_query_key_norm=True,
                                         use_post_ffw_norm=True, use_post_attention_norm=True,
                                         use_sliding_window_attention=True, sliding_window_size=5,
                                         vision_encoder=None)
    else:
        raise ValueError(name)
    kw.update(overrides)
    return cls(**kw)


CAUSAL_LM = {
    "llama": "LlamaCausalLM", "llama3": "Llama3CausalLM", "mistral": "MistralCausalLM",
    "mixtral": "MixtralCausalLM", "phi3": "Phi3CausalLM", "qwen": "QwenCausalLM", "qwen_window": "QwenCausalLM",
    "qwen_moe": "QwenMoeCausalLM", "qwen3": "Qwen3CausalLM", "qwen3_moe": "Qwen3MoeCausalLM",
    "smollm3": "SmolLM3CausalLM", "gpt_neox": "GPTNeoXCausalLM", "gpt_neox_dropout": "GPTNeoXCausalLM",
    "gemma": "GemmaCausalLM", "gemma2": "GemmaCausalLM", "gemma3": "Gemma3CausalLM",
}

FAMILIES = list(CAUSAL_LM)

# The fused attention op and RMS norms (or layer norms) each tiny backbone
# holds: attention layers, norms.
EXPECTED = {
    "llama": (2, 5), "llama3": (2, 5), "mistral": (2, 5), "mixtral": (2, 5), "phi3": (2, 5), "qwen": (2, 5),
    "qwen_window": (2, 5), "qwen_moe": (2, 5), "qwen3": (2, 9), "qwen3_moe": (2, 9), "smollm3": (2, 5),
    "gpt_neox": (2, 5), "gpt_neox_dropout": (2, 5), "gemma": (2, 5), "gemma2": (2, 9), "gemma3": (2, 13),
}
# Families whose decoder blocks hand their attention a structured mask
# (tf_fastattn.layers.hub.FusedHubDecoderMixin): one block per attention layer.
STRUCTURED_MASK = {name for name in EXPECTED if not name.startswith("gemma")}


def fused_layer_count(name):
    attention, norms = EXPECTED[name]
    return attention + norms + (attention if name in STRUCTURED_MASK else 0)


def causal_lm(name, seed=0, dtype=None, **overrides):
    keras.utils.set_random_seed(seed)
    bb = backbone(name, dtype=dtype, **overrides)
    return getattr(_hub().models, CAUSAL_LM[name])(backbone=bb, preprocessor=None)


def batch(n=2, length=12, seed=1, pad=2):
    """Token ids and a padding mask (the last `pad` tokens of the first
    sequence are padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (n, length)).astype("int32")
    mask = np.ones((n, length), bool)
    if pad:
        mask[0, length - pad:] = False
        tokens[0, length - pad:] = 0
    return {"token_ids": tokens, "padding_mask": mask}
