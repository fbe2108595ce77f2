// TfFastattn>LayerNorm and TfFastattn>LayerNormGrad: op registration, shape
// functions and the CPU and GPU kernels over the core (csrc/kernels/cpu,
// csrc/runtime). On the GPU, outputs and scratch come from TensorFlow's
// allocator and the launch is asynchronous on the op's stream.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "core/layer_norm_checks.h"
#include "tf/layer_norm_attrs.h"
#include "tf/tf_common.h"
#include "tf_fastattn/layer_norm.h"

namespace tf_fastattn {
namespace tf {
namespace {

using tfw::OpKernel;
using tfw::OpKernelConstruction;
using tfw::OpKernelContext;
using tfw::Tensor;
using tfw::TensorShape;
using tfw::shape_inference::DimensionHandle;
using tfw::shape_inference::InferenceContext;
using tfw::shape_inference::ShapeHandle;

// Statistics have the input's shape without its last axis.
absl::Status stats_shape(InferenceContext* c, ShapeHandle x, ShapeHandle* out) {
  if (!c->RankKnown(x)) {
    *out = c->UnknownShape();
    return absl::OkStatus();
  }
  return c->Subshape(x, 0, -1, out);
}

REGISTER_OP("TfFastattn>LayerNorm")
    .Input("x: T")
    .Input("residual: num_residual * T")
    .Input("gamma: U")
    .Input("beta: U")
    .Output("y: T")
    .Output("sum: T")
    .Output("mean: S")
    .Output("rstd: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("num_residual: int >= 0 = 0")
    .Attr("epsilon: float = 0.001")
    .Attr("epsilon_bits: int = 0")
    .Attr("center: bool = true")
    .Attr("scale: bool = true")
    .Attr("norm: {'layer', 'rms', 'rms_scaling'} = 'layer'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x = c->input(0);
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 1, &x));
      int num_residual;
      TF_RETURN_IF_ERROR(c->GetAttr("num_residual", &num_residual));
      for (int i = 0; i < num_residual; ++i) TF_RETURN_IF_ERROR(c->Merge(x, c->input(1 + i), &x));
      ShapeHandle stats;
      TF_RETURN_IF_ERROR(stats_shape(c, x, &stats));
      c->set_output(0, x);
      c->set_output(1, x);
      c->set_output(2, stats);
      c->set_output(3, stats);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused residual-add + layer normalization over the last axis.

s = x + residual (when given); y = (s - mean) * rstd * gamma + beta with
rstd = 1 / sqrt(var(s) + epsilon). gamma is used when `scale`, beta when
`center`; an unused one may be empty. Outputs y, the sum s (x itself without a
residual), and the per-row mean and rstd (float32, float64 for float64 x).
norm = 'rms': RMS norm, mean = 0 (rstd from the mean of squares), y = s *
rstd * gamma; norm = 'rms_scaling': y = s * rstd * gamma with the layer
norm's rstd (Keras' rms_scaling). Both need center = false.
)doc");

REGISTER_OP("TfFastattn>LayerNormGrad")
    .Input("dy: T")
    .Input("sum: T")
    .Input("mean: S")
    .Input("rstd: S")
    .Input("gamma: U")
    .Input("dsum: num_dsum * T")
    .Output("dx: T")
    .Output("dgamma: U")
    .Output("dbeta: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("num_dsum: int >= 0 = 0")
    .Attr("center: bool = true")
    .Attr("scale: bool = true")
    .Attr("norm: {'layer', 'rms', 'rms_scaling'} = 'layer'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x = c->input(0);
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 1, &x));
      TF_RETURN_IF_ERROR(c->Merge(x, c->input(1), &x));
      bool center, scale;
      TF_RETURN_IF_ERROR(c->GetAttr("center", &center));
      TF_RETURN_IF_ERROR(c->GetAttr("scale", &scale));
      DimensionHandle cols = c->Dim(x, -1);
      c->set_output(0, x);
      c->set_output(1, scale ? c->Vector(cols) : c->Vector(0));
      c->set_output(2, center ? c->Vector(cols) : c->Vector(0));
      return absl::OkStatus();
    })
    .Doc("Gradient of TfFastattn>LayerNorm: dx (also the residual's gradient, including dsum), dgamma, dbeta.");

template <class Device>
class LayerNormOp : public OpKernel {
 public:
  explicit LayerNormOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor* residual = attrs_.num_residual ? &ctx->input(1) : nullptr;
    const Tensor& gamma = ctx->input(1 + attrs_.num_residual);
    const Tensor& beta = ctx->input(2 + attrs_.num_residual);
    const core::Dims residual_dims = residual ? dims_of(*residual) : core::Dims();
    int64_t rows = 0, cols = 0;
    TFA_OP_REQUIRES_OK(ctx, core::layer_norm_fwd_inputs(dims_of(x), residual ? &residual_dims : nullptr,
                                                        dims_of(gamma), dims_of(beta), attrs_.center, attrs_.scale,
                                                        &rows, &cols));
    OP_REQUIRES_OK(ctx, check_stats_dtype("statistics", x.dtype(), ctx->expected_output_dtype(2)));

    TensorShape stats_shape = x.shape();
    stats_shape.RemoveLastDims(1);
    Tensor *y, *mean, *rstd;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, stats_shape, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, stats_shape, &rstd));
    Tensor* sum = nullptr;
    if (residual) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, x.shape(), &sum));
    } else {
      ctx->set_output(1, x);  // s = x: forward the input, no copy
    }

    LayerNormFwdParams p;
    p.dtype = to_dtype(x.dtype());
    p.param_dtype = to_dtype(gamma.dtype());
    p.rows = rows;
    p.cols = cols;
    p.x = ptr(x);
    p.residual = residual ? ptr(*residual) : nullptr;
    p.gamma = attrs_.scale ? ptr(gamma) : nullptr;
    p.beta = attrs_.center ? ptr(beta) : nullptr;
    p.y = mutable_ptr(y);
    p.sum = sum ? mutable_ptr(sum) : nullptr;
    p.mean = mutable_ptr(mean);
    p.rstd = mutable_ptr(rstd);
    p.epsilon = attrs_.epsilon;
    p.norm_kind = attrs_.norm_kind;
    TFA_OP_REQUIRES_OK(ctx, core::layer_norm_fwd(p, exec_context<Device>(ctx)));
  }

 private:
  LayerNormAttrs attrs_;
};

template <class Device>
class LayerNormGradOp : public OpKernel {
 public:
  explicit LayerNormGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& sum = ctx->input(1);
    const Tensor& mean = ctx->input(2);
    const Tensor& rstd = ctx->input(3);
    const Tensor& gamma = ctx->input(4);
    const Tensor* dsum = attrs_.num_dsum ? &ctx->input(5) : nullptr;
    const core::Dims dsum_dims = dsum ? dims_of(*dsum) : core::Dims();
    int64_t rows = 0, cols = 0;
    TFA_OP_REQUIRES_OK(ctx, core::layer_norm_bwd_inputs(dims_of(dy), dims_of(sum), dsum ? &dsum_dims : nullptr,
                                                        dims_of(mean), dims_of(rstd), dims_of(gamma), attrs_.scale,
                                                        &rows, &cols));
    OP_REQUIRES_OK(ctx, check_stats_dtype("statistics", dy.dtype(), mean.dtype()));

    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dy.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({attrs_.scale ? cols : 0}), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({attrs_.center ? cols : 0}), &dbeta));

    LayerNormBwdParams p;
    p.dtype = to_dtype(dy.dtype());
    p.param_dtype = to_dtype(gamma.dtype());
    p.rows = rows;
    p.cols = cols;
    p.dy = ptr(dy);
    p.dsum = dsum ? ptr(*dsum) : nullptr;
    p.sum = ptr(sum);
    p.gamma = attrs_.scale ? ptr(gamma) : nullptr;
    p.mean = ptr(mean);
    p.rstd = ptr(rstd);
    p.dx = mutable_ptr(dx);
    p.dgamma = attrs_.scale ? mutable_ptr(dgamma) : nullptr;
    p.dbeta = attrs_.center ? mutable_ptr(dbeta) : nullptr;
    p.norm_kind = attrs_.norm_kind;
    const core::ExecContext exec = exec_context<Device>(ctx);
    Tensor workspace;
    const int64_t ws_bytes = core::layer_norm_bwd_workspace_bytes(rows, cols, p.dtype, exec);
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tfw::DT_INT8, TensorShape({ws_bytes}), &workspace));
    p.workspace = mutable_ptr(&workspace);
    TFA_OP_REQUIRES_OK(ctx, core::layer_norm_bwd(p, exec));
  }

 private:
  LayerNormGradAttrs attrs_;
};

REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNorm").Device(tfw::DEVICE_CPU), LayerNormOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNormGrad").Device(tfw::DEVICE_CPU), LayerNormGradOp<CpuDevice>);
// GPU: compiled with NVRTC at first use; not yet run on a GPU. float64 stays
// on the CPU kernel (TensorFlow places it there).
#define TFA_REGISTER_LAYER_NORM_GPU(T)                                                                     \
  REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNorm").Device(tfw::DEVICE_GPU).TypeConstraint<T>("T"),     \
                          LayerNormOp<GpuDevice>);                                                         \
  REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNormGrad").Device(tfw::DEVICE_GPU).TypeConstraint<T>("T"), \
                          LayerNormGradOp<GpuDevice>);
TFA_REGISTER_LAYER_NORM_GPU(Eigen::half)
TFA_REGISTER_LAYER_NORM_GPU(tfw::bfloat16)
TFA_REGISTER_LAYER_NORM_GPU(float)
#undef TFA_REGISTER_LAYER_NORM_GPU

}  // namespace
}  // namespace tf
}  // namespace tf_fastattn
