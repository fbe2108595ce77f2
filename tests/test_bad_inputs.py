"""Table-driven bad inputs of the Python API: each gives its exception type
and a message naming the argument (and what to pass instead)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
import tf_fastattn.layers

Q = tf.random.stateless_normal([1, 4, 2, 8], seed=[1, 2])
RAGGED = tf.RaggedTensor.from_row_lengths(tf.zeros([3, 2, 8]), [1, 2])
ROWS = tf.zeros([2, 4])

CASES = {
    "mask of strings": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, mask=tf.constant([["a"]])), TypeError,
                        "mask must be boolean (True = attend) or numeric (nonzero = attend, as Keras casts it), "
                        "got dtype string"),
    "seed object": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, dropout_rate=0.1, seed=object()), TypeError,
                    "seed must be None, an int, an integer scalar tensor or a keras.random.SeedGenerator, got object"),
    "seed float": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, dropout_rate=0.1, seed=1.5), ValueError,
                   "seed must be an integer, got dtype float32"),
    "ragged query": (lambda: tf_fastattn.dot_product_attention(RAGGED, Q, Q), TypeError,
                     "query is a tf.RaggedTensor; pass a dense tensor: query.to_tensor(), with a mask"),
    "ragged value": (lambda: tf_fastattn.dot_product_attention(Q, Q, RAGGED), TypeError,
                     "value is a tf.RaggedTensor"),
    "sparse mask": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, mask=tf.sparse.from_dense(tf.ones([4, 4]))),
                    TypeError, "mask is a tf.SparseTensor; pass a dense tensor: tf.sparse.to_dense(mask)"),
    "dropout string": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, dropout_rate="0.1"), ValueError,
                       "dropout_rate must be in [0, 1), got '0.1'"),
    "dropout one": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, dropout_rate=1.0), ValueError,
                    "dropout_rate must be in [0, 1), got 1.0"),
    "scale string": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, scale="x"), ValueError,
                     "scale must be a number or a constant scalar, got 'x'"),
    "scale inf": (lambda: tf_fastattn.dot_product_attention(Q, Q, Q, scale=float("inf")), ValueError,
                  "scale must be a finite number or None, got inf"),
    "epsilon string": (lambda: tf_fastattn.layer_norm(ROWS, epsilon="x"), TypeError,
                       "layer_norm: epsilon must be a number > 0, got str 'x'"),
    "epsilon nan": (lambda: tf_fastattn.rms_norm(ROWS, epsilon=float("nan")), ValueError,
                    "rms_norm: epsilon must be a finite number > 0, got nan"),
    "epsilon zero": (lambda: tf_fastattn.layer_norm(ROWS, epsilon=0.0), ValueError,
                     "layer_norm: epsilon must be a finite number > 0, got 0.0"),
    "ragged x": (lambda: tf_fastattn.layer_norm(tf.RaggedTensor.from_row_lengths(tf.zeros([3, 4]), [1, 2])),
                 TypeError, "layer_norm: x is a tf.RaggedTensor; pass a dense tensor: x.to_tensor()"),
    "sparse residual": (lambda: tf_fastattn.rms_norm(ROWS, residual=tf.sparse.from_dense(ROWS)), TypeError,
                        "rms_norm: residual is a tf.SparseTensor"),
    # the layers' own arguments where Keras' error is an IndexError from inside build
    "attention_axes out of range": (
        lambda: tf_fastattn.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=5)(Q[0], Q[0]),
        ValueError, "MultiHeadAttention: attention_axes=(5,) is out of range for a query of rank 3"),
    "layer norm axis out of range": (
        lambda: tf_fastattn.layers.LayerNormalization(axis=5)(ROWS), ValueError,
        "LayerNormalization: axis=5 is out of range for an input of rank 2 (shape (2, 4)): expected axes in [-2, 1]"),
    "layer norm epsilon string": (lambda: tf_fastattn.layers.LayerNormalization(epsilon="x")(ROWS), TypeError,
                                  "epsilon must be a number > 0, got str 'x'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_by_name(name):
    call, error, fragment = CASES[name]
    with pytest.raises(error) as e:
        call()
    assert fragment in str(e.value), str(e.value)


def test_numeric_masks_are_cast_as_keras_casts_them():
    """Integer and float masks: nonzero = attend, as keras.ops.cast(mask, "bool")."""
    mask = np.array([[1, 0, 2, 1]] * 4)
    want = tf_fastattn.dot_product_attention(Q, Q, Q, mask=tf.constant(mask != 0))
    for dtype in (np.int32, np.int64, np.float32):
        got = tf_fastattn.dot_product_attention(Q, Q, Q, mask=tf.constant(mask.astype(dtype)))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("inf")])
def test_layer_norm_epsilon_keras_accepts_gives_keras_result(epsilon):
    """Epsilons the fused op refuses (not a finite number > 0) but Keras takes:
    the layer computes Keras' math, NaN where Keras' is NaN."""
    import keras

    x = tf.constant(np.arange(24, dtype=np.float32).reshape(2, 3, 4) % 5)
    want = keras.layers.LayerNormalization(epsilon=epsilon)(x)
    got = tf_fastattn.layers.LayerNormalization(epsilon=epsilon)(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-6, atol=1e-6)
