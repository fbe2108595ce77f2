"""`python -m tf_fastattn`: build info and a fused-vs-Keras table on this machine.

Subcommands:
  python -m tf_fastattn              build info, then timings of the fused ops
                                     against Keras (time, speed-up, max error)
  python -m tf_fastattn --quick      the same on smaller shapes
  python -m tf_fastattn precompile   warm the GPU kernel cache (see --help)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _print_build_info(info: dict) -> None:
    print("tf_fastattn", info["version"])
    print(f"  TensorFlow: running {info['tf_version_running']}, op library built for {info['tf_version_built']}")
    if info["ops_loaded"]:
        print(f"  op library: loaded from {info['ops_library']}")
    else:
        print(f"  op library: NOT loaded ({info['reason']}); the reference implementation is used")
    for device, names in info["kernels"].items():
        print(f"  {device} ops: {', '.join(names)}")
    xla = info.get("xla", {})
    if xla.get("available"):
        gpu = f"; on the GPU: {xla['gpu_reason']}" if xla.get("gpu_reason") else ""
        print(f"  under XLA: fused ops as custom calls ({xla['library']}){gpu}")
    elif info["ops_loaded"]:
        print(f"  under XLA: reference math ({xla.get('reason')})")
    features = info.get("cpu_features")
    print(f"  CPU features: {', '.join(features) if isinstance(features, list) else features}")
    paths = info.get("cpu_attention_paths")
    if paths:
        print("  CPU attention paths: " + ", ".join(f"{case} {path}" for case, path in paths.items()))
    for key in ("gpus_visible", "gpu_runtime", "gpu_nvrtc", "gpu_kernel_cache"):
        if key in info:
            print(f"  {key}: {info[key]}")


def _grad_fn(fwd, params):
    """tf.function giving d(sum(fwd(*args)^2))/d(args[0]), also differentiating params."""
    import tensorflow as tf

    @tf.function
    def f(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(tf.cast(fwd(*args), tf.float32) ** 2)
        return tape.gradient(loss, list(args) + list(params))[0]

    return f


def _layer_norm_rows(rows, cols, dtype):
    import keras
    import tensorflow as tf

    import tf_fastattn
    from tf_fastattn._timing import layer_norm_bytes

    x = tf.cast(tf.random.normal([rows, cols]), dtype)
    r = tf.cast(tf.random.normal([rows, cols]), dtype)
    gamma = tf.Variable(tf.random.normal([cols]) + 1.0)
    beta = tf.Variable(tf.random.normal([cols]))
    policy = None if dtype == tf.float32 else keras.DTypePolicy(f"mixed_{dtype.name}")
    layer = keras.layers.LayerNormalization(dtype=policy)
    layer.build((None, cols))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    fused = tf.function(lambda x, r: tf_fastattn.layer_norm(x, gamma, beta, residual=r))
    stock = tf.function(lambda x, r: layer(x + r))
    fg, kg = _grad_fn(fused, [gamma, beta]), _grad_fn(stock, layer.trainable_variables)
    name = f"layer_norm {rows}x{cols} {dtype.name}"
    return [
        (f"{name} fwd", lambda: fused(x, r), lambda: stock(x, r),
         layer_norm_bytes(rows, cols, dtype.size, False), "GB/s"),
        (f"{name} fwd+bwd", lambda: fg(x, r), lambda: kg(x, r),
         layer_norm_bytes(rows, cols, dtype.size, True), "GB/s"),
    ]


def _attention_rows(b, n, t, h, dtype, causal):
    import keras
    import tensorflow as tf

    import tf_fastattn
    from tf_fastattn._timing import attention_flops

    q, k, v = (tf.cast(tf.random.normal([b, t, n, h]), dtype) for _ in range(3))
    fused = tf.function(lambda q, k, v: tf_fastattn.dot_product_attention(q, k, v, is_causal=causal))
    stock = tf.function(lambda q, k, v: keras.ops.dot_product_attention(q, k, v, is_causal=causal))
    fg, kg = _grad_fn(fused, []), _grad_fn(stock, [])
    name = f"attention T=S={t} H={h} N={n} {dtype.name}{' causal' if causal else ''}"
    return [
        (f"{name} fwd", lambda: fused(q, k, v), lambda: stock(q, k, v),
         attention_flops(b, n, t, t, h, causal, False), "GFLOP/s"),
        (f"{name} fwd+bwd", lambda: fg(q, k, v), lambda: kg(q, k, v),
         attention_flops(b, n, t, t, h, causal, True), "GFLOP/s"),
    ]


def _rows(quick: bool):
    """(name, fused_fn, keras_fn, work, unit) for each table row; each fn returns a tensor."""
    import tensorflow as tf

    rows = []
    ln_rows, ln_cols = (2048, 1024) if quick else (8192, 1024)
    for dtype in (tf.float32, tf.bfloat16):
        rows += _layer_norm_rows(ln_rows, ln_cols, dtype)
    b, n, t, h = (1, 8, 512, 64) if quick else (1, 8, 2048, 64)
    for dtype in (tf.float32, tf.bfloat16):
        for causal in (False, True):
            rows += _attention_rows(b, n, t, h, dtype, causal)
    return rows


def _table(quick: bool) -> None:
    import numpy as np
    import tensorflow as tf

    from tf_fastattn._timing import median_time

    print()
    print(f"{'case':<52} {'fused ms':>9} {'keras ms':>9} {'speed-up':>8} {'fused rate':>16} {'max |err|':>10}")
    for name, fused, ref, work, unit in _rows(quick):
        a = fused()
        b = ref()
        err = float(np.max(np.abs(tf.cast(a, tf.float64).numpy() - tf.cast(b, tf.float64).numpy())))
        # Eager calls on the CPU return when the result is computed; copying it
        # out with .numpy() would add a memcpy of the whole output to both.
        tf_ = median_time(fused, warmup=1, repeat=5)
        tk = median_time(ref, warmup=1, repeat=5)
        scale = 1e9
        rate = f"{work / tf_ / scale:8.1f} {unit}"
        print(f"{name:<52} {tf_ * 1e3:9.2f} {tk * 1e3:9.2f} {tk / tf_:7.2f}x {rate:>16} {err:10.2e}")
    print("\nspeed-up = Keras time / fused time, same process, medians of 5; max |err| = fused vs Keras.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "precompile":
        from tf_fastattn import gpu

        return gpu.precompile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tf_fastattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (seconds instead of a minute)")
    parser.add_argument("--info", action="store_true", help="print build info only")
    parser.add_argument("--verbose", action="store_true",
                        help="keep TensorFlow's start-up log lines (hidden by default)")
    args = parser.parse_args(argv)

    import tf_fastattn

    info = tf_fastattn.build_info()
    _print_build_info(info)
    if args.info:
        return 0
    if not info["ops_loaded"]:
        print("\nno table: the op library is not loaded")
        return 1
    _table(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
