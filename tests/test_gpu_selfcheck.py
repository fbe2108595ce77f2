"""The one-time GPU self-check of kernel variants (tf_fastattn/_selfcheck.py).

No GPU here: the check itself runs on the CPU device (the CPU kernels pass it,
a deliberately wrong fused computation fails it with the variant named), and
without a visible GPU `passes` checks nothing.
"""

from __future__ import annotations

import tensorflow as tf

import tf_fastattn
from tf_fastattn import _selfcheck


def test_the_check_passes_correct_kernels():
    for op, dtype, head_dim in (("attention", "float32", 64), ("attention", "bfloat16", 100),
                                ("layer_norm", "float16", None)):
        r = _selfcheck.check(op, dtype, head_dim, device="/CPU:0")
        assert r["ok"], r["message"]
        assert r["message"].startswith("max errors:")


def test_the_check_fails_a_wrong_kernel():
    def off_by_a_bit(q, k, v, d_o):
        out = _selfcheck._fused_attention(q, k, v, d_o)
        return [out[0] * 1.01] + out[1:]

    def raises(*_):
        raise tf.errors.InternalError(None, None, "cuLaunchKernel failed with CUDA error 719")

    r = _selfcheck.check("attention", "float16", 64, device="/CPU:0", key="attention sm_90 x", fused=off_by_a_bit)
    assert not r["ok"] and r["message"].startswith("AssertionError: out: max error"), r
    r = _selfcheck.check("attention", "float16", 64, device="/CPU:0", fused=raises)
    assert not r["ok"] and "CUDA error 719" in r["message"], r


def test_without_a_gpu_nothing_is_checked():
    assert not tf.config.list_physical_devices("GPU")
    assert _selfcheck.passes("attention", "float16", 64)
    assert tf_fastattn.build_info()["gpu_self_checks"] == {}


def test_variant_keys_name_family_and_bucket():
    assert _selfcheck.variant_key("attention", 90, "bfloat16", 100) == "attention sm_90 tensor_core bfloat16 head_dim 128"
    assert _selfcheck.variant_key("attention", 75, "float16", 64) == "attention sm_75 simt float16 head_dim 64"
    assert _selfcheck.variant_key("layer_norm", 80, "float32") == "layer_norm sm_80 float32"


def test_the_check_runs_while_a_model_is_traced():
    results = []

    @tf.function
    def traced(x):
        results.append(_selfcheck.check("attention", "float16", 40, device="/CPU:0"))
        return x

    traced(tf.constant(1.0))
    assert results[0]["ok"], results[0]["message"]


def test_the_xla_check_passes_the_custom_calls_and_fails_a_wrong_one():
    # The check a GPU runs once before the layers support XLA there; here on
    # the CPU's custom calls.
    r = _selfcheck.xla_check("/CPU:0")
    assert r["ok"], r["message"]
    q = tf.ones([1, 8, 2, 16], tf.bfloat16)
    hlo = _selfcheck._xla_attention.experimental_get_compiler_ir(q, q, q, q)(stage="hlo")
    assert 'custom_call_target="tf_fastattn_attention_bwd"' in hlo
    assert "attention bfloat16 max errors" in r["message"] and "layer_norm float32 max errors" in r["message"]

    def wrong(x, r, g, b, dy):
        out = _selfcheck._xla_layer_norm(x, r, g, b, dy)
        return [out[0] + 1e-3] + out[1:]

    r = _selfcheck.xla_check("/CPU:0", layer_norm=wrong)
    assert not r["ok"] and r["message"].startswith("layer_norm float32 under XLA: AssertionError: y: max error"), r
    # Without a GPU nothing is checked.
    assert _selfcheck.xla_gpu_reason() is None and not _selfcheck._xla_result
