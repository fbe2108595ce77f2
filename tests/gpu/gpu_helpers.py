"""GPU test helpers: _C on PyTorch tensors; the checks against the float64
references are tests/numpy_reference.py's (the ones the emulated tests use),
on the outputs copied to NumPy."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: numpy_reference.py
import numpy_reference  # noqa: E402, F401  (re-exported: check_attention, check_layer_norm)

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def stream():
    return torch.cuda.current_stream().cuda_stream


def mask_strides(mask):
    if mask is None:
        return [0, 0, 0, 0]
    return [0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4)]


def common_params(C, q, k, v, mask, causal, scale, dropout, seed, seed_device=None, llm=None) -> dict:
    """The fields AttentionFwdParams and AttentionBwdParams share, for [B, T, N, H]
    tensors; `seed_device`: a device tensor holding the seed the kernels read
    instead; `llm`: window_left, window_right, query_offset, logits_soft_cap
    and query_offset_device (a device int32 tensor the kernels read the
    offset from) as given."""
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    fields = dict(dtype=DTYPE_NAMES[q.dtype], shape=C.AttentionShape(B, T, S, N, Nkv, H, Hv), q=q.data_ptr(),
                  k=k.data_ptr(), v=v.data_ptr(), mask=mask.data_ptr() if mask is not None else 0,
                  mask_strides=mask_strides(mask), scale=H**-0.5 if scale is None else scale, is_causal=causal,
                  dropout_rate=dropout, seed=seed, seed_device=0 if seed_device is None else seed_device.data_ptr())
    for name, value in (llm or {}).items():
        fields[name] = value.data_ptr() if name == "query_offset_device" else value
    return fields


def attention_fwd(C, q, k, v, mask=None, causal=False, scale=None, dropout=0.0, seed=0, family="auto",
                  seed_device=None, llm=None):
    """Our forward on [B, T, N, H] tensors. Returns (o, lse)."""
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    scale = H**-0.5 if scale is None else scale
    o = torch.full((B, T, N, Hv), float("nan"), dtype=q.dtype, device=q.device)  # poisoned
    lse = torch.full((B, N, T), float("nan"), dtype=torch.float32, device=q.device)
    p = C.AttentionFwdParams(**common_params(C, q, k, v, mask, causal, scale, dropout, seed, seed_device, llm),
                             o=o.data_ptr(),
                             lse=lse.data_ptr())
    C.attention_fwd_gpu(p, stream(), family)
    return o, lse


def attention_bwd(C, q, k, v, o, lse, d_o, mask=None, causal=False, scale=None, dropout=0.0, seed=0,
                  family="auto", seed_device=None, llm=None):
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    scale = H**-0.5 if scale is None else scale
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    shape = C.AttentionShape(B, T, S, N, Nkv, H, Hv)
    ws = torch.empty(C.attention_bwd_workspace_bytes_gpu(shape, DTYPE_NAMES[q.dtype]), dtype=torch.uint8,
                     device=q.device)
    p = C.AttentionBwdParams(**common_params(C, q, k, v, mask, causal, scale, dropout, seed, seed_device, llm),
                             o=o.data_ptr(),
                             lse=lse.data_ptr(), do_=d_o.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(),
                             dv=dv.data_ptr(), workspace=ws.data_ptr())
    C.attention_bwd_gpu(p, stream(), family)
    return dq, dk, dv


def to_numpy(*tensors):
    """Host NumPy copies: float16/bfloat16 values as float32 (exact), bool and
    float32 as they are; None stays None."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            t = t.detach()
            out.append((t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy())
    return out
