"""The GPU launchers check every grid against the device's limit (2^31 - 1
blocks in x) before anything reaches the driver: a shape past it is a
ValueError naming the kernel, the block count and what it is made of, not a
grid size silently cast to 32 bits. Pure launcher arithmetic: runs without a
GPU (the pointers are never dereferenced; the check comes first)."""

from __future__ import annotations

import pytest

from tf_fastattn import _C as C


def _params(B, T, S, N, Nkv, H, backward):
    shape = C.AttentionShape(B, T, S, N, Nkv, H, H)
    strides = lambda L, heads: [L * heads * H, heads * H, H]  # noqa: E731
    common = dict(dtype="float16", shape=shape, q=16, k=16, v=16, scale=0.125, q_strides=strides(T, N),
                  k_strides=strides(S, Nkv), v_strides=strides(S, Nkv))
    if not backward:
        return C.AttentionFwdParams(**common, o=16, lse=16, o_strides=strides(T, N))
    return C.AttentionBwdParams(**common, o=16, lse=16, do_=16, dq=16, dk=16, dv=16, workspace=16,
                                o_strides=strides(T, N), do_strides=strides(T, N), dq_strides=strides(T, N),
                                dk_strides=strides(S, Nkv), dv_strides=strides(S, Nkv))


@pytest.mark.parametrize("backward, shape, message", [
    # 1024 x 1024 heads x 2^21 queries / 32 rows = 2^36 blocks
    (False, (1024, 1 << 21, 64, 1024, 1, 64), "attention forward: 68719476736 thread blocks (batch x heads x ceil(T / 32))"),
    # just past the limit: 2^31 blocks
    (False, (64, 1 << 20, 1 << 20, 1024, 1024, 64), "attention forward: 2147483648 thread blocks"),
    (True, (64, 1 << 20, 1 << 20, 1024, 1024, 64), "attention backward (delta): 17179869184 thread blocks"),
    # the dK/dV grid over keys alone: 2^16 x 2^10 heads x 2^20 keys / 32 keys per block
    (True, (1 << 16, 1, 1 << 20, 1024, 1024, 64), "attention backward (dk, dv): 2199023255552 thread blocks "
                                                  "(batch x key-value heads x ceil(S / keys per block))"),
])
def test_grids_past_the_limit_are_refused_by_name(backward, shape, message):
    with pytest.raises(ValueError) as e:
        (C.attention_bwd_gpu if backward else C.attention_fwd_gpu)(_params(*shape, backward), 0, "auto")
    assert message in str(e.value)
    assert "exceed the GPU's grid limit of 2147483647" in str(e.value)
