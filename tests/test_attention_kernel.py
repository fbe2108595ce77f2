"""The attention kernel through tf_fastattn._C (no TensorFlow in the computation)
against a NumPy float64 reference: forward, backward, masks, GQA, dropout,
determinism across thread counts.

The NumPy helpers here (reference forward/backward, Philox keep mask) are also
imported by test_attention.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import criterion
from tf_fastattn import _C

NP_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


# ---------------------------------------------------------------------------
# Philox4x32-10 (the generator of csrc/include/tf_fastattn/philox.h), vectorised.

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(x, np.uint64) & _LO for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & _LO, np.uint64(k1) & _LO
    for _ in range(10):
        p0, p1 = _M0 * c[0], _M1 * c[2]
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & _LO, p1 >> np.uint64(32), p1 & _LO
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _W0) & _LO, (k1 + _W1) & _LO
    return c


def philox_keep_mask(seed: int, rate: float, B: int, N: int, T: int, S: int) -> np.ndarray:
    """The kernel's dropout keep mask [B, N, T, S]: key s of row (b, n, t) is kept
    when word s % 4 of Philox(counter=(s // 4, t, n, b), key=seed) >= rate * 2^32."""
    seed %= 2**64
    s4 = (S + 3) // 4
    b, n, t, s = np.meshgrid(np.arange(B), np.arange(N), np.arange(T), np.arange(s4), indexing="ij")
    words = philox4x32_10(s, t, n, b, seed & 0xFFFFFFFF, seed >> 32)
    words = np.stack(words, axis=-1).reshape(B, N, T, 4 * s4)[..., :S]
    threshold = min(int(rate * 2**32), 2**32 - 1)
    return words >= np.uint64(threshold)


# ---------------------------------------------------------------------------
# NumPy reference.


def allowed_mask(B, N, T, S, mask=None, is_causal=False) -> np.ndarray:
    allowed = np.ones((B, N, T, S), bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
    if is_causal:
        allowed &= np.tril(np.ones((T, S), bool))
    return allowed


def np_attention_fwd(q, k, v, mask=None, scale=None, is_causal=False, keep=None, rate=0.0, compute=np.float64):
    """Returns (out, lse, p, p_drop) in `compute` precision. Rows with no allowed
    key average value uniformly over all keys (lse = +inf)."""
    q, k, v = (np.asarray(x).astype(compute) for x in (q, k, v))
    B, T, N, H = q.shape
    S, Nkv = k.shape[1], k.shape[2]
    g = N // Nkv
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = compute(1.0 / np.sqrt(H) if scale is None else scale)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    allowed = allowed_mask(B, N, T, S, mask, is_causal)
    any_allowed = allowed.any(-1, keepdims=True)
    masked = np.where(allowed, logits, -np.inf)
    m = np.where(any_allowed, masked.max(-1, keepdims=True, initial=-np.inf), 0)
    e = np.where(allowed, np.exp(masked - m), 0)
    denom = e.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(any_allowed, e / denom, compute(1.0 / max(S, 1)))
        lse = np.where(any_allowed, m + np.log(denom), np.inf)[..., 0]
    p = p.astype(compute)
    p_drop = p if keep is None else p * keep.astype(compute) / compute(1.0 - rate)
    out = np.einsum("bnts,bsnh->btnh", p_drop, v)
    return out, lse, p, p_drop, allowed


def np_attention_bwd(q, k, v, d_out, mask=None, scale=None, is_causal=False, keep=None, rate=0.0, compute=np.float64):
    """Gradients (dq, dk, dv) of np_attention_fwd's out for upstream d_out."""
    _, _, p, p_drop, allowed = np_attention_fwd(q, k, v, mask, scale, is_causal, keep, rate, compute)
    q, k, v, d_out = (np.asarray(x).astype(compute) for x in (q, k, v, d_out))
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    g = N // Nkv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = compute(1.0 / np.sqrt(H) if scale is None else scale)
    dv = np.einsum("bnts,btnh->bsnh", p_drop, d_out)
    dp = np.einsum("btnh,bsnh->bnts", d_out, vr)
    if keep is not None:
        dp = dp * keep.astype(compute) / compute(1.0 - rate)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    ds = np.where(allowed.any(-1, keepdims=True), ds, 0)  # uniform rows: constant p, no gradient
    dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
    dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    dk = dk.reshape(B, S, Nkv, g, H).sum(3)
    dv = dv.reshape(B, S, Nkv, g, Hv).sum(3)
    return dq, dk, dv


def check_close(fused, naive, ref, dtype_name, name):
    """The accuracy criterion (criterion.py)."""
    criterion.check_close(fused, naive, ref, dtype_name, name)


def naive_same_dtype(q, k, v, d_out, dtype, **kw):
    """The naive implementation at the inputs' precision: float32 arithmetic for
    half types (as Keras' softmax), probabilities and outputs rounded to dtype."""
    compute = np.float64 if dtype is np.float64 else np.float32
    out, _, p, p_drop, _ = np_attention_fwd(q, k, v, compute=compute, **kw)
    out = out.astype(dtype)
    grads = [g.astype(dtype) for g in np_attention_bwd(q, k, v, d_out, compute=compute, **kw)]
    return out, grads


def make_inputs(rng, B, T, S, N, Nkv, H, Hv, dtype):
    q = rng.standard_normal((B, T, N, H)).astype(dtype)
    k = rng.standard_normal((B, S, Nkv, H)).astype(dtype)
    v = rng.standard_normal((B, S, Nkv, Hv)).astype(dtype)
    d_out = rng.standard_normal((B, T, N, Hv)).astype(dtype)
    return q, k, v, d_out


# ---------------------------------------------------------------------------
# Tests.

SHAPES = [  # B, T, S, N, Nkv, H, Hv
    (2, 1, 1, 2, 2, 8, 8),
    (2, 7, 97, 4, 2, 40, 40),
    (1, 97, 7, 4, 4, 80, 64),
    (1, 128, 128, 4, 1, 64, 64),
    (1, 97, 1025, 2, 1, 128, 96),
    (1, 7, 128, 2, 2, 256, 256),
]


def _shape_id(s):
    return "B{}_T{}_S{}_N{}_Nkv{}_H{}_Hv{}".format(*s)


@pytest.mark.parametrize("dtype_name", list(NP_DTYPES))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_fwd_bwd_match_numpy_reference(shape, is_causal, dtype_name):
    rng = np.random.default_rng(7)
    dtype = NP_DTYPES[dtype_name]
    q, k, v, d_out = make_inputs(rng, *shape, dtype)
    out, lse = _C.attention_fwd(q, k, v, is_causal=is_causal)
    dq, dk, dv = _C.attention_bwd(q, k, v, out, lse, d_out, is_causal=is_causal)
    ref_out, ref_lse, *_ = np_attention_fwd(q, k, v, is_causal=is_causal)
    ref_grads = np_attention_bwd(q, k, v, d_out, is_causal=is_causal)
    naive_out, naive_grads = naive_same_dtype(q, k, v, d_out, dtype, is_causal=is_causal)
    assert out.dtype == dtype and dq.dtype == dtype and lse.dtype == (np.float64 if dtype is np.float64 else np.float32)
    check_close(out, naive_out, ref_out, dtype_name, "out")
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5 if dtype is not np.float64 else 1e-12, atol=1e-5)
    for name, f, n, r in zip(("dq", "dk", "dv"), (dq, dk, dv), naive_grads, ref_grads):
        check_close(f, n, r, dtype_name, name)


def _masks(B, N, T, S, rng):
    padding = np.ones((B, 1, 1, S), bool)
    padding[0, ..., S // 2 :] = False
    arbitrary = rng.random((B, N, T, S)) < 0.7
    fully_masked = rng.random((B, 1, T, S)) < 0.8
    fully_masked[:, :, ::3] = False  # every third query row sees no key
    return {"padding": padding, "arbitrary": arbitrary, "fully_masked_rows": fully_masked}


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["padding", "arbitrary", "fully_masked_rows"])
def test_masks_match_numpy_reference(kind, is_causal, dtype_name):
    rng = np.random.default_rng(11)
    dtype = NP_DTYPES[dtype_name]
    B, T, S, N, Nkv, H, Hv = 2, 97, 70, 4, 2, 40, 24
    q, k, v, d_out = make_inputs(rng, B, T, S, N, Nkv, H, Hv, dtype)
    mask = _masks(B, N, T, S, rng)[kind]
    out, lse = _C.attention_fwd(q, k, v, mask=mask, is_causal=is_causal)
    grads = _C.attention_bwd(q, k, v, out, lse, d_out, mask=mask, is_causal=is_causal)
    ref_out, ref_lse, *_ = np_attention_fwd(q, k, v, mask=mask, is_causal=is_causal)
    ref_grads = np_attention_bwd(q, k, v, d_out, mask=mask, is_causal=is_causal)
    naive_out, naive_grads = naive_same_dtype(q, k, v, d_out, dtype, mask=mask, is_causal=is_causal)
    check_close(out, naive_out, ref_out, dtype_name, "out")
    # Rows with no allowed key store lse = +inf (attention.h).
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    for name, f, n, r in zip(("dq", "dk", "dv"), grads, naive_grads, ref_grads):
        check_close(f, n, r, dtype_name, name)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float64"])
def test_dropout_matches_philox_mask(dtype_name):
    rng = np.random.default_rng(3)
    dtype = NP_DTYPES[dtype_name]
    B, T, S, N, Nkv, H, Hv = 2, 37, 45, 4, 2, 16, 16
    rate, seed = 0.3, 0x1234_5678_9ABC_DEF0
    q, k, v, d_out = make_inputs(rng, B, T, S, N, Nkv, H, Hv, dtype)
    keep = philox_keep_mask(seed, rate, B, N, T, S)
    kw = dict(is_causal=True, keep=keep, rate=rate)
    out, lse = _C.attention_fwd(q, k, v, is_causal=True, dropout_rate=rate, seed=seed)
    grads = _C.attention_bwd(q, k, v, out, lse, d_out, is_causal=True, dropout_rate=rate, seed=seed)
    ref_out, *_ = np_attention_fwd(q, k, v, **kw)
    naive_out, naive_grads = naive_same_dtype(q, k, v, d_out, dtype, **kw)
    check_close(out, naive_out, ref_out, dtype_name, "out")
    for name, f, n, r in zip(("dq", "dk", "dv"), grads, naive_grads, np_attention_bwd(q, k, v, d_out, **kw)):
        check_close(f, n, r, dtype_name, name)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_deterministic_across_thread_counts(dtype_name):
    rng = np.random.default_rng(5)
    q, k, v, d_out = make_inputs(rng, 2, 200, 150, 4, 2, 64, 64, NP_DTYPES[dtype_name])
    mask = rng.random((2, 1, 200, 150)) < 0.9
    results = []
    for threads in (1, 2, 3, 2):
        kw = dict(mask=mask, is_causal=True, dropout_rate=0.1, seed=42, num_threads=threads)
        out, lse = _C.attention_fwd(q, k, v, **kw)
        results.append([out, lse, *_C.attention_bwd(q, k, v, out, lse, d_out, **kw)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype_name", list(NP_DTYPES))
@pytest.mark.parametrize("shape, causal, rate", [((2, 1, 1, 2, 2, 8, 8), False, 0.0),
                                                 ((1, 97, 7, 4, 2, 40, 24), True, 0.0),
                                                 ((2, 7, 97, 2, 1, 72, 72), False, 0.3),
                                                 ((1, 130, 130, 2, 2, 256, 200), True, 0.1)],
                         ids=["tiny", "T97_S7_causal", "T7_S97_dropout", "H256_causal_dropout"])
def test_outputs_fully_written(dtype_name, shape, causal, rate):
    # Every element of out, lse, dq, dk, dv is written, including rows with no
    # allowed key: outputs poisoned with NaN come back bitwise equal to
    # freshly allocated ones.
    rng = np.random.default_rng(17)
    B, T, S, N, Nkv, H, Hv = shape
    q, k, v, d_out = make_inputs(rng, *shape, NP_DTYPES[dtype_name])
    mask = rng.random((B, 1, T, S)) < 0.7
    mask[:, :, ::4] = False  # rows with no allowed key
    kw = dict(mask=mask, is_causal=causal, dropout_rate=rate, seed=99)
    fresh = _C.attention_fwd(q, k, v, **kw)
    poisoned = tuple(np.full_like(t, np.nan) for t in fresh)
    got = _C.attention_fwd(q, k, v, outputs=poisoned, **kw)
    assert all(a is p for a, p in zip(got, poisoned))
    for name, a, f in zip(("out", "lse"), got, fresh):
        assert a.tobytes() == f.tobytes(), name
    fresh_b = _C.attention_bwd(q, k, v, *fresh, d_out, **kw)
    poisoned_b = tuple(np.full_like(t, np.nan) for t in fresh_b)
    got_b = _C.attention_bwd(q, k, v, *fresh, d_out, outputs=poisoned_b, **kw)
    for name, a, f in zip(("dq", "dk", "dv"), got_b, fresh_b):
        assert a.tobytes() == f.tobytes(), name


def test_outputs_argument_is_checked():
    q = np.ones((1, 3, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"attention_fwd: outputs\[1\] \(lse\) must have shape \[1, 2, 3\], got \[1, 3, 2\]"):
        _C.attention_fwd(q, q, q, outputs=(np.empty_like(q), np.empty((1, 3, 2), np.float32)))
    with pytest.raises(ValueError, match=r"attention_bwd: outputs must hold 3 arrays \(dquery, dkey, dvalue\), got 1"):
        o, lse = _C.attention_fwd(q, q, q)
        _C.attention_bwd(q, q, q, o, lse, o, outputs=(np.empty_like(q),))


def test_empty_sequences():
    rng = np.random.default_rng(0)
    for T, S in ((0, 5), (5, 0), (0, 0)):
        q, k, v, d_out = make_inputs(rng, 2, T, S, 2, 1, 8, 4, np.float32)
        out, lse = _C.attention_fwd(q, k, v)
        assert out.shape == (2, T, 2, 4) and lse.shape == (2, 2, T)
        np.testing.assert_array_equal(out, 0)  # an average over no keys
        dq, dk, dv = _C.attention_bwd(q, k, v, out, lse, d_out)
        np.testing.assert_array_equal(dq, 0)
        assert dk.shape == k.shape and dv.shape == v.shape
        np.testing.assert_array_equal(dk, 0)
        np.testing.assert_array_equal(dv, 0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=(2, 5, 3, 8)), r"the query heads N must be a multiple of the key/value heads Nkv, got N = 3"),
        (dict(q=(2, 5, 4, 300), k=(2, 6, 2, 300)), r"H \(head dim of query and key\) must be in \[1, 256\], got 300"),
        (dict(v=(2, 6, 2, 257)), r"Hv \(head dim of value\) must be in \[1, 256\], got 257"),
        (dict(k=(2, 6, 2, 16)), r"key must have the head dim H of query \(8\), got key \[2, 6, 2, 16\]"),
        (dict(k=(3, 6, 2, 8)), "same batch size B"),
        (dict(q=(2, 5, 4)), r"query must have rank 4 \[B, T, N, H\], got shape \[2, 5, 4\]"),
    ],
)
def test_bad_shapes_raise_value_error(change, match):
    shapes = dict(q=(2, 5, 4, 8), k=(2, 6, 2, 8), v=(2, 6, 2, 8))
    shapes.update(change)
    q, k, v = (np.ones(shapes[n], np.float32) for n in "qkv")
    with pytest.raises(ValueError, match=match):
        _C.attention_fwd(q, k, v)


@pytest.mark.parametrize("kw, match", [(dict(dropout_rate=1.0), "dropout_rate"), (dict(scale=float("inf")), "scale")])
def test_bad_arguments_raise_value_error(kw, match):
    q = np.ones((1, 3, 2, 8), np.float32)
    with pytest.raises(ValueError, match=match):
        _C.attention_fwd(q, q, q, **kw)
