// Host launchers of the layer-norm CUDA kernels (csrc/kernels/cuda/layer_norm.cu).
#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/layer_norm_args.h"
#include "runtime/modules.h"
#include "runtime/variants.h"
#include "tf_fastattn/gpu.h"

namespace tf_fastattn {
namespace {

using gpu::Dim3;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a row is split over threads; see the launch shape in layer_norm_args.h.
struct Config {
  int vecs;             // 16-byte vectors cached per thread (0: stream the row)
  int threads_per_row;  // 32: a warp per row; = block: a block per row
  int block;
};

Config config(int64_t cols, DType dtype, bool backward) {
  const int elem = static_cast<int>(dtype_size(dtype));
  const int64_t vecs = ceil_div(cols, 16 / elem);
  const int max_vecs = tfa::layer_norm_max_vecs(elem, backward);
  auto pow2_at_least = [](int64_t v) {
    int p = 1;
    while (p < v) p *= 2;
    return p;
  };
  if (vecs <= 32 * max_vecs) {
    // Short rows: a warp per row, 4 rows per block of 128 threads.
    return {pow2_at_least(ceil_div(vecs, 32)), 32, 128};
  }
  if (vecs <= int64_t(tfa::kLayerNormMaxThreads) * max_vecs) {
    const int v = pow2_at_least(ceil_div(vecs, tfa::kLayerNormMaxThreads));
    const int threads = static_cast<int>(ceil_div(ceil_div(vecs, v), 32) * 32);
    return {v, threads, threads};
  }
  return {0, tfa::kLayerNormMaxThreads, tfa::kLayerNormMaxThreads};
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Every row of a tensor (null: none) starts 16-byte aligned: its base is, and
// its row stride is a whole number of 16-byte vectors of `per16` elements.
bool rows_aligned16(const void* p, int64_t row_stride, int64_t per16) {
  return p == nullptr || (aligned16(p) && row_stride % per16 == 0);
}

std::string kernel_name(const char* dir, const Config& c, bool aligned) {
  return std::string("tfa_layer_norm_") + dir + "_v" + std::to_string(c.vecs) + (aligned ? "_a" : "_u");
}

struct BwdChunks {
  int64_t chunks = 0, rows_per_chunk = 0;
};

// Row chunks of the backward (one block each): a function of the shape only,
// so the dgamma/dbeta summation order is fixed for a given problem.
BwdChunks bwd_chunks(int64_t rows, int64_t cols, DType dtype) {
  constexpr int64_t kMaxChunks = 1024;
  const Config c = config(cols, dtype, true);
  const int64_t groups = c.block / c.threads_per_row;
  BwdChunks b;
  if (rows <= 0) return b;
  b.chunks = std::min(ceil_div(rows, groups), kMaxChunks);
  b.rows_per_chunk = ceil_div(rows, b.chunks);
  b.chunks = ceil_div(rows, b.rows_per_chunk);
  return b;
}

}  // namespace

int64_t layer_norm_bwd_workspace_bytes_gpu(int64_t rows, int64_t cols, DType dtype) {
  if (rows <= 0 || cols <= 0) return 0;
  return bwd_chunks(rows, cols, dtype).chunks * 2 * cols * dtype_size(stats_dtype(dtype));
}

Status layer_norm_fwd_gpu(const LayerNormFwdParams& p, const GpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  if (p.rows == 0) return Status::OK();
  gpu::DeviceInfo dev;
  TFA_RETURN_IF_ERROR(gpu::device_for_stream(ctx.stream, &dev));
  const Config c = config(p.cols, p.dtype, false);
  // 16-byte vectors: every row of every tensor starts 16-byte aligned.
  const int64_t e = 16 / static_cast<int64_t>(dtype_size(p.dtype));
  const bool aligned = p.cols % e == 0 && rows_aligned16(p.x, p.x_row_stride, e) &&
                       rows_aligned16(p.y, p.y_row_stride, e) && rows_aligned16(p.residual, p.residual_row_stride, e) &&
                       rows_aligned16(p.sum, p.sum_row_stride, e);
  gpu::CUfunction f;
  TFA_RETURN_IF_ERROR(
      gpu::get_kernel(dev, gpu::layer_norm_variant(p.dtype), kernel_name("fwd", c, aligned).c_str(), 0, &f));
  LayerNormFwdParams a = p;  // the kernel's argument (finalize()d by the core)
  a.threads_per_row = c.threads_per_row;
  const int64_t groups = c.block / c.threads_per_row;
  // Enough blocks to fill the GPU several times over; the kernel strides
  // over the remaining rows.
  const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, groups), int64_t(dev.sm_count) * 64);
  return gpu::launch(dev, f, Dim3{static_cast<unsigned>(blocks)}, Dim3{static_cast<unsigned>(c.block)}, 0,
                     ctx.stream, &a);
}

Status layer_norm_bwd_gpu(const LayerNormBwdParams& p, const GpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  gpu::DeviceInfo dev;
  TFA_RETURN_IF_ERROR(gpu::device_for_stream(ctx.stream, &dev));
  const int64_t param_bytes = p.cols * dtype_size(p.param_dtype);
  if (p.rows == 0) {
    // Empty batch: parameter gradients are zero (all-zero bits in every dtype).
    if (p.dgamma) TFA_RETURN_IF_ERROR(gpu::memset_zero(dev, p.dgamma, param_bytes, ctx.stream));
    if (p.dbeta) TFA_RETURN_IF_ERROR(gpu::memset_zero(dev, p.dbeta, param_bytes, ctx.stream));
    return Status::OK();
  }
  const Config c = config(p.cols, p.dtype, true);
  const int64_t e = 16 / static_cast<int64_t>(dtype_size(p.dtype));
  const bool aligned = p.cols % e == 0 && rows_aligned16(p.dy, p.dy_row_stride, e) &&
                       rows_aligned16(p.sum, p.sum_row_stride, e) && rows_aligned16(p.dx, p.dx_row_stride, e) &&
                       rows_aligned16(p.dsum, p.dsum_row_stride, e);
  const gpu::KernelVariant v = gpu::layer_norm_variant(p.dtype);
  gpu::CUfunction rows_fn, reduce_fn;
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, v, kernel_name("bwd", c, aligned).c_str(), 0, &rows_fn));
  TFA_RETURN_IF_ERROR(gpu::get_kernel(dev, v, "tfa_layer_norm_bwd_reduce", 0, &reduce_fn));
  const BwdChunks chunks = bwd_chunks(p.rows, p.cols, p.dtype);
  LayerNormBwdParams a = p;  // the kernel's argument (finalize()d by the core)
  a.threads_per_row = c.threads_per_row;
  a.rows_per_chunk = chunks.rows_per_chunk;
  a.chunks = chunks.chunks;
  TFA_RETURN_IF_ERROR(gpu::launch(dev, rows_fn, Dim3{static_cast<unsigned>(chunks.chunks)},
                                  Dim3{static_cast<unsigned>(c.block)}, 0, ctx.stream, &a));
  if (!p.dgamma && !p.dbeta) return Status::OK();
  return gpu::launch(dev, reduce_fn, Dim3{static_cast<unsigned>(ceil_div(p.cols, 256))}, Dim3{256}, 0, ctx.stream,
                     &a);
}

}  // namespace tf_fastattn
