"""Concurrent use gives bitwise the results of one call at a time: the ops
called from several Python threads at once (TensorFlow runs them in
parallel: eager ops release the GIL, and the kernels share the process's
thread pool), and two processes filling one kernel cache at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import tf_fastattn
from tfa_helpers import requires_ops


def _work(i):
    """Case i: attention forward and backward (with dropout from a fixed
    seed, causal every other case) and a residual layer norm."""
    rng = np.random.default_rng(i)
    q, k, v = (tf.constant(rng.standard_normal((2, 96, 4, 32)).astype(np.float32)) for _ in range(3))
    x, r = (tf.constant(rng.standard_normal((64, 96)).astype(np.float32)) for _ in range(2))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = tf_fastattn.dot_product_attention(q, k, v, is_causal=bool(i % 2), dropout_rate=0.1, seed=1000 + i,
                                                implementation="fused")
    grads = tape.gradient(out, [q, k, v])
    y = tf_fastattn.layer_norm(x, tf.ones([96]), tf.zeros([96]), residual=r, implementation="fused")
    return [t.numpy() for t in (out, *grads, y)]


def test_ops_from_many_threads_at_once_match_one_at_a_time():
    requires_ops()
    cases = list(range(8))
    want = {i: _work(i) for i in cases}
    got, errors = {}, []
    barrier = threading.Barrier(len(cases) * 2)

    def run(i, slot):
        try:
            barrier.wait()
            for _ in range(3):
                got[(i, slot)] = _work(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i, slot)) for i in cases for slot in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(got) == len(cases) * 2
    for (i, slot), arrays in got.items():
        for a, b in zip(arrays, want[i]):
            assert a.tobytes() == b.tobytes(), f"case {i} (thread slot {slot}) differs from the sequential run"


CHILD = r"""
import os, sys
from tf_fastattn import gpu
name = sys.argv[1]
r = gpu._C().gpu_compile(80, name, True)
again = gpu._C().gpu_compile(80, name, True)
assert again["from_cache"], "the entry just written must be read back"
sys.stdout.write(f"{r['image_bytes']} {again['image_bytes']}\n")
"""


def test_two_processes_filling_one_kernel_cache(tmp_path):
    """Both processes compile the same variant into one empty cache at the
    same moment: each reads back a complete entry, the same image."""
    from tf_fastattn import gpu

    if gpu.runtime_info()["nvrtc"] is None:
        if os.environ.get("CI"):
            pytest.fail("NVRTC is required in CI")
        pytest.skip("NVRTC not found")
    name = gpu.select_variants(80, ["float32"], None, ["layer_norm"])[0]["name"]
    env = dict(os.environ, TF_FASTATTN_CACHE_DIR=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    sizes = {int(n) for out, _ in outs for n in out.strip().splitlines()[-1].split()}
    assert len(sizes) == 1, sizes  # every compile and every read-back: the same image
    assert sorted(os.listdir(tmp_path / "cache"))[0].endswith(".bin")
    assert len(os.listdir(tmp_path / "cache")) == 1  # one entry, no temporary file left behind
