"""The decoder-LLM options of the fused attention: logit soft-capping, sliding
windows and query offsets (cached decoding), through every tier: the CPU
kernels via _C against the NumPy float64 reference (all four dtypes, the
accuracy criterion on the output and every gradient), the TF op and its
gradient, XLA (bitwise equal to the op without XLA), and the errors.

Tiles outside the band are never computed: NaN and inf planted in keys no
query may see reach no output and no gradient. (The CUDA kernels run the same
cases under the emulator: tests/test_cuda_emulated.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
from numpy_reference import check_attention
from test_attention_kernel import NP_DTYPES, make_inputs
from tf_fastattn import _C, _loader, attention, reference
from tfa_helpers import assert_close_to_reference, random_tensor, requires_ops

# B, T, S, N, Nkv, H, Hv and the options: caps 1, 30, 50 with logits large
# enough that the cap matters (q_mult); windows (0, 0), (1, 0), (7, 3), about
# the tile size (64, 70) and beyond T; causal or not; masks; GQA and MQA;
# dropout; T != S; offsets 0, 1 and S - T.
CASES = {
    "cap1_full": ((2, 37, 45, 4, 2, 40, 40), dict(logits_soft_cap=1.0, q_mult=3)),
    "cap30_causal_gqa": ((1, 97, 97, 4, 2, 64, 64), dict(is_causal=True, logits_soft_cap=30.0, q_mult=8)),
    "cap50_mqa_dropout": ((1, 70, 130, 4, 1, 80, 48), dict(logits_soft_cap=50.0, q_mult=10, dropout_rate=0.2)),
    "win0_0": ((2, 97, 97, 2, 2, 40, 40), dict(window=(0, 0))),
    "win1_0_causal_mask": ((2, 70, 70, 2, 1, 32, 32), dict(window=(1, 0), is_causal=True, mask="padding")),
    "win7_3_dropout": ((1, 97, 97, 4, 2, 40, 24), dict(window=(7, 3), dropout_rate=0.1)),
    "win64_0_causal_cap": ((1, 200, 200, 2, 1, 64, 64), dict(window=(64, 0), is_causal=True, logits_soft_cap=30.0,
                                                              q_mult=6)),
    "win70_beyond_T": ((1, 40, 40, 2, 2, 16, 16), dict(window=(70, 0), is_causal=True)),
    "offset1_causal": ((1, 64, 65, 2, 1, 64, 64), dict(is_causal=True, query_offset=1, dropout_rate=0.1)),
    "decode_offset_window": ((2, 7, 129, 4, 2, 64, 64), dict(is_causal=True, window=(64, 0), query_offset=122,
                                                             logits_soft_cap=50.0, q_mult=4)),
    "decode_offset_mask": ((2, 33, 150, 2, 2, 40, 40), dict(is_causal=True, query_offset=117, mask="arbitrary",
                                                            dropout_rate=0.1)),
    "right_only_window": ((1, 65, 80, 2, 1, 32, 32), dict(window=(-1, 5), mask="rows")),
}


def _mask(kind, B, N, T, S, rng):
    if kind == "padding":
        m = np.ones((B, 1, 1, S), bool)
        m[0, ..., S // 2:] = False
        return m
    if kind == "arbitrary":
        return rng.random((B, N, T, S)) < 0.7
    if kind == "rows":  # some rows see no key at all: the uniform average
        m = rng.random((B, 1, T, S)) < 0.8
        m[:, :, ::4] = False
        return m
    return None


def _case(name, dtype_name, seed=0):
    shape, opts = CASES[name]
    opts = dict(opts)
    rng = np.random.default_rng(seed)
    dtype = NP_DTYPES[dtype_name]
    q, k, v, d_out = make_inputs(rng, *shape, dtype)
    q = (q * opts.pop("q_mult", 1)).astype(dtype)
    B, T, S, N = shape[0], shape[1], shape[2], shape[3]
    opts["mask"] = _mask(opts.get("mask"), B, N, T, S, rng)
    return q, k, v, d_out, opts


def _c_kwargs(opts, seed=77):
    kw = dict(opts)
    kw["seed"] = seed
    kw.setdefault("logits_soft_cap", 0.0)
    return kw


def _check(dtype_name, q, k, v, d_out, o, lse, grads, opts, seed=77):
    return check_attention(dtype_name, q, k, v, d_out, o, lse, *grads, mask=opts.get("mask"),
                           is_causal=opts.get("is_causal", False), seed=seed, rate=opts.get("dropout_rate", 0.0),
                           window=opts.get("window"), query_offset=opts.get("query_offset", 0),
                           logits_soft_cap=opts.get("logits_soft_cap"))


@pytest.mark.parametrize("dtype_name", list(NP_DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_kernels_match_reference(name, dtype_name):
    q, k, v, d_out, opts = _case(name, dtype_name)
    kw = _c_kwargs(opts)
    o, lse = _C.attention_fwd(q, k, v, **kw)
    grads = _C.attention_bwd(q, k, v, o, lse, d_out, **kw)
    _check(dtype_name, q, k, v, d_out, o, lse, grads, opts)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["win7_3_dropout", "decode_offset_window", "cap30_causal_gqa"])
def test_bitwise_across_thread_counts(name, dtype_name):
    """The fused backward (few threads) and the three-pass one (more threads
    than kv heads) give the same bits with windows, offsets and caps."""
    q, k, v, d_out, opts = _case(name, dtype_name)
    kw = _c_kwargs(opts)
    results = []
    for threads in (1, 2, 3, 7):
        o, lse = _C.attention_fwd(q, k, v, num_threads=threads, **kw)
        results.append([x.tobytes() for x in (o, lse, *_C.attention_bwd(q, k, v, o, lse, d_out, num_threads=threads,
                                                                          **kw))])
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("dtype_name", list(NP_DTYPES))
@pytest.mark.parametrize("threads", [1, 3], ids=["fused_bwd", "three_pass_bwd"])
def test_tiles_outside_the_window_are_skipped(dtype_name, threads):
    """64 new queries at the end of a 512-key cache with a window of 100: keys
    0 .. 347 are outside every query's window. NaN and inf planted in the
    whole 64-key tiles among them (keys 0 .. 319) must reach no output and no
    gradient (a computed tile would turn them into NaN: 0 * inf, NaN logits),
    and the results keep their bits."""
    rng = np.random.default_rng(3)
    dtype = NP_DTYPES[dtype_name]
    B, T, S, N, Nkv, H = 2, 64, 512, 4, 2, 64
    q, k, v, d_out = make_inputs(rng, B, T, S, N, Nkv, H, H, dtype)
    kw = dict(is_causal=True, window=(100, 0), query_offset=S - T, dropout_rate=0.1, seed=5, logits_soft_cap=30.0,
              num_threads=threads)
    clean = _C.attention_fwd(q, k, v, **kw)
    clean = [*clean, *_C.attention_bwd(q, k, v, *clean, d_out, **kw)]
    k2, v2 = k.copy(), v.copy()
    k2[:, :320:2], v2[:, :320:2] = np.nan, np.inf
    k2[:, 1:320:2], v2[:, 1:320:2] = -np.inf, np.nan
    o, lse = _C.attention_fwd(q, k2, v2, **kw)
    dq, dk, dv = _C.attention_bwd(q, k2, v2, o, lse, d_out, **kw)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), clean):
        assert np.isfinite(got.astype(np.float64)).all(), f"{name}: a key outside every window reached it"
        assert got.tobytes() == want.tobytes(), name
    assert not dk[:, :348].any() and not dv[:, :348].any()  # no query sees them: zero gradient


def test_c_rejects_bad_options():
    q = np.ones((1, 4, 2, 8), np.float32)
    k = np.ones((1, 6, 2, 8), np.float32)
    for kw, match in [(dict(window=(-2, 0)), "window_left must be >= 0, or -1"),
                      (dict(window=(0, -5)), "window_right must be >= 0, or -1"),
                      (dict(logits_soft_cap=-1.0), "logits_soft_cap must be a finite number >= 0"),
                      (dict(logits_soft_cap=float("nan")), "logits_soft_cap must be a finite number >= 0"),
                      (dict(query_offset=3), r"query_offset must be in \[0, S - T\] = \[0, 2\]"),
                      (dict(query_offset=-1), "query_offset must be in")]:
        with pytest.raises(ValueError, match=match):
            _C.attention_fwd(q, k, k, **kw)


def test_window_with_no_allowed_key_keeps_the_uniform_row():
    """A window that leaves rows without any key is not an error: those rows
    get the documented uniform average (T > S, non-causal window (0, 0))."""
    rng = np.random.default_rng(0)
    q, k, v, d_out = make_inputs(rng, 1, 9, 5, 2, 1, 16, 16, np.float64)
    o, lse = _C.attention_fwd(q, k, v, window=(0, 0))
    grads = _C.attention_bwd(q, k, v, o, lse, d_out, window=(0, 0))
    assert np.isinf(lse[..., 5:]).all() and np.isfinite(lse[..., :5]).all()
    np.testing.assert_allclose(o[:, 5:], np.broadcast_to(v.mean(1, keepdims=True), o[:, 5:].shape), rtol=1e-12)
    check_attention("float64", q, k, v, d_out, o, lse, *grads, window=(0, 0))


# ---- the TF op: forward, gradient, errors --------------------------------------------


def _tf_case(name, dtype, seed=0):
    q, k, v, d_out, opts = _case(name, "float64", seed)
    cast = lambda a: tf.cast(tf.constant(a), dtype)  # noqa: E731
    opts = dict(opts)
    mask = opts.pop("mask")
    return cast(q), cast(k), cast(v), cast(d_out), (None if mask is None else tf.constant(mask)), opts


def _grads(fn, q, k, v, d_out):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v)
    return [out, *tape.gradient(out, [q, k, v], output_gradients=d_out)]


@requires_ops
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["cap30_causal_gqa", "win7_3_dropout", "decode_offset_window", "right_only_window"])
def test_op_and_gradient_match_reference(name, dtype):
    """dot_product_attention with the options against the reference math
    (float64, and the same math in the op's dtype as the criterion's naive
    implementation); with dropout the keep mask is the kernels' Philox mask."""
    dt = tf.as_dtype(dtype)
    q, k, v, d_out, mask, opts = _tf_case(name, dt)
    rate = opts.pop("dropout_rate", 0.0)
    seed = 99
    fused = _grads(lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, mask=mask, dropout_rate=rate,
                                                                     seed=seed, implementation="fused", **opts),
                   q, k, v, d_out)
    B, T, N = q.shape[0], q.shape[1], q.shape[2]
    S = k.shape[1]
    keep = None
    if rate:
        from numpy_reference import philox_keep_mask

        keep = tf.constant(philox_keep_mask(seed, rate, B, N, T, S))

    def ref(q, k, v):
        return reference.attention(q, k, v, mask=mask, dropout_rate=rate, keep_mask=keep,
                                   is_causal=opts.get("is_causal", False), window=opts.get("window"),
                                   query_offset=opts.get("query_offset"),
                                   logits_soft_cap=opts.get("logits_soft_cap"))

    ref64 = _grads(ref, *(tf.cast(t, tf.float64) for t in (q, k, v, d_out)))
    naive = _grads(ref, q, k, v, d_out)
    for label, f, n, r in zip(("out", "dq", "dk", "dv"), fused, naive, ref64):
        assert_close_to_reference(f, n, r, dt, f"{name} {label}")


@requires_ops
def test_query_offset_tensor_does_not_retrace():
    rng = np.random.default_rng(1)
    q = random_tensor(rng, (2, 1, 4, 32), tf.float32)
    k = random_tensor(rng, (2, 96, 2, 32), tf.float32)

    @tf.function
    def step(offset):
        return tf_fastattn.dot_product_attention(q, k, k, is_causal=True, window=(20, 0), query_offset=offset,
                                                 implementation="fused")

    for offset in (0, 5, 50, 95):
        want = reference.attention(q, k, k, is_causal=True, window=(20, 0), query_offset=offset)
        np.testing.assert_allclose(step(tf.constant(offset)).numpy(), want.numpy(), atol=2e-6, rtol=1e-5)
    assert step.experimental_get_tracing_count() == 1
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"query_offset must be in \[0, S - T\] = \[0, 95\]"):
        step(tf.constant(96))


@requires_ops
@pytest.mark.parametrize("kw, match", [
    (dict(logits_soft_cap=-1.0), "logits_soft_cap must be a finite number >= 0"),
    (dict(logits_soft_cap=float("nan")), "logits_soft_cap must be a finite number >= 0"),
    (dict(logits_soft_cap="x"), "logits_soft_cap must be None or a number >= 0"),
    (dict(window=(-2, 0)), "window left side must be an int >= 0, or -1"),
    (dict(window=(0, 1.5)), "window right side must be an int >= 0, or -1"),
    (dict(window=64), r"window must be None or a pair \(left, right\)"),
    (dict(query_offset=2.0), "query_offset must be an int or a scalar integer tensor"),
    (dict(query_offset=tf.constant(1.0)), "query_offset must be an integer scalar, got dtype float32"),
    (dict(query_offset=tf.constant([1, 2])), "query_offset must be a scalar, got shape"),
    (dict(query_offset=30), r"query_offset must be in \[0, S - T\] = \[0, 24\]"),
], ids=lambda x: str(x)[:40])
def test_bad_options_name_the_argument(kw, match):
    q = tf.ones((1, 8, 2, 16))
    k = tf.ones((1, 32, 2, 16))
    with pytest.raises(ValueError, match=match):
        tf_fastattn.dot_product_attention(q, k, k, **kw)


@requires_ops
def test_soft_cap_none_and_zero_are_off():
    rng = np.random.default_rng(2)
    q, k = random_tensor(rng, (1, 16, 2, 16), tf.float32), random_tensor(rng, (1, 16, 2, 16), tf.float32)
    base = tf_fastattn.dot_product_attention(q, k, k)
    for cap in (None, 0, 0.0):
        assert np.array_equal(tf_fastattn.dot_product_attention(q, k, k, logits_soft_cap=cap).numpy(), base.numpy())


# ---- under XLA: custom calls, bitwise the op's results --------------------------------

@requires_ops
@pytest.mark.skipif(_loader.xla_reason() is not None, reason=f"XLA kernels not loaded: {_loader.xla_reason()}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_bitwise_under_xla(dtype):
    dt = tf.as_dtype(dtype)
    q, k, v, d_out, mask, opts = _tf_case("decode_offset_window", dt)
    offset = tf.constant(opts["query_offset"], tf.int32)
    seed = tf.constant(5, tf.int64)

    def f(q, k, v, d_out, offset):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, lse = attention.fused_attention(q, k, v, None, None, True, 0.1, seed, logits_soft_cap=50.0,
                                                 window=(64, 0), query_offset=offset)
        return (out, lse, *tape.gradient(out, [q, k, v], output_gradients=d_out))

    eager = f(q, k, v, d_out, offset)
    jit = tf.function(f, jit_compile=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), eager, jit(q, k, v, d_out, offset)):
        a, b = (np.asarray(tf.cast(t, tf.float64)) for t in (a, b))
        assert np.array_equal(a, b), name
    text = jit.experimental_get_compiler_ir(q, k, v, d_out, offset)(stage="hlo")
    assert 'custom_call_target="tf_fastattn_attention_fwd"' in text
    # Another offset: same compiled function, the op's result for it.
    other = tf.constant(100, tf.int32)
    for a, b in zip(f(q, k, v, d_out, other), jit(q, k, v, d_out, other)):
        assert np.array_equal(np.asarray(tf.cast(a, tf.float64)), np.asarray(tf.cast(b, tf.float64)))
    assert jit.experimental_get_tracing_count() == 1
