"""Out of memory is an error, not a crash: with the address space limited
(RLIMIT_AS, in a child process) an output the fused op cannot allocate, and
the reference math's T x S scores, give TensorFlow's ResourceExhaustedError
naming the op and the shape (slow); the CPU kernel's own scratch buffers
failing in its worker threads give ResourceExhaustedError naming the kernel
(MemoryError from _C); the process goes on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tfa_helpers import requires_ops

CHILD = r"""
import os, resource, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
import tf_fastattn
impl, T = sys.argv[1], int(sys.argv[2])
q = tf.zeros([1, T, 8, 64])  # allocated before the limit
q.numpy()
vms = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = vms + 256 * 2**20  # 256 MiB more: less than the output (or the scores)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    tf_fastattn.dot_product_attention(q, q, q, implementation=impl)
    print("NO ERROR")
except tf.errors.ResourceExhaustedError as e:
    print("RESOURCE_EXHAUSTED", str(e).replace("\n", " ")[:500])
print("ALIVE", float(tf.reduce_sum(tf.ones([4]) * 2)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/statm: Linux")
@pytest.mark.parametrize("impl, T, fragments", [
    ("fused", 262144, ["TfFastattn>Attention", "OOM when allocating tensor with shape[1,262144,8,64]"]),
    ("reference", 16384, ["OOM when allocating tensor with shape[1,8,16384,16384]"]),
])
def test_out_of_memory_is_resource_exhausted(impl, T, fragments):
    if impl == "fused":
        requires_ops()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", CHILD, impl, str(T)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESOURCE_EXHAUSTED" in res.stdout, res.stdout + res.stderr[-2000:]
    for fragment in fragments:
        assert fragment in res.stdout, res.stdout
    assert "ALIVE 8.0" in res.stdout


SCRATCH_CHILD = r"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf_fastattn
from tf_fastattn import _C
q = tf.random.normal([2, 300, 4, 64])
d = tf.random.normal([2, 300, 4, 64])
def grad():
    with tf.GradientTape() as tape:
        tape.watch(q)
        out = tf_fastattn.dot_product_attention(q, q, q, implementation="fused")
    return tape.gradient(out, q, output_gradients=d)
calls = {
    "op": lambda: tf_fastattn.dot_product_attention(q, q, q, implementation="fused"),
    "xla": tf.function(lambda: tf_fastattn.dot_product_attention(q, q, q, implementation="fused"), jit_compile=True),
    "tf.function gradient": tf.function(grad),
    "_C": lambda: _C.attention_fwd(q.numpy(), q.numpy(), q.numpy(), num_threads=2),
}
for name, call in calls.items():
    try:
        call()
        print(name, "NO ERROR")
    except tf.errors.ResourceExhaustedError as e:
        print(name, "RESOURCE_EXHAUSTED", str(e).replace("\n", " ")[:300])
    except MemoryError:
        print(name, "MEMORY_ERROR")
print("ALIVE", float(tf.reduce_sum(tf.ones([4]) * 2)))
"""


def test_kernel_scratch_out_of_memory_is_an_error_from_every_front_end():
    """The CPU kernel's own scratch buffers, allocated in the worker threads
    (a test hook, TF_FASTATTN_TEST_SCRATCH_LIMIT, makes every block over 1 KiB
    fail as malloc would): the op, XLA and a traced gradient raise
    ResourceExhaustedError naming the kernel, _C raises MemoryError, and the
    process lives on (a worker thread that threw used to end it)."""
    requires_ops()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_FASTATTN_TEST_SCRATCH_LIMIT="1024")
    res = subprocess.run([sys.executable, "-c", SCRATCH_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("op ", "xla ", "_C ")))
    for name in ("op", "xla"):
        assert lines[name].startswith("RESOURCE_EXHAUSTED"), res.stdout
        assert "tf_fastattn attention forward: out of memory for the CPU kernel's scratch buffers" in lines[name]
    assert "tf.function gradient RESOURCE_EXHAUSTED" in res.stdout, res.stdout
    assert lines["_C"] == "MEMORY_ERROR", res.stdout
    assert "ALIVE 8.0" in res.stdout
