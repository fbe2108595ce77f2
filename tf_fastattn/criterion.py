"""The accuracy criterion (README), one definition for every tier of tests
(the CPU kernels through _C, the TensorFlow ops and layers, the GPU kernels
under PyTorch and under the emulator) and for the GPU self-check
(tf_fastattn._selfcheck). NumPy only: tests/criterion.py loads this file by
path where TensorFlow is absent.

FlashAttention's criterion: max|fused - ref| <= factor * max|naive - ref| +
floor, where `ref` is the same math in float64 and `naive` the plain
implementation in the fused result's dtype; the floor covers results that are
exact in the naive implementation but need one rounding step in the fused
one, so it scales with the result: ATOL_FLOOR[dtype] * max(1, max|ref|) (one
ulp of the half types, eight of float32, at the result's largest magnitude;
an absolute floor asked a float32 gradient of magnitude 9 for under one ulp).
Non-finite entries of `ref` must be non-finite in `fused` too (an
unwritten output shows up here), and are excluded from the error.
"""

from __future__ import annotations

import numpy as np

ATOL_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6, "float64": 1e-12}


def check_close(fused, naive, ref, dtype_name: str, name: str = "output", factor: float = 2.0) -> None:
    """Asserts the criterion on arrays convertible to float64 (AssertionError
    with the errors when it fails)."""
    fused, naive, ref = (np.asarray(x, np.float64) for x in (fused, naive, ref))
    assert fused.shape == ref.shape, f"{name}: shape {fused.shape} != {ref.shape}"
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(fused), finite):
        raise AssertionError(f"{name}: non-finite pattern differs ({int((np.isfinite(fused) != finite).sum())} entries)")
    err = np.abs(fused - ref)[finite]
    naive_err = np.abs(naive - ref)[finite]
    max_err = float(err.max()) if err.size else 0.0
    max_naive = float(naive_err.max()) if naive_err.size else 0.0
    floor = ATOL_FLOOR[dtype_name] * max(1.0, float(np.abs(ref[finite]).max()) if finite.any() else 1.0)
    assert max_err <= factor * max_naive + floor, (
        f"{name}: max error {max_err:.3g} (mean {float(err.mean()) if err.size else 0:.3g}) exceeds "
        f"{factor} x naive {max_naive:.3g} + floor {floor:.1g}"
    )
