"""The NumPy references every test tier compares with: attention forward and
backward (masks, GQA, dropout with the kernels' Philox keep mask), the naive
same-dtype attention of the accuracy criterion, and residual-add + layer
norm. Float64 unless asked otherwise; NumPy only (no TensorFlow, no GPU).
"""

from __future__ import annotations

import numpy as np


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


def naive_same_dtype(q, k, v, d_out, dtype, **kw):
    """The naive implementation at the inputs' precision: float32 arithmetic for
    half types (as Keras' softmax), probabilities and outputs rounded to dtype."""
    compute = np.float64 if dtype is np.float64 else np.float32
    out, _, p, p_drop, _ = np_attention_fwd(q, k, v, compute=compute, **kw)
    out = out.astype(dtype)
    grads = [g.astype(dtype) for g in np_attention_bwd(q, k, v, d_out, compute=compute, **kw)]
    return out, grads


# ---------------------------------------------------------------------------
# Residual-add + layer norm.


def layer_norm_fwd(x, r, g, b, eps):
    """(y, s, mean, rstd) in float64; the sum s = x + r is rounded to x's dtype, as in every implementation."""
    s = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype).astype(np.float64)
    mean = s.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + eps)
    y = (s - mean) * rstd * g + b
    return y, s, mean[..., 0], rstd[..., 0]


def layer_norm_bwd(s, dy, dsum, g, eps):
    """(ds, dgamma, dbeta) in float64 for upstream dy (on y) and dsum (on s)."""
    mean = s.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (s - mean) * rstd
    gy = dy * g
    ds = rstd * (gy - gy.mean(-1, keepdims=True) - xhat * (gy * xhat).mean(-1, keepdims=True)) + dsum
    axes = tuple(range(s.ndim - 1))
    return ds, (dy * xhat).sum(axes), dy.sum(axes)
