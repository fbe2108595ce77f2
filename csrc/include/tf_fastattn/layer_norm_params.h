// The layer norm's params structs, one per direction. POD only, no standard
// headers beyond <cstdint>: the host code (g++) and the CUDA kernels (NVRTC)
// include this same file, and the kernels take these structs as their
// argument.
#pragma once

#include <cstdint>

#include "tf_fastattn/dtype.h"

namespace tf_fastattn {

// What a row is normalised by (layer_norm.h):
//   kLayerNorm   (s - mean) * rstd, rstd from the variance (mean subtracted)
//   kRmsNorm     s * rstd, rstd from the mean of squares (mean = 0): RMS norm
//   kRmsScaling  s * rstd, rstd from the variance: Keras' deprecated
//                LayerNormalization(rms_scaling=True)
enum NormKind : int32_t { kLayerNorm = 0, kRmsNorm = 1, kRmsScaling = 2 };

// An unset (0) row stride means contiguous rows: cols elements apart.
inline void default_row_stride(int64_t* stride, int64_t cols) {
  if (*stride == 0) *stride = cols;
}

struct LayerNormFwdParams {
  DType dtype = DType::kFloat32;        // x, residual, y, sum
  DType param_dtype = DType::kFloat32;  // gamma, beta: float32 or dtype
  int64_t rows = 0;
  int64_t cols = 0;
  const void* x = nullptr;         // [rows, cols], in (rows *_row_stride elements apart)
  const void* residual = nullptr;  // [rows, cols] or null, in
  const void* gamma = nullptr;     // [cols], in; null iff !scale
  const void* beta = nullptr;      // [cols], in; null iff !center
  void* y = nullptr;               // [rows, cols], out
  void* sum = nullptr;             // [rows, cols] x + residual, out; may be null
  void* mean = nullptr;            // [rows] stats_dtype(dtype), out
  void* rstd = nullptr;            // [rows] stats_dtype(dtype), out
  double epsilon = 1e-3;
  // Element strides between rows of x, residual, y and sum (columns are
  // contiguous); 0, the default, means cols: filled by finalize().
  int64_t x_row_stride = 0, residual_row_stride = 0, y_row_stride = 0, sum_row_stride = 0;
  int32_t norm_kind = kLayerNorm;  // NormKind (the RMS kinds take no beta)

  // Derived by finalize(); read by the kernels.
  int32_t param_is_float = 1;  // gamma/beta are float32 (else the input dtype)
  // Launch shape, filled by the GPU launcher: threads normalising one row.
  int32_t threads_per_row = 0;

  void finalize() {
    param_is_float = param_dtype == DType::kFloat32;
    // (an array, not a braced list: NVRTC compiles this header without <initializer_list>)
    int64_t* strides[] = {&x_row_stride, &residual_row_stride, &y_row_stride, &sum_row_stride};
    for (int64_t* s : strides) default_row_stride(s, cols);
  }
};

struct LayerNormBwdParams {
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* dy = nullptr;     // [rows, cols], in
  const void* dsum = nullptr;   // [rows, cols] gradient reaching the sum output, or null
  const void* sum = nullptr;    // [rows, cols] the forward's s = x + residual, in
  const void* gamma = nullptr;  // [cols] or null (scale=False), in
  const void* mean = nullptr;   // [rows] stats_dtype, in
  const void* rstd = nullptr;   // [rows] stats_dtype, in
  void* dx = nullptr;           // [rows, cols] ds (also dresidual), out
  void* dgamma = nullptr;       // [cols] param_dtype, out; may be null
  void* dbeta = nullptr;        // [cols] param_dtype, out; may be null
  void* workspace = nullptr;    // layer_norm_bwd_workspace_bytes(rows, cols, dtype) bytes: the
                                // GPU's dgamma/dbeta partial sums [chunks, 2, cols] stats type
  // Element strides between rows of dy, dsum, sum and dx; 0 means cols.
  int64_t dy_row_stride = 0, dsum_row_stride = 0, sum_row_stride = 0, dx_row_stride = 0;
  int32_t norm_kind = kLayerNorm;  // NormKind, as the forward's

  // Derived by finalize(); read by the kernels.
  int32_t param_is_float = 1;
  // Launch shape, filled by the GPU launcher: row chunks of the dgamma/dbeta
  // reduction (block c sums rows [c * rows_per_chunk, ...) into partial c;
  // the column pass adds the chunks in order: deterministic, no atomics) and
  // threads normalising one row.
  int32_t threads_per_row = 0;
  int64_t rows_per_chunk = 0;
  int64_t chunks = 0;

  void finalize() {
    param_is_float = param_dtype == DType::kFloat32;
    int64_t* strides[] = {&dy_row_stride, &dsum_row_stride, &sum_row_stride, &dx_row_stride};
    for (int64_t* s : strides) default_row_stride(s, cols);
  }
};

// The layout both compilers must produce; both builds check these sizes.
static_assert(sizeof(LayerNormFwdParams) == 144, "LayerNormFwdParams layout");
static_assert(sizeof(LayerNormBwdParams) == 168, "LayerNormBwdParams layout");

}  // namespace tf_fastattn
