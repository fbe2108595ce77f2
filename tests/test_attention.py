"""TfFastattn>Attention and tf_fastattn.dot_product_attention: parity with
keras.ops.dot_product_attention (float64-reference criterion), gradients,
masks, dropout, determinism, graph mode and XLA, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from tfa_helpers import DTYPES, assert_close_to_reference, random_tensor, requires_ops
from numpy_reference import np_attention_bwd, np_attention_fwd, philox_keep_mask

import tf_fastattn
from tf_fastattn import _loader, reference
from tf_fastattn.attention import fused_attention

pytestmark = requires_ops


def keras_attention(q, k, v, mask=None, is_causal=False):
    """keras.ops.dot_product_attention with the exact default scale.

    Keras computes 1/sqrt(H) in float32 even for float64 inputs, so the scale
    is passed as a Python float; and its TF backend cannot broadcast a single
    kv head (MQA) in its einsum, so that case gets the heads repeated (the
    same math).
    """
    if k.shape[2] == 1 and q.shape[2] > 1:
        k, v = (tf.repeat(t, q.shape[2], axis=2) for t in (k, v))
    return keras.ops.dot_product_attention(q, k, v, mask=mask, scale=1.0 / np.sqrt(q.shape[-1]), is_causal=is_causal)


def forward_backward(fn, q, k, v, d_out):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v)
    return out, tape.gradient(out, [q, k, v], output_gradients=d_out)


def check_parity(q, k, v, mask=None, is_causal=False, rng=None, dtype=tf.float32):
    """Fused vs Keras in `dtype` vs the float64 reference, outputs and gradients."""
    d_out = random_tensor(rng, q.shape[:3] + v.shape[3:], dtype)
    cast = [tf.cast(t, dtype) for t in (q, k, v)]
    fused = forward_backward(lambda *a: tf_fastattn.dot_product_attention(*a, mask=mask, is_causal=is_causal), *cast, d_out)
    naive = forward_backward(lambda *a: keras_attention(*a, mask=mask, is_causal=is_causal), *cast, d_out)
    c64 = [tf.cast(t, tf.float64) for t in cast]
    ref = forward_backward(
        lambda *a: reference.attention(*a, mask=mask, is_causal=is_causal), *c64, tf.cast(d_out, tf.float64)
    )
    assert fused[0].dtype == dtype
    assert_close_to_reference(fused[0], naive[0], ref[0], dtype, "out")
    for name, f, n, r in zip(("dq", "dk", "dv"), fused[1], naive[1], ref[1]):
        assert f.dtype == dtype
        assert_close_to_reference(f, n, r, dtype, name)


SHAPES = [  # B, T, S, N, Nkv, H, Hv
    (2, 1, 1, 2, 2, 8, 8),
    (2, 7, 97, 4, 2, 40, 40),  # GQA, T < S
    (1, 97, 7, 4, 4, 80, 64),  # T > S, Hv != H
    (1, 128, 128, 4, 1, 64, 64),  # MQA
    (1, 1025, 97, 2, 2, 128, 128),
    (1, 97, 1025, 2, 1, 256, 256),
    (1, 1025, 1025, 1, 1, 64, 48),
]


def _shape_id(s):
    return "B{}_T{}_S{}_N{}_Nkv{}_H{}_Hv{}".format(*s)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_parity_with_keras(shape, is_causal, dtype, rng):
    B, T, S, N, Nkv, H, Hv = shape
    q = random_tensor(rng, (B, T, N, H), tf.float64)
    k = random_tensor(rng, (B, S, Nkv, H), tf.float64)
    v = random_tensor(rng, (B, S, Nkv, Hv), tf.float64)
    check_parity(q, k, v, is_causal=is_causal, rng=rng, dtype=dtype)


def _mask(kind, B, N, T, S, rng):
    if kind == "padding":  # key padding, [B, 1, 1, S]
        lengths = rng.integers(1, S + 1, size=B)
        return tf.constant(np.arange(S)[None, None, None, :] < lengths[:, None, None, None])
    if kind == "arbitrary":  # a dense per-head mask
        return tf.constant(rng.random((B, N, T, S)) < 0.6)
    if kind == "rank2":  # [T, S], left-padded to [1, 1, T, S]
        return tf.constant(rng.random((T, S)) < 0.6)
    if kind == "fully_masked_rows":  # [B, 1, T, S] with query rows that see nothing
        m = rng.random((B, 1, T, S)) < 0.7
        m[:, :, 1::4] = False
        return tf.constant(m)
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["padding", "arbitrary", "rank2", "fully_masked_rows"])
def test_masks_parity_with_keras(kind, is_causal, dtype, rng):
    B, T, S, N, Nkv, H, Hv = 2, 97, 70, 4, 2, 40, 24
    q = random_tensor(rng, (B, T, N, H), tf.float64)
    k = random_tensor(rng, (B, S, Nkv, H), tf.float64)
    v = random_tensor(rng, (B, S, Nkv, Hv), tf.float64)
    check_parity(q, k, v, mask=_mask(kind, B, N, T, S, rng), is_causal=is_causal, rng=rng, dtype=dtype)


def test_fully_masked_rows_average_uniformly(rng):
    # Keras' semantics, documented: no allowed key -> mean of value over all keys.
    q = random_tensor(rng, (1, 3, 2, 8), tf.float32)
    k = random_tensor(rng, (1, 5, 2, 8), tf.float32)
    v = random_tensor(rng, (1, 5, 2, 8), tf.float32)
    mask = tf.constant([[True] * 5, [False] * 5, [True, False, False, False, False]])
    out = tf_fastattn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out[0, 1], tf.reduce_mean(v[0], axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 2], v[0, 0], rtol=1e-6, atol=1e-6)
    _, lse = fused_attention(q, k, v, mask=mask)
    assert np.isinf(lse[0, :, 1]).all() and np.isfinite(lse[0, :, 0]).all()


def test_lse_is_log_sum_exp(rng):
    q = random_tensor(rng, (2, 9, 4, 16), tf.float32)
    k = random_tensor(rng, (2, 11, 2, 16), tf.float32)
    _, lse = fused_attention(q, k, k, is_causal=True)
    _, ref_lse, *_ = np_attention_fwd(q.numpy(), k.numpy(), k.numpy(), is_causal=True)
    assert lse.dtype == tf.float32 and lse.shape == (2, 4, 9)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "gqa_causal_mask", "explicit_scale"])
def test_compute_gradient_float64(case, rng):
    B, T, S, N, Nkv, H, Hv = 1, 5, 6, 2, 1, 4, 3
    q = random_tensor(rng, (B, T, N, H), tf.float64)
    k = random_tensor(rng, (B, S, Nkv, H), tf.float64)
    v = random_tensor(rng, (B, S, Nkv, Hv), tf.float64)
    kw = {}
    if case == "gqa_causal_mask":
        m = rng.random((B, 1, T, S)) < 0.7
        m[0, 0, 2] = False  # a fully masked row
        kw = dict(mask=tf.constant(m), is_causal=True)
    elif case == "explicit_scale":
        kw = dict(scale=0.75)  # exactly representable in the float32 attribute
    theoretical, numerical = tf.test.compute_gradient(
        lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, implementation="fused", **kw), [q, k, v]
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7)


def test_gradients_bitwise_deterministic(rng):
    q = random_tensor(rng, (2, 97, 4, 64), tf.float32)
    k = random_tensor(rng, (2, 130, 2, 64), tf.float32)
    v = random_tensor(rng, (2, 130, 2, 64), tf.float32)
    d_out = random_tensor(rng, (2, 97, 4, 64), tf.float32)
    mask = tf.constant(rng.random((2, 1, 97, 130)) < 0.9)

    def run():
        fn = lambda *a: tf_fastattn.dot_product_attention(*a, mask=mask, is_causal=True, dropout_rate=0.1, seed=3)
        out, grads = forward_backward(fn, q, k, v, d_out)
        return [out.numpy().tobytes()] + [g.numpy().tobytes() for g in grads]

    first = run()
    for _ in range(2):
        assert run() == first


# ---------------------------------------------------------------------------
# Dropout.


def _dropout_probe(B, N, T, S, rate, seed, dtype=tf.float32):
    """Reads the op's keep mask: with query = 0 every probability is 1/S, and
    value = identity (Hv = S) makes out[b, t, n, s] = p_drop[b, n, t, s]."""
    q = tf.zeros((B, T, N, 8), dtype)
    k = tf.ones((B, S, 1, 8), dtype)
    v = tf.tile(tf.eye(S, dtype=dtype)[None, :, None, :], [B, 1, 1, 1])
    return q, k, v, lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, dropout_rate=rate, seed=seed)


def test_dropout_keep_rate_and_scaling():
    B, N, T, S, rate = 2, 4, 64, 256, 0.3
    q, k, v, fn = _dropout_probe(B, N, T, S, rate, seed=1)
    out = tf.transpose(fn(q, k, v), [0, 2, 1, 3]).numpy()  # [B, N, T, S]
    kept = out != 0
    # Kept probabilities are 1/S scaled by 1/(1 - rate), exactly (float32 rounding).
    np.testing.assert_allclose(out[kept], 1.0 / (S * (1 - rate)), rtol=1e-6)
    n = kept.size
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("T, S", [(5, 4), (6, 61), (7, 64), (5, 150), (3, 250), (70, 100)])
def test_dropout_mask_is_philox_bit_for_bit(T, S):
    # Every key of long and ragged rows and every row count (the CPU draws
    # 64 keys of up to 4 rows at once, in tiles of 64 x 64): philox.h's mask.
    B, N, rate, seed = 2, 3, 0.3, 2**64 - 2**33 + 977
    q, k, v, fn = _dropout_probe(B, N, T, S, rate, seed=seed)
    kept = tf.transpose(fn(q, k, v), [0, 2, 1, 3]).numpy() != 0  # [B, N, T, S]
    np.testing.assert_array_equal(kept, philox_keep_mask(seed, rate, B, N, T, S))


def test_dropout_independent_across_heads_and_batches():
    B, N, T, S, rate = 2, 4, 64, 256, 0.5
    q, k, v, fn = _dropout_probe(B, N, T, S, rate, seed=7)
    keep = (tf.transpose(fn(q, k, v), [0, 2, 1, 3]).numpy() != 0).reshape(B * N, T * S).astype(np.float64)
    corr = np.corrcoef(keep)
    off_diagonal = corr[~np.eye(B * N, dtype=bool)]
    assert np.abs(off_diagonal).max() < 5 / np.sqrt(T * S)
    # Rows (t) and keys (s) of one head are independent too: no repeated rows.
    one = keep[0].reshape(T, S)
    assert len({r.tobytes() for r in one}) == T


def test_dropout_reproducible_for_fixed_seed_and_varies_otherwise():
    q, k, v, fn = _dropout_probe(1, 2, 16, 64, 0.4, seed=123)
    a, b = fn(q, k, v), fn(q, k, v)
    np.testing.assert_array_equal(a, b)
    _, _, _, other = _dropout_probe(1, 2, 16, 64, 0.4, seed=124)
    assert not np.array_equal(a, other(q, k, v))
    _, _, _, unseeded = _dropout_probe(1, 2, 16, 64, 0.4, seed=None)
    assert not np.array_equal(unseeded(q, k, v), unseeded(q, k, v))


def test_dropout_seed_generator_advances():
    gen = keras.random.SeedGenerator(5)
    q, k, v, _ = _dropout_probe(1, 2, 16, 64, 0.4, seed=None)
    a = tf_fastattn.dot_product_attention(q, k, v, dropout_rate=0.4, seed=gen)
    b = tf_fastattn.dot_product_attention(q, k, v, dropout_rate=0.4, seed=gen)
    assert not np.array_equal(a, b)
    again = keras.random.SeedGenerator(5)
    np.testing.assert_array_equal(a, tf_fastattn.dot_product_attention(q, k, v, dropout_rate=0.4, seed=again))


def test_dropout_forward_and_backward_masks_agree(rng):
    # d value = p_drop^T d_out: with the probe, p_drop is the forward's mask.
    B, N, T, S, rate = 1, 2, 32, 64, 0.25
    q, k, v, fn = _dropout_probe(B, N, T, S, rate, seed=99)
    d_out = random_tensor(rng, (B, T, N, S), tf.float32)
    out, (_, _, dv) = forward_backward(fn, q, k, v, d_out)
    p_drop = tf.transpose(out, [0, 2, 1, 3])  # [B, N, T, S]
    expected = tf.einsum("bnts,btnh->bsh", p_drop, d_out)[:, :, None, :]
    np.testing.assert_allclose(dv, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32, tf.float64], ids=["bfloat16", "float32", "float64"])
def test_dropout_equals_reference_with_philox_mask(dtype, rng):
    # The fused mask is the Philox stream of philox.h: the reference with that
    # keep mask gives the same outputs and gradients.
    B, T, S, N, Nkv, H, Hv, rate, seed = 2, 33, 47, 4, 2, 16, 16, 0.2, 2**63 + 12345
    q = tf.cast(random_tensor(rng, (B, T, N, H), tf.float64), dtype)
    k = tf.cast(random_tensor(rng, (B, S, Nkv, H), tf.float64), dtype)
    v = tf.cast(random_tensor(rng, (B, S, Nkv, Hv), tf.float64), dtype)
    d_out = random_tensor(rng, (B, T, N, Hv), dtype)
    keep = tf.constant(philox_keep_mask(seed, rate, B, N, T, S))
    fused = forward_backward(
        lambda *a: tf_fastattn.dot_product_attention(*a, is_causal=True, dropout_rate=rate, seed=seed), q, k, v, d_out
    )
    ref_kw = dict(is_causal=True, dropout_rate=rate, keep_mask=keep)
    naive = forward_backward(lambda *a: reference.attention(*a, **ref_kw), q, k, v, d_out)
    c64 = [tf.cast(t, tf.float64) for t in (q, k, v, d_out)]
    ref = forward_backward(lambda *a: reference.attention(*a, **ref_kw), *c64)
    assert_close_to_reference(fused[0], naive[0], ref[0], dtype, "out")
    for name, f, n, r in zip(("dq", "dk", "dv"), fused[1], naive[1], ref[1]):
        assert_close_to_reference(f, n, r, dtype, name)
    # And the NumPy reference's gradients agree with TF's float64 reference.
    np_grads = np_attention_bwd(*[t.numpy() for t in c64], is_causal=True, keep=keep.numpy(), rate=rate)
    for g, r in zip(np_grads, ref[1]):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Graph mode, XLA, implementation choice.


def test_tf_function_and_shape_inference(rng):
    spec = [tf.TensorSpec([None, None, 4, 16]), tf.TensorSpec([None, None, 2, 16]), tf.TensorSpec([None, None, 2, 8])]
    shapes = {}

    @tf.function(input_signature=spec)
    def f(q, k, v):
        out = tf_fastattn.dot_product_attention(q, k, v, is_causal=True)
        shapes["out"] = out.shape
        return out

    q = random_tensor(rng, (2, 9, 4, 16), tf.float32)
    k = random_tensor(rng, (2, 11, 2, 16), tf.float32)
    v = random_tensor(rng, (2, 11, 2, 8), tf.float32)
    np.testing.assert_allclose(f(q, k, v), tf_fastattn.dot_product_attention(q, k, v, is_causal=True), rtol=1e-6)
    assert shapes["out"].as_list() == [None, None, 4, 8]
    graph = f.get_concrete_function().graph
    assert any(op.type == "TfFastattn>Attention" for op in graph.get_operations())


def test_xla_runs_the_fused_op(rng):
    # With the XLA kernels loaded the op stays in XLA code (a custom call,
    # tests/test_xla.py); without them XLA gets the reference math.
    q = random_tensor(rng, (2, 9, 4, 16), tf.float32)
    k = random_tensor(rng, (2, 11, 2, 16), tf.float32)

    @tf.function(jit_compile=True)
    def f(q, k):
        return tf_fastattn.dot_product_attention(q, k, k, is_causal=True)

    eager = tf_fastattn.dot_product_attention(q, k, k, is_causal=True)
    np.testing.assert_array_equal(f(q, k).numpy(), eager.numpy())
    ops = f.get_concrete_function(q, k).graph.get_operations()
    assert any(op.type == "TfFastattn>Attention" for op in ops) == (_loader.xla_reason() is None)


def test_implementation_choice(rng):
    q = random_tensor(rng, (1, 5, 2, 8), tf.float32)

    @tf.function
    def f(implementation):
        return tf_fastattn.dot_product_attention(q, q, q, implementation=implementation)

    types = lambda impl: {op.type for op in f.get_concrete_function(impl).graph.get_operations()}
    assert "TfFastattn>Attention" in types("fused")
    assert "TfFastattn>Attention" in types("auto")
    assert "TfFastattn>Attention" not in types("reference")
    with pytest.raises(ValueError, match="implementation"):
        tf_fastattn.dot_product_attention(q, q, q, implementation="fast")

    @tf.function(jit_compile=True)
    def g(q):
        return tf_fastattn.dot_product_attention(q, q, q, implementation="fused")

    if _loader.xla_reason() is None:
        np.testing.assert_array_equal(g(q).numpy(), tf_fastattn.dot_product_attention(q, q, q).numpy())
    else:
        with pytest.raises(ValueError, match="XLA"):
            g(q)


@pytest.mark.parametrize("scale", [0.3, np.float32(0.3), tf.constant(0.3)], ids=["float", "np_float32", "tensor"])
def test_explicit_scale(scale, rng):
    q = random_tensor(rng, (2, 9, 4, 16), tf.float32)
    k = random_tensor(rng, (2, 11, 2, 16), tf.float32)
    out = tf_fastattn.dot_product_attention(q, k, k, scale=scale, implementation="fused")
    # float32 inputs: the float32 attribute holds the scale Keras uses.
    expected = keras.ops.dot_product_attention(q, tf.repeat(k, 2, axis=2), tf.repeat(k, 2, axis=2), scale=0.3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_mixed_input_dtypes_are_cast_like_keras(rng):
    q = random_tensor(rng, (1, 5, 2, 8), tf.float16)
    k = random_tensor(rng, (1, 6, 2, 8), tf.float32)
    out = tf_fastattn.dot_product_attention(q, k, k)
    assert out.dtype == tf.float32


@pytest.mark.parametrize("T, S", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(T, S, rng):
    q = random_tensor(rng, (2, T, 2, 8), tf.float32)
    k = random_tensor(rng, (2, S, 1, 8), tf.float32)
    v = random_tensor(rng, (2, S, 1, 4), tf.float32)
    out, grads = forward_backward(lambda *a: tf_fastattn.dot_product_attention(*a), q, k, v, tf.ones((2, T, 2, 4)))
    assert out.shape == (2, T, 2, 4)
    np.testing.assert_array_equal(out, keras_attention(q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape
        np.testing.assert_array_equal(g, 0)


# ---------------------------------------------------------------------------
# Errors.

GOOD = dict(q=(2, 5, 4, 8), k=(2, 6, 2, 8), v=(2, 6, 2, 8))
BAD_SHAPES = {
    "query_rank": (dict(q=(2, 5, 32)), ["query", "rank 4", "[2, 5, 32]"]),
    "key_rank": (dict(k=(2, 6, 2, 8, 1)), ["key", "rank 4", "[2, 6, 2, 8, 1]"]),
    "batch": (dict(k=(3, 6, 2, 8), v=(3, 6, 2, 8)), ["batch size", "[2, 5, 4, 8]", "[3, 6, 2, 8]"]),
    "kv_mismatch": (dict(v=(2, 7, 2, 8)), ["value must match key", "[2, 6, 2, 8]", "[2, 7, 2, 8]"]),
    "heads": (dict(q=(2, 5, 3, 8)), ["multiple", "N = 3", "Nkv = 2"]),
    "head_dim": (dict(k=(2, 6, 2, 16), v=(2, 6, 2, 16)), ["head dim", "(8)", "[2, 6, 2, 16]"]),
    "h_too_big": (dict(q=(1, 2, 2, 264), k=(1, 3, 2, 264), v=(1, 3, 2, 8)), ["H (", "[1, 256]", "264"]),
    "hv_too_big": (dict(v=(2, 6, 2, 257)), ["Hv", "[1, 256]", "257"]),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes_raise_value_error(case):
    change, fragments = BAD_SHAPES[case]
    shapes = {**GOOD, **change}
    q, k, v = (tf.ones(shapes[n]) for n in "qkv")
    with pytest.raises(ValueError) as err:
        tf_fastattn.dot_product_attention(q, k, v)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("case", [c for c in BAD_SHAPES if "rank" not in c])
def test_bad_shapes_raise_invalid_argument_from_op(case):
    # Shapes unknown until run time: the op's own checks name the problem.
    change, _ = BAD_SHAPES[case]
    shapes = {**GOOD, **change}
    q, k, v = (tf.ones(shapes[n]) for n in "qkv")

    @tf.function(input_signature=[tf.TensorSpec(None)] * 3)
    def f(q, k, v):
        return fused_attention(q, k, v)

    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        f(q, k, v)
    assert any(word in str(err.value) for word in ("batch", "must match key", "multiple", "head dim", "must be in"))


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(mask=tf.ones((2, 4, 5, 7), tf.bool)), ["mask", "[B, N, T, S] = [2, 4, 5, 6]", "[2, 4, 5, 7]"]),
        (dict(mask=tf.ones((1, 2, 4, 5, 6), tf.bool)), ["mask", "[1, 2, 4, 5, 6]"]),
        (dict(dropout_rate=1.0), ["dropout_rate", "[0, 1)", "1.0"]),
        (dict(dropout_rate=-0.1), ["dropout_rate", "-0.1"]),
        (dict(scale=float("inf")), ["scale", "finite", "inf"]),
        (dict(scale=float("nan")), ["scale", "finite", "nan"]),
    ],
    ids=["mask_shape", "mask_rank", "dropout_one", "dropout_negative", "scale_inf", "scale_nan"],
)
def test_bad_arguments_raise_value_error(kwargs, fragments):
    q, k, v = (tf.ones(GOOD[n]) for n in "qkv")
    with pytest.raises(ValueError) as err:
        tf_fastattn.dot_product_attention(q, k, v, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_non_floating_inputs_raise_value_error():
    q = tf.ones(GOOD["q"], tf.int32)
    with pytest.raises(ValueError, match="query must be float16, bfloat16, float32 or float64, got int32"):
        tf_fastattn.dot_product_attention(q, q, q)


def test_op_rejects_bad_mask_and_attributes():
    q, k, v = (tf.ones(GOOD[n]) for n in "qkv")

    def op(mask=(), seed=(), **attrs):
        return _loader.ops().tf_fastattn_attention(query=q, key=k, value=v, mask=list(mask), seed=list(seed),
                                                   query_offset=[], **attrs)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"mask of shape \[3, 5, 6\] is not broadcastable"):
        op(mask=[tf.ones((3, 5, 6), tf.bool)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dropout_rate must be in \[0, 1\), got 1"):
        op(seed=[tf.constant(1, tf.int64)], dropout_rate=1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs a seed"):
        op(dropout_rate=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="scale must be finite, got inf"):
        op(scale=float("inf"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="window_left and window_right must be >= 0"):
        op(window_left=-2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="logits_soft_cap must be a finite number >= 0"):
        op(logits_soft_cap=-1.0)


@pytest.mark.parametrize("shapes", [
    dict(q=(2, 5, 3, 8)), dict(q=(2, 5, 4, 300), k=(2, 6, 2, 300), v=(2, 6, 2, 300)), dict(v=(2, 6, 2, 257)),
    dict(k=(2, 6, 2, 16)), dict(k=(3, 6, 2, 8), v=(3, 6, 2, 8)), dict(v=(2, 7, 2, 8)), dict(q=(2, 5, 4)),
    dict(mask=(3, 5, 6)), dict(mask=(1, 2, 4, 5, 6)),
], ids=["heads", "head_dim", "head_dim_v", "key_head_dim", "batch", "value_seq", "rank", "mask", "mask_rank"])
def test_op_and_C_give_the_same_message(shapes):
    # One set of checks (csrc/core/attention_checks.cc) behind both front ends.
    from tf_fastattn import _C

    dims = dict(q=(2, 5, 4, 8), k=(2, 6, 2, 8), v=(2, 6, 2, 8), mask=None)
    dims.update(shapes)
    q, k, v = (np.ones(dims[n], np.float32) for n in "qkv")
    mask = None if dims["mask"] is None else np.ones(dims["mask"], bool)
    with pytest.raises(ValueError) as c_err:
        _C.attention_fwd(q, k, v, mask=mask)
    with pytest.raises(tf.errors.InvalidArgumentError) as tf_err:
        _loader.ops().tf_fastattn_attention(query=q, key=k, value=v, mask=[] if mask is None else [mask], seed=[],
                                            query_offset=[])
    assert str(c_err.value) in str(tf_err.value), (str(c_err.value), str(tf_err.value))


# ---------------------------------------------------------------------------
# Memory: nothing T x S is stored (forward or backward).

PEAK_MEMORY_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
import tf_fastattn

def vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

impl, B, N, T, H, causal = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6] == "1"
dtype = tf.as_dtype(sys.argv[7])
q, k, v, d_out = (tf.cast(tf.random.normal([B, T, N, H]), dtype) for _ in range(4))
fn = ((lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, is_causal=causal, implementation="fused"))
      if impl == "fused" else
      (lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, is_causal=causal, implementation="reference")))
before = vm_hwm_bytes()
with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = fn(q, k, v)
grads = tape.gradient(out, [q, k, v], output_gradients=d_out)
_ = [g.numpy() for g in grads]
print("PEAK_GROWTH", vm_hwm_bytes() - before)
"""


def peak_rss_growth(impl, B, N, T, H, causal=False, dtype="float32", timeout=600):
    """Growth of the peak resident set (VmHWM) over one forward + backward, in
    bytes, measured in a fresh process so earlier allocations do not hide it."""
    import os
    import subprocess
    import sys

    args = [impl, B, N, T, H, int(causal), dtype]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split("PEAK_GROWTH")[-1].split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("H, causal", [(64, False), (256, True)])
def test_peak_memory_long_sequences(H, causal):
    # B=1, N=2, T=16384: one T x S float32 score matrix for a single head would
    # be 1 GiB; inputs, outputs and gradients are 8-32 MiB each. The backward
    # takes its fused form at H=64 and, its per-item sums being over the fused
    # form's limit, the three-pass form at H=256.
    growth = peak_rss_growth("fused", 1, 2, 16384, H, causal=causal)
    limit_gib = 0.75
    assert growth < limit_gib * 2**30, f"peak RSS grew by {growth / 2**30:.2f} GiB (limit {limit_gib} GiB)"


# ---------------------------------------------------------------------------
# bfloat16 products on AMX tiles and with AVX512-BF16: both meet the criterion.

AMX_OFF_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["TF_FASTATTN_CPU_AMX"] = "0"
import numpy as np
import tensorflow as tf
import tf_fastattn
assert "amx-bf16" not in tf_fastattn.build_info()["cpu_features"]
data = dict(np.load(sys.argv[1]))
out = {}
for case in sorted({k.split(":")[0] for k in data}):
    q, k, v, d_out, causal = (tf.constant(data[f"{case}:{n}"]) for n in ("q", "k", "v", "d_out", "causal"))
    q, k, v, d_out = (tf.cast(t, tf.bfloat16) for t in (q, k, v, d_out))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        o = tf_fastattn.dot_product_attention(q, k, v, is_causal=bool(causal.numpy()), implementation="fused")
    for name, t in zip(("out", "dq", "dk", "dv"), [o] + tape.gradient(o, [q, k, v], output_gradients=d_out)):
        out[f"{case}:{name}"] = tf.cast(t, tf.float32).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.skipif("amx-bf16" not in tf_fastattn.build_info().get("cpu_features", []),
                    reason="the CPU (or the OS) gives no AMX-BF16 tiles; the AVX512-BF16 path is the one tested")
def test_bfloat16_with_and_without_amx_meets_the_criterion(rng, tmp_path):
    # (T, S, N, Nkv, H, causal): head dims with pair tails past a multiple
    # of 16 pairs (40, 100) and row counts past a multiple of 16 (37, 70).
    cases = {"a": (37, 70, 2, 1, 40, True), "b": (64, 64, 2, 2, 64, False), "c": (70, 33, 4, 2, 100, False),
             "d": (130, 130, 1, 1, 256, True)}
    data, ref = {}, {}
    for name, (T, S, N, Nkv, H, causal) in cases.items():
        q64, k64, v64 = (random_tensor(rng, (2, L, heads, H), tf.float64) for L, heads in ((T, N), (S, Nkv), (S, Nkv)))
        q, k, v = (tf.cast(tf.cast(t, tf.bfloat16), tf.float64) for t in (q64, k64, v64))  # exactly representable
        d_out = tf.cast(tf.cast(random_tensor(rng, (2, T, N, H), tf.float64), tf.bfloat16), tf.float64)
        data.update({f"{name}:q": q.numpy(), f"{name}:k": k.numpy(), f"{name}:v": v.numpy(),
                     f"{name}:d_out": d_out.numpy(), f"{name}:causal": np.array(causal)})
        ref[name] = forward_backward(lambda *a: reference.attention(*a, is_causal=causal), q, k, v, d_out)
        naive = forward_backward(lambda *a: reference.attention(*a, is_causal=causal),
                                 *[tf.cast(t, tf.bfloat16) for t in (q, k, v, d_out)])
        amx = forward_backward(lambda *a: tf_fastattn.dot_product_attention(*a, is_causal=causal, implementation="fused"),
                               *[tf.cast(t, tf.bfloat16) for t in (q, k, v, d_out)])
        ref[name] = (ref[name], naive)
        for label, f, n, r in zip(("out", "dq", "dk", "dv"), [amx[0], *amx[1]], [naive[0], *naive[1]],
                                  [ref[name][0][0], *ref[name][0][1]]):
            assert_close_to_reference(f, n, r, tf.bfloat16, f"AMX {name} {label}")
    np.savez(tmp_path / "in.npz", **data)
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", AMX_OFF_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    off = np.load(tmp_path / "out.npz")
    for name in cases:
        (r_out, r_grads), naive = ref[name]
        for label, r, n in zip(("out", "dq", "dk", "dv"), [r_out, *r_grads], [naive[0], *naive[1]]):
            assert_close_to_reference(tf.constant(off[f"{name}:{label}"]), n, r, tf.bfloat16, f"AVX512-BF16 {name} {label}")


# ---------------------------------------------------------------------------
# float64: scale and dropout_rate reach the kernel exactly (the *_bits
# attributes), not rounded to float32.


def test_float64_scale_and_dropout_rate_are_exact(rng):
    B, T, S, N, H = 1, 9, 13, 2, 8
    q, k, v = (rng.standard_normal(shape) for shape in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    scale, rate, seed = 0.1, 0.1, 12345  # neither is a float32 value
    keep = philox_keep_mask(seed, rate, B, N, T, S)  # threshold from the float64 rate
    ref = np_attention_fwd(q, k, v, scale=scale, keep=keep, rate=rate)[0]
    out = tf_fastattn.dot_product_attention(*(tf.constant(t) for t in (q, k, v)), scale=scale, dropout_rate=rate,
                                            seed=seed, implementation="fused")
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-13, atol=1e-14)
    # The gradient op reads the same exact attributes.
    qt, kt, vt = (tf.constant(t) for t in (q, k, v))
    d_out = rng.standard_normal((B, T, N, H))
    with tf.GradientTape() as tape:
        tape.watch([qt, kt, vt])
        o = tf_fastattn.dot_product_attention(qt, kt, vt, scale=scale, dropout_rate=rate, seed=seed,
                                              implementation="fused")
    grads = tape.gradient(o, [qt, kt, vt], output_gradients=tf.constant(d_out))
    for g, r in zip(grads, np_attention_bwd(q, k, v, d_out, scale=scale, keep=keep, rate=rate)):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-12, atol=1e-13)

