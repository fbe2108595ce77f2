// TfFastattn>Attention and TfFastattn>AttentionGrad: op registration, shape
// functions and the CPU and GPU kernels over the core (csrc/kernels/cpu,
// csrc/runtime). On the GPU the seed stays in host memory, outputs and scratch
// come from TensorFlow's allocator and launches are asynchronous on the op's
// stream.
#include <cmath>
#include <limits>
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "core/attention_checks.h"
#include "tf/attention_attrs.h"
#include "tf/tf_common.h"
#include "tf_fastattn/attention.h"

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

// Shape function shared by both ops: checks what can be checked statically and
// returns q, k, v with merged dimensions.
absl::Status attention_shapes(InferenceContext* c, ShapeHandle* q, ShapeHandle* k, ShapeHandle* v) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, k));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, v));
  DimensionHandle d;
  // Batch is shared by all three; S and Nkv by key and value; H by query and key.
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*q, 0), c->Dim(*k, 0), &d));
  TF_RETURN_IF_ERROR(c->Merge(d, c->Dim(*v, 0), &d));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*q, 0, d, q));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*k, 0, d, k));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*v, 0, d, v));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*q, 3), c->Dim(*k, 3), &d));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*q, 3, d, q));
  TF_RETURN_IF_ERROR(c->ReplaceDim(*k, 3, d, k));
  for (int axis : {1, 2}) {
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(*k, axis), c->Dim(*v, axis), &d));
    TF_RETURN_IF_ERROR(c->ReplaceDim(*k, axis, d, k));
    TF_RETURN_IF_ERROR(c->ReplaceDim(*v, axis, d, v));
  }
  return absl::OkStatus();
}

REGISTER_OP("TfFastattn>Attention")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("mask: num_mask * bool")
    .Input("seed: num_seed * int64")
    .Input("query_offset: num_offset * int32")
    .Output("out: T")
    .Output("lse: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("num_mask: int >= 0 = 0")
    .Attr("num_seed: int >= 0 = 0")
    .Attr("num_offset: int >= 0 = 0")
    .Attr("is_causal: bool = false")
    .Attr("window_left: int = -1")
    .Attr("window_right: int = -1")
    .Attr("scale: float = nan")
    .Attr("dropout_rate: float = 0")
    .Attr("logits_soft_cap: float = 0")
    .Attr("scale_bits: int = 0")
    .Attr("dropout_rate_bits: int = 0")
    .Attr("logits_soft_cap_bits: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q, k, v;
      TF_RETURN_IF_ERROR(attention_shapes(c, &q, &k, &v));
      c->set_output(0, c->MakeShape({c->Dim(q, 0), c->Dim(q, 1), c->Dim(q, 2), c->Dim(v, 3)}));
      c->set_output(1, c->MakeShape({c->Dim(q, 0), c->Dim(q, 2), c->Dim(q, 1)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused scaled-dot-product attention (exact, FlashAttention-style).

query [B, T, N, H], key [B, S, Nkv, H], value [B, S, Nkv, Hv], N % Nkv == 0
(query head n reads kv head n / (N / Nkv)). mask: optional bool tensor of rank
<= 4, broadcastable to [B, N, T, S] after left-padding with 1s (True = attend).
seed: optional int64 scalar, required when dropout_rate > 0. query_offset:
optional int32 scalar, 0 when absent: query row t sits at position
t + query_offset among the keys (cached decoding).

  x = scale * q k^T, or logits_soft_cap * tanh(x / logits_soft_cap) when the
      cap is > 0;
  p = softmax(x) over the allowed keys (mask; when is_causal, s <= pos(t) =
      t + query_offset, top-left aligned for offset 0; window_left >= 0:
      s >= pos(t) - window_left; window_right >= 0: s <= pos(t) +
      window_right), dropped out with keep probability 1 - dropout_rate and
      scaled by 1 / (1 - dropout_rate);
  out = p v;  lse = log sum exp over the allowed keys.

A row with no allowed key averages value uniformly over all S keys (as Keras'
large-negative fill does); its lse is +inf. scale = nan means 1/sqrt(H).
lse is float32 (float64 for float64 inputs).
)doc");

REGISTER_OP("TfFastattn>AttentionGrad")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("mask: num_mask * bool")
    .Input("seed: num_seed * int64")
    .Input("query_offset: num_offset * int32")
    .Input("out: T")
    .Input("lse: S")
    .Input("d_out: T")
    .Output("d_query: T")
    .Output("d_key: T")
    .Output("d_value: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("num_mask: int >= 0 = 0")
    .Attr("num_seed: int >= 0 = 0")
    .Attr("num_offset: int >= 0 = 0")
    .Attr("is_causal: bool = false")
    .Attr("window_left: int = -1")
    .Attr("window_right: int = -1")
    .Attr("scale: float = nan")
    .Attr("dropout_rate: float = 0")
    .Attr("logits_soft_cap: float = 0")
    .Attr("scale_bits: int = 0")
    .Attr("dropout_rate_bits: int = 0")
    .Attr("logits_soft_cap_bits: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q, k, v;
      TF_RETURN_IF_ERROR(attention_shapes(c, &q, &k, &v));
      c->set_output(0, q);
      c->set_output(1, k);
      c->set_output(2, v);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of TfFastattn>Attention: d_query, d_key, d_value. Probabilities are
recomputed from lse (nothing T x S is stored); d_key and d_value of a kv head
sum over the query heads of its group. Deterministic.
)doc");

// q [B, T, N, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv]: the core's checks
// (core/attention_checks.h), the same messages as every front end.
absl::Status attention_shape(const Tensor& q, const Tensor& k, const Tensor& v, AttentionShape* s) {
  return to_tf_status(core::attention_shape(dims_of(q), dims_of(k), dims_of(v), s));
}

// The mask, left-padded with 1s to rank 4, must be broadcastable to
// [B, N, T, S]; its element strides are 0 on broadcast axes.
absl::Status mask_view(const Tensor& mask, const AttentionShape& s, const bool** data, MaskStrides* strides) {
  TF_RETURN_IF_ERROR(to_tf_status(core::dense_mask_strides(dims_of(mask), s, strides)));
  *data = mask.NumElements() ? mask.flat<bool>().data() : nullptr;
  return absl::OkStatus();
}

absl::Status read_query_offset(OpKernelContext* ctx, int index, int64_t* offset) {
  const Tensor& t = ctx->input(index);
  if (t.NumElements() != 1) {
    return invalid_argument("query_offset must be a scalar int32, got shape ", core::dims_string(dims_of(t)));
  }
  *offset = t.flat<int32_t>()(0);
  return absl::OkStatus();
}

absl::Status read_seed(OpKernelContext* ctx, int index, uint64_t* seed) {
  const Tensor& t = ctx->input(index);
  if (t.NumElements() != 1) {
    return invalid_argument("seed must be a scalar int64, got shape ", core::dims_string(dims_of(t)));
  }
  *seed = static_cast<uint64_t>(t.flat<int64_t>()(0));
  return absl::OkStatus();
}

// Input indices: query 0, key 1, value 2, then num_mask masks, num_seed
// seeds, num_offset query offsets, then (backward) out, lse, d_out.
template <class Device>
class AttentionOp : public OpKernel {
 public:
  explicit AttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    AttentionFwdParams p;
    OP_REQUIRES_OK(ctx, attention_shape(q, k, v, &p.shape));
    OP_REQUIRES_OK(ctx, check_stats_dtype("lse", q.dtype(), ctx->expected_output_dtype(1)));
    if (attrs_.num_mask) OP_REQUIRES_OK(ctx, mask_view(ctx->input(3), p.shape, &p.mask, &p.mask_strides));
    if (attrs_.num_seed) OP_REQUIRES_OK(ctx, read_seed(ctx, 3 + attrs_.num_mask, &p.seed));
    if (attrs_.num_offset) {
      OP_REQUIRES_OK(ctx, read_query_offset(ctx, 3 + attrs_.num_mask + attrs_.num_seed, &p.query_offset));
    }
    const AttentionShape& s = p.shape;
    Tensor *o, *lse;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({s.batch, s.seqlen_q, s.num_heads, s.head_dim_v}), &o));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({s.batch, s.num_heads, s.seqlen_q}), &lse));
    p.dtype = to_dtype(q.dtype());
    p.q = ptr(q);
    p.k = ptr(k);
    p.v = ptr(v);
    p.o = mutable_ptr(o);
    p.lse = mutable_ptr(lse);
    attrs_.fill(&p);
    TFA_OP_REQUIRES_OK(ctx, core::attention_fwd(p, exec_context<Device>(ctx)));
  }

 private:
  AttentionAttrs attrs_;
};

template <class Device>
class AttentionGradOp : public OpKernel {
 public:
  explicit AttentionGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const int rest = 3 + attrs_.num_mask + attrs_.num_seed + attrs_.num_offset;
    const Tensor& o = ctx->input(rest);
    const Tensor& lse = ctx->input(rest + 1);
    const Tensor& d_o = ctx->input(rest + 2);
    AttentionBwdParams p;
    OP_REQUIRES_OK(ctx, attention_shape(q, k, v, &p.shape));
    const AttentionShape& s = p.shape;
    TFA_OP_REQUIRES_OK(ctx, core::attention_bwd_inputs(dims_of(o), dims_of(lse), dims_of(d_o), s));
    OP_REQUIRES_OK(ctx, check_stats_dtype("lse", q.dtype(), lse.dtype()));
    if (attrs_.num_mask) OP_REQUIRES_OK(ctx, mask_view(ctx->input(3), s, &p.mask, &p.mask_strides));
    if (attrs_.num_seed) OP_REQUIRES_OK(ctx, read_seed(ctx, 3 + attrs_.num_mask, &p.seed));
    if (attrs_.num_offset) {
      OP_REQUIRES_OK(ctx, read_query_offset(ctx, 3 + attrs_.num_mask + attrs_.num_seed, &p.query_offset));
    }

    Tensor *dq, *dk, *dv;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, k.shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &dv));
    p.dtype = to_dtype(q.dtype());
    p.q = ptr(q);
    p.k = ptr(k);
    p.v = ptr(v);
    p.o = ptr(o);
    p.lse = ptr(lse);
    p.do_ = ptr(d_o);
    p.dq = mutable_ptr(dq);
    p.dk = mutable_ptr(dk);
    p.dv = mutable_ptr(dv);
    attrs_.fill(&p);
    const core::ExecContext exec = exec_context<Device>(ctx);
    Tensor workspace;
    const int64_t ws_bytes = core::attention_bwd_workspace_bytes(s, p.dtype, exec);
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tfw::DT_INT8, TensorShape({ws_bytes}), &workspace));
    p.workspace = mutable_ptr(&workspace);
    TFA_OP_REQUIRES_OK(ctx, core::attention_bwd(p, exec));
  }

 private:
  AttentionAttrs attrs_;
};

REGISTER_KERNEL_BUILDER(Name("TfFastattn>Attention").Device(tfw::DEVICE_CPU), AttentionOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfFastattn>AttentionGrad").Device(tfw::DEVICE_CPU), AttentionGradOp<CpuDevice>);
// GPU: compiled with NVRTC at first use; not yet run on a GPU. The seed and
// the query offset are host scalars (they become kernel arguments); float64
// stays on the CPU kernel.
#define TFA_REGISTER_ATTENTION_GPU(T)                                           \
  REGISTER_KERNEL_BUILDER(Name("TfFastattn>Attention")                          \
                              .Device(tfw::DEVICE_GPU)                          \
                              .TypeConstraint<T>("T")                           \
                              .HostMemory("seed")                               \
                              .HostMemory("query_offset"),                      \
                          AttentionOp<GpuDevice>);                              \
  REGISTER_KERNEL_BUILDER(Name("TfFastattn>AttentionGrad")                      \
                              .Device(tfw::DEVICE_GPU)                          \
                              .TypeConstraint<T>("T")                           \
                              .HostMemory("seed")                               \
                              .HostMemory("query_offset"),                      \
                          AttentionGradOp<GpuDevice>);
TFA_REGISTER_ATTENTION_GPU(Eigen::half)
TFA_REGISTER_ATTENTION_GPU(tfw::bfloat16)
TFA_REGISTER_ATTENTION_GPU(float)
#undef TFA_REGISTER_ATTENTION_GPU

}  // namespace
}  // namespace tf
}  // namespace tf_fastattn
