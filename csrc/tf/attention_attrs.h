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
  int num_offset = 0;  // query_offset given as an input (a scalar int32)
  bool is_causal = false;
  int64_t window_left = -1, window_right = -1;
  double scale = 0;            // nan: 1/sqrt(H)
  double dropout_rate = 0;     // exact: see get_exact_attr
  double logits_soft_cap = 0;  // exact; 0: off

  explicit AttentionAttrs(tfw::OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_mask", &num_mask));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_seed", &num_seed));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_offset", &num_offset));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("is_causal", &is_causal));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("window_left", &window_left));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("window_right", &window_right));
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "scale", &scale));
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "dropout_rate", &dropout_rate));
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "logits_soft_cap", &logits_soft_cap));
    OP_REQUIRES(ctx, num_mask <= 1, invalid_argument("num_mask must be 0 or 1, got ", num_mask));
    OP_REQUIRES(ctx, num_seed <= 1, invalid_argument("num_seed must be 0 or 1, got ", num_seed));
    OP_REQUIRES(ctx, num_offset <= 1, invalid_argument("num_offset must be 0 or 1, got ", num_offset));
    OP_REQUIRES(ctx, window_left >= -1 && window_right >= -1,
                invalid_argument("window_left and window_right must be >= 0, or -1 for no bound, got (",
                                 window_left, ", ", window_right, ")"));
    OP_REQUIRES(ctx, logits_soft_cap >= 0 && std::isfinite(logits_soft_cap),
                invalid_argument("logits_soft_cap must be a finite number >= 0 (0 = off), got ", logits_soft_cap));
    // nan selects the default; any other non-finite scale is an error.
    OP_REQUIRES(ctx, std::isnan(scale) || std::isfinite(scale),
                invalid_argument("scale must be finite, got ", scale));
    OP_REQUIRES(ctx, dropout_rate >= 0 && dropout_rate < 1,
                invalid_argument("dropout_rate must be in [0, 1), got ", dropout_rate));
    OP_REQUIRES(ctx, dropout_rate == 0 || num_seed == 1,
                invalid_argument("dropout_rate > 0 needs a seed input, got none"));
  }

  // The options every front end fills the same way (the offset comes from
  // the query_offset input, when there is one).
  void fill(AttentionParams* p) const {
    p->scale = resolved_scale(p->shape.head_dim);
    p->is_causal = is_causal;
    p->window_left = window_left;
    p->window_right = window_right;
    p->logits_soft_cap = logits_soft_cap;
    p->dropout_rate = dropout_rate;
  }

  // The scale the kernel uses: 1/sqrt(H) in double precision by default.
  double resolved_scale(int64_t head_dim) const {
    if (std::isnan(scale)) return 1.0 / std::sqrt(static_cast<double>(head_dim > 0 ? head_dim : 1));
    return scale;
  }
};

}  // namespace tf
}  // namespace tf_fastattn
