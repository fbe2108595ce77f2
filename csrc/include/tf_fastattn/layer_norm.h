// Fused residual-add + layer normalization over the last axis.
//
// Forward, per row r of a [rows, cols] view:
//   s    = x + residual                 (residual optional)
//   mean = sum(s) / cols
//   rstd = 1 / sqrt(sum((s - mean)^2) / cols + epsilon)
//   y    = (s - mean) * rstd * gamma + beta     (gamma if scale, beta if center)
// Statistics are accumulated and saved in float32 (float64 for float64 input).
// The rows of x, residual, y, sum, dy, dsum and dx may lie any number of
// elements apart (the params' *_row_stride; unset means cols, contiguous) with
// each row's columns contiguous, e.g. x[:, :C] of a wider array; mean and rstd
// are contiguous.
//
// norm_kind (NormKind, layer_norm_params.h) selects two RMS variants, both
// without beta:
//   kRmsNorm     mean = 0: rstd = 1 / sqrt(sum(s^2) / cols + epsilon),
//                y = s * rstd * gamma (RMS norm: Llama, Keras' RMSNormalization;
//                Gemma's with gamma = 1 + scale)
//   kRmsScaling  mean and rstd as the layer norm's, y = s * rstd * gamma
//                (Keras' LayerNormalization(rms_scaling=True))
//
// Backward, with xhat = (s - mean) * rstd, u = s * rstd for kRmsScaling
// (xhat otherwise), g = dy * gamma, c = 1 for the layer norm (0 for the RMS kinds):
//   ds     = rstd * (g - c mean(g) - xhat * mean(g * u)) + dsum
//   dgamma = sum_rows(dy * u),  dbeta = sum_rows(dy)
// dx and dresidual both equal ds. dgamma/dbeta use a two-stage reduction over
// fixed row chunks, so results do not depend on the thread count.
#pragma once

#include "tf_fastattn/common.h"
#include "tf_fastattn/layer_norm_params.h"

namespace tf_fastattn {

// Checks sizes, dtypes, pointers and output row strides (csrc/core/validate.cc,
// for every backend). Kernels assume a validated, finalize()d params struct.
Status validate(const LayerNormFwdParams& p);
Status validate(const LayerNormBwdParams& p);

// Scratch the backward needs for the deterministic dgamma/dbeta reduction.
int64_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols, DType dtype);

// CPU kernels: validate, then compute with ctx.parallel_for over row chunks.
Status layer_norm_fwd_cpu(const LayerNormFwdParams& p, const CpuContext& ctx);
Status layer_norm_bwd_cpu(const LayerNormBwdParams& p, const CpuContext& ctx);

}  // namespace tf_fastattn
