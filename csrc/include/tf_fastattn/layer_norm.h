// Fused residual-add + layer normalization over the last axis.
//
// Forward, per row r of a [rows, cols] view:
//   s    = x + residual                 (residual optional)
//   mean = sum(s) / cols
//   rstd = 1 / sqrt(sum((s - mean)^2) / cols + epsilon)
//   y    = (s - mean) * rstd * gamma + beta     (gamma if scale, beta if center)
// Statistics are accumulated and saved in float32 (float64 for float64 input).
//
// Backward, with xhat = (s - mean) * rstd, g = dy * gamma:
//   ds     = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dsum
//   dgamma = sum_rows(dy * xhat),  dbeta = sum_rows(dy)
// dx and dresidual both equal ds. dgamma/dbeta use a two-stage reduction over
// fixed row chunks, so results do not depend on the thread count.
#pragma once

#include "tf_fastattn/common.h"

namespace tf_fastattn {

struct LayerNormFwdParams {
  DType dtype = DType::kFloat32;        // x, residual, y, sum
  DType param_dtype = DType::kFloat32;  // gamma, beta: float32 or dtype
  int64_t rows = 0;
  int64_t cols = 0;
  const void* x = nullptr;         // [rows, cols], contiguous, in
  const void* residual = nullptr;  // [rows, cols] or null, in
  const void* gamma = nullptr;     // [cols], in; null iff !scale
  const void* beta = nullptr;      // [cols], in; null iff !center
  void* y = nullptr;               // [rows, cols], out
  void* sum = nullptr;             // [rows, cols] x + residual, out; may be null
  void* mean = nullptr;            // [rows] stats_dtype(dtype), out
  void* rstd = nullptr;            // [rows] stats_dtype(dtype), out
  double epsilon = 1e-3;
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
  void* workspace = nullptr;    // layer_norm_bwd_workspace_bytes(rows, cols, dtype) bytes
};

// Checks sizes, dtypes and pointers. Kernels assume a validated params struct.
Status validate(const LayerNormFwdParams& p);
Status validate(const LayerNormBwdParams& p);

// Scratch the backward needs for the deterministic dgamma/dbeta reduction.
int64_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols, DType dtype);

// CPU kernels: validate, then compute with ctx.parallel_for over row chunks.
Status layer_norm_fwd_cpu(const LayerNormFwdParams& p, const CpuContext& ctx);
Status layer_norm_bwd_cpu(const LayerNormBwdParams& p, const CpuContext& ctx);

}  // namespace tf_fastattn
