"""The NumPy reference's own checks: bfloat16 rounding without ml_dtypes, and
the shared output checks (check_attention, check_layer_norm; the emulated
and the real GPU tests use them) on values held in float32 arrays, as the GPU
tests pass them: a correct kernel passes, a corrupted output fails naming it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numpy_reference import check_attention, check_layer_norm, round_to

from tf_fastattn import _C


def test_round_to_bfloat16_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 20000),
        # exact ties (round half to even, both directions), near-ties, specials
        np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 2**-130, 3.4e38, np.inf, -np.inf,
                  0.0, -0.0], np.float32),
    ])
    want = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    got = round_to(x, "bfloat16")
    np.testing.assert_array_equal(got, want)
    assert np.isnan(round_to(np.array([np.nan], np.float32), "bfloat16")).all()
    np.testing.assert_array_equal(round_to(x, ml_dtypes.bfloat16), want)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_check_attention_on_float32_held_values(dtype_name):
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype_name]
    rng = np.random.default_rng(1)
    B, T, S, N, Nkv, H = 2, 19, 23, 4, 2, 32
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((B, T, N, H), (B, S, Nkv, H), (B, S, Nkv, H)))
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[:, :, ::5] = False  # fully masked rows
    kw = dict(mask=mask, is_causal=True, dropout_rate=0.2, seed=9)
    o, lse = _C.attention_fwd(q, k, v, **kw)
    d_o = rng.standard_normal(o.shape).astype(dtype)
    dq, dk, dv = _C.attention_bwd(q, k, v, o, lse, d_o, **kw)
    f32 = [np.asarray(a, np.float32) for a in (q, k, v, d_o, o, lse, dq, dk, dv)]
    errors = check_attention(dtype_name, *f32, mask=mask, is_causal=True, seed=9, rate=0.2)
    assert set(errors) == {"o", "dq", "dk", "dv", "lse"}
    bad = f32[7].copy()
    bad[0, 3, 1, 5] += 0.05 * max(1.0, np.abs(bad).max())
    with pytest.raises(AssertionError, match="dk: max error"):
        check_attention(dtype_name, *f32[:7], bad, f32[8], mask=mask, is_causal=True, seed=9, rate=0.2)
    with pytest.raises(AssertionError, match="o: max error"):  # another seed drops other keys
        check_attention(dtype_name, *f32, mask=mask, is_causal=True, seed=10, rate=0.2)


@pytest.mark.parametrize("dtype_name,param_dtype_name", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                                         ("float16", "float32"), ("float32", "float32")])
def test_check_layer_norm_on_float32_held_values(dtype_name, param_dtype_name):
    types = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
    dtype, pdtype = types[dtype_name], types[param_dtype_name]
    rng = np.random.default_rng(2)
    rows, cols, eps = 13, 333, 1e-3
    x = (rng.standard_normal((rows, cols)) * 2 + 0.5).astype(dtype)
    r = rng.standard_normal((rows, cols)).astype(dtype)
    g = (rng.random(cols) + 0.5).astype(pdtype)
    b = rng.standard_normal(cols).astype(pdtype)
    y, s, mean, rstd = _C.layer_norm_fwd(x, g, b, residual=r, epsilon=eps)
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    dx, dg, db = _C.layer_norm_bwd(dy, s, mean, rstd, gamma=g)
    f32 = lambda *a: [np.asarray(t, np.float32) for t in a]  # noqa: E731
    args = [dtype_name, param_dtype_name, *f32(x, r, g, b), eps, *f32(y, s, mean, rstd, dy), None]
    errors = check_layer_norm(*args, *f32(dx, dg, db))
    assert set(errors) == {"y", "dx", "dgamma", "dbeta"}
    bad_s = f32(s)[0]
    bad_s[2, 7] = np.nextafter(bad_s[2, 7], np.float32(np.inf))
    with pytest.raises(AssertionError, match="sum"):
        check_layer_norm(*args[:8], bad_s, *args[9:], *f32(dx, dg, db))
    bad_dg = f32(dg)[0]
    bad_dg[5] += 0.05 * np.abs(bad_dg).max()
    with pytest.raises(AssertionError, match="dgamma: max error"):
        check_layer_norm(*args, *f32(dx), bad_dg, *f32(db))
