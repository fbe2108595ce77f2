"""Shared by the GPU benchmarks: loading _C without TensorFlow, CUDA-event timing."""

from __future__ import annotations

import importlib.util
import os
import statistics

import torch


def load_C():
    path = os.environ.get("TFA_C_PATH")
    if path:
        spec = importlib.util.spec_from_file_location("_C", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from tf_fastattn import _C

    return _C


def time_ms(fn, warmup=3, iters=20):
    """Median milliseconds of fn() with CUDA events, after warm-up (run-time compilation excluded)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
