"""Small timing helpers shared by `python -m tf_fastattn` and the benchmarks."""

from __future__ import annotations

import statistics
import time


def median_time(fn, *, warmup: int = 2, repeat: int = 7, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds, after `warmup` calls.

    Each sample runs fn() enough times to last at least `min_time` seconds.
    fn must block until its result is ready (call .numpy() or similar).
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        n = 0
        t0 = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)


def layer_norm_bytes(rows: int, cols: int, itemsize: int, backward: bool) -> int:
    """Bytes a fused residual layer norm must move: x, residual read and y, sum
    written in the forward; dy, sum read and dx written in the backward."""
    arrays = 4 + (3 if backward else 0)
    return arrays * rows * cols * itemsize


def attention_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int, causal: bool, backward: bool) -> float:
    """FlashAttention's count (csrc/include/tf_fastattn/attention.h): forward
    4*B*N*T*S*H, halved when causal; forward + backward 3.5x that."""
    from tf_fastattn import _C

    return _C.attention_flops(batch, heads, tq, tk, head_dim, causal, backward)
