"""tf_fastattn.layers.LayerNormalization as a drop-in for Keras' layer."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfa_helpers import assert_close_to_reference, random_tensor, requires_ops
from tf_fastattn import _loader, layers, reference

pytestmark = requires_ops


def copy_weights(src, dst):
    for a, b in zip(src.weights, dst.weights):
        b.assign(a)


def test_same_class_name_config_and_weights():
    stock = keras.layers.LayerNormalization(epsilon=1e-5, center=False)
    fused = layers.LayerNormalization(epsilon=1e-5, center=False)
    assert type(fused).__name__ == "LayerNormalization"
    assert isinstance(fused, keras.layers.LayerNormalization)
    stock.build((None, 16))
    fused.build((None, 16))
    assert [w.name for w in stock.weights] == [w.name for w in fused.weights]
    # Keras names (and keys saved weights by) the snake-cased class name.
    assert fused.name.startswith("layer_normalization")
    cfg = fused.get_config()
    stock_cfg = stock.get_config()
    for key in stock_cfg:
        if key != "name":
            assert cfg[key] == stock_cfg[key], key
    assert cfg["return_residual"] is False and cfg["implementation"] == "auto"
    clone = layers.LayerNormalization.from_config(cfg)
    assert clone.epsilon == 1e-5 and clone.center is False


@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+residual"])
def test_matches_stock_layer(rng, with_residual):
    x = random_tensor(rng, (3, 5, 71), tf.float32)
    r = random_tensor(rng, (3, 5, 71), tf.float32)
    stock = keras.layers.LayerNormalization(gamma_initializer="random_normal", beta_initializer="random_normal")
    fused = layers.LayerNormalization()
    stock.build((None, 5, 71))
    fused.build((None, 5, 71))
    copy_weights(stock, fused)
    want = stock(x + r) if with_residual else stock(x)
    got = fused([x, r]) if with_residual else fused(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=3e-6)
    if with_residual:
        fused_rr = layers.LayerNormalization(return_residual=True)
        fused_rr.build((None, 5, 71))
        copy_weights(stock, fused_rr)
        y, s = fused_rr([x, r])
        np.testing.assert_allclose(y.numpy(), want.numpy(), atol=3e-6)
        np.testing.assert_array_equal(s.numpy(), (x + r).numpy())


def test_non_last_axis_uses_reference(rng):
    x = random_tensor(rng, (4, 6, 8), tf.float32)
    stock = keras.layers.LayerNormalization(axis=1)
    fused = layers.LayerNormalization(axis=1)
    np.testing.assert_allclose(fused(x).numpy(), stock(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="axis=\\[1\\] is not the last axis"):
        layers.LayerNormalization(axis=1, implementation="fused")(x)


def build_model(ln_cls, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((10, 32))
    h = keras.layers.Dense(32)(inp)
    h = ln_cls()([h, inp]) if ln_cls is layers.LayerNormalization else ln_cls()(keras.layers.Add()([h, inp]))
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


def toy_data(n=256):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 10, 32)).astype(np.float32)
    y = (x[:, :, 0].sum(1) > 0).astype(np.int32) + (x[:, :, 1].sum(1) > 2).astype(np.int32)
    return x, y


@pytest.mark.parametrize("jit_compile", [False, True, "auto"])
def test_fit_trains_like_stock(jit_compile):
    x, y = toy_data()
    histories = {}
    for cls in (keras.layers.LayerNormalization, layers.LayerNormalization):
        model = build_model(cls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns when it turns jit off for us
            model.compile(
                optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
        histories[cls] = model.fit(x, y, epochs=4, batch_size=32, verbose=0, shuffle=False).history["loss"]
    stock, fused = histories[keras.layers.LayerNormalization], histories[layers.LayerNormalization]
    assert fused[-1] < 0.8 * fused[0], fused
    np.testing.assert_allclose(fused, stock, rtol=2e-3)


def test_supports_jit_while_fused():
    # Keras keeps XLA on when the op's XLA kernels loaded (they run it as a
    # custom call); otherwise the layer opts out while the op can run.
    assert layers.LayerNormalization().supports_jit is (_loader.xla_reason() is None)
    assert layers.LayerNormalization(implementation="reference").supports_jit is True


def test_forced_xla_matches_eager(rng):
    x = random_tensor(rng, (4, 10, 32), tf.float32)
    model = build_model(layers.LayerNormalization)
    eager = model(x)
    xla = tf.function(model, jit_compile=True)(x)
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), atol=1e-5)


def test_loads_weights_saved_from_stock_layer(tmp_path, rng):
    stock = build_model(keras.layers.LayerNormalization, seed=1)
    for w in stock.weights:
        w.assign(tf.random.normal(w.shape, seed=3))
    path = str(tmp_path / "stock.weights.h5")
    stock.save_weights(path)
    fused = build_model(layers.LayerNormalization, seed=2)
    fused.load_weights(path)
    x = random_tensor(rng, (4, 10, 32), tf.float32)
    np.testing.assert_allclose(fused(x).numpy(), stock(x).numpy(), atol=1e-5)


def test_keras_file_round_trip(tmp_path, rng):
    model = build_model(layers.LayerNormalization)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert any(type(l) is layers.LayerNormalization for l in loaded.layers)
    x = random_tensor(rng, (4, 10, 32), tf.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, rng):
    keras.mixed_precision.set_global_policy(policy)
    try:
        stock = keras.layers.LayerNormalization(gamma_initializer="random_normal")
        fused = layers.LayerNormalization()
        cdt = tf.float16 if policy == "mixed_float16" else tf.bfloat16
        x = random_tensor(rng, (6, 71), cdt)
        r = random_tensor(rng, (6, 71), cdt)
        stock.build((None, 71))
        fused.build((None, 71))
        copy_weights(stock, fused)
        assert fused.gamma.dtype == "float32"
        got = fused([x, r])
        assert got.dtype == cdt
        want = stock(x + r)
        ref = reference.layer_norm(tf.cast(x + r, tf.float64), tf.cast(fused.gamma, tf.float64),
                                   tf.cast(fused.beta, tf.float64))[0]
        assert_close_to_reference(got, want, ref, cdt)
    finally:
        keras.mixed_precision.set_global_policy("float32")


SAVEDMODEL_CHECK = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
import tf_fastattn  # loads the op library, which the SavedModel needs
m = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
want = np.load(sys.argv[3])
got = m.serve(tf.constant(x)).numpy()
np.testing.assert_allclose(got, want, atol=1e-5)
ops = set()
for f in m.serve.concrete_functions:
    gd = f.graph.as_graph_def()
    ops.update(n.op for n in gd.node)
    ops.update(n.op for fn in gd.library.function for n in fn.node_def)
print("FUSED_OP_IN_GRAPH", any(o.startswith("TfFastattn") for o in ops))
"""


def test_savedmodel_reloads_in_fresh_process(tmp_path, rng):
    model = build_model(layers.LayerNormalization)
    x = random_tensor(rng, (4, 10, 32), tf.float32).numpy()
    export = str(tmp_path / "export")
    model.export(export, verbose=False)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    env = dict(os.environ)
    res = subprocess.run(
        [sys.executable, "-c", SAVEDMODEL_CHECK, export, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FUSED_OP_IN_GRAPH True" in res.stdout
