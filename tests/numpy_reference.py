"""The NumPy references every test tier compares with: attention forward and
backward (masks, GQA, dropout with the kernels' Philox keep mask), the naive
same-dtype attention of the accuracy criterion, and residual-add + layer
norm; and the checks of a kernel's outputs against them that the emulated and
the real GPU tests share (check_attention, check_layer_norm). Float64 unless
asked otherwise; NumPy only (no TensorFlow, no ml_dtypes, no GPU): bfloat16
values travel as float32 arrays holding bfloat16 values, rounded by round_to.
"""

from __future__ import annotations

import numpy as np

import criterion

# ---------------------------------------------------------------------------
# Rounding to a dtype by name.

_HALF_TYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def round_to(x, dtype) -> np.ndarray:
    """x rounded to `dtype` (a name, or a NumPy/ml_dtypes dtype), as float64 for
    "bfloat16" without ml_dtypes: round to nearest even on the float32 bits."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name != "bfloat16":
        return np.asarray(x).astype(_HALF_TYPES[name])
    bits = np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    out = rounded.astype(np.uint32).view(np.float32)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, np.float32(np.nan), out).astype(np.float64)


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


def band_mask(T, S, is_causal=False, window=None, query_offset=0) -> np.ndarray:
    """[T, S]: query t (at position t + query_offset) may see key s: s <= pos
    when causal, pos - left <= s <= pos + right for window (left, right), -1
    = unbounded side."""
    pos = np.arange(T)[:, None] + query_offset
    s = np.arange(S)[None, :]
    band = np.ones((T, S), bool)
    if is_causal:
        band &= s <= pos
    left, right = window if window is not None else (-1, -1)
    if left >= 0:
        band &= s >= pos - left
    if right >= 0:
        band &= s <= pos + right
    return band


def allowed_mask(B, N, T, S, mask=None, is_causal=False, window=None, query_offset=0) -> np.ndarray:
    allowed = np.ones((B, N, T, S), bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
    allowed &= band_mask(T, S, is_causal, window, query_offset)
    return allowed


def nan_aware_attention(q, k, v, d_out, mask=None, is_causal=False, window=None, query_offset=0,
                        logits_soft_cap=None):
    """float64 forward and backward of [B, T, N, H] attention (GQA by Nkv) with
    masked terms left out, as Keras' masking by `where` does: a NaN or inf in a
    key a row may not see does not reach that row; every other NaN, inf - inf
    and -inf - (-inf) does. A row with no allowed key averages every value
    (log-sum-exp +inf). Returns out, lse [B, N, T], dq, dk, dv."""
    q, k, v, d_out = (np.asarray(t, np.float64) for t in (q, k, v, d_out))
    B, T, N, H = q.shape
    S, Nkv = k.shape[1], k.shape[2]
    g = N // Nkv
    kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [B, S, N, H]
    A = allowed_mask(B, N, T, S, mask, is_causal, window, query_offset)
    cap = logits_soft_cap or 0.0
    with np.errstate(all="ignore"):
        prod = np.einsum("btnh,bsnh->bntsh", q, kh) / np.sqrt(H)
        prod = np.where(A[..., None], prod, 0.0)  # a masked key's NaN does not reach
        x = prod.sum(-1)
        if cap:
            x = cap * np.tanh(x / cap)
        xm = np.where(A, x, -np.inf)
        m = np.max(xm, axis=-1, keepdims=True)  # NaN if any allowed logit is NaN
        none = ~A.any(-1, keepdims=True)
        p = np.where(A, np.exp(xm - m), 0.0)
        p = np.where(none, 1.0, p)
        lsum = p.sum(-1, keepdims=True)
        p = np.where(A | none, p / lsum, 0.0)
        lse = np.where(none[..., 0], np.inf, (m + np.log(lsum))[..., 0])
        out = np.einsum("bnts,bsnh->btnh", p, vh)
        do = np.transpose(d_out, (0, 2, 1, 3))  # [B, N, T, H]
        dv = np.einsum("bnts,bnth->bsnh", p, do)
        dp = np.einsum("bnth,bsnh->bnts", do, vh)
        delta = np.einsum("bnth,btnh->bnt", do, out)[..., None]
        ds = np.where(A & ~none, p * (dp - delta), 0.0)
        if cap:
            ds = ds * (1 - np.tanh(xm / cap) ** 2)
            ds = np.where(A & ~none, ds, 0.0)
        ds = ds / np.sqrt(H)
        dq = np.where(A[..., None], np.einsum("bnts,bsnh->bntsh", ds, kh), 0.0).sum(3)  # [B, N, T, H]
        dq = np.transpose(dq, (0, 2, 1, 3))
        dk = np.where(A[..., None], np.einsum("bnts,btnh->bntsh", ds, q), 0.0).sum(2)  # [B, N, S, H]
        dk = np.transpose(dk, (0, 2, 1, 3))
    fold = lambda t: t.reshape(B, S, Nkv, g, H).sum(3)  # noqa: E731
    return out, lse, dq, fold(dk), fold(dv)


def _logits(q, k, scale, cap, r):
    """(logits, tanh of the capped ones or None), rounded by r where a plain
    implementation stores them (x, x / cap, tanh, cap * tanh)."""
    x = r(np.einsum("btnh,bsnh->bnts", q, k) * scale)
    if not cap:
        return x, None
    t = r(np.tanh(r(x / q.dtype.type(cap))))
    return r(t * q.dtype.type(cap)), t


def _rounder(rounding, compute):
    """x -> x rounded to the dtype `rounding` (None: unchanged), in `compute`."""
    if rounding is None:
        return lambda x: x
    return lambda x: np.asarray(round_to(x, rounding)).astype(compute)


def np_attention_fwd(q, k, v, mask=None, scale=None, is_causal=False, keep=None, rate=0.0, compute=np.float64,
                     rounding=None, window=None, query_offset=0, logits_soft_cap=None):
    """Returns (out, lse, p, p_drop, allowed) in `compute` precision. Rows with no
    allowed key average value uniformly over all keys (lse = +inf). `rounding`
    (a dtype name): every intermediate a plain implementation in that dtype
    stores (logits, probabilities, dropped probabilities, out) is rounded to it.
    window, query_offset, logits_soft_cap: as the kernels' (band_mask; logits
    cap * tanh(logits / cap))."""
    r = _rounder(rounding, compute)
    q, k, v = (np.asarray(x).astype(compute) for x in (q, k, v))
    B, T, N, H = q.shape
    S, Nkv = k.shape[1], k.shape[2]
    g = N // Nkv
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = compute(1.0 / np.sqrt(H) if scale is None else scale)
    logits, _ = _logits(q, k, scale, logits_soft_cap, r)
    allowed = allowed_mask(B, N, T, S, mask, is_causal, window, query_offset)
    any_allowed = allowed.any(-1, keepdims=True)
    masked = np.where(allowed, logits, -np.inf)
    m = np.where(any_allowed, masked.max(-1, keepdims=True, initial=-np.inf), 0)
    e = np.where(allowed, np.exp(masked - m), 0)
    denom = e.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(any_allowed, e / denom, compute(1.0 / max(S, 1)))
        lse = np.where(any_allowed, m + np.log(denom), np.inf)[..., 0]
    p = r(p.astype(compute))
    p_drop = p if keep is None else r(p * keep.astype(compute) / compute(1.0 - rate))
    out = r(np.einsum("bnts,bsnh->btnh", p_drop, v))
    return out, lse, p, p_drop, allowed


def np_attention_bwd(q, k, v, d_out, mask=None, scale=None, is_causal=False, keep=None, rate=0.0, compute=np.float64,
                     rounding=None, window=None, query_offset=0, logits_soft_cap=None):
    """Gradients (dq, dk, dv) of np_attention_fwd's out for upstream d_out;
    `rounding` as there (also dP, dS and the gradients are rounded)."""
    r = _rounder(rounding, compute)
    _, _, p, p_drop, allowed = np_attention_fwd(q, k, v, mask, scale, is_causal, keep, rate, compute, rounding,
                                                window, query_offset, logits_soft_cap)
    q, k, v, d_out = (np.asarray(x).astype(compute) for x in (q, k, v, d_out))
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    g = N // Nkv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = compute(1.0 / np.sqrt(H) if scale is None else scale)
    dv = np.einsum("bnts,btnh->bsnh", p_drop, d_out)
    dp = r(np.einsum("btnh,bsnh->bnts", d_out, vr))
    if keep is not None:
        dp = r(dp * keep.astype(compute) / compute(1.0 - rate))
    ds = r(p * (dp - (dp * p).sum(-1, keepdims=True)))
    ds = np.where(allowed.any(-1, keepdims=True), ds, 0)  # uniform rows: constant p, no gradient
    if logits_soft_cap:  # through cap * tanh(x / cap): times 1 - tanh^2
        _, t = _logits(q, kr, scale, logits_soft_cap, r)
        ds = r(ds * r(1 - t * t))
    dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
    dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    dk = dk.reshape(B, S, Nkv, g, H).sum(3)
    dv = dv.reshape(B, S, Nkv, g, Hv).sum(3)
    return r(dq), r(dk), r(dv)


def naive_same_dtype(q, k, v, d_out, dtype, **kw):
    """The plain implementation in `dtype` (a name or a dtype), the criterion's
    baseline: float32 arithmetic for half types (as Keras' softmax and matmuls
    accumulate), every stored intermediate (logits, probabilities, dP, dS) and
    result rounded to dtype, as a framework running the math op by op in that
    dtype does."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    compute = np.float64 if name == "float64" else np.float32
    out = np_attention_fwd(q, k, v, compute=compute, rounding=name, **kw)[0]
    grads = list(np_attention_bwd(q, k, v, d_out, compute=compute, rounding=name, **kw))
    return out, grads


def check_attention(dtype_name, q, k, v, d_out, o, lse, dq, dk, dv, mask=None, scale=None, is_causal=False, seed=0,
                    rate=0.0, also_o=None, window=None, query_offset=0, logits_soft_cap=None) -> dict:
    """A kernel's forward (o, lse) and backward (dq, dk, dv) for inputs q, k, v,
    d_out (NumPy arrays of `dtype_name`'s values, any float type) against the
    float64 reference by the accuracy criterion; lse to 1e-4 relative with its
    +inf pattern (lse None: not checked). Dropout: the kernels' Philox mask
    for `seed`. `also_o`: other
    implementations' o for the same inputs ({label: array}), checked the same
    way. Returns the max errors; AssertionError naming the output when one
    fails."""
    B, T, N, _ = q.shape
    S = k.shape[1]
    keep = philox_keep_mask(seed, rate, B, N, T, S) if rate > 0 else None
    kw = dict(mask=mask, scale=scale, is_causal=is_causal, keep=keep, rate=rate, window=window,
              query_offset=query_offset, logits_soft_cap=logits_soft_cap)
    ref_o, ref_lse, _, _, _ = np_attention_fwd(q, k, v, **kw)
    ref_grads = np_attention_bwd(q, k, v, d_out, **kw)
    naive_o, naive_grads = naive_same_dtype(q, k, v, d_out, dtype_name, **kw)
    errors = {}
    outputs = [("o", o, naive_o, ref_o)] + list(zip(("dq", "dk", "dv"), (dq, dk, dv), naive_grads, ref_grads))
    outputs += [(label, other, naive_o, ref_o) for label, other in (also_o or {}).items()]
    for name, got, naive, ref in outputs:
        got = np.asarray(got, np.float64)
        criterion.check_close(got, naive, ref, dtype_name, name)
        errors[name] = float(np.abs(got - ref).max()) if got.size else 0.0
    if lse is None:  # (an op that keeps it internal)
        return errors
    # lse: float32 statistics, +inf for rows with no allowed key.
    lse, ref_lse = np.asarray(lse, np.float64), ref_lse.astype(np.float64)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse), err_msg="lse: infinite pattern differs")
    fin = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[fin] - ref_lse[fin]).max()) if fin.any() else 0.0
    bound = 1e-4 * max(1.0, float(np.abs(ref_lse[fin]).max()) if fin.any() else 1.0)
    assert lse_err <= bound, f"lse: error {lse_err:.3g} > {bound:.3g}"
    errors["lse"] = lse_err
    return errors


# ---------------------------------------------------------------------------
# Residual-add + layer norm.


def layer_norm_fwd(x, r, g, b, eps, norm="layer"):
    """(y, s, mean, rstd) in float64; the sum s = x + r is rounded to x's dtype, as in every implementation.
    norm "rms": mean = 0, y = s * rstd * g; "rms_scaling": y = s * rstd * g with the layer norm's rstd."""
    s = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype).astype(np.float64)
    mean = np.zeros_like(s[..., :1]) if norm == "rms" else s.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + eps)
    y = ((s - mean) * rstd * g + b) if norm == "layer" else s * rstd * g
    return y, s, mean[..., 0], rstd[..., 0]


def check_layer_norm(dtype_name, param_dtype_name, x, residual, gamma, beta, eps, y, s, mean, rstd, dy, dsum, dx,
                     dgamma, dbeta, norm="layer") -> dict:
    """A kernel's residual-add + layer norm forward (y, the sum s when residual
    is given, mean, rstd) and backward (dx, dgamma, dbeta for upstream dy and
    dsum; dsum None without residual) against the float64 reference by the
    accuracy criterion; the sum must equal x + residual rounded to the dtype
    bitwise; mean and rstd None: not checked. NumPy arrays of the dtypes'
    values (any float type). Returns the
    max errors; AssertionError naming the output when one fails."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x64, g64, b64 = f64(x), f64(gamma), f64(beta)
    r64 = f64(residual) if residual is not None else np.zeros_like(x64)
    ref_s = f64(round_to(x64 + r64, dtype_name))  # the sum rounded to the dtype, as every implementation
    ref_y, _, ref_mean, ref_rstd = layer_norm_fwd(ref_s, np.zeros_like(ref_s), g64, b64, eps, norm)
    d64 = f64(dsum) if dsum is not None else 0.0
    ref_dx, ref_dg, ref_db = layer_norm_bwd(ref_s, f64(dy), d64, g64, eps, norm)
    # The naive implementation at the input precision (float32 statistics for
    # half types, as every framework's layer norm).
    c = np.float64 if dtype_name == "float64" else np.float32
    s_c = ref_s.astype(c)
    naive_y = round_to(layer_norm_fwd(s_c, np.zeros_like(s_c), g64.astype(c), b64.astype(c), eps, norm)[0],
                       dtype_name)
    naive_dx, naive_dg, naive_db = layer_norm_bwd(s_c, f64(dy).astype(c), (d64.astype(c) if dsum is not None else c(0)),
                                                  g64.astype(c), eps, norm)
    errors = {}
    outputs = [
        ("y", y, naive_y, ref_y, dtype_name),
        ("dx", dx, round_to(naive_dx, dtype_name), ref_dx, dtype_name),
        ("dgamma", dgamma, round_to(naive_dg, param_dtype_name), ref_dg, param_dtype_name),
    ]
    if norm == "layer":  # (the RMS norms have no beta)
        outputs.append(("dbeta", dbeta, round_to(naive_db, param_dtype_name), ref_db, param_dtype_name))
    for name, got, naive, ref, dt in outputs:
        criterion.check_close(f64(got), naive, ref, dt, name)
        errors[name] = float(np.abs(f64(got) - ref).max())
    if residual is not None:
        np.testing.assert_array_equal(f64(s), ref_s, err_msg="sum")
    for name, got, ref in (("mean", mean, ref_mean), ("rstd", rstd, ref_rstd)):
        if got is None:  # (an op that keeps it internal)
            continue
        err = float(np.abs(f64(got) - ref).max() / max(1.0, np.abs(ref).max()))
        assert err <= (1e-12 if dtype_name == "float64" else 1e-5), f"{name}: relative error {err:.3g}"
    return errors


def layer_norm_bwd(s, dy, dsum, g, eps, norm="layer"):
    """(ds, dgamma, dbeta) in float64 for upstream dy (on y) and dsum (on s); norm as layer_norm_fwd's."""
    mean = np.zeros_like(s[..., :1]) if norm == "rms" else s.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (s - mean) * rstd
    u = s * rstd if norm == "rms_scaling" else xhat  # y = u * g (+ b)
    gy = dy * g
    mean_g = gy.mean(-1, keepdims=True) if norm == "layer" else 0.0
    ds = rstd * (gy - mean_g - xhat * (gy * u).mean(-1, keepdims=True)) + dsum
    axes = tuple(range(s.ndim - 1))
    return ds, (dy * u).sum(axes), dy.sum(axes)
