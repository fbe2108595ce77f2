#include "core/dispatch.h"

#include <exception>
#include <new>
#include <string>

namespace tf_fastattn {
namespace core {

namespace {

// seed_device is a GPU address: the CPU kernels take the seed by value.
Status check_cpu_seed(const AttentionParams& p) {
  if (!p.seed_device) return Status::OK();
  return Status::Invalid("seed_device (the device address of the dropout seed) is for the GPU kernels; "
                         "the CPU kernels take the seed itself");
}

// Runs a CPU kernel: out of memory for its scratch buffers (std::bad_alloc,
// from any of its threads: the front ends' parallel_for carries it to this
// thread) is kResourceExhausted naming the kernel; another exception is
// kInternal. Nothing throws past the core.
template <typename F>
Status guarded(const char* kernel, F&& run) {
  try {
    return run();
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted(std::string(kernel) + ": out of memory for the CPU kernel's scratch buffers "
                                     "(about 1-4 MiB per thread)");
  } catch (const std::exception& e) {
    return Status::Internal(std::string(kernel) + ": " + e.what());
  }
}

}  // namespace

// The params' derived fields are filled here, once, for every backend (the
// backends do not finalize() again).
Status attention_fwd(const AttentionFwdParams& p, const ExecContext& ctx) {
  AttentionFwdParams a = p;
  a.finalize();
  if (ctx.backend == Backend::kGpu) return attention_fwd_gpu(a, ctx.gpu);
  TFA_RETURN_IF_ERROR(check_cpu_seed(a));
  return guarded("tf_fastattn attention forward", [&] { return attention_fwd_cpu(a, ctx.cpu); });
}

Status attention_bwd(const AttentionBwdParams& p, const ExecContext& ctx) {
  AttentionBwdParams a = p;
  a.finalize();
  if (ctx.backend == Backend::kGpu) return attention_bwd_gpu(a, ctx.gpu);
  TFA_RETURN_IF_ERROR(check_cpu_seed(a));
  return guarded("tf_fastattn attention backward", [&] { return attention_bwd_cpu(a, ctx.cpu); });
}

int64_t attention_bwd_workspace_bytes(const AttentionShape& shape, DType dtype, const ExecContext& ctx) {
  return ctx.backend == Backend::kGpu ? attention_bwd_workspace_bytes_gpu(shape, dtype)
                                      : tf_fastattn::attention_bwd_workspace_bytes(shape, dtype, ctx.cpu.num_threads);
}

Status layer_norm_fwd(const LayerNormFwdParams& p, const ExecContext& ctx) {
  LayerNormFwdParams a = p;
  a.finalize();
  if (ctx.backend == Backend::kGpu) return layer_norm_fwd_gpu(a, ctx.gpu);
  return guarded("tf_fastattn layer norm forward", [&] { return layer_norm_fwd_cpu(a, ctx.cpu); });
}

Status layer_norm_bwd(const LayerNormBwdParams& p, const ExecContext& ctx) {
  LayerNormBwdParams a = p;
  a.finalize();
  if (ctx.backend == Backend::kGpu) return layer_norm_bwd_gpu(a, ctx.gpu);
  return guarded("tf_fastattn layer norm backward", [&] { return layer_norm_bwd_cpu(a, ctx.cpu); });
}

int64_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols, DType dtype, const ExecContext& ctx) {
  return ctx.backend == Backend::kGpu ? layer_norm_bwd_workspace_bytes_gpu(rows, cols, dtype)
                                      : tf_fastattn::layer_norm_bwd_workspace_bytes(rows, cols, dtype);
}

}  // namespace core
}  // namespace tf_fastattn
