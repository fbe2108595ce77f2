// Host launchers of the attention CUDA kernels (csrc/kernels/cuda/attention_*.cu).
//
// Dispatch happens once here: dtype and architecture pick the family
// (variants.cc), max(H, Hv) picks the head-dim bucket; causal, mask and
// dropout are run-time fields of the arguments.
#include <cmath>
#include <string>

#include "kernels/cuda/attention_args.h"
#include "kernels/cuda/attention_mma_bwd_args.h"
#include "runtime/modules.h"
#include "runtime/variants.h"
#include "tf_fastattn/gpu.h"
#include "tf_fastattn/philox.h"

namespace tf_fastattn {
namespace {

using gpu::Dim3;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Status check_gpu_shape(DType dtype, const AttentionShape& s, int* bucket) {
  if (dtype == DType::kFloat64) {
    return Status::Invalid("attention on the GPU supports float16, bfloat16 and float32, got float64");
  }
  *bucket = gpu::attention_head_dim_bucket(s.head_dim, s.head_dim_v);
  if (*bucket == 0) {
    return Status::Invalid("attention on the GPU supports head dims up to " + std::to_string(kMaxHeadDim) +
                           ", got H = " + std::to_string(s.head_dim) + ", Hv = " + std::to_string(s.head_dim_v));
  }
  return Status::OK();
}

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// The grids of every kernel a call may launch, checked against the grid limit
// before the device is looked up, for whichever family the device will pick
// (the smaller of the two tiles: a shape refused here fits neither family by
// more than a factor 2). Pure arithmetic on the shape, so it runs (and is
// tested) without a GPU.
Status check_grids(const AttentionShape& s, int bucket, bool backward) {
  Dim3 g;
  const int64_t bn = s.batch * s.num_heads;
  if (!backward) {
    return gpu::grid_1d(bn * ceil_div(s.seqlen_q, min64(tfa::kMmaRowTile, tfa::kSimtRowTile)), "attention forward",
                        "batch x heads x ceil(T / 32)", &g);
  }
  const int64_t rows = bn * s.seqlen_q;
  TFA_RETURN_IF_ERROR(gpu::grid_1d(ceil_div(rows, min64(tfa::kMmaBwdDeltaRows, tfa::kSimtThreads / 32)),
                                   "attention backward (delta)", "batch x heads x T / 4", &g));
  TFA_RETURN_IF_ERROR(gpu::grid_1d(bn * ceil_div(s.seqlen_q, min64(tfa::kMmaBwdDqRows, tfa::simt_dq_rows(bucket))),
                                   "attention backward (dq)", "batch x heads x ceil(T / query rows per block)", &g));
  return gpu::grid_1d(
      s.batch * s.num_heads_kv * ceil_div(s.seqlen_k, min64(tfa::kMmaBwdKvKeys, tfa::simt_dkdv_keys(bucket))),
      "attention backward (dk, dv)", "batch x key-value heads x ceil(S / keys per block)", &g);
}

const char* prefix(AttentionFamily f) {
  return f == AttentionFamily::kTensorCore ? "tfa_attention_mma_" : "tfa_attention_simt_";
}

}  // namespace

int64_t attention_bwd_workspace_bytes_gpu(const AttentionShape& shape, DType /*dtype*/) {
  return shape.batch * shape.num_heads * shape.seqlen_q * static_cast<int64_t>(sizeof(float));
}

Status attention_fwd_gpu(const AttentionFwdParams& p, const GpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  int bucket = 0;
  TFA_RETURN_IF_ERROR(check_gpu_shape(p.dtype, p.shape, &bucket));
  const AttentionShape& s = p.shape;
  if (s.batch * s.num_heads * s.seqlen_q == 0) return Status::OK();
  TFA_RETURN_IF_ERROR(check_grids(s, bucket, false));
  gpu::DeviceInfo dev;
  TFA_RETURN_IF_ERROR(gpu::device_for_stream(ctx.stream, &dev));
  AttentionFamily family;
  TFA_RETURN_IF_ERROR(gpu::resolve_attention_family(dev.arch, p.dtype, ctx.attention_family, &family));
  AttentionFwdParams a = p;  // the kernels' argument (finalize()d by the core)
  const bool mma = family == AttentionFamily::kTensorCore;
  const int rows = mma ? tfa::mma_fwd_rows(bucket) : tfa::kSimtRowTile;
  // SIMT kernels use static shared memory only.
  const int smem = mma ? tfa::mma_fwd_smem_bytes(bucket) : 0;
  gpu::CUfunction f;
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, gpu::attention_variant(family, p.dtype, bucket, false),
                                      (std::string(prefix(family)) + "fwd").c_str(), smem, &f));
  Dim3 grid;
  TFA_RETURN_IF_ERROR(gpu::grid_1d(s.batch * s.num_heads * ceil_div(s.seqlen_q, rows), "attention forward",
                                   "batch x heads x query tiles", &grid));
  const unsigned threads = mma ? 32 * tfa::kMmaWarps : tfa::kSimtThreads;
  return gpu::launch(dev, f, grid, Dim3{threads}, smem, ctx.stream, &a);
}

Status attention_bwd_gpu(const AttentionBwdParams& p, const GpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  int bucket = 0;
  TFA_RETURN_IF_ERROR(check_gpu_shape(p.dtype, p.shape, &bucket));
  const AttentionShape& s = p.shape;
  if (s.batch * s.num_heads_kv * s.seqlen_k == 0 && s.batch * s.num_heads * s.seqlen_q == 0) return Status::OK();
  TFA_RETURN_IF_ERROR(check_grids(s, bucket, true));
  gpu::DeviceInfo dev;
  TFA_RETURN_IF_ERROR(gpu::device_for_stream(ctx.stream, &dev));
  AttentionFamily family;
  TFA_RETURN_IF_ERROR(gpu::resolve_attention_family(dev.arch, p.dtype, ctx.attention_family, &family));
  AttentionBwdParams a = p;  // the kernels' argument (finalize()d by the core)
  // Grids already checked by check_grids: a 1-D grid of n blocks.
  const auto grid = [](int64_t n) { return Dim3{static_cast<unsigned>(n)}; };
  // ---- tensor-core backward (attention_mma_bwd.cu; compiled, not yet run on a GPU) ----
  if (family == AttentionFamily::kTensorCore) {
    const gpu::KernelVariant mv = gpu::attention_variant(AttentionFamily::kTensorCore, p.dtype, bucket, true);
    const int dq_smem = tfa::mma_bwd_dq_smem_bytes(bucket), kv_smem = tfa::mma_bwd_kv_smem_bytes(bucket);
    gpu::CUfunction delta_fn, dq_fn, dkdv_fn;
    TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, mv, "tfa_attention_mma_bwd_delta", 0, &delta_fn));
    TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, mv, "tfa_attention_mma_bwd_dq", dq_smem, &dq_fn));
    TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, mv, "tfa_attention_mma_bwd_dkdv", kv_smem, &dkdv_fn));
    const Dim3 block{static_cast<unsigned>(tfa::kMmaBwdThreads)};
    const int64_t rows = s.batch * s.seqlen_q * s.num_heads;
    if (rows > 0) {
      TFA_RETURN_IF_ERROR(gpu::launch(dev, delta_fn, grid(ceil_div(rows, tfa::kMmaBwdDeltaRows)),
                                      block, 0, ctx.stream, &a));
      const int64_t dq_blocks = s.batch * s.num_heads * ceil_div(s.seqlen_q, tfa::kMmaBwdDqRows);
      TFA_RETURN_IF_ERROR(
          gpu::launch(dev, dq_fn, grid(dq_blocks), block, dq_smem, ctx.stream, &a));
    }
    const int64_t kv_blocks = s.batch * s.num_heads_kv * ceil_div(s.seqlen_k, tfa::kMmaBwdKvKeys);
    if (kv_blocks == 0) return Status::OK();
    return gpu::launch(dev, dkdv_fn, grid(kv_blocks), block, kv_smem, ctx.stream, &a);
  }
  // ---- end of the tensor-core backward ----
  const gpu::KernelVariant v = gpu::attention_variant(AttentionFamily::kSimt, p.dtype, bucket, true);
  const char* pre = prefix(AttentionFamily::kSimt);
  const Dim3 block{static_cast<unsigned>(tfa::kSimtThreads)};
  const int64_t rows = s.batch * s.seqlen_q * s.num_heads;
  gpu::CUfunction delta_fn, dq_fn, dkdv_fn;
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, v, (std::string(pre) + "bwd_delta").c_str(), 0, &delta_fn));
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, v, (std::string(pre) + "bwd_dq").c_str(), 0, &dq_fn));
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, v, (std::string(pre) + "bwd_dkdv").c_str(), 0, &dkdv_fn));
  if (rows > 0) {
    TFA_RETURN_IF_ERROR(gpu::launch(dev, delta_fn, grid(ceil_div(rows, tfa::kSimtThreads / 32)),
                                    block, 0, ctx.stream, &a));
    const int64_t dq_blocks = s.batch * s.num_heads * ceil_div(s.seqlen_q, tfa::simt_dq_rows(bucket));
    TFA_RETURN_IF_ERROR(gpu::launch(dev, dq_fn, grid(dq_blocks), block, 0, ctx.stream, &a));
  }
  const int64_t kv_blocks = s.batch * s.num_heads_kv * ceil_div(s.seqlen_k, tfa::simt_dkdv_keys(bucket));
  if (kv_blocks == 0) return Status::OK();
  return gpu::launch(dev, dkdv_fn, grid(kv_blocks), block, 0, ctx.stream, &a);
}

}  // namespace tf_fastattn
