// CUDA kernels of tf_fastattn: the same params structs as the CPU kernels,
// run on a CUDA stream. Kernels are compiled by NVRTC for the GPU present on
// first use (cached on disk) and launched through the driver API, so nothing
// here needs CUDA at build time. All pointers in the params are device
// pointers; launches are asynchronous on `stream` and never synchronise.
//
// Status: compiled with NVRTC 12 for sm_60..sm_90 in CI, NOT yet run on a GPU.
#pragma once

#include "tf_fastattn/attention.h"
#include "tf_fastattn/layer_norm.h"

namespace tf_fastattn {

// Which attention kernels run. kAuto: tensor cores (mma.sync m16n8k16) for
// float16/bfloat16 on sm_80 and newer, the float32 SIMT family otherwise
// (sm_60/70/75, and float32 inputs everywhere). The environment variable
// TF_FASTATTN_ATTENTION_FAMILY=simt|tensor_core overrides kAuto.
enum class AttentionFamily : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };

struct GpuContext {
  void* stream = nullptr;  // CUstream; null = the legacy default stream of the current context
  AttentionFamily attention_family = AttentionFamily::kAuto;
};

// OK when the CUDA driver loads and NVRTC is found; otherwise the reason.
Status gpu_runtime_status();

// The GPU backends, called by the core (csrc/core/dispatch.cc) with
// finalize()d params: the kernels read the derived fields.
//
// Layer norm (layer_norm.h) on the GPU. Statistics are float32 (float64 for
// float64 input). The backward's workspace is layer_norm_bwd_workspace_bytes_gpu.
Status layer_norm_fwd_gpu(const LayerNormFwdParams& p, const GpuContext& ctx);
Status layer_norm_bwd_gpu(const LayerNormBwdParams& p, const GpuContext& ctx);
int64_t layer_norm_bwd_workspace_bytes_gpu(int64_t rows, int64_t cols, DType dtype);

// Attention (attention.h) on the GPU for float16, bfloat16 and float32, head
// dims up to 256. The backward's workspace is attention_bwd_workspace_bytes_gpu
// (the float32 row sums of dO * O).
Status attention_fwd_gpu(const AttentionFwdParams& p, const GpuContext& ctx);
Status attention_bwd_gpu(const AttentionBwdParams& p, const GpuContext& ctx);
int64_t attention_bwd_workspace_bytes_gpu(const AttentionShape& shape, DType dtype);

}  // namespace tf_fastattn
