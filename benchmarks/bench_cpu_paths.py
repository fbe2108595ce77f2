"""The CPU paths the attention kernels dispatch on, and the fused op against
Keras with XLA off and on, in one run.

Records `tf_fastattn.build_info()["cpu_features"]` and
`["cpu_attention_paths"]` (which micro-kernel tier ran: AMX-BF16,
AVX512-BF16, AVX-512, AVX2 or portable loops) in each benchmark's
extra_info.
B = 1, N = 8, H = 64, float32 and bfloat16, causal and not, T = S in
{256, 512, 2048} (and 8192 with TFA_BENCH_LARGE=1), forward and forward +
backward; impl: fused, keras (`keras.ops.dot_product_attention` in a
tf.function), keras_xla (the same with jit_compile=True).

Run:  pytest benchmarks/bench_cpu_paths.py --benchmark-json=cpu_paths.json
      TF_FASTATTN_CPU_AMX=0 pytest benchmarks/bench_cpu_paths.py ...   # bfloat16 without AMX
      TF_FASTATTN_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 pytest ...       # an AVX2-only CPU, approximately
(the last caps both the fused kernels and TensorFlow's oneDNN matrix
products at AVX2 on an AVX-512 machine; TensorFlow's other kernels are
built for AVX either way).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_fastattn  # noqa: E402
from tf_fastattn._timing import attention_flops  # noqa: E402
from bench_attention import B, H, N, op_fns  # noqa: E402

LARGE = os.environ.get("TFA_BENCH_LARGE", "") not in ("", "0")
LENGTHS = [256, 512, 2048] + ([8192] if LARGE else [])
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}
CPU_FEATURES = tf_fastattn.build_info().get("cpu_features")
CPU_PATHS = tf_fastattn.build_info().get("cpu_attention_paths")


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "keras", "keras_xla"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", LENGTHS)
def test_attention_cpu_paths(benchmark, T, dtype, causal, impl, direction):
    fwd, fwd_bwd = op_fns("fused" if impl == "fused" else "keras", T, DTYPES[dtype], causal,
                          jit_compile=impl == "keras_xla")
    fn = fwd if direction == "fwd" else fwd_bwd
    fn()  # trace (and compile)
    benchmark.group = f"{direction} {dtype} T={T} {'causal' if causal else 'full'}"
    benchmark.pedantic(fn, rounds=5 if T <= 2048 else 3, iterations=1, warmup_rounds=1)
    flops = attention_flops(B, N, T, T, H, causal, backward=direction == "fwd_bwd")
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["cpu_features"] = CPU_FEATURES
    benchmark.extra_info["cpu_attention_paths"] = CPU_PATHS
