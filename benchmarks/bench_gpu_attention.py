"""Attention on the GPU: tf_fastattn's kernels against PyTorch's SDPA backends and a naive einsum.

TFLOP/s by FlashAttention's count: forward 4 B N T S H, halved when
causal; backward 2.5x the forward; fwd+bwd 3.5x. Layout [B, T, N, H]; PyTorch
gets [B, N, T, H] views of the same tensors. Prints one line per case and
writes JSON (--json). Needs a GPU, PyTorch and _C (TFA_C_PATH or installed).
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_common import load_C, time_ms

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def flops(C, B, N, T, S, H, causal, direction):
    # FlashAttention's count (attention.h); the backward is the difference.
    fwd, both = (C.attention_flops(B, N, T, S, H, causal, backward) for backward in (False, True))
    return {"fwd": fwd, "bwd": both - fwd, "fwd+bwd": both}[direction]


def ours(C, q, k, v, causal, family):
    B, T, N, H = q.shape
    S, Nkv, Hv = k.shape[1], k.shape[2], v.shape[3]
    shape = C.AttentionShape(B, T, S, N, Nkv, H, Hv)
    dt = DTYPE_NAMES[q.dtype]
    o = torch.empty_like(q)
    lse = torch.empty(B, N, T, device="cuda")
    d_o = torch.randn_like(o)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ws = torch.empty(C.attention_bwd_workspace_bytes_gpu(shape, dt), dtype=torch.uint8, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    scale = H**-0.5

    common = dict(dtype=dt, shape=shape, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), scale=scale,
                  is_causal=causal, o=o.data_ptr(), lse=lse.data_ptr())
    fwd_params = C.AttentionFwdParams(**common)
    bwd_params = C.AttentionBwdParams(**common, do_=d_o.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(),
                                      dv=dv.data_ptr(), workspace=ws.data_ptr())

    def fwd():
        C.attention_fwd_gpu(fwd_params, s, family)

    def bwd():
        C.attention_bwd_gpu(bwd_params, s, family)

    fwd()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda: (fwd(), bwd())}


def torch_impl(q, k, v, causal, backend):
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))

    def run_fwd():
        if backend == "naive":
            T, S = qt.shape[2], kt.shape[2]
            logits = torch.einsum("bnth,bnsh->bnts", qt, kt) * qt.shape[-1] ** -0.5
            if causal:
                logits = logits.masked_fill(~torch.ones(T, S, dtype=torch.bool, device="cuda").tril(), float("-inf"))
            return torch.einsum("bnts,bnsh->bnth", torch.softmax(logits, -1), vt)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    out = run_fwd()
    grad = torch.randn_like(out)

    def bwd():
        torch.autograd.grad(out, (qt, kt, vt), grad, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(run_fwd(), (qt, kt, vt), grad)

    return {"fwd": run_fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="T = S in {512, 2048} only")
    args = ap.parse_args()
    C = load_C()
    lengths = [512, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    providers = ["tf_fastattn", "tf_fastattn_simt", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                 "naive"]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for H in (64, 128):
            for T in lengths:
                B, N = max(1, 16384 // T), 2048 // H
                for causal in (False, True):
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn(B, T, N, H, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
                    for prov in providers:
                        if prov == "naive" and T > 4096:
                            continue  # the T x S probabilities no longer fit comfortably
                        if prov == "tf_fastattn_simt" and T > 2048:
                            continue  # the cross-check family is slow by design
                        try:
                            fns = (ours(C, q, k, v, causal, "simt" if prov.endswith("simt") else "auto")
                                   if prov.startswith("tf_fastattn") else torch_impl(q, k, v, causal, prov))
                        except Exception as e:  # noqa: BLE001 - a backend absent on this GPU/PyTorch
                            print(f"skip {prov}: {type(e).__name__}: {str(e)[:80]}")
                            continue
                        for direction, fn in fns.items():
                            try:
                                ms = time_ms(fn)
                            except Exception as e:  # noqa: BLE001
                                print(f"skip {prov} {direction}: {type(e).__name__}: {str(e)[:80]}")
                                continue
                            tflops = flops(C, B, N, T, T, H, causal, direction) / ms / 1e9
                            row = dict(dtype=str(dtype).split(".")[-1], H=H, T=T, B=B, N=N, causal=causal,
                                       provider=prov, direction=direction, ms=ms, tflops=tflops)
                            rows.append(row)
                            print(f"{row['dtype']:<9}H={H:<4}T={T:<6}{'causal' if causal else 'full':<7}"
                                  f"{prov:<20}{direction:<8}{ms:9.3f} ms {tflops:8.1f} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
