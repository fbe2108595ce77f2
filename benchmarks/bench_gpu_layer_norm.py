"""Fused residual-add + layer norm on the GPU: GB/s against a device-to-device copy and
torch.nn.functional.layer_norm(x + r).

Bytes moved: forward reads x, r, gamma, beta and writes y, sum,
mean, rstd; backward reads dy, s, gamma, mean, rstd and writes dx, dgamma, dbeta.
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_common import load_C, time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    C = load_C()
    s = torch.cuda.current_stream().cuda_stream
    rows_out = []
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        for cols in (768, 1024, 4096, 8192, 65536):
            rows = max(1, (1 << 26) // (cols * 2))
            x, r = (torch.randn(rows, cols, device="cuda", dtype=dtype) for _ in range(2))
            gamma, beta = torch.ones(cols, device="cuda"), torch.zeros(cols, device="cuda")
            y, sm = torch.empty_like(x), torch.empty_like(x)
            mean, rstd = torch.empty(rows, device="cuda"), torch.empty(rows, device="cuda")
            dy, dx = torch.randn_like(x), torch.empty_like(x)
            dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)
            ws = torch.empty(C.layer_norm_bwd_workspace_bytes_gpu(rows, cols, name), dtype=torch.uint8, device="cuda")
            e = x.element_size()

            fwd_params = C.LayerNormFwdParams(
                dtype=name, param_dtype="float32", rows=rows, cols=cols, epsilon=1e-5, x=x.data_ptr(),
                residual=r.data_ptr(), gamma=gamma.data_ptr(), beta=beta.data_ptr(), y=y.data_ptr(),
                sum=sm.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr())
            bwd_params = C.LayerNormBwdParams(
                dtype=name, param_dtype="float32", rows=rows, cols=cols, dy=dy.data_ptr(), sum=sm.data_ptr(),
                gamma=gamma.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr(), dx=dx.data_ptr(),
                dgamma=dgamma.data_ptr(), dbeta=dbeta.data_ptr(), workspace=ws.data_ptr())

            def fwd():
                C.layer_norm_fwd_gpu(fwd_params, s)

            def bwd():
                C.layer_norm_bwd_gpu(bwd_params, s)

            fwd()
            copy_dst = torch.empty_like(x)
            cases = {
                "copy": (lambda: copy_dst.copy_(x), 2 * rows * cols * e),
                "tf_fastattn fwd": (fwd, 4 * rows * cols * e + 8 * cols + 8 * rows),
                "tf_fastattn bwd": (bwd, 3 * rows * cols * e + 12 * cols + 8 * rows),
                "torch layer_norm(x+r)": (lambda: torch.nn.functional.layer_norm(x + r, (cols,), gamma.to(dtype),
                                                                                beta.to(dtype), 1e-5),
                                          4 * rows * cols * e + 8 * cols),
            }
            for prov, (fn, nbytes) in cases.items():
                ms = time_ms(fn)
                row = dict(dtype=name, cols=cols, rows=rows, provider=prov, ms=ms, gbps=nbytes / ms / 1e6)
                rows_out.append(row)
                print(f"{name:<9}C={cols:<6}{prov:<24}{ms:8.3f} ms {row['gbps']:8.0f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
