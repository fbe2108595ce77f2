"""Out of memory is an error, not a crash: with the address space limited
(RLIMIT_AS, in a child process) an output the fused op cannot allocate, and
the reference math's T x S scores, give TensorFlow's ResourceExhaustedError
naming the op and the shape, and the process goes on."""

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
