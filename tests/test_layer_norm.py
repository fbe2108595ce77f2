"""tf_fastattn.layer_norm and the TfFastattn>LayerNorm op: parity, gradients,
graph modes, fallback, errors, determinism."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
from tfa_helpers import DTYPES, assert_close_to_reference, random_tensor, requires_ops
from tf_fastattn import _loader, reference

pytestmark = requires_ops

COLS = [1, 71, 229, 541, 4096]
LEADING = {"1row": (1,), "2d": (37,), "3d": (2, 5)}


def make_inputs(rng, lead, cols, dtype, residual=True, param_dtype=tf.float32):
    x = random_tensor(rng, lead + (cols,), dtype)
    r = random_tensor(rng, lead + (cols,), dtype) if residual else None
    g = random_tensor(rng, (cols,), param_dtype, scale=0.5) + 1.0
    b = random_tensor(rng, (cols,), param_dtype, scale=0.5)
    return x, r, g, b


def ln_with_grads(fn, x, r, g, b, dy, dsum, **kw):
    """Runs fn and returns (y, s, dx, dr, dg, db) for the loss <y, dy> + <s, dsum>."""
    watched = [t for t in (x, r, g, b) if t is not None]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y, s = fn(x, g, b, residual=r, **kw)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(dy, tf.float64))
        if dsum is not None:
            loss += tf.reduce_sum(tf.cast(s, tf.float64) * tf.cast(dsum, tf.float64))
    grads = tape.gradient(loss, watched)
    return [y, s] + grads


def fused(x, g, b, residual=None, **kw):
    return tf_fastattn.layer_norm(x, g, b, residual=residual, return_residual=True, implementation="fused", **kw)


def cast64(*ts):
    return [None if t is None else tf.cast(t, tf.float64) for t in ts]


@pytest.mark.parametrize("lead", LEADING.values(), ids=LEADING.keys())
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_gradients_match_reference(rng, dtype, cols, lead):
    x, r, g, b = make_inputs(rng, lead, cols, dtype)
    dy = random_tensor(rng, lead + (cols,), dtype)
    dsum = random_tensor(rng, lead + (cols,), dtype)
    got = ln_with_grads(fused, x, r, g, b, dy, dsum)
    naive = ln_with_grads(reference.layer_norm, x, r, g, b, dy, dsum)
    # float64 reference from the same (rounded) inputs; the sum is rounded to
    # the input dtype in every implementation, so the reference rounds it too.
    s_rounded = tf.cast(x + r, tf.float64)
    x64, g64, b64 = cast64(x, g, b)
    ref = ln_with_grads(reference.layer_norm, s_rounded, None, g64, b64, tf.cast(dy, tf.float64),
                        tf.cast(dsum, tf.float64))
    ref = ref[:2] + [ref[2], ref[2]] + ref[3:]  # d/dx = d/dresidual = d/ds
    names = ["y", "sum", "dx", "dresidual", "dgamma", "dbeta"]
    for name, a, n, rf in zip(names, got, naive, ref):
        assert_close_to_reference(a, n, rf, dtype, name=name)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[4].dtype == tf.float32


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
def test_center_scale_off(rng, dtype, center, scale):
    x, r, g, b = make_inputs(rng, (9,), 229, dtype)
    kw = dict(center=center, scale=scale)
    y = tf_fastattn.layer_norm(x, g, b, residual=r, implementation="fused", **kw)
    ref_layer = keras.layers.LayerNormalization(center=center, scale=scale)
    ref_layer.build((None, 229))
    if scale:
        ref_layer.gamma.assign(g)
    if center:
        ref_layer.beta.assign(b)
    want = ref_layer(tf.cast(x + r, tf.float32))
    naive = tf_fastattn.layer_norm(x, g, b, residual=r, implementation="reference", **kw)
    assert_close_to_reference(y, naive, want, dtype)
    # gradients exist exactly for the parameters in use
    with tf.GradientTape() as tape:
        tape.watch([g, b])
        out = tf_fastattn.layer_norm(x, g, b, residual=r, implementation="fused", **kw)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
    dg, db = tape.gradient(loss, [g, b])
    assert (dg is not None) == scale and (db is not None) == center


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_keras_layer_on_sum(rng, dtype):
    x, r, g, b = make_inputs(rng, (4, 6), 71, dtype)
    layer = keras.layers.LayerNormalization(dtype="float64" if dtype == tf.float64 else "float32")
    layer.build((None, None, 71))
    layer.gamma.assign(tf.cast(g, layer.gamma.dtype))
    layer.beta.assign(tf.cast(b, layer.beta.dtype))
    keras_out = layer(x + r)
    y = tf_fastattn.layer_norm(x, g, b, residual=r, implementation="fused")
    x64 = tf.cast(x + r, tf.float64)
    ref = reference.layer_norm(x64, tf.cast(g, tf.float64), tf.cast(b, tf.float64))[0]
    assert_close_to_reference(y, tf.cast(keras_out, dtype), ref, dtype)


@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 1e-12, 0.1])
def test_float64_matches_keras_layer_with_exact_epsilon(rng, epsilon):
    # Epsilon reaches the kernel as a float64 (epsilon_bits), not rounded to
    # float32: with a float32 epsilon the two differed by about 2e-8 at 1e-5.
    x = tf.constant(rng.standard_normal((8, 64)) * 1e-2, tf.float64)  # small variance: epsilon matters
    layer = keras.layers.LayerNormalization(epsilon=epsilon, dtype="float64")
    keras_out = layer(x)
    y = tf_fastattn.layer_norm(x, layer.gamma, layer.beta, epsilon=epsilon, implementation="fused")
    np.testing.assert_allclose(y.numpy(), keras_out.numpy(), rtol=1e-13, atol=1e-13)


def test_epsilon_bits_must_describe_the_epsilon_attribute():
    x = tf.ones([2, 4], tf.float64)
    ops = _loader.ops()
    with pytest.raises(tf.errors.InvalidArgumentError, match="epsilon_bits holds 0.5, which does not round to epsilon"):
        ops.tf_fastattn_layer_norm(x=x, residual=[], gamma=tf.ones([4], tf.float64), beta=tf.zeros([4], tf.float64),
                                   S=tf.float64, epsilon=1e-3, epsilon_bits=_loader.float64_bits(0.5))


def test_no_residual_forwards_x_as_sum(rng):
    x, _, g, b = make_inputs(rng, (5,), 71, tf.float32, residual=False)
    y, s = tf_fastattn.layer_norm(x, g, b, return_residual=True, implementation="fused")
    np.testing.assert_array_equal(s.numpy(), x.numpy())
    want = reference.layer_norm(x, g, b)[0]
    np.testing.assert_allclose(y.numpy(), want.numpy(), atol=2e-6)


def test_float16_params_with_float16_input(rng):
    x, r, g, b = make_inputs(rng, (5,), 71, tf.float16, param_dtype=tf.float16)
    y = tf_fastattn.layer_norm(x, g, b, residual=r, implementation="fused")
    ref = reference.layer_norm(*cast64(x + r, g, b))[0]
    naive = reference.layer_norm(x + r, g, b)[0]
    assert_close_to_reference(y, naive, ref, tf.float16)


def test_compute_gradient_float64(rng):
    x, r, g, b = make_inputs(rng, (3,), 7, tf.float64, param_dtype=tf.float64)

    def f(x, r, g, b):
        y, s = tf_fastattn.layer_norm(x, g, b, residual=r, return_residual=True, implementation="fused")
        return y + 0.5 * s * s

    theoretical, numerical = tf.test.compute_gradient(f, [x, r, g, b])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7)


def test_tf_function_and_shape_inference(rng):
    x, r, g, b = make_inputs(rng, (4, 3), 71, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 71], tf.float32)] * 2)
    def f(x, r):
        y, s = tf_fastattn.layer_norm(x, g, b, residual=r, return_residual=True, implementation="fused")
        assert y.shape.as_list() == [None, None, 71] and s.shape.as_list() == [None, None, 71]
        return y

    graph = f.get_concrete_function().graph
    assert any(op.type == "TfFastattn>LayerNorm" for op in graph.get_operations())
    np.testing.assert_allclose(f(x, r).numpy(), reference.layer_norm(x, g, b, residual=r)[0].numpy(), atol=3e-6)


def test_zero_rows_returns_empty(rng):
    g = tf.ones([71])
    b = tf.zeros([71])
    x = tf.zeros([0, 71])
    with tf.GradientTape() as tape:
        tape.watch([x, g, b])
        y = tf_fastattn.layer_norm(x, g, b, residual=x, implementation="fused")
        loss = tf.reduce_sum(y)
    assert y.shape == (0, 71)
    dx, dg, db = tape.gradient(loss, [x, g, b])
    assert dx.shape == (0, 71)
    np.testing.assert_array_equal(dg.numpy(), np.zeros(71))
    np.testing.assert_array_equal(db.numpy(), np.zeros(71))


def test_nan_and_inf_propagate_as_reference():
    x = tf.constant([[1.0, np.nan, 2.0, 3.0], [1.0, np.inf, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    g, b = tf.ones([4]), tf.zeros([4])
    got = tf_fastattn.layer_norm(x, g, b, implementation="fused").numpy()
    want = reference.layer_norm(x, g, b)[0].numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[2], want[2], atol=1e-6)


def test_gradients_are_bitwise_deterministic(rng):
    x, r, g, b = make_inputs(rng, (301,), 541, tf.float32)
    dy = random_tensor(rng, (301, 541), tf.float32)
    runs = [ln_with_grads(fused, x, r, g, b, dy, None)[2:] for _ in range(3)]
    for later in runs[1:]:
        for a, c in zip(runs[0], later):
            np.testing.assert_array_equal(a.numpy(), c.numpy())


# ---- errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=tf.zeros([4, 8]), gamma=tf.ones([7]), beta=tf.zeros([8])), r"gamma must have shape \[8\].*got \[7\]"),
        (dict(x=tf.zeros([4, 8]), gamma=tf.ones([8]), beta=tf.zeros([9])), r"beta must have shape \[8\].*got \[9\]"),
        (dict(x=tf.zeros([4, 8]), residual=tf.zeros([4, 9])), r"residual must have the shape of x \[4, 8\], got \[4, 9\]"),
        (dict(x=tf.zeros([4, 8]), residual=tf.zeros([4, 8], tf.float16)), r"residual must have the dtype of x \(float32\), got float16"),
        (dict(x=tf.constant(1.0)), r"x must have rank >= 1, got a scalar"),
        (dict(x=tf.zeros([4, 8], tf.int32)), r"x must be float16, bfloat16, float32 or float64, got int32"),
        (dict(x=tf.constant([["a"]])), r"x must be float16, bfloat16, float32 or float64, got string"),
        (dict(x=tf.zeros([4, 8]), epsilon=0.0), r"epsilon must be a finite number > 0, got 0.0"),
        (dict(x=tf.zeros([4, 8]), epsilon=-1e-5), r"epsilon must be a finite number > 0"),
    ],
    ids=["gamma-cols", "beta-cols", "residual-shape", "residual-dtype", "rank0", "int", "string", "eps0", "eps-neg"],
)
def test_bad_input_raises_value_error(kwargs, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    cols = x.shape[-1] if x.shape.rank else 1
    gamma = kwargs.pop("gamma", tf.ones([cols]))
    beta = kwargs.pop("beta", tf.zeros([cols]))
    with pytest.raises(ValueError, match=match):
        tf_fastattn.layer_norm(x, gamma, beta, implementation="fused", **kwargs)


def test_op_errors_with_dynamic_shapes():
    # Shapes unknown at trace time reach the kernel, which raises InvalidArgumentError.
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.float32)])
    def f(x, gamma):
        return tf_fastattn.layer_norm(x, gamma, tf.zeros([8]), implementation="fused")

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"gamma must have shape \[8\].*got \[7\]"):
        f(tf.zeros([4, 8]), tf.ones([7]))


def test_implementation_must_be_known():
    with pytest.raises(ValueError, match="implementation must be one of"):
        tf_fastattn.layer_norm(tf.zeros([2, 3]), tf.ones([3]), tf.zeros([3]), implementation="fast")


# ---- fallback and XLA ------------------------------------------------------


def test_reference_implementation_never_uses_the_op():
    @tf.function
    def f(x):
        return tf_fastattn.layer_norm(x, tf.ones([8]), tf.zeros([8]), implementation="reference")

    graph = f.get_concrete_function(tf.TensorSpec([4, 8])).graph
    assert not any(op.type.startswith("TfFastattn") for op in graph.get_operations())


def test_xla_context_runs_the_fused_op(rng):
    # With the XLA kernels loaded the op runs as a custom call (bitwise cases
    # in tests/test_xla.py); without them XLA gets the reference math.
    x, r, g, b = make_inputs(rng, (6,), 71, tf.float32)

    @tf.function(jit_compile=True)
    def f(x, r):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf_fastattn.layer_norm(x, g, b, residual=r)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, x)

    y, dx = f(x, r)
    y_ref = reference.layer_norm(x, g, b, residual=r)[0]
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=3e-6)
    ops = {op.type for op in f.get_concrete_function(x, r).graph.get_operations()}
    assert ("TfFastattn>LayerNorm" in ops) == (_loader.xla_reason() is None)
    fused = tf.function(jit_compile=True)(lambda x: tf_fastattn.layer_norm(x, g, b, implementation="fused"))
    if _loader.xla_reason() is None:
        np.testing.assert_array_equal(fused(x).numpy(), tf_fastattn.layer_norm(x, g, b).numpy())
    else:
        with pytest.raises(ValueError, match="cannot run inside XLA"):
            fused(x)


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import os, warnings
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    {setup}
    import numpy as np, tensorflow as tf, tf_fastattn
    info = tf_fastattn.build_info()
    assert not info["ops_loaded"], info
    print("REASON:", info["reason"])
    x = tf.random.normal([4, 8]); g = tf.ones([8]); b = tf.zeros([8])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = tf_fastattn.layer_norm(x, g, b)
        y2 = tf_fastattn.layer_norm(x, g, b)
    msgs = [str(m.message) for m in w if "reference implementation" in str(m.message)]
    assert len(msgs) == 1, msgs
    want = tf_fastattn.reference.layer_norm(x, g, b)[0]
    np.testing.assert_allclose(y1.numpy(), want.numpy())
    try:
        tf_fastattn.layer_norm(x, g, b, implementation="fused")
    except ValueError as e:
        print("FUSED:", e)
    else:
        raise AssertionError("fused did not raise")
    """
)


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_fallback_when_library_disabled():
    code = FALLBACK_SCRIPT.format(setup='os.environ["TF_FASTATTN_DISABLE_OPS"] = "1"')
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REASON: disabled by TF_FASTATTN_DISABLE_OPS" in res.stdout
    assert "FUSED: layer_norm: implementation='fused' is not possible: disabled" in res.stdout


def test_library_for_another_tf_version_is_refused():
    # Pretend the library was built for another TF minor version.
    setup = (
        "import sys, types; c = types.ModuleType('tf_fastattn._build_config'); "
        "c.TF_VERSION = '2.3.0'; c.OPS_LIBRARY = '_tf_fastattn_ops.so'; sys.modules[c.__name__] = c"
    )
    res = run_python(FALLBACK_SCRIPT.format(setup=setup))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "built for TensorFlow 2.3.0 but TensorFlow" in res.stdout


def test_version_mismatch_rule():
    assert _loader.version_mismatch("2.21.0", "2.21.3") is None
    assert "2.20.0" in _loader.version_mismatch("2.20.0", "2.21.0")
    assert "without the TensorFlow op library" in _loader.version_mismatch(None, "2.21.0")


def test_build_info_reports_loaded_library():
    info = tf_fastattn.build_info()
    assert info["ops_loaded"] and info["reason"] is None
    assert info["tf_version_built"] == tf.__version__
    assert "TfFastattn>LayerNorm" in info["kernels"]["CPU"]
    # The GPU kernels are registered even where no GPU is present (they
    # compile with NVRTC on first use); float64 is CPU-only.
    assert set(info["kernels"]["GPU"]) == {
        "TfFastattn>LayerNorm", "TfFastattn>LayerNormGrad", "TfFastattn>Attention", "TfFastattn>AttentionGrad"
    }
    assert "gpu_runtime" in info and "gpus_visible" in info


def test_cli_info_is_quiet_and_lists_the_cpu_paths():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_FASTATTN_CPU_ISA")}
    res = subprocess.run([sys.executable, "-m", "tf_fastattn", "--info"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.startswith(f"tf_fastattn {tf_fastattn.__version__}\n"), res.stdout
    assert "CPU attention paths: " in res.stdout and "float32 " in res.stdout
    # TensorFlow's start-up lines ("I0000 ... oneDNN custom operations are on") are hidden.
    assert res.stderr == "", res.stderr[-4000:]


def test_gpu_kernels_registered_for_half_bfloat16_float_only():
    from tensorflow.python.framework import kernels

    for op in ("TfFastattn>LayerNorm", "TfFastattn>AttentionGrad"):
        gpu = [k for k in kernels.get_registered_kernels_for_op(op).kernel if k.device_type == "GPU"]
        types = {tf.dtypes.as_dtype(c.allowed_values.list.type[0]) for k in gpu for c in k.constraint}
        assert types == {tf.float16, tf.bfloat16, tf.float32}, (op, types)


@pytest.mark.parametrize("cols", [1024, 1040])
def test_large_float32_outputs(rng, cols):
    # >= 8 MiB of float32 output takes the streaming-store path when the
    # columns are a multiple of 16 (1024), the regular one otherwise (1040).
    x, r, g, b = make_inputs(rng, (2113,), cols, tf.float32)
    y, s = tf_fastattn.layer_norm(x, g, b, residual=r, return_residual=True, implementation="fused")
    naive = reference.layer_norm(x, g, b, residual=r)
    ref = reference.layer_norm(*cast64(x + r, g, b))[0]
    assert_close_to_reference(y, naive[0], ref, tf.float32)
    np.testing.assert_array_equal(s.numpy(), (x + r).numpy())
