// The attributes of TfFastattn>Attention and TfFastattn>AttentionGrad, read
// and checked once for the TensorFlow kernels (csrc/tf) and the XLA kernels
// (csrc/xla_glue).
#pragma once

#include <cmath>

#include "tensorflow/core/framework/op_kernel.h"
#include "tf/tf_common.h"

namespace tf_fastattn {
namespace tf {

// Attributes shared by the forward and the backward kernel.
struct AttentionAttrs {
  int num_mask = 0;
  int num_seed = 0;
  bool is_causal = false;
  double scale = 0;         // nan: 1/sqrt(H)
  double dropout_rate = 0;  // both exact: see get_exact_attr

  explicit AttentionAttrs(tfw::OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_mask", &num_mask));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_seed", &num_seed));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("is_causal", &is_causal));
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "scale", &scale));
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "dropout_rate", &dropout_rate));
    OP_REQUIRES(ctx, num_mask <= 1, invalid_argument("num_mask must be 0 or 1, got ", num_mask));
    OP_REQUIRES(ctx, num_seed <= 1, invalid_argument("num_seed must be 0 or 1, got ", num_seed));
    // nan selects the default; any other non-finite scale is an error.
    OP_REQUIRES(ctx, std::isnan(scale) || std::isfinite(scale),
                invalid_argument("scale must be finite, got ", scale));
    OP_REQUIRES(ctx, dropout_rate >= 0 && dropout_rate < 1,
                invalid_argument("dropout_rate must be in [0, 1), got ", dropout_rate));
    OP_REQUIRES(ctx, dropout_rate == 0 || num_seed == 1,
                invalid_argument("dropout_rate > 0 needs a seed input, got none"));
  }

  // The scale the kernel uses: 1/sqrt(H) in double precision by default.
  double resolved_scale(int64_t head_dim) const {
    if (std::isnan(scale)) return 1.0 / std::sqrt(static_cast<double>(head_dim > 0 ? head_dim : 1));
    return scale;
  }
};

}  // namespace tf
}  // namespace tf_fastattn
