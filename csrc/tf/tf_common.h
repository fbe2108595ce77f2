// Glue between TensorFlow OpKernels and the framework-free kernel core.
// This directory is the only place TensorFlow headers appear.
#pragma once

#include <cmath>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/threadpool.h"
#include "core/attention_checks.h"
#include "core/dispatch.h"
#include "tf_fastattn/common.h"
#include "tf_fastattn/gpu.h"
#include "xla/stream_executor/stream.h"

namespace tf_fastattn {
namespace tf {

namespace tfw = ::tensorflow;

inline DType to_dtype(tfw::DataType t) {
  switch (t) {
    case tfw::DT_HALF: return DType::kFloat16;
    case tfw::DT_BFLOAT16: return DType::kBFloat16;
    case tfw::DT_DOUBLE: return DType::kFloat64;
    default: return DType::kFloat32;
  }
}

// A float attribute `name` with its exact float64 value in the int attribute
// `name`_bits (the IEEE-754 binary64 bits; TensorFlow's float attributes hold
// only float32, which made float64 results depend on float32 rounding of
// epsilon, scale and dropout_rate). Bits of 0 mean "absent" (graphs built
// before the attribute existed): the float32 value is used. Otherwise the
// float64 value must round to the float32 one.
inline absl::Status get_exact_attr(tfw::OpKernelConstruction* ctx, const std::string& name, double* out) {
  float f = 0;
  int64_t bits = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, &f));
  TF_RETURN_IF_ERROR(ctx->GetAttr(name + "_bits", &bits));
  if (bits == 0) {
    *out = static_cast<double>(f);
    return absl::OkStatus();
  }
  double d;
  std::memcpy(&d, &bits, sizeof(d));
  const bool same = std::isnan(d) ? std::isnan(f) : static_cast<float>(d) == f;
  if (!same) {
    return absl::InvalidArgumentError(absl::StrCat("attribute ", name, "_bits holds ", d, ", which does not round to ",
                                                   name, " = ", f, " (the two must describe one value)"));
  }
  *out = d;
  return absl::OkStatus();
}

inline tfw::DataType stats_tf_dtype(tfw::DataType t) { return t == tfw::DT_DOUBLE ? tfw::DT_DOUBLE : tfw::DT_FLOAT; }

// TensorFlow's intra-op CPU pool as the core's parallel-for.
inline CpuContext cpu_context(tfw::OpKernelContext* ctx) {
  tfw::thread::ThreadPool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  CpuContext c;
  c.num_threads = pool->NumThreads();
  c.parallel_for = [pool](int64_t total, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
    if (total <= 0) return;
    FirstException failed;
    pool->ParallelFor(total, tfw::thread::ThreadPool::SchedulingParams::Adaptive(cost),
                      [&fn, &failed](int64_t b, int64_t e) { failed.run([&] { fn(b, e); }); });
    failed.rethrow();
  };
  return c;
}

// The CUDA stream TensorFlow runs this op on (an opaque handle: no CUDA
// headers are needed to get it).
inline GpuContext gpu_context(tfw::OpKernelContext* ctx) {
  GpuContext g;
  g.stream = ctx->op_device_context()->stream()->platform_specific_handle().stream;
  return g;
}

// Device tags: each OpKernel is a template over the device and calls the
// core's CPU or GPU launcher; validation, allocation and params are shared.
struct CpuDevice {
  static constexpr bool kGpu = false;
};
struct GpuDevice {
  static constexpr bool kGpu = true;
};

// The core's execution context for an op kernel on Device.
template <class Device>
core::ExecContext exec_context(tfw::OpKernelContext* ctx) {
  core::ExecContext e;
  if constexpr (Device::kGpu) {
    e.backend = core::Backend::kGpu;
    e.gpu = gpu_context(ctx);
  } else {
    e.cpu = cpu_context(ctx);
  }
  return e;
}

// A tensor's shape for the core's argument checks (core/attention_checks.h).
inline core::Dims dims_of(const tfw::Tensor& t) {
  return core::Dims::from(t.dims(), [&](int i) { return t.dim_size(i); });
}

inline absl::Status to_tf_status(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk: return absl::OkStatus();
    case StatusCode::kInvalidArgument: return absl::InvalidArgumentError(s.message());
    case StatusCode::kUnavailable: return absl::UnavailableError(s.message());
    case StatusCode::kResourceExhausted: return absl::ResourceExhaustedError(s.message());
    case StatusCode::kInternal: break;
  }
  return absl::InternalError(s.message());
}

// An InvalidArgument error whose message concatenates `args` (absl::StrCat).
template <typename... Args>
absl::Status invalid_argument(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

inline const void* ptr(const tfw::Tensor& t) { return t.NumElements() ? t.data() : nullptr; }
inline void* mutable_ptr(tfw::Tensor* t) { return t->NumElements() ? t->data() : nullptr; }

// Statistics (layer-norm mean/rstd, attention lse) are float32, float64 for
// float64 inputs; `what` names them in the error.
inline absl::Status check_stats_dtype(const char* what, tfw::DataType t, tfw::DataType s) {
  if (s != stats_tf_dtype(t)) {
    return invalid_argument(what, " dtype S must be ", tfw::DataTypeString(stats_tf_dtype(t)), " for ",
                            tfw::DataTypeString(t), " inputs, got ", tfw::DataTypeString(s));
  }
  return absl::OkStatus();
}

}  // namespace tf
}  // namespace tf_fastattn

#define TFA_OP_REQUIRES_OK(ctx, expr) OP_REQUIRES_OK(ctx, ::tf_fastattn::tf::to_tf_status(expr))
