// GPU kernels of TfFastattn>LayerNorm and TfFastattn>LayerNormGrad (the ops
// are registered in layer_norm_op.cc; same inputs, outputs and attributes).
//
// Outputs and scratch come from TensorFlow's allocator; the CUDA kernels run
// on TensorFlow's stream of this op, with no synchronisation and no host
// copies. Compiled without CUDA headers: the stream is an opaque handle.
//
// Status: builds against TF 2.21; not yet run on a GPU.
#include "tf/tf_common.h"
#include "tf_fastattn/gpu.h"
#include "xla/stream_executor/stream.h"

namespace tf_fastattn {
namespace tf {
namespace {

using tfw::OpKernel;
using tfw::OpKernelConstruction;
using tfw::OpKernelContext;
using tfw::Tensor;
using tfw::TensorShape;
using tfw::errors::InvalidArgument;

GpuContext gpu_context(OpKernelContext* ctx) {
  GpuContext g;
  g.stream = ctx->op_device_context()->stream()->platform_specific_handle().stream;
  return g;
}

// Checks also done by the CPU kernels (layer_norm_op.cc); repeated here
// until they move to a header both files share.
tfw::Status check_param(const Tensor& p, const char* name, bool used, int64_t cols) {
  if (used && (p.dims() != 1 || p.dim_size(0) != cols)) {
    return InvalidArgument(name, " must have shape [", cols, "] (the last axis of x), got ", p.shape().DebugString());
  }
  return tfw::OkStatus();
}

tfw::Status check_stats_dtype(tfw::DataType t, tfw::DataType s) {
  if (s != stats_tf_dtype(t)) {
    return InvalidArgument("statistics dtype S must be ", tfw::DataTypeString(stats_tf_dtype(t)), " for ",
                           tfw::DataTypeString(t), " inputs, got ", tfw::DataTypeString(s));
  }
  return tfw::OkStatus();
}

class LayerNormGpuOp : public OpKernel {
 public:
  explicit LayerNormGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("center", &center_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_residual", &num_residual_));
    OP_REQUIRES(ctx, num_residual_ <= 1, InvalidArgument("num_residual must be 0 or 1, got ", num_residual_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() >= 1, InvalidArgument("x must have rank >= 1, got shape ", x.shape().DebugString()));
    const int64_t cols = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, cols >= 1,
                InvalidArgument("the last axis of x must be non-empty, got shape ", x.shape().DebugString()));
    const Tensor* residual = num_residual_ ? &ctx->input(1) : nullptr;
    const Tensor& gamma = ctx->input(1 + num_residual_);
    const Tensor& beta = ctx->input(2 + num_residual_);
    if (residual) {
      OP_REQUIRES(ctx, residual->shape() == x.shape(),
                  InvalidArgument("residual must have the shape of x ", x.shape().DebugString(), ", got ",
                                  residual->shape().DebugString()));
    }
    OP_REQUIRES_OK(ctx, check_param(gamma, "gamma", scale_, cols));
    OP_REQUIRES_OK(ctx, check_param(beta, "beta", center_, cols));
    OP_REQUIRES_OK(ctx, check_stats_dtype(x.dtype(), ctx->expected_output_dtype(2)));
    TensorShape stats_shape = x.shape();
    stats_shape.RemoveLastDims(1);
    Tensor *y, *mean, *rstd, *sum = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, stats_shape, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, stats_shape, &rstd));
    if (residual) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, x.shape(), &sum));
    } else {
      ctx->set_output(1, x);  // s = x: forward the input, no copy
    }
    LayerNormFwdParams p;
    p.dtype = to_dtype(x.dtype());
    p.param_dtype = to_dtype(gamma.dtype());
    p.rows = x.NumElements() / cols;
    p.cols = cols;
    p.x = ptr(x);
    p.residual = residual ? ptr(*residual) : nullptr;
    p.gamma = scale_ ? ptr(gamma) : nullptr;
    p.beta = center_ ? ptr(beta) : nullptr;
    p.y = mutable_ptr(y);
    p.sum = sum ? mutable_ptr(sum) : nullptr;
    p.mean = mutable_ptr(mean);
    p.rstd = mutable_ptr(rstd);
    p.epsilon = epsilon_;
    TFA_OP_REQUIRES_OK(ctx, layer_norm_fwd_gpu(p, gpu_context(ctx)));
  }

 private:
  float epsilon_;
  bool center_, scale_;
  int num_residual_;
};

class LayerNormGradGpuOp : public OpKernel {
 public:
  explicit LayerNormGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("center", &center_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_dsum", &num_dsum_));
    OP_REQUIRES(ctx, num_dsum_ <= 1, InvalidArgument("num_dsum must be 0 or 1, got ", num_dsum_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& sum = ctx->input(1);
    const Tensor& mean = ctx->input(2);
    const Tensor& rstd = ctx->input(3);
    const Tensor& gamma = ctx->input(4);
    const Tensor* dsum = num_dsum_ ? &ctx->input(5) : nullptr;
    OP_REQUIRES(ctx, dy.dims() >= 1, InvalidArgument("dy must have rank >= 1, got shape ", dy.shape().DebugString()));
    OP_REQUIRES(ctx, sum.shape() == dy.shape(),
                InvalidArgument("sum must have the shape of dy ", dy.shape().DebugString(), ", got ",
                                sum.shape().DebugString()));
    if (dsum) {
      OP_REQUIRES(ctx, dsum->shape() == dy.shape(),
                  InvalidArgument("dsum must have the shape of dy ", dy.shape().DebugString(), ", got ",
                                  dsum->shape().DebugString()));
    }
    const int64_t cols = dy.dim_size(dy.dims() - 1);
    OP_REQUIRES(ctx, cols >= 1, InvalidArgument("the last axis of dy must be non-empty"));
    const int64_t rows = dy.NumElements() / cols;
    OP_REQUIRES(ctx, mean.NumElements() == rows && rstd.NumElements() == rows,
                InvalidArgument("mean and rstd must have ", rows, " elements, got ", mean.NumElements(), " and ",
                                rstd.NumElements()));
    OP_REQUIRES_OK(ctx, check_stats_dtype(dy.dtype(), mean.dtype()));
    OP_REQUIRES_OK(ctx, check_param(gamma, "gamma", scale_, cols));
    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dy.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({scale_ ? cols : 0}), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({center_ ? cols : 0}), &dbeta));
    LayerNormBwdParams p;
    p.dtype = to_dtype(dy.dtype());
    p.param_dtype = to_dtype(gamma.dtype());
    p.rows = rows;
    p.cols = cols;
    p.dy = ptr(dy);
    p.dsum = dsum ? ptr(*dsum) : nullptr;
    p.sum = ptr(sum);
    p.gamma = scale_ ? ptr(gamma) : nullptr;
    p.mean = ptr(mean);
    p.rstd = ptr(rstd);
    p.dx = mutable_ptr(dx);
    p.dgamma = scale_ ? mutable_ptr(dgamma) : nullptr;
    p.dbeta = center_ ? mutable_ptr(dbeta) : nullptr;
    Tensor workspace;
    const int64_t ws_bytes = layer_norm_bwd_workspace_bytes_gpu(rows, cols, p.dtype);
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tfw::DT_INT8, TensorShape({ws_bytes}), &workspace));
    p.workspace = mutable_ptr(&workspace);
    TFA_OP_REQUIRES_OK(ctx, layer_norm_bwd_gpu(p, gpu_context(ctx)));
  }

 private:
  bool center_, scale_;
  int num_dsum_;
};

REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNorm").Device(tfw::DEVICE_GPU), LayerNormGpuOp);
REGISTER_KERNEL_BUILDER(Name("TfFastattn>LayerNormGrad").Device(tfw::DEVICE_GPU), LayerNormGradGpuOp);

}  // namespace
}  // namespace tf
}  // namespace tf_fastattn
