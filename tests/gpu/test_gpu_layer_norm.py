"""Layer norm CUDA kernels against the float64 NumPy reference (the accuracy
criterion; numpy_reference.check_layer_norm, as in the emulated tests).

Every dtype x awkward and large C (warp-per-row, block-per-row and streaming
paths; aligned and odd C) x residual x gamma/beta dtype, forward and backward,
deterministic. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
from gpu_helpers import torch  # skips the module without PyTorch
from gpu_helpers import DTYPE_NAMES, numpy_reference, stream, to_numpy

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
    # The sum must equal x + r rounded to the dtype bitwise; y, dx (= the
    # gradient of the sum), dgamma, dbeta by the criterion.
    numpy_reference.check_layer_norm(DTYPE_NAMES[dtype], DTYPE_NAMES[pdtype], *to_numpy(x, r, gamma, beta), eps,
                                     *to_numpy(y, s if residual else None, mean, rstd, dy), None,
                                     *to_numpy(dx, dgamma, dbeta))


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
