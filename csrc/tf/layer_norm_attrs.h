// The attributes of TfFastattn>LayerNorm and TfFastattn>LayerNormGrad, read
// and checked once for the TensorFlow kernels (csrc/tf) and the XLA kernels
// (csrc/xla_glue).
#pragma once

#include "tensorflow/core/framework/op_kernel.h"
#include "tf/tf_common.h"

namespace tf_fastattn {
namespace tf {

// The `norm` attribute ("layer", "rms", "rms_scaling") as a NormKind; the RMS
// kinds take no beta.
inline absl::Status get_norm_kind(tfw::OpKernelConstruction* ctx, bool center, int32_t* kind) {
  std::string norm;
  TF_RETURN_IF_ERROR(ctx->GetAttr("norm", &norm));
  *kind = norm == "rms" ? kRmsNorm : norm == "rms_scaling" ? kRmsScaling : kLayerNorm;
  if (*kind != kLayerNorm && center) {
    return invalid_argument("norm '", norm, "' takes no beta: center must be false");
  }
  return absl::OkStatus();
}

struct LayerNormAttrs {
  double epsilon = 0;  // exact: see get_exact_attr
  bool center = true, scale = true;
  int num_residual = 0;
  int32_t norm_kind = kLayerNorm;

  explicit LayerNormAttrs(tfw::OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, get_exact_attr(ctx, "epsilon", &epsilon));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("center", &center));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_residual", &num_residual));
    OP_REQUIRES_OK(ctx, get_norm_kind(ctx, center, &norm_kind));
    OP_REQUIRES(ctx, num_residual <= 1, invalid_argument("num_residual must be 0 or 1, got ", num_residual));
    OP_REQUIRES(ctx, epsilon > 0, invalid_argument("epsilon must be > 0, got ", epsilon));
  }
};

struct LayerNormGradAttrs {
  bool center = true, scale = true;
  int num_dsum = 0;
  int32_t norm_kind = kLayerNorm;

  explicit LayerNormGradAttrs(tfw::OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("center", &center));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_dsum", &num_dsum));
    OP_REQUIRES_OK(ctx, get_norm_kind(ctx, center, &norm_kind));
    OP_REQUIRES(ctx, num_dsum <= 1, invalid_argument("num_dsum must be 0 or 1, got ", num_dsum));
  }
};

}  // namespace tf
}  // namespace tf_fastattn
