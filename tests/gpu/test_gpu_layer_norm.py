"""Layer norm CUDA kernels against a float64 reference (the accuracy criterion).

Every dtype x awkward and large C (warp-per-row, block-per-row and streaming
paths; aligned and odd C) x residual x gamma/beta dtype, forward and backward,
deterministic. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
from gpu_helpers import torch  # skips the module without PyTorch
from gpu_helpers import DTYPE_NAMES, assert_close, stream

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
COLS = [1, 71, 229, 541, 1024, 4096, 20000, 65536]


def layer_norm_gpu(C, x, gamma, beta, residual, eps):
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    y = torch.full_like(x, float("nan"))
    s = torch.full_like(x, float("nan")) if residual is not None else None
    mean = torch.full(x.shape[:-1], float("nan"), device="cuda")
    rstd = torch.full_like(mean, float("nan"))
    p = C.LayerNormFwdParams(dtype=DTYPE_NAMES[x.dtype], param_dtype=DTYPE_NAMES[gamma.dtype], rows=rows, cols=cols,
                             epsilon=eps, x=x.data_ptr(), residual=residual.data_ptr() if residual is not None else 0,
                             gamma=gamma.data_ptr(), beta=beta.data_ptr(), y=y.data_ptr(),
                             sum=s.data_ptr() if s is not None else 0, mean=mean.data_ptr(), rstd=rstd.data_ptr())
    C.layer_norm_fwd_gpu(p, stream())
    return y, (s if s is not None else x), mean, rstd


def layer_norm_bwd_gpu(C, dy, s, gamma, mean, rstd):
    rows, cols = dy.numel() // dy.shape[-1], dy.shape[-1]
    dx = torch.full_like(dy, float("nan"))
    dgamma = torch.full_like(gamma, float("nan"))
    dbeta = torch.full_like(gamma, float("nan"))
    ws = torch.empty(C.layer_norm_bwd_workspace_bytes_gpu(rows, cols, DTYPE_NAMES[dy.dtype]), dtype=torch.uint8,
                     device="cuda")
    p = C.LayerNormBwdParams(dtype=DTYPE_NAMES[dy.dtype], param_dtype=DTYPE_NAMES[gamma.dtype], rows=rows, cols=cols,
                             dy=dy.data_ptr(), sum=s.data_ptr(), gamma=gamma.data_ptr(), mean=mean.data_ptr(),
                             rstd=rstd.data_ptr(), dx=dx.data_ptr(), dgamma=dgamma.data_ptr(), dbeta=dbeta.data_ptr(),
                             workspace=ws.data_ptr())
    C.layer_norm_bwd_gpu(p, stream())
    return dx, dgamma, dbeta


def reference(x, r, gamma, beta, eps):
    s = x + r if r is not None else x
    return torch.nn.functional.layer_norm(s, s.shape[-1:], gamma.to(s.dtype), beta.to(s.dtype), eps)


@pytest.mark.parametrize("param_float32", [True, False], ids=["params_f32", "params_dtype"])
@pytest.mark.parametrize("residual", [False, True], ids=["x", "x+r"])
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_forward_backward(C, dtype, cols, residual, param_float32):
    rows = 37 if cols < 20000 else 3
    eps = 1e-3
    gen = torch.Generator(device="cuda").manual_seed(cols)
    x = (torch.randn(rows, cols, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    r = torch.randn(rows, cols, device="cuda", generator=gen).to(dtype) if residual else None
    pdtype = torch.float32 if param_float32 else dtype
    gamma = (torch.rand(cols, device="cuda", generator=gen) + 0.5).to(pdtype)
    beta = torch.randn(cols, device="cuda", generator=gen).to(pdtype)
    y, s, mean, rstd = layer_norm_gpu(C, x, gamma, beta, r, eps)
    dy = torch.randn_like(y)
    dx, dgamma, dbeta = layer_norm_bwd_gpu(C, dy, s, gamma, mean, rstd)
    torch.cuda.synchronize()
    if residual:
        torch.testing.assert_close(s, x + r, rtol=0, atol=0)  # the sum is rounded like the reference

    # The reference normalises the same rounded sum s; the float64 gradients
    # are taken with respect to s (= dx = dresidual).
    s64 = s.double().requires_grad_()
    g64, b64 = gamma.double().requires_grad_(), beta.double().requires_grad_()
    y_ref = reference(s64, None, g64, b64, eps)
    ref_grads = torch.autograd.grad(y_ref, (s64, g64, b64), dy.double())
    sn = s.detach().clone().requires_grad_()
    gn, bn = gamma.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
    y_naive = reference(sn, None, gn, bn, eps)
    naive_grads = torch.autograd.grad(y_naive, (sn, gn, bn), dy)
    assert_close(y, y_naive, y_ref, dtype, "y")
    for name, fused, naive, ref in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), naive_grads, ref_grads):
        assert_close(fused, naive, ref, dtype if name == "dx" else pdtype, name)


@pytest.mark.parametrize("cols", [541, 4096, 65536])
def test_backward_deterministic(C, cols):
    x = torch.randn(300, cols, device="cuda", dtype=torch.bfloat16)
    gamma = torch.rand(cols, device="cuda") + 0.5
    beta = torch.zeros(cols, device="cuda")
    y, s, mean, rstd = layer_norm_gpu(C, x, gamma, beta, None, 1e-5)
    dy = torch.randn_like(y)
    first = layer_norm_bwd_gpu(C, dy, s, gamma, mean, rstd)
    second = layer_norm_bwd_gpu(C, dy, s, gamma, mean, rstd)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
