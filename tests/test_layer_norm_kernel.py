"""The layer-norm kernel through tf_fastattn._C on NumPy arrays (no TensorFlow)."""

import ml_dtypes
import numpy as np
import pytest

import numpy_reference as np_ln
from tf_fastattn import _C

NP_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
# Max error allowed against the float64 reference, relative to the output scale:
# a few roundings of the output dtype.
RTOL = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 2e-6, "float64": 1e-12}


def check(name, got, want, dtype):
    got = np.asarray(got, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= RTOL[dtype] * scale, f"{name}: max error {err:.3g} > {RTOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("shape", [(1, 1), (3, 71), (2, 4, 229), (17, 541), (5, 4096)], ids=str)
@pytest.mark.parametrize("dtype", NP_DTYPES.keys())
def test_forward_backward_against_numpy(dtype, shape):
    rng = np.random.default_rng(7)
    t = NP_DTYPES[dtype]
    cols = shape[-1]
    x, r, dy, dsum = (rng.standard_normal(shape).astype(t) for _ in range(4))
    g = (1 + 0.5 * rng.standard_normal(cols)).astype(np.float32)
    b = (0.5 * rng.standard_normal(cols)).astype(np.float32)
    y, s, mean, rstd = _C.layer_norm_fwd(x, g, b, residual=r, epsilon=1e-3)
    yr, sr, mr, rr = np_ln.layer_norm_fwd(x, r, g.astype(np.float64), b.astype(np.float64), 1e-3)
    assert y.dtype == x.dtype and s.dtype == x.dtype
    assert mean.dtype == (np.float64 if dtype == "float64" else np.float32) and mean.shape == shape[:-1]
    check("y", y, yr, dtype)
    np.testing.assert_array_equal(np.asarray(s, np.float64), sr)
    check("mean", mean, mr, "float32" if dtype != "float64" else dtype)
    check("rstd", rstd / rr, np.ones_like(rr), "float32" if dtype != "float64" else dtype)

    dx, dg, db = _C.layer_norm_bwd(dy, s, mean, rstd, gamma=g, dsum=dsum)
    dxr, dgr, dbr = np_ln.layer_norm_bwd(sr, dy.astype(np.float64), dsum.astype(np.float64), g.astype(np.float64), 1e-3)
    check("dx", dx, dxr, dtype)
    assert dg.dtype == np.float32  # parameter gradients take gamma's dtype
    check("dgamma", dg, dgr, "float32")
    check("dbeta", db, dbr, "float32")


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_bitwise_equal_across_thread_counts(threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 300)).astype(np.float32)
    dy = rng.standard_normal((1000, 300)).astype(np.float32)
    g = rng.standard_normal(300).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    base = _C.layer_norm_fwd(x, g, b, num_threads=1)
    out = _C.layer_norm_fwd(x, g, b, num_threads=threads)
    for a, c in zip(base, out):
        np.testing.assert_array_equal(a, c)
    gb = _C.layer_norm_bwd(dy, base[1], base[2], base[3], gamma=g, num_threads=1)
    go = _C.layer_norm_bwd(dy, base[1], base[2], base[3], gamma=g, num_threads=threads)
    for a, c in zip(gb, go):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", NP_DTYPES.keys())
@pytest.mark.parametrize("shape", [(1, 1), (33, 97), (2, 3, 1040)], ids=str)
def test_outputs_fully_written(dtype, shape):
    # Every element of every output is written: outputs poisoned with NaN
    # come back equal, bit for bit, to freshly allocated ones.
    rng = np.random.default_rng(5)
    dt = NP_DTYPES[dtype]
    x, r, dy, dsum = (rng.standard_normal(shape).astype(dt) for _ in range(4))
    g, b = (rng.standard_normal(shape[-1:]).astype(np.float32) for _ in range(2))
    fresh = _C.layer_norm_fwd(x, g, b, residual=r)
    poisoned = tuple(np.full_like(t, np.nan) for t in fresh)
    got = _C.layer_norm_fwd(x, g, b, residual=r, outputs=poisoned)
    assert all(a is p for a, p in zip(got, poisoned))
    for name, a, f in zip(("y", "sum", "mean", "rstd"), got, fresh):
        assert a.tobytes() == f.tobytes(), name
    _, s, mean, rstd = fresh
    fresh_b = _C.layer_norm_bwd(dy, s, mean, rstd, gamma=g, dsum=dsum)
    poisoned_b = tuple(np.full_like(t, np.nan) for t in fresh_b)
    got_b = _C.layer_norm_bwd(dy, s, mean, rstd, gamma=g, dsum=dsum, outputs=poisoned_b)
    for name, a, f in zip(("dx", "dgamma", "dbeta"), got_b, fresh_b):
        assert a.tobytes() == f.tobytes(), name


def test_outputs_argument_is_checked():
    x = np.ones((4, 8), np.float32)
    good = [np.empty((4, 8), np.float32), np.empty((4, 8), np.float32), np.empty(4, np.float32),
            np.empty(4, np.float32)]
    with pytest.raises(ValueError, match=r"layer_norm_fwd: outputs must hold 4 arrays \(y, sum, mean, rstd\), got 2"):
        _C.layer_norm_fwd(x, outputs=tuple(good[:2]))
    with pytest.raises(ValueError, match=r"outputs\[2\] \(mean\) must have shape \[4\], got \[8\]"):
        _C.layer_norm_fwd(x, outputs=(good[0], good[1], np.empty(8, np.float32), good[3]))
    with pytest.raises(ValueError, match=r"outputs\[0\] \(y\) must be float32, got float64"):
        _C.layer_norm_fwd(x, outputs=(np.empty((4, 8)), *good[1:]))
    read_only = np.empty((4, 8), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"outputs\[1\] \(sum\) must be writeable"):
        _C.layer_norm_fwd(x, outputs=(good[0], read_only, *good[2:]))


def test_large_row():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 65536)).astype(np.float32) + 3.0
    y, _, mean, _ = _C.layer_norm_fwd(x)
    check("y", y, np_ln.layer_norm_fwd(x, np.zeros_like(x), 1.0, 0.0, 1e-3)[0], "float32")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: _C.layer_norm_fwd(np.zeros((2, 3), np.int32)), "x must be float16, bfloat16, float32 or float64, got int32"),
        (lambda: _C.layer_norm_fwd(np.zeros((2, 3), np.float32), np.ones(4, np.float32)), r"gamma must have shape \[3\] \(the last axis of x\), got \[4\]"),
        (lambda: _C.layer_norm_fwd(np.zeros((2, 3), np.float32), residual=np.zeros((2, 4), np.float32)), r"residual must have the shape of x \[2, 3\], got \[2, 4\]"),
        (lambda: _C.layer_norm_fwd(np.zeros((2, 3), np.float32), epsilon=0.0), "epsilon must be a finite number > 0"),
        (lambda: _C.layer_norm_fwd(np.zeros((2, 0), np.float32)), r"the last axis of x must be non-empty, got shape \[2, 0\]"),
        (lambda: _C.layer_norm_fwd(np.zeros((4, 6), np.float32)[:, ::2]), "x must have a contiguous last axis"),
        (lambda: _C.layer_norm_fwd(np.zeros((), np.float32)), r"x must have rank >= 1"),
    ],
    ids=["int", "gamma", "residual", "eps", "empty-axis", "strided", "scalar"],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_error_kinds_map_to_python_exceptions():
    # Bad input is a ValueError; a missing CUDA driver is not the caller's
    # input: RuntimeError (the core's Unavailable code), naming what is missing.
    with pytest.raises(ValueError, match="epsilon"):
        _C.layer_norm_fwd(np.ones((2, 4), np.float32), epsilon=-1.0)
    info = _C.gpu_runtime_info()
    if info["driver_error"] is None:
        pytest.skip("a CUDA driver is present: the unavailable-driver error cannot occur here")
    with pytest.raises(RuntimeError, match=r"libcuda\.so\.1"):
        p = _C.LayerNormFwdParams()
        p.rows, p.cols, p.x, p.y, p.mean, p.rstd = 1, 8, 1, 2, 3, 4
        _C.layer_norm_fwd_gpu(p)


def test_gamma_and_beta_of_different_dtypes_are_refused():
    # The kernels read gamma and beta as one dtype: a bfloat16 gamma with a
    # float32 beta was read as float32 (garbage) before this was checked.
    x = np.ones((2, 4), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match=r"beta must have the dtype of gamma \(bfloat16\), got float32"):
        _C.layer_norm_fwd(x, np.ones(4, ml_dtypes.bfloat16), np.zeros(4, np.float32))
    stats = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"gamma must have the dtype of param_like \(float32\), got bfloat16"):
        _C.layer_norm_bwd(x, x, *stats, gamma=np.ones(4, ml_dtypes.bfloat16), param_like=np.ones(4, np.float32))
    dx, dgamma, dbeta = _C.layer_norm_bwd(x, x, *stats, gamma=np.ones(4, ml_dtypes.bfloat16))
    assert dgamma.dtype == dbeta.dtype == ml_dtypes.bfloat16


def test_output_row_strides_that_overlap_are_refused():
    # The core's validation (every backend): rows of an output must not
    # overlap; the GPU entry point checks before touching a device.
    p = _C.LayerNormFwdParams()
    p.rows, p.cols, p.x, p.y, p.mean, p.rstd = 4, 8, 1, 2, 3, 4
    p.y_row_stride = 4
    with pytest.raises(ValueError, match=r"output y_row_stride must be at least the row length 8 in magnitude "
                                         r"\(rows must not overlap\), got 4"):
        _C.layer_norm_fwd_gpu(p)
    b = _C.LayerNormBwdParams()
    b.rows, b.cols, b.dy, b.sum, b.mean, b.rstd, b.dx, b.workspace = 4, 8, 1, 2, 3, 4, 5, 6
    b.dx_row_stride = 7
    with pytest.raises(ValueError, match="output dx_row_stride must be at least the row length 8"):
        _C.layer_norm_bwd_gpu(b)


@pytest.mark.parametrize("case", ["rank0", "empty_axis", "gamma", "beta", "residual"])
def test_op_and_C_give_the_same_message(case):
    # One set of checks (csrc/core/layer_norm_checks.cc) behind both front ends.
    import tensorflow as tf

    from tf_fastattn import _loader

    x = np.zeros({"rank0": (), "empty_axis": (2, 0)}.get(case, (2, 3)), np.float32)
    cols = x.shape[-1] if x.ndim else 1
    gamma = np.ones(4 if case == "gamma" else cols, np.float32)
    beta = np.zeros(5 if case == "beta" else cols, np.float32)
    residual = np.zeros((3, 3), np.float32) if case == "residual" else None
    with pytest.raises(ValueError) as c_err:
        _C.layer_norm_fwd(x, gamma, beta, residual=residual)
    with pytest.raises(tf.errors.InvalidArgumentError) as tf_err:
        _loader.ops().tf_fastattn_layer_norm(x=x, residual=[] if residual is None else [residual], gamma=gamma,
                                             beta=beta)
    assert str(c_err.value) in str(tf_err.value), (str(c_err.value), str(tf_err.value))



@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_strided_views_are_read_in_place(dtype):
    """x, residual, dy and sum may be row slices of wider arrays (rows a
    constant stride apart, the params' *_row_stride): bitwise the results of
    contiguous copies."""
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((4, 3, 100)).astype(dtype)
    x, r = wide[..., :71], wide[..., 10:81]
    g, b = rng.random(71).astype(np.float32), rng.standard_normal(71).astype(np.float32)
    fwd = _C.layer_norm_fwd(x, g, b, residual=r)
    fwd_c = _C.layer_norm_fwd(np.ascontiguousarray(x), g, b, residual=np.ascontiguousarray(r))
    for a, c in zip(fwd, fwd_c):
        np.testing.assert_array_equal(a, c)
    dy = rng.standard_normal((12, 200)).astype(dtype)[:, ::1][:, 50:121].reshape(4, 3, 71)
    s_wide = np.zeros((4, 3, 80), dtype)
    s_wide[..., :71] = fwd[1]
    bwd = _C.layer_norm_bwd(dy, s_wide[..., :71], fwd[2], fwd[3], gamma=g, dsum=dy)
    bwd_c = _C.layer_norm_bwd(np.ascontiguousarray(dy), fwd[1], fwd[2], fwd[3], gamma=g, dsum=np.ascontiguousarray(dy))
    for a, c in zip(bwd, bwd_c):
        np.testing.assert_array_equal(a, c)
