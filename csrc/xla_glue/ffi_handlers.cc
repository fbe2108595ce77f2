// Typed-FFI handlers of the XLA custom calls (custom_calls.h): they fill the
// core's params from XLA's buffers and call the one core entry point per op
// and direction, on XLA's intra-op thread pool (CPU) or XLA's stream (GPU).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "core/attention_checks.h"
#include "core/dispatch.h"
#include "core/layer_norm_checks.h"
#include "xla_glue/custom_calls.h"
#include "xla/ffi/api/ffi.h"

namespace tf_fastattn {
namespace xla_glue {
namespace {

namespace ffi = ::xla::ffi;

ffi::Error to_error(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk: return ffi::Error::Success();
    case StatusCode::kInvalidArgument: return ffi::Error::InvalidArgument(s.message());
    case StatusCode::kUnavailable: return ffi::Error(ffi::ErrorCode::kUnavailable, s.message());
    case StatusCode::kResourceExhausted: return ffi::Error(ffi::ErrorCode::kResourceExhausted, s.message());
    case StatusCode::kInternal: break;
  }
  return ffi::Error::Internal(s.message());
}

Status to_dtype(ffi::DataType t, const char* name, DType* out) {
  switch (t) {
    case ffi::DataType::F16: *out = DType::kFloat16; return Status::OK();
    case ffi::DataType::BF16: *out = DType::kBFloat16; return Status::OK();
    case ffi::DataType::F32: *out = DType::kFloat32; return Status::OK();
    case ffi::DataType::F64: *out = DType::kFloat64; return Status::OK();
    default: break;
  }
  return Status::Invalid(std::string(name) + " must be float16, bfloat16, float32 or float64 (XLA type " +
                         std::to_string(static_cast<int>(t)) + ")");
}

core::Dims dims_of(const ffi::AnyBuffer& b) {
  const auto d = b.dimensions();
  return core::Dims::from(static_cast<int>(d.size()), [&](int i) { return d[i]; });
}

const void* data(const ffi::AnyBuffer& b) { return b.element_count() ? b.untyped_data() : nullptr; }
void* data(ffi::Result<ffi::AnyBuffer>& b) { return b->element_count() ? b->untyped_data() : nullptr; }

// ---- the CPU: XLA's intra-op thread pool as the core's parallel-for ---------

// Below this much work (the kernels' cost units: about a cycle each) a range
// runs on the calling thread.
constexpr int64_t kMinParallelCost = 1 << 15;

struct ForState {
  std::atomic<int64_t> next{0};
  int64_t finished = 0;
  std::mutex mu;
  std::condition_variable cv;
  FirstException failed;
};

// The range is cut into parts that the calling thread and the pool's workers
// claim one at a time; the caller waits only for parts already being run, so
// it never waits for a task the pool has not started (no deadlock when the
// caller is itself one of the pool's threads and the others are busy).
CpuContext xla_cpu_context(ffi::ThreadPool* pool) {
  const int64_t workers = std::max<int64_t>(1, pool->num_threads());
  CpuContext c;
  c.num_threads = static_cast<int>(workers);
  c.parallel_for = [pool, workers](int64_t total, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
    if (total <= 0) return;
    const int64_t parts =
        workers == 1 || total * std::max<int64_t>(cost, 1) < kMinParallelCost ? 1 : std::min(total, 4 * workers);
    if (parts == 1) {
      fn(0, total);
      return;
    }
    auto state = std::make_shared<ForState>();
    // A task that starts after every part is claimed returns without touching
    // fn (which lives only until the caller returns).
    auto work = [state, parts, total, &fn]() {
      for (;;) {
        const int64_t i = state->next.fetch_add(1);
        if (i >= parts) return;
        state->failed.run([&] { fn(total * i / parts, total * (i + 1) / parts); });
        std::lock_guard<std::mutex> lock(state->mu);
        if (++state->finished == parts) state->cv.notify_all();
      }
    };
    for (int64_t i = 0; i < std::min(parts, workers) - 1; ++i) pool->Schedule(decltype(work)(work));
    work();
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->finished == parts; });
    state->failed.rethrow();
  };
  return c;
}

// ---- attention --------------------------------------------------------------

struct AttentionAttrs {
  bool is_causal, has_mask, has_seed, has_offset;
  int64_t window_left, window_right;
  double scale, dropout_rate, logits_soft_cap;
};

// q, k, v, [mask], [seed], [query_offset] of `args` into the shared params;
// *next is the index of the first operand after them.
Status attention_common(const ffi::RemainingArgs& args, const AttentionAttrs& a, const core::ExecContext& exec,
                        AttentionParams* p, size_t* next) {
  const size_t needed = 3 + a.has_mask + a.has_seed + a.has_offset;
  if (args.size() < needed) return Status::Internal("attention custom call: too few operands");
  const ffi::AnyBuffer q = *args.get<ffi::AnyBuffer>(0);
  const ffi::AnyBuffer k = *args.get<ffi::AnyBuffer>(1);
  const ffi::AnyBuffer v = *args.get<ffi::AnyBuffer>(2);
  TFA_RETURN_IF_ERROR(core::attention_shape(dims_of(q), dims_of(k), dims_of(v), &p->shape));
  TFA_RETURN_IF_ERROR(to_dtype(q.element_type(), "query", &p->dtype));
  p->q = data(q);
  p->k = data(k);
  p->v = data(v);
  size_t i = 3;
  if (a.has_mask) {
    const ffi::AnyBuffer mask = *args.get<ffi::AnyBuffer>(i++);
    TFA_RETURN_IF_ERROR(core::dense_mask_strides(dims_of(mask), p->shape, &p->mask_strides));
    p->mask = static_cast<const bool*>(data(mask));
  }
  if (a.has_seed) {
    const ffi::AnyBuffer seed = *args.get<ffi::AnyBuffer>(i++);
    if (seed.element_count() != 1) return Status::Invalid("seed must be a scalar int64");
    if (exec.backend == core::Backend::kGpu) {
      // An XLA value in device memory: the kernels read it there.
      p->seed_device = static_cast<const uint64_t*>(seed.untyped_data());
    } else {
      p->seed = *static_cast<const uint64_t*>(seed.untyped_data());
    }
  }
  if (a.has_offset) {
    const ffi::AnyBuffer offset = *args.get<ffi::AnyBuffer>(i++);
    if (offset.element_count() != 1 || offset.element_type() != ffi::DataType::S32) {
      return Status::Invalid("query_offset must be a scalar int32");
    }
    if (exec.backend == core::Backend::kGpu) {
      p->query_offset_device = static_cast<const int32_t*>(offset.untyped_data());  // read by the kernels
    } else {
      p->query_offset = *static_cast<const int32_t*>(offset.untyped_data());
    }
  }
  p->scale = a.scale;
  p->is_causal = a.is_causal;
  p->window_left = a.window_left;
  p->window_right = a.window_right;
  p->logits_soft_cap = a.logits_soft_cap;
  p->dropout_rate = a.dropout_rate;
  *next = i;
  return Status::OK();
}

Status attention_fwd(const core::ExecContext& exec, const ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                     const AttentionAttrs& a) {
  AttentionFwdParams p;
  size_t next = 0;
  TFA_RETURN_IF_ERROR(attention_common(args, a, exec, &p, &next));
  if (rets.size() != 2) return Status::Internal("attention custom call: expected 2 results");
  ffi::Result<ffi::AnyBuffer> o = *rets.get<ffi::AnyBuffer>(0);
  ffi::Result<ffi::AnyBuffer> lse = *rets.get<ffi::AnyBuffer>(1);
  p.o = data(o);
  p.lse = data(lse);
  return core::attention_fwd(p, exec);
}

Status attention_bwd(const core::ExecContext& exec, const ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                     const AttentionAttrs& a) {
  AttentionBwdParams p;
  size_t i = 0;
  TFA_RETURN_IF_ERROR(attention_common(args, a, exec, &p, &i));
  if (args.size() != i + 3 || rets.size() != 4) return Status::Internal("attention gradient custom call: bad arity");
  const ffi::AnyBuffer o = *args.get<ffi::AnyBuffer>(i);
  const ffi::AnyBuffer lse = *args.get<ffi::AnyBuffer>(i + 1);
  const ffi::AnyBuffer d_o = *args.get<ffi::AnyBuffer>(i + 2);
  TFA_RETURN_IF_ERROR(core::attention_bwd_inputs(dims_of(o), dims_of(lse), dims_of(d_o), p.shape));
  p.o = data(o);
  p.lse = data(lse);
  p.do_ = data(d_o);
  ffi::Result<ffi::AnyBuffer> dq = *rets.get<ffi::AnyBuffer>(0);
  ffi::Result<ffi::AnyBuffer> dk = *rets.get<ffi::AnyBuffer>(1);
  ffi::Result<ffi::AnyBuffer> dv = *rets.get<ffi::AnyBuffer>(2);
  ffi::Result<ffi::AnyBuffer> ws = *rets.get<ffi::AnyBuffer>(3);
  if (static_cast<int64_t>(ws->size_bytes()) < core::attention_bwd_workspace_bytes(p.shape, p.dtype, exec)) {
    return Status::Internal("attention gradient custom call: workspace too small");
  }
  p.dq = data(dq);
  p.dk = data(dk);
  p.dv = data(dv);
  p.workspace = data(ws);
  return core::attention_bwd(p, exec);
}

// ---- layer norm -------------------------------------------------------------

Status layer_norm_fwd(const core::ExecContext& exec, const ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                      double epsilon, bool has_residual, bool center, bool scale, int64_t norm_kind) {
  const size_t n_args = 3 + has_residual, n_rets = 3 + has_residual;
  if (args.size() != n_args || rets.size() != n_rets) return Status::Internal("layer norm custom call: bad arity");
  const ffi::AnyBuffer x = *args.get<ffi::AnyBuffer>(0);
  const ffi::AnyBuffer gamma = *args.get<ffi::AnyBuffer>(1 + has_residual);
  const ffi::AnyBuffer beta = *args.get<ffi::AnyBuffer>(2 + has_residual);
  const std::optional<ffi::AnyBuffer> residual =
      has_residual ? std::optional<ffi::AnyBuffer>(*args.get<ffi::AnyBuffer>(1)) : std::nullopt;
  const core::Dims residual_dims = residual ? dims_of(*residual) : core::Dims();
  LayerNormFwdParams p;
  TFA_RETURN_IF_ERROR(core::layer_norm_fwd_inputs(dims_of(x), residual ? &residual_dims : nullptr, dims_of(gamma),
                                                  dims_of(beta), center, scale, &p.rows, &p.cols));
  p.residual = residual ? data(*residual) : nullptr;
  TFA_RETURN_IF_ERROR(to_dtype(x.element_type(), "x", &p.dtype));
  TFA_RETURN_IF_ERROR(to_dtype(gamma.element_type(), "gamma", &p.param_dtype));
  p.x = data(x);
  p.gamma = scale ? data(gamma) : nullptr;
  p.beta = center ? data(beta) : nullptr;
  size_t r = 0;
  ffi::Result<ffi::AnyBuffer> y = *rets.get<ffi::AnyBuffer>(r++);
  p.y = data(y);
  if (has_residual) {
    ffi::Result<ffi::AnyBuffer> sum = *rets.get<ffi::AnyBuffer>(r++);
    p.sum = data(sum);
  }
  ffi::Result<ffi::AnyBuffer> mean = *rets.get<ffi::AnyBuffer>(r++);
  ffi::Result<ffi::AnyBuffer> rstd = *rets.get<ffi::AnyBuffer>(r++);
  p.mean = data(mean);
  p.rstd = data(rstd);
  p.epsilon = epsilon;
  p.norm_kind = static_cast<int32_t>(norm_kind);
  return core::layer_norm_fwd(p, exec);
}

Status layer_norm_bwd(const core::ExecContext& exec, const ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                      bool has_dsum, bool center, bool scale, int64_t norm_kind) {
  if (args.size() != 5u + has_dsum || rets.size() != 4) return Status::Internal("layer norm gradient: bad arity");
  const ffi::AnyBuffer dy = *args.get<ffi::AnyBuffer>(0);
  const ffi::AnyBuffer sum = *args.get<ffi::AnyBuffer>(1);
  const ffi::AnyBuffer mean = *args.get<ffi::AnyBuffer>(2);
  const ffi::AnyBuffer rstd = *args.get<ffi::AnyBuffer>(3);
  const ffi::AnyBuffer gamma = *args.get<ffi::AnyBuffer>(4);
  const std::optional<ffi::AnyBuffer> dsum =
      has_dsum ? std::optional<ffi::AnyBuffer>(*args.get<ffi::AnyBuffer>(5)) : std::nullopt;
  const core::Dims dsum_dims = dsum ? dims_of(*dsum) : core::Dims();
  LayerNormBwdParams p;
  TFA_RETURN_IF_ERROR(core::layer_norm_bwd_inputs(dims_of(dy), dims_of(sum), dsum ? &dsum_dims : nullptr,
                                                  dims_of(mean), dims_of(rstd), dims_of(gamma), scale, &p.rows,
                                                  &p.cols));
  TFA_RETURN_IF_ERROR(to_dtype(dy.element_type(), "dy", &p.dtype));
  TFA_RETURN_IF_ERROR(to_dtype(gamma.element_type(), "gamma", &p.param_dtype));
  p.dsum = dsum ? data(*dsum) : nullptr;
  p.dy = data(dy);
  p.sum = data(sum);
  p.mean = data(mean);
  p.rstd = data(rstd);
  p.gamma = scale ? data(gamma) : nullptr;
  ffi::Result<ffi::AnyBuffer> dx = *rets.get<ffi::AnyBuffer>(0);
  ffi::Result<ffi::AnyBuffer> dgamma = *rets.get<ffi::AnyBuffer>(1);
  ffi::Result<ffi::AnyBuffer> dbeta = *rets.get<ffi::AnyBuffer>(2);
  ffi::Result<ffi::AnyBuffer> ws = *rets.get<ffi::AnyBuffer>(3);
  if (static_cast<int64_t>(ws->size_bytes()) < core::layer_norm_bwd_workspace_bytes(p.rows, p.cols, p.dtype, exec)) {
    return Status::Internal("layer norm gradient custom call: workspace too small");
  }
  p.dx = data(dx);
  p.dgamma = scale ? data(dgamma) : nullptr;
  p.dbeta = center ? data(dbeta) : nullptr;
  p.workspace = data(ws);
  p.norm_kind = static_cast<int32_t>(norm_kind);
  return core::layer_norm_bwd(p, exec);
}

// ---- bindings: one per op and direction, on each platform --------------------

template <class Ctx>
auto attention_binding() {
  return ffi::Ffi::Bind()
      .Ctx<Ctx>()
      .RemainingArgs()
      .RemainingRets()
      .template Attr<bool>("is_causal")
      .template Attr<bool>("has_mask")
      .template Attr<bool>("has_seed")
      .template Attr<bool>("has_offset")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right")
      .template Attr<double>("scale")
      .template Attr<double>("dropout_rate")
      .template Attr<double>("logits_soft_cap");
}

template <class Ctx>
auto layer_norm_fwd_binding() {
  return ffi::Ffi::Bind()
      .Ctx<Ctx>()
      .RemainingArgs()
      .RemainingRets()
      .template Attr<double>("epsilon")
      .template Attr<bool>("has_residual")
      .template Attr<bool>("center")
      .template Attr<bool>("scale")
      .template Attr<int64_t>("norm_kind");
}

template <class Ctx>
auto layer_norm_bwd_binding() {
  return ffi::Ffi::Bind()
      .Ctx<Ctx>()
      .RemainingArgs()
      .RemainingRets()
      .template Attr<bool>("has_dsum")
      .template Attr<bool>("center")
      .template Attr<bool>("scale")
      .template Attr<int64_t>("norm_kind");
}

using HostPool = ffi::ThreadPool;
using CudaStream = ffi::PlatformStream<void*>;

// The execution context of each platform's handlers.
core::ExecContext exec_of(HostPool& pool) {
  core::ExecContext e;
  e.cpu = xla_cpu_context(&pool);
  return e;
}
core::ExecContext exec_of(void* stream) {
  core::ExecContext e;
  e.backend = core::Backend::kGpu;
  e.gpu.stream = stream;
  return e;
}

template <class P>
ffi::Error attention_fwd_impl(P platform, ffi::RemainingArgs args, ffi::RemainingRets rets, bool is_causal,
                              bool has_mask, bool has_seed, bool has_offset, int64_t window_left,
                              int64_t window_right, double scale, double dropout_rate, double logits_soft_cap) {
  const AttentionAttrs a{is_causal,    has_mask,    has_seed, has_offset,   window_left,
                         window_right, scale,       dropout_rate, logits_soft_cap};
  return to_error(attention_fwd(exec_of(platform), args, rets, a));
}

template <class P>
ffi::Error attention_bwd_impl(P platform, ffi::RemainingArgs args, ffi::RemainingRets rets, bool is_causal,
                              bool has_mask, bool has_seed, bool has_offset, int64_t window_left,
                              int64_t window_right, double scale, double dropout_rate, double logits_soft_cap) {
  const AttentionAttrs a{is_causal,    has_mask,    has_seed, has_offset,   window_left,
                         window_right, scale,       dropout_rate, logits_soft_cap};
  return to_error(attention_bwd(exec_of(platform), args, rets, a));
}

template <class P>
ffi::Error layer_norm_fwd_impl(P platform, ffi::RemainingArgs args, ffi::RemainingRets rets, double epsilon,
                               bool has_residual, bool center, bool scale, int64_t norm_kind) {
  return to_error(layer_norm_fwd(exec_of(platform), args, rets, epsilon, has_residual, center, scale, norm_kind));
}

template <class P>
ffi::Error layer_norm_bwd_impl(P platform, ffi::RemainingArgs args, ffi::RemainingRets rets, bool has_dsum,
                               bool center, bool scale, int64_t norm_kind) {
  return to_error(layer_norm_bwd(exec_of(platform), args, rets, has_dsum, center, scale, norm_kind));
}

XLA_FFI_DEFINE_HANDLER(kAttentionFwdHost, attention_fwd_impl<HostPool>, attention_binding<HostPool>());
XLA_FFI_DEFINE_HANDLER(kAttentionBwdHost, attention_bwd_impl<HostPool>, attention_binding<HostPool>());
XLA_FFI_DEFINE_HANDLER(kLayerNormFwdHost, layer_norm_fwd_impl<HostPool>, layer_norm_fwd_binding<HostPool>());
XLA_FFI_DEFINE_HANDLER(kLayerNormBwdHost, layer_norm_bwd_impl<HostPool>, layer_norm_bwd_binding<HostPool>());
XLA_FFI_DEFINE_HANDLER(kAttentionFwdCuda, attention_fwd_impl<void*>, attention_binding<CudaStream>());
XLA_FFI_DEFINE_HANDLER(kAttentionBwdCuda, attention_bwd_impl<void*>, attention_binding<CudaStream>());
XLA_FFI_DEFINE_HANDLER(kLayerNormFwdCuda, layer_norm_fwd_impl<void*>, layer_norm_fwd_binding<CudaStream>());
XLA_FFI_DEFINE_HANDLER(kLayerNormBwdCuda, layer_norm_bwd_impl<void*>, layer_norm_bwd_binding<CudaStream>());

std::string error_message(const XLA_FFI_Api* api, XLA_FFI_Error* error) {
  XLA_FFI_Error_GetMessage_Args args;
  args.struct_size = XLA_FFI_Error_GetMessage_Args_STRUCT_SIZE;
  args.extension_start = nullptr;
  args.error = error;
  api->XLA_FFI_Error_GetMessage(&args);
  std::string message = args.message ? args.message : "unknown error";
  XLA_FFI_Error_Destroy_Args destroy;
  destroy.struct_size = XLA_FFI_Error_Destroy_Args_STRUCT_SIZE;
  destroy.extension_start = nullptr;
  destroy.error = error;
  api->XLA_FFI_Error_Destroy(&destroy);
  return message;
}

}  // namespace

std::string register_ffi_handlers(const XLA_FFI_Api* api, const std::string& platform) {
  struct Entry {
    const char* name;
    const char* platform;
    XLA_FFI_Handler* handler;
  };
  const Entry entries[] = {
      {kAttentionFwd, "Host", kAttentionFwdHost}, {kAttentionBwd, "Host", kAttentionBwdHost},
      {kLayerNormFwd, "Host", kLayerNormFwdHost}, {kLayerNormBwd, "Host", kLayerNormBwdHost},
      {kAttentionFwd, "CUDA", kAttentionFwdCuda}, {kAttentionBwd, "CUDA", kAttentionBwdCuda},
      {kLayerNormFwd, "CUDA", kLayerNormFwdCuda}, {kLayerNormBwd, "CUDA", kLayerNormBwdCuda},
  };
  std::string failures;
  for (const Entry& e : entries) {
    if (e.platform != platform) continue;
    if (XLA_FFI_Error* error = ffi::Ffi::RegisterStaticHandler(api, e.name, e.platform, e.handler)) {
      failures += std::string(failures.empty() ? "" : "; ") + e.name + " on " + e.platform + ": " +
                  error_message(api, error);
    }
  }
  return failures;
}

}  // namespace xla_glue
}  // namespace tf_fastattn
