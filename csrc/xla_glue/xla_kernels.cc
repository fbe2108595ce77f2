// XLA kernels of the four ops: under XLA (jit_compile=True) each op becomes a
// typed-FFI custom call (custom_calls.h) that runs the same core entry point
// as the TensorFlow kernels, instead of being refused. Built as its own
// library (_tf_fastattn_xla.so): when it cannot load (a TensorFlow without
// these XLA symbols), the op library still works and XLA gets the reference
// math. `tf_fastattn_xla_register()` (called by the Python loader after the
// op library is loaded) registers everything in an order that works whether
// or not XLA has compiled anything in this process yet.
#include <cstdio>
#include <string>
#include <vector>

#include "core/attention_checks.h"
#include "core/dispatch.h"
#include "core/layer_norm_checks.h"
#include "tensorflow/compiler/tf2xla/type_util.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/op.h"
#include "tf/attention_attrs.h"
#include "tf/layer_norm_attrs.h"
#include "tf/tf_common.h"
#include "xla_glue/custom_calls.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/shape_util.h"

namespace xla {
namespace ffi {
const XLA_FFI_Api* GetXlaFfiApi();  // xla/ffi/ffi_api.h (libtensorflow_framework)
}  // namespace ffi
}  // namespace xla

namespace tf_fastattn {
namespace xla_glue {
namespace {

namespace tfw = ::tensorflow;
using tf::AttentionAttrs;
using tf::invalid_argument;
using tf::to_tf_status;
using tfw::OpKernelConstruction;
using tfw::XlaOpKernel;
using tfw::XlaOpKernelContext;

const char* const kOps[] = {"TfFastattn>Attention", "TfFastattn>AttentionGrad", "TfFastattn>LayerNorm",
                            "TfFastattn>LayerNormGrad"};

// ---- building the custom call ------------------------------------------------

core::Dims dims_of(const xla::Shape& s) {
  return core::Dims::from(static_cast<int>(s.dimensions().size()), [&](int i) { return s.dimensions(i); });
}

// The dense row-major layout the handlers read.
xla::Shape dense(xla::PrimitiveType t, absl::Span<const int64_t> dims) {
  return xla::ShapeUtil::MakeShapeWithDescendingLayout(t, dims);
}

// The shape of input i (static under XLA), dense.
absl::Status input_shape(XlaOpKernelContext* ctx, int i, xla::Shape* out) {
  TF_ASSIGN_OR_RETURN(const xla::Shape s, ctx->InputXlaShape(i));
  if (s.is_dynamic()) {
    return invalid_argument(ctx->op_kernel().type_string(), ": input ", i,
                            " has a dynamic shape; the fused op under XLA needs static shapes");
  }
  *out = dense(s.element_type(), s.dimensions());
  return absl::OkStatus();
}

// An MLIR dictionary entry. Floats carry a decimal point and their exact
// float64 value (%.17e round-trips).
std::string attr(const char* name, bool v) { return std::string(name) + " = " + (v ? "true" : "false"); }
std::string attr(const char* name, int64_t v) { return std::string(name) + " = " + std::to_string(v) + " : i64"; }
std::string attr(const char* name, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17e : f64", v);
  return std::string(name) + " = " + buf;
}
std::string dictionary(const std::vector<std::string>& entries) {
  std::string s = "{";
  for (size_t i = 0; i < entries.size(); ++i) s += (i ? ", " : "") + entries[i];
  return s + "}";
}

// The backend an XLA kernel compiles for (its workspace size depends on it).
core::ExecContext exec_for(OpKernelConstruction* ctx) {
  core::ExecContext e;
  if (ctx->device_type().type_string() == tfw::DEVICE_GPU_XLA_JIT) e.backend = core::Backend::kGpu;
  return e;
}

// One typed-FFI custom call with `operands` (their shapes in `operand_shapes`)
// returning a tuple of `results`; returns its elements.
std::vector<xla::XlaOp> custom_call(XlaOpKernelContext* ctx, const char* target,
                                    const std::vector<xla::XlaOp>& operands,
                                    const std::vector<xla::Shape>& operand_shapes,
                                    const std::vector<xla::Shape>& results, const std::string& config) {
  xla::XlaBuilder* b = ctx->builder();
  const xla::XlaOp call = xla::CustomCallWithLayout(
      b, target, operands, xla::ShapeUtil::MakeTupleShape(results), operand_shapes, config,
      /*has_side_effect=*/false, /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE, xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  std::vector<xla::XlaOp> out;
  for (size_t i = 0; i < results.size(); ++i) out.push_back(xla::GetTupleElement(call, static_cast<int64_t>(i)));
  return out;
}

// Appends inputs [begin, end) and their dense shapes.
absl::Status add_inputs(XlaOpKernelContext* ctx, int begin, int end, std::vector<xla::XlaOp>* ops,
                        std::vector<xla::Shape>* shapes) {
  for (int i = begin; i < end; ++i) {
    xla::Shape sh;
    TF_RETURN_IF_ERROR(input_shape(ctx, i, &sh));
    ops->push_back(ctx->Input(i));
    shapes->push_back(sh);
  }
  return absl::OkStatus();
}

// ---- attention ---------------------------------------------------------------

// q, k, v, [mask], [seed], [query_offset]: operands, shapes and the checked
// AttentionShape.
absl::Status attention_operands(XlaOpKernelContext* ctx, const AttentionAttrs& a, std::vector<xla::XlaOp>* ops,
                                std::vector<xla::Shape>* shapes, AttentionShape* s) {
  TF_RETURN_IF_ERROR(add_inputs(ctx, 0, 3 + a.num_mask + a.num_seed + a.num_offset, ops, shapes));
  TF_RETURN_IF_ERROR(to_tf_status(core::attention_shape(dims_of((*shapes)[0]), dims_of((*shapes)[1]),
                                                        dims_of((*shapes)[2]), s)));
  MaskStrides unused;
  if (a.num_mask) TF_RETURN_IF_ERROR(to_tf_status(core::dense_mask_strides(dims_of((*shapes)[3]), *s, &unused)));
  if (a.num_seed && xla::ShapeUtil::ElementsIn((*shapes)[3 + a.num_mask]) != 1) {
    return invalid_argument("seed must be a scalar int64, got shape ",
                            core::dims_string(dims_of((*shapes)[3 + a.num_mask])));
  }
  const int offset_at = 3 + a.num_mask + a.num_seed;
  if (a.num_offset && xla::ShapeUtil::ElementsIn((*shapes)[offset_at]) != 1) {
    return invalid_argument("query_offset must be a scalar int32, got shape ",
                            core::dims_string(dims_of((*shapes)[offset_at])));
  }
  return absl::OkStatus();
}

std::string attention_config(const AttentionAttrs& a, const AttentionShape& s) {
  return dictionary({attr("is_causal", a.is_causal), attr("has_mask", a.num_mask == 1),
                     attr("has_seed", a.num_seed == 1), attr("has_offset", a.num_offset == 1),
                     attr("window_left", a.window_left), attr("window_right", a.window_right),
                     attr("scale", a.resolved_scale(s.head_dim)), attr("dropout_rate", a.dropout_rate),
                     attr("logits_soft_cap", a.logits_soft_cap)});
}

class AttentionXla : public XlaOpKernel {
 public:
  explicit AttentionXla(OpKernelConstruction* ctx) : XlaOpKernel(ctx), attrs_(ctx) {}

  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<xla::XlaOp> ops;
    std::vector<xla::Shape> shapes;
    AttentionShape s;
    OP_REQUIRES_OK(ctx, attention_operands(ctx, attrs_, &ops, &shapes, &s));
    OP_REQUIRES_OK(ctx, tf::check_stats_dtype("lse", ctx->input_type(0), ctx->expected_output_dtype(1)));
    xla::PrimitiveType t, st;
    OP_REQUIRES_OK(ctx, tfw::DataTypeToPrimitiveType(ctx->input_type(0), &t));
    OP_REQUIRES_OK(ctx, tfw::DataTypeToPrimitiveType(ctx->expected_output_dtype(1), &st));
    const std::vector<xla::XlaOp> out =
        custom_call(ctx, kAttentionFwd, ops, shapes,
                    {dense(t, {s.batch, s.seqlen_q, s.num_heads, s.head_dim_v}),
                     dense(st, {s.batch, s.num_heads, s.seqlen_q})},
                    attention_config(attrs_, s));
    ctx->SetOutput(0, out[0]);
    ctx->SetOutput(1, out[1]);
  }

 private:
  AttentionAttrs attrs_;
};

class AttentionGradXla : public XlaOpKernel {
 public:
  explicit AttentionGradXla(OpKernelConstruction* ctx) : XlaOpKernel(ctx), attrs_(ctx), exec_(exec_for(ctx)) {}

  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<xla::XlaOp> ops;
    std::vector<xla::Shape> shapes;
    AttentionShape s;
    OP_REQUIRES_OK(ctx, attention_operands(ctx, attrs_, &ops, &shapes, &s));
    const int rest = 3 + attrs_.num_mask + attrs_.num_seed + attrs_.num_offset;
    OP_REQUIRES_OK(ctx, add_inputs(ctx, rest, rest + 3, &ops, &shapes));
    OP_REQUIRES_OK(ctx, to_tf_status(core::attention_bwd_inputs(dims_of(shapes[rest]), dims_of(shapes[rest + 1]),
                                                                dims_of(shapes[rest + 2]), s)));
    OP_REQUIRES_OK(ctx, tf::check_stats_dtype("lse", ctx->input_type(0), ctx->input_type(rest + 1)));
    const DType dtype = tf::to_dtype(ctx->input_type(0));
    const int64_t ws = core::attention_bwd_workspace_bytes(s, dtype, exec_);
    const std::vector<xla::XlaOp> out =
        custom_call(ctx, kAttentionBwd, ops, shapes,
                    {shapes[0], shapes[1], shapes[2], dense(xla::U8, {ws})}, attention_config(attrs_, s));
    for (int i = 0; i < 3; ++i) ctx->SetOutput(i, out[i]);
  }

 private:
  AttentionAttrs attrs_;
  core::ExecContext exec_;
};

// ---- layer norm --------------------------------------------------------------

class LayerNormXla : public XlaOpKernel {
 public:
  explicit LayerNormXla(OpKernelConstruction* ctx) : XlaOpKernel(ctx), attrs_(ctx) {}

  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<xla::XlaOp> ops;
    std::vector<xla::Shape> shapes;
    OP_REQUIRES_OK(ctx, add_inputs(ctx, 0, 3 + attrs_.num_residual, &ops, &shapes));
    const int nr = attrs_.num_residual;
    const core::Dims residual = nr ? dims_of(shapes[1]) : core::Dims();
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(ctx, to_tf_status(core::layer_norm_fwd_inputs(dims_of(shapes[0]), nr ? &residual : nullptr,
                                                                 dims_of(shapes[1 + nr]), dims_of(shapes[2 + nr]),
                                                                 attrs_.center, attrs_.scale, &rows, &cols)));
    OP_REQUIRES_OK(ctx, tf::check_stats_dtype("statistics", ctx->input_type(0), ctx->expected_output_dtype(2)));
    xla::PrimitiveType st;
    OP_REQUIRES_OK(ctx, tfw::DataTypeToPrimitiveType(ctx->expected_output_dtype(2), &st));
    const absl::Span<const int64_t> dims = shapes[0].dimensions();
    const xla::Shape stats = dense(st, dims.subspan(0, dims.size() - 1));
    std::vector<xla::Shape> results = {shapes[0]};
    if (nr) results.push_back(shapes[0]);
    results.push_back(stats);
    results.push_back(stats);
    const std::string config =
        dictionary({attr("epsilon", attrs_.epsilon), attr("has_residual", nr == 1), attr("center", attrs_.center),
                    attr("scale", attrs_.scale), attr("norm_kind", int64_t(attrs_.norm_kind))});
    const std::vector<xla::XlaOp> out = custom_call(ctx, kLayerNormFwd, ops, shapes, results, config);
    size_t r = 0;
    ctx->SetOutput(0, out[r++]);
    ctx->SetOutput(1, nr ? out[r++] : ctx->Input(0));  // s = x without a residual
    ctx->SetOutput(2, out[r++]);
    ctx->SetOutput(3, out[r++]);
  }

 private:
  tf::LayerNormAttrs attrs_;
};

class LayerNormGradXla : public XlaOpKernel {
 public:
  explicit LayerNormGradXla(OpKernelConstruction* ctx) : XlaOpKernel(ctx), attrs_(ctx), exec_(exec_for(ctx)) {}

  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<xla::XlaOp> ops;
    std::vector<xla::Shape> shapes;
    OP_REQUIRES_OK(ctx, add_inputs(ctx, 0, 5 + attrs_.num_dsum, &ops, &shapes));
    const core::Dims dsum = attrs_.num_dsum ? dims_of(shapes[5]) : core::Dims();
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(ctx, to_tf_status(core::layer_norm_bwd_inputs(
                            dims_of(shapes[0]), dims_of(shapes[1]), attrs_.num_dsum ? &dsum : nullptr,
                            dims_of(shapes[2]), dims_of(shapes[3]), dims_of(shapes[4]), attrs_.scale, &rows, &cols)));
    OP_REQUIRES_OK(ctx, tf::check_stats_dtype("statistics", ctx->input_type(0), ctx->input_type(2)));
    xla::PrimitiveType u;
    OP_REQUIRES_OK(ctx, tfw::DataTypeToPrimitiveType(ctx->input_type(4), &u));
    const DType dtype = tf::to_dtype(ctx->input_type(0));
    const int64_t ws = core::layer_norm_bwd_workspace_bytes(rows, cols, dtype, exec_);
    const std::string config = dictionary({attr("has_dsum", attrs_.num_dsum == 1), attr("center", attrs_.center),
                                           attr("scale", attrs_.scale), attr("norm_kind", int64_t(attrs_.norm_kind))});
    const std::vector<xla::XlaOp> out = custom_call(
        ctx, kLayerNormBwd, ops, shapes,
        {shapes[0], dense(u, {attrs_.scale ? cols : 0}), dense(u, {attrs_.center ? cols : 0}), dense(xla::U8, {ws})},
        config);
    for (int i = 0; i < 3; ++i) ctx->SetOutput(i, out[i]);
  }

 private:
  tf::LayerNormGradAttrs attrs_;
  core::ExecContext exec_;
};

// ---- registration --------------------------------------------------------------

using Factory = tfw::OpKernel* (*)(OpKernelConstruction*);
template <class K>
tfw::OpKernel* create(OpKernelConstruction* c) {
  return new K(c);
}
const Factory kFactories[] = {create<AttentionXla>, create<AttentionGradXla>, create<LayerNormXla>,
                              create<LayerNormGradXla>};

// float64 runs on the CPU only (the GPU kernels have no float64 variant).
std::vector<tfw::DataType> types_for(const std::string& device) {
  if (device == tfw::DEVICE_GPU_XLA_JIT) return {tfw::DT_HALF, tfw::DT_BFLOAT16, tfw::DT_FLOAT};
  return {tfw::DT_HALF, tfw::DT_BFLOAT16, tfw::DT_FLOAT, tfw::DT_DOUBLE};
}

// (The description text, not the KernelList proto: protobuf objects do not
// cross into TensorFlow's libraries safely from an out-of-tree build.)
bool has_kernel(const char* op, const std::string& device) {
  return tfw::KernelsRegisteredForOp(op).find("device='" + device + "'") != std::string::npos;
}

std::string missing_op() {
  for (const char* op : kOps) {
    const tfw::OpRegistrationData* data = nullptr;
    if (!tfw::OpRegistry::Global()->LookUp(op, &data).ok()) {
      return std::string("op ") + op + " is not registered: load the op library (_tf_fastattn_ops.so) first";
    }
  }
  return "";
}

// Runs once, after the ops are registered.
std::string register_all() {
  // The backends the XLA kernels go to: those of this TensorFlow build.
  std::vector<std::string> devices;
  for (const std::string& d : tfw::XlaOpRegistry::BackendNames()) {
    if (d == tfw::DEVICE_CPU_XLA_JIT || d == tfw::DEVICE_GPU_XLA_JIT) devices.push_back(d);
  }
  if (devices.empty()) return "this TensorFlow has no XLA CPU or GPU backend";
  // Handlers first: an XLA kernel must never emit a call nobody serves. The
  // CPU's must register; the GPU's may fail where XLA has no CUDA platform.
  const XLA_FFI_Api* api = xla::ffi::GetXlaFfiApi();
  const std::string host_failures = register_ffi_handlers(api, "Host");
  if (!host_failures.empty()) return "registering the XLA FFI handlers failed: " + host_failures;
  const std::string ffi_failures = register_ffi_handlers(api, "CUDA");

  for (size_t i = 0; i < std::size(kOps); ++i) {
    for (const std::string& d : devices) {
      new tfw::XlaOpRegistrar(
          tfw::XlaOpRegistrationBuilder::Name(kOps[i]).Device(d).TypeConstraint("T", types_for(d)).Build(kFactories[i]));
    }
  }
  // XLA turns its registrations into kernels once per process, at its first
  // compilation: now, if it has not compiled anything yet. Otherwise that
  // already happened without these ops, and their kernels are registered here
  // the same way (op, device, T constraint; class name "XlaJitOp").
  tfw::XlaOpRegistry::RegisterCompilationKernels();
  for (size_t i = 0; i < std::size(kOps); ++i) {
    for (const std::string& d : devices) {
      if (has_kernel(kOps[i], d)) continue;
      auto* def = new tfw::KernelDef;
      def->set_op(kOps[i]);
      def->set_device_type(d);
      auto* constraint = def->add_constraint();
      constraint->set_name("T");
      for (tfw::DataType t : types_for(d)) constraint->mutable_allowed_values()->mutable_list()->add_type(t);
      new tfw::kernel_factory::OpKernelRegistrar(def, "XlaJitOp", kFactories[i]);
    }
  }
  for (const char* op : kOps) {
    for (const std::string& d : devices) {
      if (!has_kernel(op, d)) return std::string("no XLA kernel for ") + op + " on " + d + " after registration";
    }
  }
  return ffi_failures.empty() ? "" : "GPU custom calls unavailable: " + ffi_failures;
}

}  // namespace
}  // namespace xla_glue
}  // namespace tf_fastattn

// Registers the XLA kernels and custom-call handlers, once per process.
// Returns "" when XLA can run the fused ops, otherwise why not (a message
// starting with "GPU custom calls unavailable" leaves the CPU path working).
extern "C" __attribute__((visibility("default"))) const char* tf_fastattn_xla_register() {
  // Without the ops nothing is registered (XLA would fail on registrations of
  // unknown ops), and a later call may still succeed.
  static std::string* missing = new std::string;
  *missing = tf_fastattn::xla_glue::missing_op();
  if (!missing->empty()) return missing->c_str();
  static const std::string* result = new std::string(tf_fastattn::xla_glue::register_all());
  return result->c_str();
}
