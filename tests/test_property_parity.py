"""Property-based parity: cases drawn by hypothesis (a fixed derivation, no
example database, so every run draws the same cases) over batch, lengths,
heads (GQA and MQA), head dims, dtype, causal, mask pattern (key padding,
random, rows with no allowed key), dropout and strided (transposed) inputs;
the CPU kernels' forward and every gradient meet the accuracy criterion
against the float64 NumPy reference. The quick suite draws 25 cases, the
slow suite 300 (the same derivation: its first cases are the quick ones).

Known miss, found by this search: with dropout, when no row sees more than
one key (S = 1, or a mask leaving one key), dq and dk should be exactly 0 (p
= 1 is constant) but come out at 1-3.4x the criterion's floor: delta = dO .
o uses the output rounded to its dtype while dp uses the unrounded products
(FlashAttention-2 forms delta the same way). Such draws are discarded
(`assume`, nothing else is), and test_single_key_dropout_known_miss pins the
miss (a strict xfail: it fails the day the backward forms delta exactly)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from numpy_reference import check_attention
from test_attention_kernel import NP_DTYPES
from tf_fastattn import _C

SEED = 0x5EED_0F_D20F


@st.composite
def attention_cases(draw):
    Nkv = draw(st.integers(1, 2))
    H = draw(st.sampled_from([8, 16, 24, 40, 64, 72, 128, 256]))
    return dict(
        B=draw(st.integers(1, 2)), T=draw(st.integers(1, 70)), S=draw(st.integers(1, 70)),
        Nkv=Nkv, N=Nkv * draw(st.integers(1, 3)), H=H, Hv=draw(st.sampled_from([8, 16, 40, 64, H])),
        dtype=draw(st.sampled_from(list(NP_DTYPES))), causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "padding", "random", "empty_rows"])),
        rate=draw(st.sampled_from([0.0, 0.0, 0.2])), strided=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensor(rng, dtype, B, L, heads, dim, strided):
    """[B, L, heads, dim]; strided: a transposed view of [B, heads, L, dim] memory."""
    if strided:
        return rng.standard_normal((B, heads, L, dim)).astype(dtype).transpose(0, 2, 1, 3)
    return rng.standard_normal((B, L, heads, dim)).astype(dtype)


def _mask(rng, kind, B, N, T, S):
    if kind == "padding":
        m = np.ones((B, 1, 1, S), bool)
        m[..., rng.integers(0, S):] = False  # possibly every key: all rows empty
        return m
    if kind == "random":
        return rng.random((B, N, T, S)) < 0.7
    if kind == "empty_rows":
        m = rng.random((B, 1, T, S)) < 0.8
        m[:, :, ::3] = False
        return m
    return None


def single_key_dropout(c, mask):
    """The known miss's cases: dropout, and no row sees more than one key."""
    if not c["rate"]:
        return False
    T, S = c["T"], c["S"]
    allowed = np.ones((T, S), bool) if not c["causal"] else np.tri(T, S, dtype=bool)
    allowed = np.broadcast_to(allowed, (c["B"], c["N"], T, S))
    if mask is not None:
        allowed = allowed & mask
    return bool((allowed.sum(-1) <= 1).all())


def check_case(c, skip_known_miss=False):
    rng = np.random.default_rng(c["data_seed"])
    dtype = NP_DTYPES[c["dtype"]]
    B, T, S, N, Nkv, H, Hv = (c[k] for k in ("B", "T", "S", "N", "Nkv", "H", "Hv"))
    q, k = _tensor(rng, dtype, B, T, N, H, c["strided"]), _tensor(rng, dtype, B, S, Nkv, H, c["strided"])
    v, d_out = _tensor(rng, dtype, B, S, Nkv, Hv, c["strided"]), _tensor(rng, dtype, B, T, N, Hv, False)
    mask = _mask(rng, c["mask"], B, N, T, S)
    if skip_known_miss:
        assume(not single_key_dropout(c, mask))
    kw = dict(mask=mask, is_causal=c["causal"], dropout_rate=c["rate"], seed=SEED)
    o, lse = _C.attention_fwd(q, k, v, **kw)
    dq, dk, dv = _C.attention_bwd(q, k, v, o, lse, d_out, **kw)
    check_attention(c["dtype"], q, k, v, d_out, o, lse, dq, dk, dv, mask=mask, is_causal=c["causal"], seed=SEED,
                    rate=c["rate"])


_COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=25, **_COMMON)
@given(attention_cases())
def test_drawn_cases_meet_the_criterion(case):
    check_case(case, skip_known_miss=True)


@pytest.mark.slow
@settings(max_examples=300, **_COMMON)
@given(case=attention_cases())
def test_more_drawn_cases_meet_the_criterion(case):
    check_case(case, skip_known_miss=True)


@pytest.mark.xfail(strict=True, reason="known miss: dropout with S = 1, delta from the rounded output (dq over the floor)")
def test_single_key_dropout_known_miss():
    case = dict(B=1, T=45, S=1, Nkv=1, N=1, H=24, Hv=40, dtype="float16", causal=True, mask=None, rate=0.2,
                strided=True, data_seed=0)
    assert single_key_dropout(case, None)
    check_case(case)


# ---------------------------------------------------------------------------
# The same search through the TensorFlow op and its registered gradient
# (tf_fastattn.dot_product_attention under tf.GradientTape), with the decoder
# options drawn too: sliding windows, the logit soft-cap and a query offset.


@st.composite
def op_cases(draw):
    c = draw(attention_cases())
    c["rate"] = 0.0 if c["mask"] == "empty_rows" else c["rate"]
    c["window"] = draw(st.sampled_from([None, None, (0, 0), (5, 0), (3, 7), (40, -1)]))
    c["cap"] = draw(st.sampled_from([None, None, 5.0, 30.0]))
    c["offset"] = draw(st.integers(0, max(0, c["S"] - c["T"]))) if draw(st.booleans()) else 0
    return c


def check_op_case(c):
    import tensorflow as tf

    import tf_fastattn

    rng = np.random.default_rng(c["data_seed"])
    dtype = NP_DTYPES[c["dtype"]]
    B, T, S, N, Nkv, H, Hv = (c[k] for k in ("B", "T", "S", "N", "Nkv", "H", "Hv"))
    q, k = _tensor(rng, dtype, B, T, N, H, False), _tensor(rng, dtype, B, S, Nkv, H, False)
    v, d_out = _tensor(rng, dtype, B, S, Nkv, Hv, False), _tensor(rng, dtype, B, T, N, Hv, False)
    mask = _mask(rng, c["mask"], B, N, T, S)
    window = c["window"] or (-1, -1)
    allowed = np.ones((B, N, T, S), bool) if mask is None else np.broadcast_to(mask, (B, N, T, S))
    pos, s = np.arange(T)[:, None] + c["offset"], np.arange(S)[None, :]
    band = ((s <= pos) | (not c["causal"])) & ((s >= pos - window[0]) | (window[0] < 0))
    band &= (s <= pos + window[1]) | (window[1] < 0)
    assume(not (c["rate"] and ((allowed & band).sum(-1) <= 1).all()))  # the known miss above
    tensors = [tf.constant(a) for a in (q, k, v)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        o = tf_fastattn.dot_product_attention(
            *tensors, mask=None if mask is None else tf.constant(mask), is_causal=c["causal"],
            dropout_rate=c["rate"], seed=SEED, implementation="fused", logits_soft_cap=c["cap"],
            window=c["window"], query_offset=c["offset"])
    dq, dk, dv = tape.gradient(o, tensors, output_gradients=tf.constant(d_out))
    as_np = lambda t: np.asarray(tf.cast(t, tf.float64))  # noqa: E731
    check_attention(c["dtype"], q, k, v, d_out, as_np(o), None, as_np(dq), as_np(dk), as_np(dv), mask=mask,
                    is_causal=c["causal"], seed=SEED, rate=c["rate"], window=c["window"], query_offset=c["offset"],
                    logits_soft_cap=c["cap"])


@settings(max_examples=12, **_COMMON)
@given(op_cases())
def test_drawn_cases_through_the_tf_op_and_its_gradient(case):
    check_op_case(case)


@pytest.mark.slow
@settings(max_examples=120, **_COMMON)
@given(case=op_cases())
def test_more_drawn_cases_through_the_tf_op_and_its_gradient(case):
    check_op_case(case)
