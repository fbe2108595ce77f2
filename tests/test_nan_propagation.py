"""NaN and inf in the inputs reach exactly the rows they reach in the
reference math, on every CPU tier this machine can run.

The reference is float64 attention with masked keys left out (Keras' masking
by `where`: a NaN or inf in a key that a row may not see does not reach that
row's output). A planted NaN or inf:

* makes NaN every output row (and log-sum-exp) whose reference row is NaN: a
  NaN query row, a NaN in an allowed key, a +inf logit (inf - inf in the
  softmax), every allowed logit -inf (-inf - (-inf); a row with no allowed
  key is the average of all values instead), a NaN through the logit soft-cap;
* leaves every other row finite and within the accuracy criterion of the
  reference (an inf logit of -inf just drops its key), and every (batch,
  key-value head) it cannot reach bitwise equal to the run without it;
* in the backward, reaches at least the gradient entries the reference
  reaches (a NaN row's dq, the dk and dv of every key that row sees). Inside
  a computed tile it may reach more, as it does in Keras' autodiff (dk = dS^T
  q takes 0 x NaN from a NaN query row at a key the row may not see).

Keys outside a row's mask, its causal range or its sliding window never reach
it: their tiles are skipped or their logits replaced by -inf before the max.
(A NaN in a *value* at a masked key inside a computed tile does reach the
row, as 0 x NaN does in Keras' `softmax(...) @ v`: only queries and keys are
planted here.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_fastattn import _C
from test_attention_kernel import NP_DTYPES
import numpy_reference

FEATURES = set(_C.cpu_features())
TIERS = {
    "avx512": "avx512f" in FEATURES,
    "avx2": {"avx2", "fma"} <= FEATURES,
    "portable": True,
}
NAN, INF = float("nan"), float("inf")

# name: (B, T, S, N, Nkv, H), options, plants [(tensor, index, value)]
CASES = {
    "q_nan_row": ((2, 97, 97, 4, 2, 40), dict(), [("q", (0, 2, 0, 0), NAN)]),
    "q_nan_causal_late_row": ((1, 130, 130, 2, 1, 64), dict(is_causal=True), [("q", (0, 100, 1, 5), NAN)]),
    "k_nan_allowed": ((2, 70, 70, 4, 2, 32), dict(is_causal=True), [("k", (1, 40, 1, 3), NAN)]),
    "k_inf_causal": ((1, 97, 97, 4, 2, 40), dict(is_causal=True), [("k", (0, 50, 1, 3), INF)]),
    "k_neg_inf": ((1, 65, 80, 2, 2, 16), dict(), [("k", (0, 7, 0, 0), -INF)]),
    "q_inf_row_causal": ((1, 80, 80, 2, 1, 64), dict(is_causal=True), [("q", (0, 5, 1, 0), INF)]),
    "k_nan_masked_for_some": ((2, 64, 90, 2, 1, 32), dict(mask="key_rows"), [("k", (0, 10, 0, 2), NAN)]),
    "k_nan_outside_window": ((1, 200, 200, 2, 1, 64), dict(is_causal=True, window=(32, 0)),
                             [("k", (0, 20, 0, 1), NAN)]),
    "k_nan_soft_cap": ((1, 70, 70, 2, 1, 64), dict(logits_soft_cap=30.0), [("k", (0, 3, 0, 0), NAN)]),
    "k_inf_soft_cap": ((1, 70, 70, 2, 1, 64), dict(logits_soft_cap=30.0), [("k", (0, 3, 0, 0), INF)]),
    # every logit of row 5 -inf (keys 0..5 positive in dim 0, q -inf there):
    # -inf - (-inf) = NaN in the softmax, not the empty row's average
    "all_logits_neg_inf": ((1, 70, 70, 2, 1, 16), dict(is_causal=True),
                           [("k", (0, s, 0, 0), 1.0) for s in range(6)] + [("q", (0, 5, 1, 0), -INF)]),
    "q_nan_decode_offset": ((1, 5, 150, 4, 2, 64), dict(is_causal=True, query_offset=145, window=(64, 0)),
                            [("q", (0, 4, 3, 0), NAN), ("k", (0, 20, 1, 0), NAN)]),
}


def _mask(kind, B, T, S):
    if kind != "key_rows":
        return None
    m = np.ones((B, 1, T, S), bool)
    m[:, :, ::2, 10] = False  # even rows may not see key 10
    return m


def _inputs(name, dtype_name):
    (B, T, S, N, Nkv, H), opts, plants = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    dtype = NP_DTYPES[dtype_name]
    q, k, v, d_out = (rng.standard_normal(s).astype(dtype)
                      for s in ((B, T, N, H), (B, S, Nkv, H), (B, S, Nkv, H), (B, T, N, H)))
    planted = {"q": q.copy(), "k": k.copy()}
    for tensor, index, value in plants:
        planted[tensor][index] = value
    return q, k, v, d_out, planted["q"], planted["k"], _mask(opts.get("mask"), B, T, S)


def _kernel_kwargs(opts, mask):
    kw = {key: opts[key] for key in ("is_causal", "window", "query_offset", "logits_soft_cap") if key in opts}
    return dict(kw, mask=mask)


def reference(q, k, v, d_out, opts, mask):
    """float64 forward and backward with masked terms left out (numpy_reference.nan_aware_attention)."""
    return numpy_reference.nan_aware_attention(q, k, v, d_out, mask=mask, **opts_for_reference(opts))


def opts_for_reference(opts):
    return {key: opts[key] for key in ("is_causal", "window", "query_offset", "logits_soft_cap") if key in opts}


CHILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import numpy as np
import test_nan_propagation as t
from tf_fastattn import _C
res = {"paths": np.array(json.dumps(_C.cpu_attention_paths()))}
for dtype_name in ("float32", "bfloat16"):
    for name in t.CASES:
        q, k, v, d_out, qp, kp, mask = t._inputs(name, dtype_name)
        kw = t._kernel_kwargs(t.CASES[name][1], mask)
        for tag, (qq, kk) in (("clean", (q, k)), ("planted", (qp, kp))):
            o, lse = _C.attention_fwd(qq, kk, v, **kw)
            dq, dk, dv = _C.attention_bwd(qq, kk, v, o, lse, d_out, **kw)
            for n, a in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv)):
                res[f"{dtype_name}:{name}:{tag}:{n}"] = np.asarray(a, np.float32)
np.savez(sys.argv[2], **res)
"""


@pytest.fixture(scope="module")
def tier_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan")
    results = {}
    for tier, ok in TIERS.items():
        if not ok:
            continue
        env = dict(os.environ, TF_FASTATTN_CPU_ISA=tier)
        out = tmp / f"{tier}.npz"
        res = subprocess.run([sys.executable, "-c", CHILD, __file__, str(out)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        results[tier] = dict(np.load(out))
    return results


def _rows_nan(a):
    """Rows of [B, T, N, H] (or lse [B, N, T]) holding a NaN."""
    return np.isnan(a).any(-1) if a.ndim == 4 else np.isnan(a)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("name", list(CASES))
def test_nan_reaches_exactly_the_reference_rows(tier_results, tier, dtype_name, name):
    if not TIERS[tier]:
        pytest.skip(f"this CPU cannot run the {tier} tier (cpu_features: {sorted(FEATURES)})")
    got = tier_results[tier]
    assert json.loads(str(got["paths"]))["float32"] == tier
    (B, T, S, N, Nkv, H), opts, _ = CASES[name]
    q, k, v, d_out, qp, kp, mask = _inputs(name, dtype_name)
    ref = dict(zip(("out", "lse", "dq", "dk", "dv"), reference(qp, kp, v, d_out, opts, mask)))
    key = f"{dtype_name}:{name}"
    fused = {n: got[f"{key}:planted:{n}"] for n in ref}
    clean = {n: got[f"{key}:clean:{n}"] for n in ref}
    label = f"{tier} {key}"

    # The forward: NaN in exactly the reference's rows.
    ref_nan, fused_nan = _rows_nan(ref["out"]), _rows_nan(fused["out"])
    assert ref_nan.any() or name in ("k_neg_inf", "k_nan_outside_window", "k_inf_soft_cap") or \
        "masked" in name, f"{label}: the plant was meant to reach some row"
    np.testing.assert_array_equal(fused_nan, ref_nan, err_msg=f"{label}: rows of NaN output")
    np.testing.assert_array_equal(np.isnan(fused["lse"]), np.isnan(ref["lse"]), err_msg=f"{label}: NaN lse")
    # Whole rows: a NaN row is NaN in every column, as the reference's.
    np.testing.assert_array_equal(np.isnan(fused["out"]), np.isnan(ref["out"]), err_msg=f"{label}: NaN entries")
    finite = ~ref_nan
    assert np.isfinite(fused["out"][finite]).all(), f"{label}: rows the plant cannot make NaN are finite"
    tol = 2e-2 if dtype_name == "bfloat16" else 2e-5
    np.testing.assert_allclose(fused["out"][finite], ref["out"][finite], atol=tol, rtol=tol, err_msg=label)

    # Nothing the plant cannot reach changes: the (batch, kv head) slices
    # holding no planted value are bitwise those of the clean run.
    for n in ("out", "dq", "dk", "dv"):
        planted_kv = np.zeros((B, Nkv), bool)
        for tensor, index, _ in CASES[name][2]:
            b, head = index[0], index[2] // (N // Nkv if tensor == "q" else 1)
            planted_kv[b, head] = True
        keep = ~planted_kv
        f = fused[n].reshape(B, fused[n].shape[1], Nkv, -1)
        c = clean[n].reshape(B, clean[n].shape[1], Nkv, -1)
        for b, h in zip(*np.nonzero(keep)):
            assert f[b, :, h].tobytes() == c[b, :, h].tobytes(), f"{label}: {n} of batch {b} kv head {h} changed"

    # The backward: at least the reference's NaN entries.
    for n in ("dq", "dk", "dv"):
        missing = np.isnan(ref[n]) & ~np.isnan(fused[n])
        assert not missing.any(), f"{label}: {n} misses {int(missing.sum())} NaN entries of the reference"


# ---------------------------------------------------------------------------
# Through TensorFlow: the op, its gradient, XLA and the pure-TF reference
# implementation give the NaN rows of the float64 reference.

@pytest.mark.parametrize("implementation", ["fused", "fused_xla", "reference"])
@pytest.mark.parametrize("name", ["q_nan_row", "k_inf_causal", "k_nan_masked_for_some", "k_nan_outside_window"])
def test_tensorflow_paths_propagate_nan(name, implementation):
    import tensorflow as tf

    import tf_fastattn
    from tfa_helpers import requires_ops

    if implementation != "reference":
        requires_ops()
    (B, T, S, N, Nkv, H), opts, _ = CASES[name]
    q, k, v, d_out, qp, kp, mask = _inputs(name, "float32")
    ref_out, _, ref_dq, ref_dk, ref_dv = reference(qp, kp, v, d_out, opts, mask)
    kw = dict(is_causal=opts.get("is_causal", False), window=opts.get("window"),
              implementation="reference" if implementation == "reference" else "fused")
    tmask = None if mask is None else tf.constant(mask)

    def f(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = tf_fastattn.dot_product_attention(q, k, v, mask=tmask, **kw)
        return (out, *tape.gradient(out, [q, k, v], output_gradients=tf.constant(d_out)))

    if implementation == "fused_xla":
        f = tf.function(f, jit_compile=True)
    out, dq, dk, dv = (np.asarray(t) for t in f(tf.constant(qp), tf.constant(kp), tf.constant(v)))
    np.testing.assert_array_equal(_rows_nan(out), _rows_nan(ref_out), err_msg=f"{implementation} {name}")
    finite = ~_rows_nan(ref_out)
    np.testing.assert_allclose(out[finite], ref_out[finite], atol=2e-5, rtol=2e-5)
    grads = (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv))
    if implementation == "reference":
        # tf.nn.softmax puts NaN only where the logit is NaN or +inf ([1, 2,
        # inf] -> [0, 0, nan]), so autodiff through it reaches only those
        # keys' dk and dv; the NaN rows' dq it reaches.
        grads = grads[:1]
    for n, a, r in grads:
        assert not (np.isnan(r) & ~np.isnan(a)).any(), f"{implementation} {name}: {n} misses NaN"


def test_keras_math_agrees_on_the_nan_rows():
    """Keras' own attention (where-masking then softmax) gives the rows this
    reference gives: the rule the fused op follows is Keras' rule."""
    import keras

    for name in ("q_nan_row", "k_inf_causal", "k_nan_masked_for_some"):
        (B, T, S, N, Nkv, H), opts, _ = CASES[name]
        q, k, v, d_out, qp, kp, mask = _inputs(name, "float32")
        g = N // Nkv
        kk, vv = np.repeat(kp, g, axis=2), np.repeat(v, g, axis=2)
        allowed = numpy_reference.allowed_mask(B, N, T, S, mask, **{k: v for k, v in opts_for_reference(opts).items() if k != "logits_soft_cap"})
        out = np.asarray(keras.ops.dot_product_attention(qp, kk, vv, mask=allowed))
        ref_out = reference(qp, kp, v, d_out, opts, mask)[0]
        np.testing.assert_array_equal(_rows_nan(out), _rows_nan(ref_out), err_msg=name)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "neg_inf"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norms_propagate_nan_and_inf_to_their_row(norm, value):
    """Residual-add + layer norm or RMS norm: a NaN or inf in one element
    gives NaN where the float64 reference does (its row's mean and variance
    are NaN or inf - inf), and reaches that row's dx; every other row is finite."""
    import tensorflow as tf

    import tf_fastattn

    rng = np.random.default_rng(3)
    x, r = (rng.standard_normal((4, 3, 70)).astype(np.float32) for _ in range(2))
    x[1, 2, 5] = value
    gamma, beta = np.ones(70, np.float32), np.zeros(70, np.float32)
    xt, rt = tf.constant(x), tf.constant(r)
    with tf.GradientTape() as tape:
        tape.watch([xt, rt])
        if norm == "layer":
            out = tf_fastattn.layer_norm(xt, gamma, beta, residual=rt)
        else:
            out = tf_fastattn.rms_norm(xt, gamma, residual=rt)
    dx = tape.gradient(out, xt).numpy()
    out = out.numpy()
    h = x.astype(np.float64) + r
    with np.errstate(all="ignore"):
        if norm == "layer":
            ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-3)
        else:  # inf: the row's other entries x / inf = 0, the inf entry inf / inf = NaN
            ref = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
    expected = np.zeros((4, 3), bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(np.isnan(ref).any(-1), expected)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isnan(dx).any(-1), expected)
    assert np.isfinite(out[~expected]).all() and np.isfinite(dx[~expected]).all()
