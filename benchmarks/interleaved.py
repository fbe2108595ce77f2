"""Rounds of two or more callables alternating in one process (a, b, b, a,
...), so that a shared machine's drift between rounds does not become their
ratio. The benchmark times one round of all of them."""

import statistics
import time


def interleaved_medians(benchmark, fns, rounds):
    """fns: name -> callable (already traced). Runs benchmark.pedantic with one
    warm-up round and `rounds` timed ones; returns name -> median seconds of
    the timed rounds."""
    times = {name: [] for name in fns}
    order = list(fns)

    def one_round():
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    return {name: statistics.median(t[1:]) for name, t in times.items()}  # t[0]: the warm-up round
