"""Every CPU attention micro-kernel tier this machine can run (AVX-512, AVX2,
portable loops), forced with TF_FASTATTN_CPU_ISA in a child process, against
the NumPy float64 reference with the accuracy criterion; and float32 results
bitwise identical on the AVX-512 and AVX2 tiers (the AVX2 kernels repeat the
AVX-512 arithmetic in the same order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_fastattn import _C
from numpy_reference import naive_same_dtype, np_attention_bwd, np_attention_fwd, philox_keep_mask
from test_attention_kernel import NP_DTYPES, check_close, make_inputs

FEATURES = set(_C.cpu_features())
TIERS = {
    "avx512": "avx512f" in FEATURES,  # with DQ, BW, VL (every AVX-512 CPU with F since Skylake-SP)
    "avx2": {"avx2", "fma"} <= FEATURES,
    "portable": True,
}

# B, T, S, N, Nkv, H, Hv, causal, dropout rate, mask, decoder-LLM options:
# lengths past multiples of 16 and 64, GQA, head dims in several buckets,
# dropout with masks, sliding windows, query offsets, soft-caps (the tanh of
# each tier) with logits large enough for the cap to matter (q_mult).
CASES = [
    (2, 7, 97, 4, 2, 40, 40, False, 0.0, False, {}),
    (1, 97, 130, 2, 1, 128, 96, True, 0.0, True, {}),
    (1, 70, 77, 2, 2, 64, 64, False, 0.2, True, {}),
    (1, 65, 64, 4, 2, 256, 256, True, 0.1, False, {}),
    (2, 33, 45, 2, 1, 16, 8, False, 0.0, True, {}),
    (1, 70, 200, 2, 1, 64, 64, True, 0.1, False, dict(window=(40, 0), query_offset=130, logits_soft_cap=30.0,
                                                      q_mult=6)),
    (1, 97, 97, 4, 2, 40, 40, False, 0.0, True, dict(window=(7, 3), logits_soft_cap=1.0, q_mult=3)),
]
LLM_OPTIONS = ("window", "query_offset", "logits_soft_cap")
SEED = 0x0123_4567_89AB_CDEF

CHILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import ml_dtypes
import numpy as np
from tf_fastattn import _C
data = dict(np.load(sys.argv[1]))  # bfloat16 travels as float32 (exactly)
out = {"paths": np.array(json.dumps(_C.cpu_attention_paths()))}
for key in sorted({k.split(":")[0] for k in data}):
    dtype = ml_dtypes.bfloat16 if key.startswith("bfloat16") else np.float32
    q, k, v, d_out = (data[f"{key}:{n}"].astype(dtype) for n in ("q", "k", "v", "d_out"))
    mask = data[f"{key}:mask"]
    causal, rate, has_mask = (bool(data[f"{key}:causal"]), float(data[f"{key}:rate"]), bool(data[f"{key}:has_mask"]))
    kw = dict(is_causal=causal, dropout_rate=rate, seed=int(data[f"{key}:seed"]), mask=mask if has_mask else None)
    kw.update(json.loads(str(data[f"{key}:options"])))
    o, lse = _C.attention_fwd(q, k, v, **kw)
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, *_C.attention_bwd(q, k, v, o, lse, d_out, **kw))):
        out[f"{key}:{name}"] = t.astype(np.float32)
np.savez(sys.argv[2], **out)
"""


def _inputs(dtype_name):
    rng = np.random.default_rng(21)
    data = {}
    for i, (B, T, S, N, Nkv, H, Hv, causal, rate, has_mask, opts) in enumerate(CASES):
        key = f"{dtype_name}{i}"
        q, k, v, d_out = make_inputs(rng, B, T, S, N, Nkv, H, Hv, NP_DTYPES[dtype_name])
        q = (q * opts.get("q_mult", 1)).astype(q.dtype)
        mask = rng.random((B, 1, T, S)) < 0.8
        mask[:, :, ::5] = False  # rows with no allowed key
        options = json.dumps({k: v for k, v in opts.items() if k in LLM_OPTIONS})
        data.update({f"{key}:q": q, f"{key}:k": k, f"{key}:v": v, f"{key}:d_out": d_out, f"{key}:mask": mask,
                     f"{key}:causal": np.array(causal), f"{key}:rate": np.array(rate),
                     f"{key}:has_mask": np.array(has_mask), f"{key}:seed": np.array(SEED, np.uint64),
                     f"{key}:options": np.array(options)})
    return data


def _run_tier(tier, data, tmp_path):
    np.savez(tmp_path / "in.npz", **{k: v.astype(np.float32) if v.dtype == NP_DTYPES["bfloat16"] else v
                                     for k, v in data.items()})
    env = dict(os.environ, TF_FASTATTN_CPU_ISA=tier)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "in.npz"), str(tmp_path / f"{tier}.npz")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return dict(np.load(tmp_path / f"{tier}.npz"))


@pytest.fixture(scope="module")
def tier_results(tmp_path_factory):
    data = {**_inputs("float32"), **_inputs("bfloat16")}
    tmp = tmp_path_factory.mktemp("tiers")
    return data, {tier: _run_tier(tier, data, tmp) for tier, ok in TIERS.items() if ok}


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_tier_meets_the_criterion(tier_results, tier, dtype_name):
    if not TIERS[tier]:
        pytest.skip(f"this CPU cannot run the {tier} tier (cpu_features: {sorted(FEATURES)})")
    data, results = tier_results
    got = results[tier]
    paths = json.loads(str(got["paths"]))  # the child's cpu_attention_paths(): the cap took effect
    assert paths["float32"] == tier and paths["dropout"] == tier, paths
    if tier != "avx512":
        assert paths["bfloat16"] == f"float32 products ({tier})", paths
    dtype = NP_DTYPES[dtype_name]
    for i, (B, T, S, N, Nkv, H, Hv, causal, rate, has_mask, opts) in enumerate(CASES):
        key = f"{dtype_name}{i}"
        q, k, v, d_out, mask = (data[f"{key}:{n}"] for n in ("q", "k", "v", "d_out", "mask"))
        kw = dict(is_causal=causal, mask=mask if has_mask else None, **{k: v for k, v in opts.items()
                                                                        if k in LLM_OPTIONS})
        if rate:
            kw.update(keep=philox_keep_mask(SEED, rate, B, N, T, S), rate=rate)
        ref_out, ref_lse, *_ = np_attention_fwd(q, k, v, **kw)
        ref_grads = np_attention_bwd(q, k, v, d_out, **kw)
        naive_out, naive_grads = naive_same_dtype(q, k, v, d_out, dtype, **kw)
        label = (f"{tier} {key} (B{B} T{T} S{S} N{N}/{Nkv} H{H}/{Hv} causal={causal} rate={rate} mask={has_mask} "
                 f"{opts})")
        check_close(got[f"{key}:out"], naive_out, ref_out, dtype_name, f"{label} out")
        np.testing.assert_array_equal(np.isinf(got[f"{key}:lse"]), np.isinf(ref_lse), err_msg=label)
        for name, n, r in zip(("dq", "dk", "dv"), naive_grads, ref_grads):
            check_close(got[f"{key}:{name}"], n, r, dtype_name, f"{label} {name}")


def test_float32_is_bitwise_identical_on_avx512_and_avx2(tier_results):
    if not (TIERS["avx512"] and TIERS["avx2"]):
        pytest.skip(f"needs a CPU with both tiers (cpu_features: {sorted(FEATURES)})")
    _, results = tier_results
    a, b = results["avx512"], results["avx2"]
    keys = [k for k in a if k.startswith("float32")]
    assert len(keys) == 5 * len(CASES)
    differing = [k for k in keys if a[k].tobytes() != b[k].tobytes()]
    assert not differing, f"float32 results differ between the AVX-512 and AVX2 tiers: {differing}"


def test_unknown_cpu_isa_value_warns_and_is_ignored():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import tf_fastattn\n"
            "from tf_fastattn import _C\n"
            "print('FLOAT32', _C.cpu_attention_paths()['float32'])\n")
    env = dict(os.environ, TF_FASTATTN_CPU_ISA="sse9", TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "TF_FASTATTN_CPU_ISA='sse9' is ignored: expected one of avx512, avx2, portable" in res.stderr
    best = next(t for t, ok in TIERS.items() if ok)
    assert f"FLOAT32 {best}" in res.stdout
